"""Hugging Face-style safetensors export of a checkpoint, and a sliced load into a parallelized model.

Key mapping: an MoE layer at module path ``P`` stores ``P.experts.w1 [E, H, D]``,
``P.experts.w3 [E, H, D]`` and ``P.experts.w2 [E, D, H]``; expert ``j`` is exported as
``P.experts.{j}.gate_proj.weight [H, D]``, ``P.experts.{j}.up_proj.weight [H, D]`` and
``P.experts.{j}.down_proj.weight [D, H]``. Every other tensor keeps its name.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..expert_modules import ExpertParallelExperts, expert_layers
from ..moe import moe_layers
from ._dcp import _gather
from ._format import INDEX_FILE, experts_prefix, hub_weight_map, read_metadata, storage_permutations
from ._reader import CheckpointReader

__all__ = ["export_safetensors", "load_safetensors", "expert_key_map", "INDEX_FILE"]

_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_DTYPES = {
    "float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "uint16": "U16", "uint32": "U32", "uint64": "U64",
}


def expert_key_map(layer_names: list[str], num_experts: dict[str, int]) -> dict[str, list[str]]:
    """``{"P.experts.w1": ["P.experts.0.gate_proj.weight", ...], ...}`` for every MoE layer ``P``."""
    out = {}
    for p in layer_names:
        experts = experts_prefix(p)
        for w, proj in _PROJ.items():
            out[f"{experts}.{w}"] = [f"{experts}.{j}.{proj}.weight" for j in range(num_experts[p])]
    return out


def _plan(meta: dict[str, Any], max_shard_bytes: int) -> list[list[tuple[str, list[tuple[str, list[int]]]]]]:
    """Group source tensors into output files: ``[[(source_key, [(out_name, shape)])]]``."""
    layers = meta["moe_layers"]
    experts = expert_key_map(list(layers), {p: r["config"]["num_experts"] for p, r in layers.items()})
    shards: list[list[tuple[str, list[tuple[str, list[int]]]]]] = [[]]
    size = 0
    for key, rec in meta["params"].items():
        shape = rec["shape"]
        nbytes = torch.empty((), dtype=getattr(torch, rec["dtype"])).element_size()
        for d in shape:
            nbytes *= d
        outs = [(name, shape[1:]) for name in experts[key]] if key in experts else [(key, shape)]
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, outs))
        size += nbytes
    return shards


def _read_slabs(reader: CheckpointReader, key: str) -> list[torch.Tensor]:
    """One global tensor, as dimension-0 pieces (views of the mapped checkpoint files when the
    stored chunks are whole rows, see :meth:`CheckpointReader.slabs`)."""
    return reader.slabs(key)


def export_safetensors(
    checkpoint_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Export the model weights of a checkpoint to a Hugging Face-style safetensors directory.

    Runs in one process, with or without a training world. The checkpoint's files are checked
    (sizes, CRC32) and DCP's metadata read once; tensors are then read from the mapped files and
    written one at a time (no copy where the stored chunks are whole rows; else peak memory about
    the largest tensor), into files
    ``model-0000i-of-0000N.safetensors`` of at most ``max_shard_bytes`` (a single larger tensor
    gets its own file) plus ``model.safetensors.index.json``. Values are copied bit for bit and
    every expert of every layer is written (see the module docstring for the names).

    A checkpoint of a transformers model (its config is recorded by :func:`save`) is written in
    hub format instead: the keys ``save_pretrained`` would write (per-expert keys, the family's
    legacy names), ``config.json`` and ``generation_config.json``, one decoder layer in memory at
    a time; ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads it. This needs
    the ``hf`` extra.

    The directory is built as ``.NAME.partial`` and renamed when complete; an existing
    ``out_dir`` is never touched.

    Example::

        export_safetensors("runs/x/checkpoints/step_00000100", "runs/x/hf")
    """
    checkpoint_path, out_dir = Path(checkpoint_path), Path(out_dir)
    meta = read_metadata(checkpoint_path, "export_safetensors")
    if out_dir.exists():
        raise FileExistsError(
            f"export_safetensors: {out_dir} already exists; choose a new directory or remove it first."
        )
    unsupported = {key: rec["dtype"] for key, rec in meta["params"].items() if rec["dtype"] not in _DTYPES}
    if unsupported:  # NOTE: refused before anything is written, also for a transformers model
        raise ValueError(
            f"export_safetensors: safetensors has no dtype for {len(unsupported)} tensors, e.g. "
            f"{dict(list(unsupported.items())[:4])}; it stores {sorted(_DTYPES)}. Save those tensors in one "
            "of these dtypes, or read the checkpoint with ep_fsdp.checkpoint.load."
        )
    # NOTE: one reader for the whole export: DCP's metadata is unpickled once and every file's
    # CRC32 checked once, over the mappings the tensors are then read from
    with CheckpointReader(checkpoint_path, meta, "export_safetensors") as reader:
        if meta.get("transformers"):  # a transformers model: hub keys, config.json (needs the hf extra)
            from ..hf._export import export_hub

            return export_hub(checkpoint_path, out_dir, meta, max_shard_bytes, reader=reader)
        return _export(reader, out_dir, meta, max_shard_bytes)


