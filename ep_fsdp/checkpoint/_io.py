"""Checkpoint file I/O at disk speed: CRC32s taken in the same pass as the bytes are written or read.

Save: :class:`Crc32FileSystemWriter` is DCP's ``FileSystemWriter`` whose file streams compute the
CRC32 of the bytes as they are written, so the manifest in ``ep_fsdp.json`` needs no second read of
the files.

Load and export: :class:`MappedFiles` maps each file once (``mmap``, copy-on-write: nothing writes
to the file through it), so every file is read from disk (or the page cache) once.
:class:`MappedFileSystemReader` is the DCP reader that decodes each stored tensor where it lies in
the mapping (:class:`ArchiveDecoder`, instead of ``torch.load``-ing it into a fresh buffer) and
copies it once into its target; for the files it is asked to check, it computes the CRC32 in the
same pass as that copy (:func:`copy_checked`). A CRC32 can also be checked over a mapping before
anything is copied from it (:meth:`MappedFiles.crc_problem`): the mapping is then the staging
buffer that keeps the model untouched until every file has passed (``load(verify_first=True)``,
export).
"""

from __future__ import annotations

import io
import math
import mmap
import os
import stat
import struct
import sys
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from ._format import crc32
from ._safe import CheckpointLoadError, SafeFileSystemReader

__all__ = ["MappedFiles", "MappedFileSystemReader", "Crc32FileSystemWriter", "ArchiveDecoder", "archive_tensor",
           "native_byte_order", "narrow", "copy_into", "copy_checked"]


_ENDS = 64 << 10  # the head and tail of a stored archive, read ahead first (see MappedFiles.view)


def _map(path: Path) -> mmap.mmap | None:
    """``path``'s bytes, mapped copy-on-write (writable views, the file itself is never written);
    ``None`` for an empty file (which ``mmap`` refuses). Only a regular file: opened without
    blocking, so a FIFO or device put in a checkpoint's place is refused instead of waited on."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with open(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointLoadError(f"{path} is not a regular file; refusing to read it.")
        return mmap.mmap(f.fileno(), info.st_size, access=mmap.ACCESS_COPY) if info.st_size else None


def crc_mismatch(name: str, crc: int, expected: int) -> str | None:
    """``None`` when file ``name``'s CRC32 ``crc`` is ``expected``, else the problem in words."""
    return None if crc == expected else f"{name} is corrupted (CRC32 {crc:#010x}, expected {expected:#010x})"


