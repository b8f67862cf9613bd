"""On-disk format of an ep_fsdp checkpoint: names, the metadata record and its checks.

A checkpoint is a directory::

    PATH/
      .metadata            DCP's index of every tensor shard (written by torch.distributed.checkpoint)
      __R_0.distcp         tensor bytes written by rank R (one file per rank)
      extra/rank_R.pt      what rank R passed as ``extra`` (pickled with torch.save), if anything
      ep_fsdp.json         our metadata; written last: its presence marks the checkpoint complete

It is written as ``.PATH.partial`` next to PATH and renamed to PATH only after every rank finished.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ._safe import relative_name_problem

__all__ = [
    "METADATA_FILE",
    "FORMAT_VERSION",
    "partial_path",
    "extra_path",
    "read_metadata",
    "moe_layer_records",
    "transformers_record",
    "storage_permutations",
    "structure_problem",
    "aside_path",
    "crc32",
    "file_crc32",
    "metadata_crc32",
    "experts_prefix",
    "write_json_atomic",
    "is_complete",
    "INDEX_FILE",
    "read_weight_map",
    "hub_weight_map",
    "state_dict_name",
]

METADATA_FILE = "ep_fsdp.json"
FORMAT_VERSION = 1
INDEX_FILE = "model.safetensors.index.json"  # a hub-format directory's map of tensor names to files


def partial_path(path: Path) -> Path:
    """Where a checkpoint bound for ``path`` is written before it is committed."""
    return path.with_name(f".{path.name}.partial")


def extra_path(path: Path, rank: int) -> Path:
    return path / "extra" / f"rank_{rank:05d}.pt"


def is_complete(path: Path) -> bool:
    return (path / METADATA_FILE).is_file() and (path / ".metadata").is_file()


def read_metadata(path: str | os.PathLike[str], api: str = "load") -> dict[str, Any]:
    """Read ``ep_fsdp.json``; clear errors for a missing, partial or foreign directory."""
    path = Path(path)
    if not path.exists():
        partial = partial_path(path)
        hint = (
            f" A partial save exists at {partial}: that save did not finish; resume from an earlier "
            "checkpoint (ep_fsdp.checkpoint.latest(root))."
            if partial.exists()
            else " Check the path, or find the newest complete one with ep_fsdp.checkpoint.latest(root)."
        )
        raise FileNotFoundError(f"{api}: checkpoint {path} does not exist.{hint}")
    if not path.is_dir():
        raise NotADirectoryError(f"{api}: checkpoint path {path} is a file; pass the checkpoint directory.")
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        has_shards = any(path.glob("*.distcp")) or (path / ".metadata").exists()
        what = (
            "is incomplete: tensor files are there but ep_fsdp.json, written last on commit, is missing "
            "(the save was interrupted)"
            if has_shards
            else "is not an ep_fsdp checkpoint (no ep_fsdp.json)"
        )
        raise ValueError(
            f"{api}: {path} {what}; load an earlier complete checkpoint "
            "(ep_fsdp.checkpoint.latest(root) finds the newest)."
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # (RecursionError: nested too deep)
        raise ValueError(f"{api}: {meta_file} is corrupted ({e}); load an earlier checkpoint.") from None
    if isinstance(meta, dict) and "meta_crc32" in meta and meta["meta_crc32"] != metadata_crc32(meta):
        raise ValueError(
            f"{api}: {meta_file} is corrupted (its content does not match its meta_crc32 "
            f"{meta['meta_crc32']!r}); load an earlier checkpoint."
        )
    if isinstance(meta, dict) and isinstance(meta.get("files"), dict):
        # NOTE: names as written on Windows before they were written with "/" ("extra\\rank_00000.pt")
        meta["files"] = {name.replace("\\", "/"): rec for name, rec in meta["files"].items()}
    problem = _malformed(meta)
    if problem:
        raise ValueError(f"{api}: {meta_file} is malformed ({problem}); load an earlier checkpoint.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{api}: {path} has format_version={meta.get('format_version')!r}, this ep_fsdp reads "
            f"{FORMAT_VERSION}; use the ep_fsdp version that wrote it ({meta.get('versions')})."
        )
    return meta


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format_version": int, "layout": dict, "moe_layers": dict, "params": dict, "files": dict, "versions": dict,
    "has_optimizer": bool, "extra_ranks": list,
}


def _malformed(meta: Any) -> str | None:
    """What is wrong with the structure of an ``ep_fsdp.json`` value, or ``None``."""
    if not isinstance(meta, dict):
        return f"a JSON {type(meta).__name__}, expected an object"
    for key, kind in _REQUIRED.items():
        if not isinstance(meta.get(key), kind):
            return f"{key!r} is {meta.get(key)!r}, expected {getattr(kind, '__name__', kind)}"
    if meta.get("step") is not None and (not isinstance(meta["step"], int) or isinstance(meta["step"], bool)):
        return f"'step' is {meta['step']!r}, expected an int or null"
    for name, rec in meta["files"].items():
        if not isinstance(rec, dict) or not isinstance(rec.get("bytes"), int) or not isinstance(rec.get("crc32"), int):
            return f"files[{name!r}] is {rec!r}, expected {{bytes, crc32}}"
        if (problem := relative_name_problem(name)) is not None:
            return f"files names {problem}"
    for key in ("world_size", "dp_shard", "ep"):
        if not isinstance(meta["layout"].get(key), int):
            return f"layout[{key!r}] is {meta['layout'].get(key)!r}, expected an int"
    for name, rec in meta["params"].items():
        if not isinstance(rec, dict) or not isinstance(rec.get("shape"), list) or not isinstance(rec.get("dtype"), str):
            return f"params[{name!r}] is {rec!r}, expected {{shape, dtype}}"
        if not all(_is_count(d) for d in rec["shape"]):
            return f"params[{name!r}].shape is {rec['shape']!r}, expected a list of ints >= 0"
        if not isinstance(getattr(torch, rec["dtype"], None), torch.dtype):
            return f"params[{name!r}].dtype is {rec['dtype']!r}, expected a torch dtype name"
    for name, rec in meta["moe_layers"].items():
        if not isinstance(rec, dict) or not isinstance(rec.get("config"), dict):
            return f"moe_layers[{name!r}] is {rec!r}, expected a record with a config"
        physical = (rec.get("placement") or {}).get("physical") if isinstance(rec.get("placement"), dict) else None
        E = rec["config"].get("num_experts")
        if physical is not None and (
            not isinstance(physical, list) or not all(_is_count(p) for p in physical)
            or sorted(physical) != list(range(len(physical))) or (_is_count(E) and len(physical) != E)
        ):
            return f"moe_layers[{name!r}].placement.physical is {physical!r}, expected a permutation of range({E})"
        if (problem := _layer_problem(rec, meta["params"])) is not None:
            return f"moe_layers[{name!r}].{problem}"
    if not isinstance(meta.get("created", ""), str):
        return f"'created' is {meta.get('created')!r}, expected a string"
    return None


def _layer_problem(rec: dict[str, Any], params: dict[str, Any]) -> str | None:
    """What is wrong with the fields of one ``moe_layers`` record that loads and tools read."""
    placement = rec.get("placement")
    if placement is not None:
        if not isinstance(placement, dict) or not isinstance(placement.get("physical", []), list):
            return f"placement is {placement!r}, expected {{ep, ranks, physical}}"
        ep, ranks = placement.get("ep"), placement.get("ranks")
        if not (_is_count(ep) and ep >= 1) or not (isinstance(ranks, list) and all(_is_count(r) and r < ep for r in ranks)):
            return f"placement is {placement!r}, expected an ep >= 1 and the ep rank of each expert"
        if len(ranks) % ep or len(ranks) < ep or len(ranks) != len(placement.get("physical") or ranks):
            return f"placement is {placement!r}, expected ranks and physical for each of E experts, E a multiple of ep"
    keys = rec.get("expert_params")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) and k in params for k in keys)):
        return f"expert_params is {keys!r}, expected names of saved tensors"
    physical = placement.get("physical") if isinstance(placement, dict) else None
    if keys and physical and any(params[k]["shape"][:1] != [len(physical)] for k in keys):
        return f"expert_params is {keys!r}, expected tensors with one row per expert ({len(physical)})"
    owners = rec.get("expert_owner")
    if owners is not None and not (isinstance(owners, list) and all(
        isinstance(o, dict) and _is_count(o.get("ep_rank")) and isinstance(o.get("experts"), list)
        and all(_is_count(e) for e in o["experts"]) for o in owners
    )):
        return f"expert_owner is {owners!r}, expected [{{ep_rank, experts}}]"
    if not (rec["config"].get("num_experts") is None or _is_count(rec["config"]["num_experts"])):
        return f"config.num_experts is {rec['config']['num_experts']!r}, expected an int"
    return None


def read_weight_map(index_file: Path, api: str) -> dict[str, str]:
    """``{tensor name: file name}`` from a hub-format ``model.safetensors.index.json``, checked: a
    JSON object with a ``weight_map`` of names to files inside the directory (a name with ``..``
    or an absolute path could load another directory's weights). Raises ``ValueError`` naming the
    index file."""
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{api}: {index_file} is not valid JSON ({e}); rewrite it, or remove it to read "
                         "model.safetensors alone.") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{api}: {index_file} has no 'weight_map' object (tensor name -> file name); "
                         "pass a directory written by save_pretrained or export_safetensors.")
    for key, fname in weight_map.items():
        if (problem := relative_name_problem(fname)) is not None:
            raise ValueError(f"{api}: {index_file} maps {key!r} to {problem}; every file must lie in "
                             f"{index_file.parent}.")
    return weight_map


def hub_weight_map(directory: Path, api: str = "from_pretrained") -> dict[str, str]:
    """``{tensor name: file name}`` of a hub-format directory: its index (checked, see
    :func:`read_weight_map`); else ``model.safetensors`` alone when it exists (what transformers
    reads then); else the tensors of every ``*.safetensors`` file in it, a name in two files being
    an error (which one is meant is not said anywhere)."""
    index_file = directory / INDEX_FILE
    if index_file.is_file():
        return read_weight_map(index_file, api)
    single = directory / "model.safetensors"
    files = [single] if single.is_file() else sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{api}: {directory} has no {INDEX_FILE} and no *.safetensors file; pass a directory written by "
            "save_pretrained (or by ep_fsdp.checkpoint.export_safetensors)."
        )
    out: dict[str, str] = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            for key in h.keys():
                if key in out:
                    raise ValueError(
                        f"{api}: tensor {key!r} is in both {out[key]} and {f.name} in {directory}, which has no "
                        f"{INDEX_FILE} to say which one to read; move the other file out, or write an index."
                    )
                out[key] = f.name
    return out


def experts_prefix(layer_name: str) -> str:
    """The module path of an ``ep_fsdp.MoE`` layer's experts (``"experts"`` for a model that is
    itself the layer, path ``""``)."""
    return f"{layer_name}.experts" if layer_name else "experts"


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def metadata_crc32(meta: dict[str, Any]) -> int:
    """CRC32 of an ``ep_fsdp.json`` record without its ``meta_crc32`` key, over its canonical JSON
    text (sorted keys, no spaces): what :func:`read_metadata` checks when the key is present."""
    # NOTE: over the JSON round trip (what a reader sees): non-string keys become strings there,
    # and may then sort in another order
    body = json.loads(json.dumps({k: v for k, v in meta.items() if k != "meta_crc32"}))
    return crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def aside_path(path: Path, why: str) -> Path:
    """``.NAME.WHY-<time>`` next to ``path``: where an unusable checkpoint is moved (never deleted)."""
    return path.with_name(f".{path.name}.{why}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")


def structure_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable checkpoint, checked cheaply (metadata, file presence and sizes;
    CRCs are checked on load), or ``None``."""
    try:
        meta = read_metadata(path, "latest")
    except (ValueError, OSError) as e:
        return str(e)
    for name, rec in meta["files"].items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != rec["bytes"]:
            return f"{f} has {f.stat().st_size} bytes, {rec['bytes']} were written"
    return None


