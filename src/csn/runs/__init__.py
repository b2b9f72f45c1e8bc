"""Run directories: the typed training config, atomic I/O, the writer lock, checkpoints and their
manifest, resumable tables, experiment run names, and integrity checks (`csn verify`)."""

from csn.runs.config import TrainConfig, load_config_file, preset
from csn.runs.io import atomic_path, read_table, save_tensors, sha256_file, write_json, write_table, write_text
from csn.runs.lock import lock_holder, main_lock, run_lock
from csn.runs.run import MANIFEST, Checkpoint, Run, read_manifest, select_checkpoints, write_manifest
from csn.runs.table import ResumableTable, TableSpec

__all__ = [
    "TrainConfig", "load_config_file", "preset", "atomic_path", "read_table", "save_tensors", "sha256_file",
    "write_json", "write_table", "write_text", "lock_holder", "main_lock", "run_lock", "MANIFEST", "Checkpoint", "Run",
    "read_manifest", "select_checkpoints", "write_manifest", "ResumableTable", "TableSpec",
]
