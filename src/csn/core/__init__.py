"""What everything else in csn uses, with nothing of csn above it: units, the trace layer, statistics,
BatchNorm re-estimation, schedules, progress bars and resource limits."""