# Module names that wrappers put in a path and state dicts leave out (torch.compile, the
# activation-checkpoint wrapper, FSDP1): checkpoint records name modules as the state dict does.
_WRAPPER_NAMES = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def state_dict_name(name: str) -> str:
    """A module or parameter path as ``get_model_state_dict`` writes it (wrapper names left out)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


def moe_layer_records(model: torch.nn.Module, ep: int | None = None) -> dict[str, dict[str, Any]]:
    """For every expert-parallel layer: its config and which ep rank holds which logical experts.

    ``ep_fsdp.MoE`` layers record their :class:`~ep_fsdp.MoEConfig`; transformers experts modules
    record ``num_experts`` and their class. Ownership comes from each layer's
    :class:`~ep_fsdp.placement.ExpertPlacement` (``ep`` is the layout's degree, checked against it
    when given). An unparallelized transformers model has no such layer: its experts are plain.
    """
    from ..expert_modules import ExpertParallelExperts, expert_layers

    records = {}
    for name, layer in expert_layers(model):
        name = state_dict_name(name)
        placement = layer.placement
        if ep is not None and placement.ep != ep:
            raise ValueError(
                f"checkpoint: MoE layer '{name}' has a placement over ep={placement.ep}, the layout has ep={ep}; "
                "parallelize the whole model with one parallelize_moe call."
            )
        config = (
            {"num_experts": layer.ep_num_experts, "experts_class": layer._ep_base_class.__name__}
            if isinstance(layer, ExpertParallelExperts) else asdict(layer.config)
        )
        holder, prefix = (layer, name) if isinstance(layer, ExpertParallelExperts) else (layer.experts, experts_prefix(name))
        records[name] = {
            "config": config,
            "expert_params": [f"{prefix}.{p}" if prefix else p for p, _ in holder.named_parameters(recurse=False)],
            "placement": placement.to_dict(),
            "expert_owner": [{"ep_rank": r, "experts": placement.experts_on(r)} for r in range(placement.ep)],
        }
    return records


def storage_permutations(meta: dict[str, Any]) -> dict[str, list[int]]:
    """``{expert tensor key: physical}`` for the layers whose saved placement is not the identity:
    row ``physical[e]`` of the saved tensor holds logical expert ``e`` (``saved[physical]`` is the
    tensor in logical order)."""
    out: dict[str, list[int]] = {}
    for name, rec in meta.get("moe_layers", {}).items():
        physical = (rec.get("placement") or {}).get("physical")
        if physical is None or physical == list(range(len(physical))):
            continue
        keys = rec.get("expert_params") or [f"{experts_prefix(name)}.{w}" for w in ("w1", "w3", "w2")]
        out.update({key: physical for key in keys})
    return out


def transformers_record(model: torch.nn.Module) -> dict[str, Any] | None:
    """The transformers config (and generation config) of a transformers model, as JSON, else
    ``None``. Duck-typed: nothing here imports transformers."""
    config = getattr(model, "config", None)
    if not (hasattr(config, "to_json_string") and hasattr(model, "save_pretrained")):
        return None
    generation = getattr(model, "generation_config", None)
    from ..expert_modules import original_class

    record = {
        "config": json.loads(config.to_json_string(use_diff=False)),
        "generation_config": json.loads(generation.to_json_string(use_diff=True)) if generation is not None else None,
    }
    record["config"]["architectures"] = [original_class(model).__name__]
    return record


try:  # NOTE: ISA-L's CRC32 (same polynomial and values as zlib's) runs at memory speed; zlib's
    # (about 7 GB/s here) would cost more than reading the bytes from the page cache.
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same values, slower
    _crc32 = zlib.crc32


def crc32(data: Any, value: int = 0) -> int:
    """CRC32 of a bytes-like object (zlib's values), continuing from ``value``."""
    return _crc32(data, value)


def file_crc32(path: Path, chunk: int = 1 << 24) -> int:
    """CRC32 of a file's bytes, read in ``chunk``-sized pieces into one reused buffer."""
    crc = 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = crc32(view[:n], crc)
    return crc


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
