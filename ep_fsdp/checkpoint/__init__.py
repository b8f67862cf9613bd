"""Distributed checkpoints that keep expert assignments, reshard on load and speak safetensors.

See ``docs/checkpoint.md`` for the on-disk format.
"""

from ._dcp import PendingSave, latest, list_checkpoints, load, save
from ._format import read_metadata
from ._safe import CheckpointCorruptError, CheckpointLoadError, CheckpointMismatchError, UnsafeCheckpointError
from ._safetensors import export_safetensors, load_safetensors

__all__ = [
    "save",
    "load",
    "latest",
    "list_checkpoints",
    "read_metadata",
    "PendingSave",
    "export_safetensors",
    "load_safetensors",
    "UnsafeCheckpointError",
    "CheckpointLoadError",
    "CheckpointCorruptError",
    "CheckpointMismatchError",
]
