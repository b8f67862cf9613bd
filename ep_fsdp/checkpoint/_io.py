"""Checkpoint file I/O at disk speed: CRC32 taken while writing, one mapped read per file.

Save: :class:`Crc32FileSystemWriter` is DCP's ``FileSystemWriter`` whose file streams compute the
CRC32 of the bytes as they are written, so the manifest in ``ep_fsdp.json`` needs no second read of
the files.

Load and export: :class:`MappedFiles` maps each file once (``mmap``, copy-on-write: nothing writes
to the file through it). The CRC32 check runs over the mapping, and the tensors are then copied
from the same mapped pages into their targets: every file is read from disk (or the page cache)
once, and the mapping is the staging buffer that keeps the model untouched until every file has
passed its check. :class:`MappedFileSystemReader` is the DCP reader that copies from those mappings,
decoding each stored tensor in place (:func:`archive_tensor`) instead of ``torch.load``-ing it into
a fresh buffer.
"""

from __future__ import annotations

import io
import mmap
import os
import sys
import zipfile
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem

from ._format import crc32
from ._safe import CheckpointLoadError, SafeFileSystemReader

__all__ = ["MappedFiles", "MappedFileSystemReader", "Crc32FileSystemWriter", "archive_tensor", "narrow"]


def _map(path: Path) -> memoryview:
    """``path``'s bytes, mapped copy-on-write (writable views, the file itself is never written)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:  # mmap refuses empty files
            return memoryview(bytearray())
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    if hasattr(m, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
        # NOTE: read-ahead of the whole file when it is not cached (the CRC pass then runs at disk
        # speed instead of one fault per page); nearly free when it is.
        m.madvise(mmap.MADV_WILLNEED)
    return memoryview(m)


class MappedFiles:
    """The files of one checkpoint directory, each mapped on first use and kept for one load or
    export. A view stays valid while anything refers to it, also after :meth:`close`.

    NOTE: views alias the files: a checkpoint must not be truncated or rewritten in place while it
    is read (``save`` never does; it only ever creates new directories).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._views: dict[str, memoryview] = {}

    def view(self, name: str) -> memoryview:
        """The bytes of ``root/name`` (relative, as in ``ep_fsdp.json`` and DCP's metadata)."""
        view = self._views.get(name)
        if view is None:
            view = self._views[name] = _map(self.root / name)
        return view

    def crc_problem(self, name: str, expected: int) -> str | None:
        """``None`` when the CRC32 of ``name`` is ``expected``, else the problem in words."""
        crc = crc32(self.view(name))
        return None if crc == expected else f"{name} is corrupted (CRC32 {crc:#010x}, expected {expected:#010x})"

    def close(self) -> None:
        """Drop the mappings (unmapped once no tensor refers to them)."""
        self._views.clear()


