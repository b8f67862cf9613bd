"""Reading checkpoints without executing code from them.

A checkpoint directory may come from anywhere. Three of its files are pickles, and unpickling runs
whatever callables the file names:

* DCP's ``.metadata`` (``FileSystemReader.read_metadata`` uses ``pickle.load``): read here with
  an unpickler that admits only the types DCP metadata is made of (:data:`METADATA_TYPES`, torch
  dtypes, ``torch.Size``, paths);
* non-tensor entries inside the ``.distcp`` files, e.g. the optimizer's ``param_groups`` (DCP's
  default load planner uses ``torch.load(weights_only=False)``): read with ``weights_only=True``;
* ``extra/rank_R.pt`` (what ``save(extra=...)`` stored): ``torch.load(weights_only=True)``, which
  admits tensors, numbers, strings, ``None`` and lists / tuples / dicts of them: what the recipes
  store (RNG states, data-loader state, expert loads). Other types must be allowed explicitly with
  ``torch.serialization.add_safe_globals`` (a decision to trust them).

Anything else is refused with :class:`UnsafeCheckpointError`, which names the file and the type.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path, PosixPath, PurePosixPath, PureWindowsPath, WindowsPath
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

__all__ = ["UnsafeCheckpointError", "CheckpointLoadError", "CheckpointCorruptError", "SafeFileSystemReader",
           "SafeLoadPlanner", "load_extra", "safe_metadata_load", "METADATA_TYPES"]

METADATA_TYPES: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    }),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "slice"}),
}
_ = (PosixPath, WindowsPath, PurePosixPath, PureWindowsPath)  # the path types the allow-list names


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file holds a type that loading it would have to trust (and could run code)."""


class CheckpointLoadError(RuntimeError):
    """Reading a checkpoint's contents failed (on this rank or another): the checkpoint, not the
    job, is at fault; a caller may fall back to another checkpoint."""


class CheckpointMismatchError(ValueError):
    """An intact checkpoint that does not fit what it is loaded into: saved from a different model
    (tensor names, shapes or MoE structure), or without the optimizer state asked for. Nothing was
    loaded; the checkpoint is not at fault (build the model with its configuration)."""


class CheckpointCorruptError(CheckpointLoadError, ValueError):
    """A checkpoint file is missing, has the wrong size or fails its CRC32 check, on every rank.
    Sizes are checked before anything from the checkpoint reaches the model; CRC32s during the copy
    (so the model may be partly overwritten) unless ``load(..., verify_first=True)``. Also a
    ``ValueError`` (what these checks raised before they became a :class:`CheckpointLoadError`)."""


class _MetadataUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Pure-Python unpickler: its BUILD step can be checked (the C one cannot)."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def _load_build(self) -> None:
        # NOTE: BUILD on an allowed *class* would set attributes on it for the whole process
        if isinstance(self.stack[-2], type):
            raise UnsafeCheckpointError(
                f"{self.source} tries to modify the class {self.stack[-2].__name__}; refusing to load it."
            )
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = _load_build

    def find_class(self, module: str, name: str) -> Any:
        allowed = METADATA_TYPES.get(module, frozenset())
        if name in allowed:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.source} refers to {module}.{name}, which is not a type DCP metadata is made of; refusing to "
            "load it (a crafted checkpoint could run code here). Use checkpoints from a source you trust."
        )


def safe_metadata_load(data: bytes, source: str) -> Metadata:
    """Unpickle DCP metadata bytes, admitting only :data:`METADATA_TYPES` (and torch dtypes)."""
    metadata = _MetadataUnpickler(io.BytesIO(data), source).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{source} does not hold DCP metadata (got {type(metadata).__name__}).")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` goes through :func:`safe_metadata_load`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = safe_metadata_load(f.read(), str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor entries with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"checkpoint entry {read_item.dest_index.fqn!r} holds a type torch.load(weights_only=True) does not "
                f"admit ({_unsupported(e)}); refusing to unpickle it."
            ) from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _unsupported(error: Exception) -> str:
    """The line of torch's weights_only error that names the refused global."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")


def load_extra(path: Path) -> Any:
    """``extra/rank_R.pt`` with ``weights_only=True``; a clear error naming the file and the type."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"load: {path} holds a type that torch.load(weights_only=True) does not admit ({_unsupported(e)}); "
            "refusing to unpickle it. If you wrote that extra yourself and trust it, allow its types with "
            "torch.serialization.add_safe_globals([...]) before loading."
        ) from None