class MappedFiles:
    """The files of one checkpoint directory, each mapped on first use and kept for one load or
    export. A view stays valid while anything refers to it, also after :meth:`close`.

    NOTE: views alias the files: a checkpoint must not be truncated or rewritten in place while it
    is read (``save`` never does; it only ever creates new directories).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._maps: dict[str, mmap.mmap | None] = {}
        self._views: dict[str, memoryview] = {}

    def view(self, name: str, spans: Iterable[tuple[int, int]] = ()) -> memoryview:
        """The bytes of ``root/name`` (relative, as in ``ep_fsdp.json`` and DCP's metadata).

        When it is first mapped, the kernel is asked to read ahead the first and last 64 KiB of
        each ``(start, end)`` span, then the whole file (nearly free when it is in the page cache).
        NOTE: a stored ``torch.save`` archive is decoded from its head and from its zip directory
        at its end before its data is read: from a file not in the page cache, each archive cost a
        synchronous disk read out of order without the first (a load took 1.8x a plain read from
        disk instead of 1.35x). Asking for the whole file in steps as the reader moves did worse
        (2x).
        """
        view = self._views.get(name)
        if view is None:
            m = self._maps[name] = _map(self.root / name)
            view = self._views[name] = memoryview(m) if m is not None else memoryview(bytearray())
            for start, end in spans:
                self._advise(name, start, _ENDS)
                self._advise(name, max(start, end - _ENDS), _ENDS)
            self._advise(name, 0, len(view))
        return view

    def _advise(self, name: str, start: int, length: int) -> None:
        """Ask the kernel to read bytes ``[start, start + length)`` of mapped file ``name`` ahead."""
        m = self._maps.get(name)
        if m is None or not hasattr(mmap, "MADV_WILLNEED") or start >= len(m):
            return
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        m.madvise(mmap.MADV_WILLNEED, aligned, min(len(m), start + length) - aligned)

    def crc_problem(self, name: str, expected: int) -> str | None:
        """``None`` when the CRC32 of ``name`` is ``expected``, else the problem in words."""
        return crc_mismatch(name, crc32(self.view(name)), expected)

    def close(self) -> None:
        """Drop the mappings (unmapped once no tensor refers to them)."""
        self._views.clear()
        self._maps.clear()


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
        info = next((i for i in z.infolist() if i.filename == "byteorder" or i.filename.endswith("/byteorder")), None)
    order = bytes(_stored_record(archive, info)).decode("ascii", "replace") if info is not None else "little"
    return order == sys.byteorder


def _stored_record(archive: memoryview, info: zipfile.ZipInfo) -> memoryview:
    """The bytes of an uncompressed zip record, located through its local header.

    NOTE: read raw, not with ``ZipFile.read``: ``save`` writes without torch's zip CRC32s (torch
    never checks them; our own CRC32 covers every byte of the file), which ``ZipFile.read`` rejects.
    """
    start = _record_start(archive, info)
    return archive[start:start + info.file_size]


def _record_start(archive: memoryview, info: zipfile.ZipInfo) -> int:
    """Where the bytes of an uncompressed zip record start (after its local header)."""
    at = info.header_offset
    if info.compress_type != zipfile.ZIP_STORED or bytes(archive[at:at + 4]) != b"PK\x03\x04":
        raise CheckpointLoadError(f"a stored tensor's {info.filename!r} record is not a plain zip record")
    name_len, extra_len = struct.unpack_from("<HH", archive, at + 26)
    return at + 30 + name_len + extra_len


def archive_tensor(archive: memoryview, source: str, in_place: bool = True) -> torch.Tensor:
    """The tensor saved (``torch.save``) in ``archive``, decoded where it lies: a view of the
    archive's bytes, no copy. ``source`` names the file in errors.

    Only the archive's small pickle is read, with ``weights_only=True`` (as DCP does); the data
    record is located through ``torch.load(map_location="meta")`` and viewed with the recorded dtype,
    shape, strides and offset (which ``as_strided`` bounds-checks against the record). With
    ``in_place=False`` (an archive in another byte order) it is ``torch.load``-ed, a copy.
    """
    return _decode(archive, source, in_place)[0]


def _decode(archive: memoryview, source: str, in_place: bool = True) -> tuple[torch.Tensor, _Layout | None]:
    """:func:`archive_tensor`, and the layout it found (``None`` when it made a copy)."""
    try:
        # NOTE: every archive's own byte order: torch byte-swaps a storage of another order as it
        # loads it, which on the meta device kills the process (torch 2.13)
        if not in_place or not native_byte_order(archive):
            return _only_tensor(torch.load(_Window(archive), map_location="cpu", weights_only=True), source), None
        meta = _only_tensor(torch.load(_Window(archive), map_location="meta", weights_only=True), source)
        storage = meta.untyped_storage()
        start = getattr(storage, "_checkpoint_offset", None)
        if start is None:  # a torch that does not record where the data lies: decode with a copy
            return _decode(archive, source, in_place=False)
        layout = _Layout(start, storage.nbytes(), meta.dtype, tuple(meta.shape), meta.stride(), meta.storage_offset())
        return _view(archive, layout), layout
    except CheckpointLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed archive, whatever torch raises for it
        raise CheckpointLoadError(
            f"{source}: a stored tensor could not be decoded ({type(e).__name__}: {e}); the file is not what DCP "
            "writes (damaged, or written so). Use another checkpoint."
        ) from None


@dataclass(frozen=True)
class _Layout:
    """Where and how a stored tensor lies in its archive (what its pickle and zip directory say)."""

    start: int  # the data record's first byte, from the archive's start
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # storage offset, in elements


def _view(archive: memoryview, layout: _Layout) -> torch.Tensor:
    """The tensor ``layout`` describes, viewing ``archive``'s bytes (``as_strided`` checks bounds).

    NOTE: a tensor whose elements overlap (a stride of 0) could stand for far more bytes than its
    record holds, and a copy of it would allocate them all: a stored tensor may not hold more
    elements than its record has room for (DCP stores dense chunks)."""
    numel = math.prod(layout.shape)
    if numel * layout.dtype.itemsize > layout.nbytes:
        raise CheckpointLoadError(
            f"a stored tensor declares {tuple(layout.shape)} {layout.dtype} over a record of {layout.nbytes} bytes "
            "(overlapping strides); the file is not what DCP writes. Use another checkpoint."
        )
    raw = (torch.frombuffer(archive, dtype=torch.uint8, offset=layout.start, count=layout.nbytes) if layout.nbytes
           else torch.empty(0, dtype=torch.uint8))
    return raw.view(layout.dtype).as_strided(layout.shape, layout.stride, layout.offset)


class ArchiveDecoder:
    """:func:`archive_tensor` for the many archives of one load or export, each distinct pickle
    decoded once.

    NOTE: ``torch.load`` of an archive's pickle takes ~110 us; a model's tensors come in few
    shapes, so archives whose pickle bytes are identical (same dtype, shape, strides, record) reuse
    the layout ``torch.load(weights_only=True)`` found for the first of them; their data record is
    then found through the zip directory (~35 us). Nothing is unpickled that was not first decoded
    by ``torch.load`` in exactly these bytes, and ``as_strided`` still bounds-checks the view.
    """

    def __init__(self) -> None:
        # (pickle record's name, its bytes) -> (data record's name, layout)
        self._layouts: dict[tuple[str, bytes], tuple[str, _Layout]] = {}

    def __call__(self, archive: memoryview, source: str, in_place: bool = True) -> torch.Tensor:
        if not in_place:
            return archive_tensor(archive, source, in_place=False)
        try:
            records = _records(archive)
            key = next((name, bytes(data)) for name, (_, data) in records.items() if name.endswith("data.pkl"))
        except (zipfile.BadZipFile, CheckpointLoadError, StopIteration, ValueError, struct.error):
            return archive_tensor(archive, source)  # torch's decoder says what is wrong with it
        known = self._layouts.get(key)
        if known is not None and known[0] in records:
            name, layout = known
            start, data = records[name]
            if len(data) == layout.nbytes:
                return _view(archive, replace(layout, start=start))
        tensor, layout = _decode(archive, source)
        name = next((n for n, (start, _) in records.items() if layout is not None and start == layout.start), None)
        if name is not None:
            self._layouts[key] = (name, layout)
        return tensor


def _records(archive: memoryview) -> dict[str, tuple[int, memoryview]]:
    """``{name: (first byte, bytes)}`` of every record of a zip archive of uncompressed records."""
    with zipfile.ZipFile(_Window(archive)) as z:
        infos = z.infolist()
    out = {}
    for info in infos:
        start = _record_start(archive, info)
        out[info.filename] = (start, archive[start:start + info.file_size])
    return out


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


def _bytes(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a uint8 array (no copy)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


# NOTE: CRC32 then copy of 256 KiB at a time: the copy reads what the CRC just brought into the
# cache. Measured (two processes, 0.5 GB each): copy alone 29 ms, with the CRC in 256 KiB pieces
# 35 ms (64 KiB: 41, 1 MiB: 41), CRC pass then copy 46 ms.
_PIECE = 256 << 10
# NOTE: a written buffer is CRC'd then written 4 MiB at a time: the kernel's copy reads what the
# CRC just cached, and the write calls stay few (256 KiB pieces made a save ~5% slower, whole
# buffers ~3%, on a disk as fast as the page cache).
_WRITE_PIECE = 4 << 20


def _memcpy_able(target: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether ``target.copy_(source)`` is a plain copy of bytes (dense CPU tensors, one dtype)."""
    return (target.device.type == "cpu" and source.device.type == "cpu" and target.dtype == source.dtype
            and target.is_contiguous() and source.is_contiguous() and not target.is_conj() and not source.is_conj()
            and not target.is_neg() and not source.is_neg() and target.numel() > 0)


def copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)``; a plain ``memcpy`` when both are contiguous CPU tensors of one dtype.

    NOTE: numpy's copy is libc's ``memcpy`` (non-temporal stores for large blocks); ``copy_``'s
    vectorised loop took ~1.5x as long with two processes copying at once, the checkpoint case.
    """
    if _memcpy_able(target, source):
        np.copyto(_bytes(target), _bytes(source))
    else:
        target.copy_(source)


def copy_checked(target: torch.Tensor, source: torch.Tensor, archive: memoryview, crc: int) -> int:
    """Copy ``source`` (a view into ``archive``) into ``target`` and return the CRC32 of ``archive``
    continued from ``crc``, in one pass: each piece of the tensor's bytes is CRC'd, then copied while
    it is still in the cache."""
    raw = np.frombuffer(archive, dtype=np.uint8)
    start = source.data_ptr() - raw.ctypes.data if len(raw) else -1
    end = start + source.numel() * source.element_size()
    if not (_memcpy_able(target, source) and 0 <= start <= end <= len(raw)):
        crc = crc32(archive, crc)  # not one contiguous block of the archive (strided, byte-swapped): two passes
        copy_into(target, source)
        return crc
    crc = crc32(archive[:start], crc)
    out = memoryview(_bytes(target))
    for at in range(start, end, _PIECE):
        piece = archive[at:min(at + _PIECE, end)]
        crc = crc32(piece, crc)
        out[at - start:at - start + len(piece)] = piece  # a memcpy
    return crc32(archive[end:], crc)


class MappedFileSystemReader(SafeFileSystemReader):
    """DCP's file reader, reading through :class:`MappedFiles`: each stored tensor is decoded in
    the mapped file and copied once, straight into its target (DCP's own reader ``torch.load``-s
    every tensor into a fresh buffer first, then copies it). ``metadata``, when given, is DCP's
    metadata already read (and checked) by the caller, so ``.metadata`` is not unpickled twice.
    Non-tensor entries go through ``SafeLoadPlanner.load_bytes`` (``weights_only``) as before.

    ``check`` (``{file name: expected CRC32}``) names files whose CRC32 is computed while they are
    read: every byte of them in file order, in the same pass as the copy of what this rank needs
    (also files it needs nothing from). A mismatch is appended to :attr:`problems`, after the
    copies: the caller must share that verdict and raise.
    """

    def __init__(self, path: Path, files: MappedFiles, metadata: Metadata | None = None,
                 check: dict[str, int] | None = None) -> None:
        super().__init__(str(path))
        self._files = files
        self._metadata = metadata
        self._check = dict(check or {})
        self._decode = ArchiveDecoder()
        self.problems: list[str] = []

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
        done: Future[None] = Future()
        done.set_result(None)
        if any(self.storage_data[i.storage_index].transform_descriptors for i in plan.items):
            # NOTE: stream extensions (e.g. compression): DCP's own read, after a separate check
            self.problems += [p for name, crc in self._check.items() if (p := self._files.crc_problem(name, crc))]
            super().read_data(plan, planner)
            return done
        names = sorted(set(per_file) | set(self._check))
        for name in names:  # NOTE: all mapped (and read ahead) first
            self._files.view(name, sorted({self._span(i) for i in per_file.get(name, [])}))
        for name in names:
            items = sorted(per_file.get(name, []), key=self._span)
            crc = self._read_file(name, items, planner, checked=name in self._check)
            if crc is not None and (problem := crc_mismatch(name, crc, self._check[name])):
                self.problems.append(problem)
        return done

    def _span(self, item: ReadItem) -> tuple[int, int]:
        """``(start, end)`` of the stored entry ``item`` reads, in its file."""
        info = self.storage_data[item.storage_index]
        return info.offset, info.offset + info.length

    def _read_file(self, name: str, items: list[ReadItem], planner: LoadPlanner, checked: bool) -> int | None:
        """Copy ``items`` of file ``name`` into their targets, in file order; when ``checked``,
        return the CRC32 of the whole file, taken in the same pass."""
        view, source = self._files.view(name), str(Path(self.path) / name)
        in_place: bool | None = None
        decode = self._decode
        crc, done = (0 if checked else None), 0  # NOTE: bytes [0, done) are in crc
        for item in items:
            start, end = self._span(item)
            if crc is not None and start > done:  # entries this rank needs nothing from
                crc, done = crc32(view[done:start], crc), start
            fresh = crc is not None and start == done  # NOTE: an entry read twice is checked once
            archive = view[start:end]
            if item.type == LoadItemType.BYTE_IO:
                if fresh:
                    crc, done = crc32(archive, crc), end
                planner.load_bytes(item, io.BytesIO(archive))
                continue
            if in_place is None:  # NOTE: one process wrote the file: one byte order for all its tensors
                in_place = native_byte_order(archive)
            tensor = narrow(decode(archive, source, in_place), item.storage_offsets, item.lengths)
            target = planner.resolve_tensor(item).detach()
            if target.size() != tensor.size():
                raise CheckpointLoadError(
                    f"{source}: entry {item.storage_index.fqn!r} holds {tuple(tensor.shape)} where DCP's metadata "
                    f"promises {tuple(target.shape)}; the checkpoint is inconsistent. Use another checkpoint."
                )
            if fresh:
                crc, done = copy_checked(target, tensor, archive, crc), end
            else:
                copy_into(target, tensor)
            planner.commit_tensor(item, target)
        if crc is not None and done < len(view):
            crc = crc32(view[done:], crc)
        return crc


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
        view = memoryview(data).cast("B")
        if self.crc is None:
            return self._raw.write(view)
        for at in range(0, len(view), _WRITE_PIECE):
            # NOTE: CRC then write of one piece at a time: the write copies what the CRC just cached
            piece = view[at:at + _WRITE_PIECE]
            self.crc = crc32(piece, self.crc)
            self._raw.write(piece)
        self.size += len(view)
        return len(view)

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
