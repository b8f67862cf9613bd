"""``python -m ep_fsdp.checkpoint info PATH``: what a checkpoint holds, without loading it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from ..config import MoEConfig
from ._format import crc32, read_metadata, structure_problem
from ._safe import safe_metadata_load


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _ranges(ids: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts: list[str] = []
    start = prev = None
    for i in list(ids) + [None]:
        if start is not None and (i is None or i != prev + 1):
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ",".join(parts)


def _non_default_options(config: dict[str, Any]) -> dict[str, Any]:
    """The recorded MoEConfig options other than the four shown first that differ from their
    defaults (e.g. ``expert_bias=True``): what a model must be built with to load the checkpoint."""
    shown = {"num_experts", "top_k", "dim", "hidden_dim", "score_func"}
    defaults = {f.name: f.default for f in dataclasses.fields(MoEConfig) if f.default is not dataclasses.MISSING}
    return {k: v for k, v in config.items() if k not in shown and (k not in defaults or defaults[k] != v)}


def info(path: Path) -> str:
    meta = read_metadata(path, "info")
    problem = structure_problem(path)
    if problem:
        raise ValueError(f"info: {path} is not a usable checkpoint: {problem}")
    dcp_meta = path / ".metadata"
    if dcp_meta.is_file():  # checked with the restricted unpickler: a crafted file is reported, never run
        data = dcp_meta.read_bytes()
        expected, crc = meta["files"].get(".metadata", {}).get("crc32"), crc32(data)
        if expected is not None and crc != expected:  # NOTE: damaged bytes are never unpickled
            raise ValueError(f"info: {dcp_meta} is corrupted (CRC32 {crc:#010x}, expected {expected:#010x})")
        safe_metadata_load(data, str(dcp_meta), meta["files"])
    lay = meta["layout"]
    lines = [
        f"checkpoint   {path}",
        f"step         {meta['step']}",
        f"created      {meta.get('created', 'unknown')}",
        f"saved on     world_size={lay['world_size']} dp_shard={lay['dp_shard']} ep={lay['ep']}"
        + ("" if lay.get("parallelized", True) else " (unparallelized model)"),
        f"versions     ep_fsdp {meta['versions'].get('ep_fsdp', '?')}, torch {meta['versions'].get('torch', '?')}",
        f"optimizer    {'yes' if meta['has_optimizer'] else 'no'}",
        f"extra        ranks {meta['extra_ranks'] or 'none'}",
    ]
    params = meta["params"]
    numel = 0
    for rec in params.values():
        n = 1
        for d in rec["shape"]:
            n *= d
        numel += n
    files = meta["files"]
    lines.append(
        f"model        {len(params)} tensors, {numel:,} values; files {len(files)}, "
        f"{_human(sum(f['bytes'] for f in files.values()))} on disk"
    )
    if meta.get("transformers"):
        hf = meta["transformers"]["config"]
        lines.append(f"transformers {', '.join(hf.get('architectures') or [])} (model_type {hf.get('model_type')}); "
                     "export_safetensors writes hub format")
    for name, rec in meta["moe_layers"].items():
        c = rec["config"]
        if "placement" in rec:  # experts listed one by one
            owners = ", ".join(f"ep{o['ep_rank']}: {_ranges(o['experts'])}" for o in rec.get("expert_owner", []))
        else:  # checkpoints written before placements: [start, end) blocks
            owners = ", ".join(f"ep{o['ep_rank']}: {o['experts'][0]}-{o['experts'][1] - 1}"
                               for o in rec.get("expert_owner", []) if len(o["experts"]) == 2)
        what = (
            f"E={c.get('num_experts')} {c['experts_class']}" if "experts_class" in c  # a transformers experts module
            else f"E={c.get('num_experts')} k={c.get('top_k')} D={c.get('dim')} H={c.get('hidden_dim')} {c.get('score_func')}"
            + "".join(f" {k}={v!r}" for k, v in _non_default_options(c).items())
        )
        ranks = (rec.get("placement") or {}).get("ranks")
        if ranks is not None:
            G = len(ranks) // max(rec["placement"]["ep"], 1)
            off = sum(r != e // G for e, r in enumerate(ranks))
            what += "; default placement" if off == 0 else f"; {off} of {len(ranks)} experts off their default rank"
        lines.append(f"moe layer    {name}: {what}; experts {owners}")
    user = meta.get("user")
    if isinstance(user, dict) and user:  # e.g. the recipes' train_config: the configuration to build the model with
        lines.append("user metadata (save(..., metadata=...)):")
        lines += [f"  {key}: {json.dumps(value, sort_keys=True, default=str)}" for key, value in user.items()]
    elif user is not None:  # any JSON value is allowed
        lines.append(f"user metadata {json.dumps(user, sort_keys=True, default=str)}")
    width = max(len(k) for k in params) if params else 0
    lines.append("tensors:")
    for key, rec in params.items():
        n = torch.empty((), dtype=getattr(torch, rec["dtype"])).element_size()
        for d in rec["shape"]:
            n *= d
        lines.append(f"  {key:<{width}}  {rec['dtype']:<9} {str(rec['shape']):<16} {_human(n):>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ep_fsdp.checkpoint", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print layout, expert owners, configs, versions and sizes").add_argument("path", type=Path)
    args = p.parse_args(argv)
    try:
        print(info(args.path))
    except (OSError, ValueError, pickle.UnpicklingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a record this reader cannot describe: said, not a traceback
        print(f"error: {args.path} cannot be described ({type(e).__name__}: {e}); it is not a checkpoint this "
              "ep_fsdp wrote, or it is damaged.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
