"""The global model tensors of a checkpoint, read in one process (no process group): for export."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

from ._dcp import _verify_files
from ._io import ArchiveDecoder, MappedFiles, copy_into, native_byte_order
from ._safe import CheckpointLoadError, safe_metadata_load

__all__ = ["CheckpointReader"]


class CheckpointReader:
    """Random access to the global model tensors of a checkpoint, in this process.

    Opening it checks every file's size and CRC32 (over the file's mapping, which the tensors are
    then read from: each file is read once) and unpickles DCP's metadata once, with the restricted
    unpickler of ``_safe.py``. A tensor is then a view of the mapped bytes (no copy) where one
    stored chunk holds it, else assembled from its chunks. Raises
    :class:`~ep_fsdp.checkpoint.CheckpointCorruptError` naming the damaged files, before anything
    is read.

    Example::

        with CheckpointReader(path, read_metadata(path)) as reader:
            wq = reader.tensor("layers.0.attention.wq.weight")
    """

    def __init__(self, path: str | Path, meta: dict[str, Any], api: str = "export_safetensors") -> None:
        self.path = Path(path)
        self.params: dict[str, Any] = meta["params"]
        self.files = MappedFiles(self.path)
        _verify_files(self.path, meta, api, collective=False, files=self.files)
        self.metadata = safe_metadata_load(bytes(self.files.view(".metadata")), str(self.path / ".metadata"),
                                           meta["files"])
        self._in_place: dict[str, bool] = {}
        self._decode = ArchiveDecoder()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Drop the mappings (tensors already returned stay valid)."""
        self.files.close()

    def _storage(self, key: str) -> tuple[str, TensorStorageMetadata]:
        fqn = f"model.{key}"
        md = self.metadata.state_dict_metadata.get(fqn)
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointLoadError(
                f"{self.path}: DCP's metadata has no tensor {fqn!r} although ep_fsdp.json lists it; the checkpoint "
                "is inconsistent. Use another checkpoint."
            )
        rec = self.params.get(key)
        # NOTE: what export writes in a file's header comes from ep_fsdp.json, its bytes from DCP's files
        if rec is not None and (list(md.size) != rec["shape"] or str(md.properties.dtype) != f"torch.{rec['dtype']}"):
            raise CheckpointLoadError(
                f"{self.path}: ep_fsdp.json records {key!r} as {rec['shape']} {rec['dtype']}, DCP's metadata as "
                f"{list(md.size)} {md.properties.dtype}; the checkpoint is inconsistent. Use another checkpoint."
            )
        return fqn, md

    def chunks(self, key: str) -> list[tuple[list[int], torch.Tensor]]:
        """``(offsets, tensor)`` of every stored chunk of model tensor ``key``: views of the mapped
        file bytes, in dimension-0 order."""
        fqn, md = self._storage(key)
        out = [(list(c.offsets), self._chunk(fqn, c, md)) for c in md.chunks]
        return sorted(out, key=lambda c: c[0])

    def _chunk(self, fqn: str, chunk: ChunkStorageMetadata, md: TensorStorageMetadata) -> torch.Tensor:
        info = self.metadata.storage_data[MetadataIndex(fqn, chunk.offsets)]
        source = str(self.path / info.relative_path)
        if info.transform_descriptors:
            raise CheckpointLoadError(
                f"{source}: {fqn!r} is stored through DCP stream extensions {info.transform_descriptors}, which "
                "export does not read; ep_fsdp.checkpoint.save never writes them."
            )
        archive = self.files.view(info.relative_path)[info.offset:info.offset + info.length]
        if info.relative_path not in self._in_place:  # NOTE: one process wrote a file: one byte order
            self._in_place[info.relative_path] = native_byte_order(archive)
        tensor = self._decode(archive, source, self._in_place[info.relative_path])
        if list(tensor.shape) != list(chunk.sizes) or tensor.dtype != md.properties.dtype:
            raise CheckpointLoadError(
                f"{source}: {fqn!r} holds {tuple(tensor.shape)} {tensor.dtype} where DCP's metadata promises "
                f"{tuple(chunk.sizes)} {md.properties.dtype}; the checkpoint is inconsistent. Use another checkpoint."
            )
        return tensor

    def slabs(self, key: str) -> list[torch.Tensor]:
        """Pieces of the global tensor ``key`` whose concatenation along dimension 0 is the tensor:
        the stored chunks themselves (no copy) when each spans whole rows, else the assembled tensor."""
        _, md = self._storage(key)
        chunks = self.chunks(key)
        size = list(md.size)
        if size and _tile_rows(chunks, size):
            return [t for _, t in chunks]
        return [self._assemble(chunks, md)]

    def tensor(self, key: str) -> torch.Tensor:
        """The global tensor ``key``: a view of the mapped bytes when one chunk holds it all, else a
        new tensor assembled from its chunks."""
        _, md = self._storage(key)
        chunks = self.chunks(key)
        if len(chunks) == 1 and list(chunks[0][1].shape) == list(md.size):
            return chunks[0][1]
        return self._assemble(chunks, md)

    def _assemble(self, chunks: list[tuple[list[int], torch.Tensor]], md: TensorStorageMetadata) -> torch.Tensor:
        if sum(t.numel() for _, t in chunks) != math.prod(md.size):
            raise CheckpointLoadError(
                f"{self.path}: the stored chunks of a {tuple(md.size)} tensor do not cover it; the checkpoint is "
                "inconsistent. Use another checkpoint."
            )
        out = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for offsets, t in chunks:
            copy_into(out[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))], t)
        return out


def _tile_rows(chunks: list[tuple[list[int], torch.Tensor]], size: list[int]) -> bool:
    """Whether ``chunks`` (sorted) are whole-row blocks that cover dimension 0 exactly once."""
    row = 0
    for offsets, t in chunks:
        if offsets[0] != row or any(offsets[1:]) or list(t.shape[1:]) != size[1:]:
            return False
        row += t.shape[0]
    return row == size[0]