class _Window(io.RawIOBase):
    """A read-only, seekable file over a memoryview, without copying it (for ``torch.load``)."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), len(self._view) - self._pos))
        memoryview(buffer).cast("B")[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def native_byte_order(archive: memoryview) -> bool:
    """Whether the tensors in a ``torch.save`` archive are stored in this machine's byte order
    (torch records it; archives without the record are little-endian)."""
    with zipfile.ZipFile(_Window(archive)) as z:
        name = next((n for n in z.namelist() if n == "byteorder" or n.endswith("/byteorder")), None)
        order = z.read(name).decode() if name is not None else "little"
    return order == sys.byteorder


def archive_tensor(archive: memoryview, source: str, in_place: bool = True) -> torch.Tensor:
    """The tensor saved (``torch.save``) in ``archive``, decoded where it lies: a view of the
    archive's bytes, no copy. ``source`` names the file in errors.

    Only the archive's small pickle is read, with ``weights_only=True`` (as DCP does); the data
    record is located through ``torch.load(map_location="meta")`` and viewed with the recorded dtype,
    shape, strides and offset (which ``as_strided`` bounds-checks against the record). With
    ``in_place=False`` (an archive in another byte order) it is ``torch.load``-ed, a copy.
    """
    try:
        if not in_place:
            return _only_tensor(torch.load(_Window(archive), map_location="cpu", weights_only=True), source)
        meta = _only_tensor(torch.load(_Window(archive), map_location="meta", weights_only=True), source)
        storage = meta.untyped_storage()
        start, nbytes = getattr(storage, "_checkpoint_offset", None), storage.nbytes()
        if start is None:  # a torch that does not record where the data lies: decode with a copy
            return archive_tensor(archive, source, in_place=False)
        raw = (torch.frombuffer(archive, dtype=torch.uint8, offset=start, count=nbytes) if nbytes
               else torch.empty(0, dtype=torch.uint8))
        return raw.view(meta.dtype).as_strided(meta.shape, meta.stride(), meta.storage_offset())
    except CheckpointLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed archive, whatever torch raises for it
        raise CheckpointLoadError(
            f"{source}: a stored tensor could not be decoded ({type(e).__name__}: {e}); the file is not what DCP "
            "wrote (its CRC32 matched, so it was written that way). Use another checkpoint."
        ) from None


def _only_tensor(obj: Any, source: str) -> torch.Tensor:
    if not isinstance(obj, torch.Tensor):
        raise CheckpointLoadError(f"{source}: a tensor entry holds a {type(obj).__name__}, not a tensor.")
    return obj


def narrow(tensor: torch.Tensor, offsets: Any, lengths: Any) -> torch.Tensor:
    """``tensor[offsets[d] : offsets[d] + lengths[d]]`` in every dimension ``d`` (a view)."""
    for dim, (start, length) in enumerate(zip(offsets, lengths)):
        if start != 0 or length != tensor.shape[dim]:
            tensor = tensor.narrow(dim, start, length)
    return tensor


class MappedFileSystemReader(SafeFileSystemReader):
    """DCP's file reader, reading through :class:`MappedFiles`: each stored tensor is decoded in
    the mapped file and copied once, straight into its target (DCP's own reader ``torch.load``-s
    every tensor into a fresh buffer first, then copies it). ``metadata``, when given, is DCP's
    metadata already read (and checked) by the caller, so ``.metadata`` is not unpickled twice.
    Non-tensor entries go through ``SafeLoadPlanner.load_bytes`` (``weights_only``) as before.
    """

    def __init__(self, path: Path, files: MappedFiles, metadata: Metadata | None = None) -> None:
        super().__init__(str(path))
        self._files = files
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None or kwargs.get("rank") is not None:
            return super().read_metadata(*args, **kwargs)
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        if any(self.storage_data[i.storage_index].transform_descriptors for i in plan.items):
            return super().read_data(plan, planner)  # NOTE: stream extensions (e.g. compression): DCP's path
        for name, items in per_file.items():
            self._read_file(name, sorted(items, key=lambda i: self.storage_data[i.storage_index].offset), planner)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _read_file(self, name: str, items: list[ReadItem], planner: LoadPlanner) -> None:
        """Copy ``items`` of file ``name`` into their targets, in file order."""
        view, source = self._files.view(name), str(Path(self.path) / name)
        in_place: bool | None = None
        for item in items:
            info = self.storage_data[item.storage_index]
            archive = view[info.offset:info.offset + info.length]
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(archive))
                continue
            if in_place is None:  # NOTE: one process wrote the file: one byte order for all its tensors
                in_place = native_byte_order(archive)
            tensor = narrow(archive_tensor(archive, source, in_place), item.storage_offsets, item.lengths)
            target = planner.resolve_tensor(item).detach()
            if target.size() != tensor.size():
                raise CheckpointLoadError(
                    f"{source}: entry {item.storage_index.fqn!r} holds {tuple(tensor.shape)} where DCP's metadata "
                    f"promises {tuple(target.shape)}; the checkpoint is inconsistent. Use another checkpoint."
                )
            target.copy_(tensor)
            planner.commit_tensor(item, target)


class _Crc32Stream(io.RawIOBase):
    """A binary file being written, whose CRC32 is computed from the bytes as they go by.
    ``crc`` is ``None`` once anything other than sequential writes happened (a seek)."""

    def __init__(self, raw: io.BufferedWriter, name: str, done: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self._raw, self._name, self._done = raw, name, done
        self.crc: int | None = 0
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = self._raw.write(data)
        if self.crc is not None:
            view = memoryview(data).cast("B")
            self.crc = crc32(view[:n], self.crc)
            self.size += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.crc = None  # NOTE: a rewrite would invalidate the running CRC: the file is read back instead
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def fileno(self) -> int:
        return self._raw.fileno()

    def flush(self) -> None:
        if not self._raw.closed:  # NOTE: IOBase.close flushes, after close() closed the raw file
            self._raw.flush()

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
            if self.crc is not None:
                self._done[self._name] = (self.size, self.crc)
        super().close()


class _Crc32FileSystem(FileSystem):
    """DCP's local file system whose shard files (``*.distcp``) are written through
    :class:`_Crc32Stream`."""

    def __init__(self, done: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self._done = done

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[io.IOBase]:
        path = Path(path)
        if mode != "wb" or path.suffix != ".distcp":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with path.open(mode) as raw, _Crc32Stream(raw, path.name, self._done) as stream:
            yield stream


class Crc32FileSystemWriter(FileSystemWriter):
    """DCP's ``FileSystemWriter`` that records ``{file name: (bytes, CRC32)}`` of every shard file
    it writes (:attr:`crcs`), computed while writing: the manifest needs no second read."""

    def __init__(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.crcs: dict[str, tuple[int, int]] = {}
        self.fs = _Crc32FileSystem(self.crcs)