def _export(reader: CheckpointReader, out_dir: Path, meta: dict[str, Any], max_shard_bytes: int) -> Path:
    """Write ``out_dir`` (via ``.NAME.partial``): the safetensors files of :func:`_plan` and the index."""
    plan = _plan(meta, max_shard_bytes)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total = 0
    try:
        for i, shard in enumerate(plan):
            fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
            total += _write_file(tmp / fname, shard, reader, meta)
            for _, outs in shard:
                weight_map.update({name: fname for name, _ in outs})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed export leaves nothing behind
        raise
    index = {
        "metadata": {
            "total_size": total,
            "ep_fsdp_step": meta["step"],
            "ep_fsdp_source": str(reader.path),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
    os.rename(tmp, out_dir)
    return out_dir


def _write_file(
    path: Path, shard: list[tuple[str, list[tuple[str, list[int]]]]], reader: CheckpointReader, meta: dict[str, Any]
) -> int:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, outs in shard:
        rec = meta["params"][key]
        itemsize = torch.empty((), dtype=getattr(torch, rec["dtype"])).element_size()
        for name, shape in outs:
            n = itemsize
            for d in shape:
                n *= d
            header[name] = {"dtype": _DTYPES[rec["dtype"]], "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        rows = storage_permutations(meta)
        for key, _ in shard:
            # NOTE: one tensor at a time, dropped before the next one is read. Experts are written
            # in logical order, whatever the placement they were saved with. The bytes of the
            # per-expert pieces, one after the other, are the tensor's own: the split is in the header.
            _write_tensor(f, _read_slabs(reader, key), rows.get(key))
        f.flush()
        os.fsync(f.fileno())
    return offset


def _write_tensor(f: Any, slabs: list[torch.Tensor], physical: list[int] | None) -> None:
    """Write the bytes of the tensor made of ``slabs`` (concatenated along dimension 0); with
    ``physical``, its rows in logical order: ``tensor[physical[0]]``, ``tensor[physical[1]]``, ..."""
    if physical is None:
        pieces = slabs
    else:
        rows = [row for slab in slabs for row in slab.unbind(0)]
        pieces = [rows[p] for p in physical]
    for piece in pieces:
        # NOTE: written straight from the mapped checkpoint bytes (a uint8 view, no copy)
        f.write(piece.contiguous().reshape(-1).view(torch.uint8).numpy())


def load_safetensors(model: nn.Module, directory: str | os.PathLike[str], *, allow_cast: bool = False) -> None:
    """Load a safetensors directory (as written by :func:`export_safetensors`) into ``model``.

    A transformers model reads hub-format directories (``save_pretrained``'s or an export's)
    through its conversion mapping, see :func:`ep_fsdp.hf.load_hub_weights`.

    Works on a parallelized model (any layout) and on a plain one. Each rank reads only the
    slices it holds (``safe_open(...).get_slice``): the rows of its FSDP shard of dense tensors
    and, for experts, only experts of its own ep block, so no rank materialises foreign experts.
    All or nothing: every name, shape and dtype is checked against the file headers before the
    first write, and under several ranks the verdict is shared (every rank raises, or every rank
    loads). A dtype that differs is an error unless ``allow_cast=True``. Raises ``ValueError``
    listing the differences; the model is then untouched.
    """
    directory = Path(directory)
    if hasattr(model, "save_pretrained") and hasattr(getattr(model, "config", None), "to_json_string"):
        from ..hf import load_hub_weights  # a transformers model: hub keys through its conversion mapping

        load_hub_weights(model, directory, api="load_safetensors", allow_cast=allow_cast, strict=True)
        return
    weight_map = hub_weight_map(directory, "load_safetensors")
    layers = moe_layers(model)
    experts = expert_key_map([n for n, _ in layers], {n: m.config.num_experts for n, m in layers})
    # storage row p of a layer's expert tensors holds logical expert logical_of[p] (its placement)
    for n, m in layers:
        if not m.placement.is_contiguous():
            logical_of = m.placement.logical_rows()
            for w in ("w1", "w3", "w2"):
                key = f"{experts_prefix(n)}.{w}"
                experts[key] = [experts[key][e] for e in logical_of]
    # an experts module of the transformers contract (in a model that is not a transformers
    # model) stores [E, ...] tensors whole: its storage rows are read from their logical rows
    rows_of: dict[str, list[int]] = {}
    for n, m in expert_layers(model):
        if isinstance(m, ExpertParallelExperts) and not m.placement.is_contiguous():
            logical_of = m.placement.logical_rows()
            rows_of.update({f"{n}.{p}" if n else p: logical_of for p, _ in m.named_parameters(recurse=False)})
    state = model.state_dict()
    expected = [name for key in state for name in experts.get(key, [key])]
    missing = sorted(set(expected) - set(weight_map))
    unexpected = sorted(set(weight_map) - set(expected))
    handles: dict[str, Any] = {}
    try:
        def slice_of(name: str) -> Any:
            fname = weight_map[name]
            if fname not in handles:
                handles[fname] = safe_open(directory / fname, framework="pt")
            return handles[fname].get_slice(name)

        problems: list[str] = []
        if missing or unexpected:
            problems.append(f"{len(missing)} tensors missing (e.g. {missing[:4]}), {len(unexpected)} unexpected "
                            f"(e.g. {unexpected[:4]})")
        else:
            problems += _header_problems(state, experts, slice_of, allow_cast)
        # NOTE: every name, shape and dtype is checked (from the file headers) before the first
        # write, and every rank takes the same verdict: all raise, or all load.
        verdicts = _gather(problems)
        problems = sorted({p for rank_problems in verdicts for p in rank_problems})
        if problems:
            raise ValueError(
                f"load_safetensors: {directory} does not match the model, nothing was loaded: "
                + "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else "")
                + ". Export from a checkpoint of this model"
                + ("" if allow_cast else ", or pass allow_cast=True to convert dtypes") + "."
            )
        with torch.no_grad():
            for key, value in state.items():
                _load_one(key, value, experts.get(key), slice_of, rows_of.get(key))
    finally:
        handles.clear()


def _header_problems(state: dict[str, Any], experts: dict[str, list[str]], slice_of: Any,
                     allow_cast: bool) -> list[str]:
    """Shape and dtype differences between the files' headers and the model, one line each."""
    problems = []
    for key, value in state.items():
        want_shape = tuple(value.shape[1:]) if key in experts else tuple(value.shape)
        want_dtype = _DTYPES.get(str(value.dtype).removeprefix("torch."))
        for name in experts.get(key, [key]):
            sl = slice_of(name)
            if tuple(sl.get_shape()) != want_shape:
                problems.append(f"{name} has shape {tuple(sl.get_shape())} in the files, the model expects {want_shape}")
            elif not allow_cast and sl.get_dtype() != want_dtype:
                problems.append(f"{name} is {sl.get_dtype()} in the files, the model holds {want_dtype}")
    return problems


def _load_one(key: str, value: torch.Tensor, expert_names: list[str] | None, slice_of: Any,
              rows: list[int] | None = None) -> None:
    """Copy this rank's part of ``key`` from the files; ``expert_names``: one file tensor per expert;
    ``rows``: storage row ``p`` of a whole ``[E, ...]`` file tensor is its row ``rows[p]``."""
    if isinstance(value, DTensor):
        local = value.to_local()
        shape, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
    else:
        local, shape, offset = value, tuple(value.shape), (0,) * value.dim()
    global_shape = tuple(value.shape)
    if expert_names is None:
        sl = slice_of(key)
        if tuple(sl.get_shape()) != global_shape:
            raise ValueError(
                f"load_safetensors: {key} has shape {tuple(sl.get_shape())} in the files, model expects "
                f"{global_shape}; export from a checkpoint of this model."
            )
        index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
        if rows is not None:  # one row at a time, from where its expert lies in the file
            rest = index[1:]
            for at, p in enumerate(range(offset[0], offset[0] + shape[0])):
                local[at].copy_(sl[(slice(rows[p], rows[p] + 1), *rest)][0])
            return
        local.copy_(sl[index] if index else sl[...])  # a 0-dim tensor: no index (sl[:] refuses it)
        return
    rows = []
    for j in range(offset[0], offset[0] + shape[0]):  # only experts held here
        sl = slice_of(expert_names[j])
        if tuple(sl.get_shape()) != global_shape[1:]:
            raise ValueError(
                f"load_safetensors: {expert_names[j]} has shape {tuple(sl.get_shape())} in the files, "
                f"model expects {global_shape[1:]}; export from a checkpoint of this model."
            )
        rows.append(sl[offset[1]:offset[1] + shape[1], offset[2]:offset[2] + shape[2]])
    if rows:
        local.copy_(torch.stack(rows))
