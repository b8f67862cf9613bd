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

import functools
import io
import pickle
from pathlib import Path, PosixPath, PurePosixPath, PureWindowsPath, WindowsPath
from collections.abc import Collection
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

__all__ = ["UnsafeCheckpointError", "CheckpointLoadError", "CheckpointCorruptError", "SafeFileSystemReader",
           "SafeLoadPlanner", "load_extra", "safe_metadata_load", "relative_name_problem", "METADATA_TYPES"]

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
        # NOTE: BUILD sets the state of the object below it. On an object this file did not just
        # make (a class, an enum member, a function such as torch.serialization._get_layout, a
        # dtype) it would change that object for the whole process, even if the file is refused
        # afterwards: only the dataclasses DCP metadata is made of take a state.
        target = self.stack[-2]
        if isinstance(target, type) or type(target) not in _buildable_types():
            raise UnsafeCheckpointError(
                f"{self.source} tries to set the state of {type(target).__name__} {target!r:.80}, which a DCP "
                "metadata file never does; refusing to load it (a crafted checkpoint could change this process)."
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


@functools.cache
def _buildable_types() -> frozenset[type]:
    """The allowed types whose instances a metadata pickle gives a state (BUILD): DCP's dataclasses."""
    import dataclasses
    import importlib

    out = set()
    for module, names in METADATA_TYPES.items():
        for name in names:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and dataclasses.is_dataclass(obj):
                out.add(obj)
    return frozenset(out)


def relative_name_problem(name: object) -> str | None:
    """Why ``name`` is not a file name inside a checkpoint or hub directory (a relative path down
    from it: no ``..``, not absolute, no backslash or NUL), or ``None``."""
    if not isinstance(name, str) or not name:
        return f"{name!r} is not a file name"
    if "\\" in name or "\x00" in name or name.startswith("/") or any(
        part in ("", ".", "..") for part in name.split("/")
    ):
        return f"{name!r} is not a plain relative file name (it could point outside the directory)"
    return None


def safe_metadata_load(data: bytes, source: str, files: Collection[str] | None = None) -> Metadata:
    """Unpickle DCP metadata bytes, admitting only :data:`METADATA_TYPES` (and torch dtypes).

    Every storage file it names must be a relative name inside the checkpoint and, when ``files``
    (the manifest of ``ep_fsdp.json``, whose CRC32s are checked) is given, one of them: bytes read
    from anywhere else would be unchecked.
    """
    metadata = _MetadataUnpickler(io.BytesIO(data), source).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{source} does not hold DCP metadata (got {type(metadata).__name__}).")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        problem = relative_name_problem(name)
        if problem is None and files is not None and name not in files:
            problem = f"{name!r} is not among the checkpoint's files (ep_fsdp.json), so its CRC32 is not known"
        if problem is not None:
            raise UnsafeCheckpointError(
                f"{source} names a storage file outside the checkpoint: {problem}; refusing to read it."
            )
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
