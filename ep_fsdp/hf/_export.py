"""Export a checkpoint of a transformers model to a hub-format directory that ``from_pretrained`` loads.

The checkpoint stores the model's own parameter names (fused experts ``[E, ...]``) and the
transformers config. The hub keys are what ``save_pretrained`` would write: transformers' own
``revert_weight_conversion`` maps the model's tensors back (per-expert ``experts.{j}.gate_proj.weight``,
legacy names like Mixtral's ``block_sparse_moe.experts.{j}.w1.weight``). It runs one decoder layer at
a time, so the peak memory is about one layer plus one output file, not the model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..checkpoint._format import INDEX_FILE
from ..checkpoint._reader import CheckpointReader
from ._model import build_on_meta

__all__ = ["export_hub"]

_LAYER = re.compile(r"^(.*?\.(?:layers|h|blocks)\.\d+)\.")


def _groups(params: dict[str, Any]) -> Iterator[list[str]]:
    """Checkpoint keys grouped by decoder layer (everything else: one group), in file order."""
    groups: dict[str, list[str]] = {}
    for key in params:
        m = _LAYER.match(key)
        groups.setdefault(m.group(1) if m else "", []).append(key)
    yield from groups.values()


def _read(reader: CheckpointReader, keys: list[str], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The global tensors ``keys`` of the checkpoint (views of its mapped files where one stored
    chunk holds a tensor), experts in logical order."""
    from ..checkpoint._format import storage_permutations

    out = {k: reader.tensor(k) for k in keys}
    for key, physical in storage_permutations(meta).items():  # experts in logical order
        if key in out:
            out[key] = out[key][torch.tensor(physical)]
    return out


def export_hub(checkpoint: Path, out_dir: Path, meta: dict[str, Any], max_shard_bytes: int,
               reader: CheckpointReader | None = None) -> Path:
    """Write ``out_dir`` (via ``.NAME.partial``): safetensors in hub keys, index, ``config.json`` and
    ``generation_config.json`` (when recorded). Reads through ``reader`` (opened on ``checkpoint``
    here when not given: the files are checked and DCP's metadata read once for the whole export)."""
    if reader is None:
        with CheckpointReader(checkpoint, meta, "export_safetensors") as own:
            return export_hub(checkpoint, out_dir, meta, max_shard_bytes, reader=own)

    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        return _write_hub(checkpoint, out_dir, tmp, meta, max_shard_bytes, reader)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed export leaves nothing behind (up to the model's size)
        raise


def _write_hub(checkpoint: Path, out_dir: Path, tmp: Path, meta: dict[str, Any], max_shard_bytes: int,
               reader: CheckpointReader) -> Path:
    """The body of :func:`export_hub`: every file into ``tmp``, renamed to ``out_dir`` when complete."""
    from transformers import AutoConfig
    from transformers.core_model_loading import revert_weight_conversion

    record = meta["transformers"]
    (tmp / "config.json").write_text(json.dumps(record["config"], indent=2, sort_keys=True))
    if record.get("generation_config"):
        (tmp / "generation_config.json").write_text(json.dumps(record["generation_config"], indent=2, sort_keys=True))
    model = build_on_meta(AutoConfig.from_pretrained(tmp), torch.float32)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if record["config"].get("tie_word_embeddings") else set()
    params = {k: v for k, v in meta["params"].items() if k not in tied}

    files: list[tuple[str, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            name = f"part-{len(files):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in pending.items()}, str(tmp / name), metadata={"format": "pt"})
            files.append((name, list(pending)))
            pending, pending_bytes = {}, 0

    total = 0
    for keys in _groups(params):
        hub = revert_weight_conversion(model, _read(reader, keys, meta))
        for name, tensor in hub.items():
            nbytes = tensor.numel() * tensor.element_size()
            if pending and pending_bytes + nbytes > max_shard_bytes:
                flush()
            pending[name] = tensor
            pending_bytes += nbytes
            total += nbytes
    flush()
    weight_map: dict[str, str] = {}
    for i, (name, keys) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.rename(tmp / name, tmp / final)
        weight_map.update({k: final for k in keys})
    index = {
        "metadata": {"total_size": total, "ep_fsdp_step": meta["step"], "ep_fsdp_source": str(checkpoint)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
    os.rename(tmp, out_dir)
    return out_dir
