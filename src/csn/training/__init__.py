"""Training: the one loop (dense checkpoints, exact resume, DDP), the selectivity regularizer, DDP helpers."""
