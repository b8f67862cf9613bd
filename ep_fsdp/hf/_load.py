"""Fill a (parallelized) transformers model from a hub-format directory, reading only this rank's slices.

Hub files hold tensors under the names ``save_pretrained`` writes; transformers' own conversion
mapping (``get_model_conversion_mapping``) says how they become the model's parameters: renamings,
and converters such as "stack ``experts.{j}.gate_proj.weight`` over ``j``, then concatenate with
``up_proj`` along dim 1" (``MergeModulelist(dim=0)`` + ``Concatenate(dim=1)``). Both are applied
here as *index arithmetic*: for the box of the global tensor this rank holds (its FSDP and ep
shard), only the intersecting rows of the intersecting source tensors are read
(``safe_open(...).get_slice``). A converter made of other operations is applied by transformers
itself on the full source tensors of that one parameter, then sliced (correct, not memory-lean).
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..checkpoint._format import hub_weight_map
from ..expert_modules import original_class

__all__ = ["load_hub_weights", "LoadStats"]



@dataclass
class LoadStats:
    """What one rank read: ``bytes_read`` from the files, ``local_bytes`` it holds, ``full_bytes``
    of the whole model, and which parameters needed a full read (``full_reads``)."""

    bytes_read: int = 0
    local_bytes: int = 0
    full_bytes: int = 0
    full_reads: list[str] = field(default_factory=list)


class _Files:
    """Open safetensors handles, one per file, and a byte counter."""

    def __init__(self, directory: Path, weight_map: dict[str, str], stats: LoadStats) -> None:
        self.directory, self.weight_map, self.stats = directory, weight_map, stats
        self.handles: dict[str, Any] = {}

    def slice(self, key: str) -> Any:
        fname = self.weight_map[key]
        if fname not in self.handles:
            self.handles[fname] = safe_open(self.directory / fname, framework="pt")
        try:
            return self.handles[fname].get_slice(key)
        except Exception as e:  # noqa: BLE001 - safetensors' own error names neither the file nor the index
            raise ValueError(
                f"{self.directory / fname} has no tensor {key!r}, though the directory's index maps it there "
                f"({type(e).__name__}: {e}); the index does not match the files: write it again "
                "(save_pretrained or export_safetensors)."
            ) from e

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.slice(key).get_shape())

    def read(self, key: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        sl = self.slice(key)
        t = sl[index] if index else sl[...]  # index None: the whole tensor, also 0-dim (sl[:] refuses it)
        self.stats.bytes_read += t.numel() * t.element_size()
        return t


def _local_box(value: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """``(local tensor, local shape, global offset)`` of a (DTensor) parameter on this rank."""
    if isinstance(value, DTensor):
        shape, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        return value.to_local(), tuple(shape), tuple(offset)
    return value, tuple(value.shape), (0,) * value.dim()


def _conversions(model: nn.Module) -> tuple[list[Any], list[Any]]:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def load_hub_weights(model: nn.Module, directory: str | Path, *, api: str = "from_pretrained",
                     allow_cast: bool = True, strict: bool = False) -> LoadStats:
    """Copy the hub-format weights in ``directory`` into ``model`` (plain or parallelized, already
    materialized), each rank reading only the slices it holds.

    Checked on every rank from the file headers, with a shared verdict, before any copy: every
    parameter and persistent buffer is found (tied weights aside); directly mapped tensors have
    the model's shape; each stacked parameter (per-expert tensors stacked, and concatenated, by a
    converter) has every expert, every per-expert tensor of one name has one shape, and for
    stack-and-concatenate converters the stacked shape is the model's; dtypes equal the model's
    unless ``allow_cast`` (the default: hub files are often bf16). A converter of another kind is
    applied by transformers to the full tensors, and its result's shape is checked before it is
    copied. Hub tensors that map to no parameter are an error with ``strict`` (what
    :func:`ep_fsdp.checkpoint.load_safetensors` asks), else a warning (as transformers does:
    hub files may carry tensors a model does not use)."""
    from transformers.core_model_loading import rename_source_key

    directory = Path(directory)
    from ..expert_modules import expert_layers

    moved = [n for n, m in expert_layers(model) if not m.placement.is_contiguous()]
    if moved:
        raise ValueError(
            f"{api}: experts of {moved[:3]} are not in their default placement (after rebalance_experts or a "
            "checkpoint load), and hub files are read by storage row; load hub weights into a freshly "
            "parallelized model (ep_fsdp.hf.from_pretrained does)."
        )
    weight_map = hub_weight_map(directory, api)
    stats = LoadStats()
    files = _Files(directory, weight_map, stats)
    renamings, converters = _conversions(model)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    sources: dict[str, list[tuple[str, str | None]]] = {}  # model key -> [(hub key, converter pattern)]
    for key in weight_map:
        target, pattern = rename_source_key(key, renamings, converters, prefix, state)
        sources.setdefault(target, []).append((key, pattern))
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    unused = sorted(key for target, found in sources.items() if target not in state for key, _ in found
                    if not any(p.search(key) for p in ignored))  # (what transformers itself ignores)
    missing = sorted(k for k in state if k not in sources and k not in tied)
    if missing:
        raise ValueError(
            f"{api}: {directory} lacks {len(missing)} tensors of {original_class(model).__name__}, e.g. {missing[:4]}; "
            "the directory and its config.json do not describe the same model."
        )
    problems = _problems(files, sources, by_pattern, state, allow_cast)
    if unused and strict:
        problems.append(f"{len(unused)} tensors in the files map to no parameter of the model, e.g. {unused[:4]}")
    from ..checkpoint._dcp import _gather

    problems = sorted({p for rank_problems in _gather(problems) for p in rank_problems})
    if problems:
        raise ValueError(
            f"{api}: {directory} does not match {original_class(model).__name__}, nothing was loaded: "
            + "; ".join(problems[:8]) + ". The directory and its config.json do not describe the same model"
            + ("" if allow_cast else ", or pass allow_cast=True to convert dtypes") + "."
        )
    if unused:
        warnings.warn(
            f"{api}: {len(unused)} tensors of {directory} map to no parameter of {original_class(model).__name__} and were "
            f"not loaded, e.g. {unused[:4]}.", stacklevel=2,
        )
    with torch.no_grad():
        for key, value in state.items():
            if key not in sources:
                continue
            local, shape, offset = _local_box(value)
            stats.local_bytes += local.numel() * local.element_size()
            stats.full_bytes += value.numel() * value.element_size()
            found = sources[key]
            if len(found) == 1 and found[0][1] is None:
                _copy_direct(files, found[0][0], key, local, tuple(value.shape), shape, offset, api)
            else:
                ops = by_pattern[found[0][1]].operations if found[0][1] in by_pattern else []
                if not _copy_stacked(files, found, by_pattern, ops, local, tuple(value.shape), shape, offset):
                    stats.full_reads.append(key)
                    full = _convert_full(files, found, by_pattern, key, model)
                    if tuple(full.shape) != tuple(value.shape):
                        raise ValueError(
                            f"{api}: transformers' converter made {key} of shape {tuple(full.shape)} from "
                            f"{[k for k, _ in found][:4]}, the model's is {tuple(value.shape)}; the directory and its "
                            "config.json do not describe the same model."
                        )
                    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
                    local.copy_(full[index])
    files.handles.clear()
    return stats


def _problems(files: _Files, sources: dict[str, list[tuple[str, str | None]]], by_pattern: dict[str, Any],
              state: dict[str, Any], allow_cast: bool) -> list[str]:
    """What would make the copy fail or be wrong, from the file headers alone."""
    from ..checkpoint._safetensors import _DTYPES

    problems = []
    for key, found in sources.items():
        if key not in state:
            continue
        value = state[key]
        if len(found) == 1 and found[0][1] is None:
            src = found[0][0]
            if files.shape(src) != tuple(value.shape):
                problems.append(f"{src} has shape {files.shape(src)}, the model's {key} is {tuple(value.shape)}")
            elif not allow_cast and files.slice(src).get_dtype() != _DTYPES.get(str(value.dtype).removeprefix("torch.")):
                problems.append(f"{src} is {files.slice(src).get_dtype()}, the model's {key} is {value.dtype}")
        elif found[0][1] in by_pattern and _stacks_experts(by_pattern[found[0][1]].operations):
            converter = by_pattern[found[0][1]]
            patterns = list(converter.source_patterns)
            have: dict[str, set[int]] = {p: set() for p in patterns}
            shapes: dict[str, set[tuple[int, ...]]] = {p: set() for p in patterns}
            dtypes: set[str] = set()
            for src, pattern in found:
                if pattern in have:
                    have[pattern].add(_expert_index(pattern, src))
                    shapes[pattern].add(files.shape(src))
                    dtypes.add(files.slice(src).get_dtype())
            want_dtype = _DTYPES.get(str(value.dtype).removeprefix("torch."))
            if not allow_cast and dtypes - {want_dtype}:
                problems.append(f"the per-expert tensors of {key} are {sorted(dtypes)}, the model's {key} is {value.dtype}")
            for pattern, experts in have.items():
                if experts != set(range(value.shape[0])):
                    missing = sorted(set(range(value.shape[0])) - experts)
                    extra = sorted(experts - set(range(value.shape[0])))
                    problems.append(f"{key} has {value.shape[0]} experts; for {pattern!r} the files "
                                    + (f"lack experts {missing[:8]}" if missing else "")
                                    + (" and " if missing and extra else "")
                                    + (f"hold experts beyond them {extra[:8]}" if extra else ""))
                if len(shapes[pattern]) > 1:
                    problems.append(f"the tensors of {pattern!r} have several shapes {sorted(shapes[pattern])[:4]}")
            problems += _stacked_problems(key, tuple(value.shape), converter.operations, patterns,
                                          [next(iter(shapes[p]), None) for p in patterns])
    return problems


def _stacks_experts(ops: list[Any]) -> bool:
    """Whether a converter stacks per-expert tensors (its first operation ``MergeModulelist(dim=0)``,
    its patterns with a ``*`` for the expert); another converter is checked after converting."""
    from transformers.core_model_loading import MergeModulelist

    return bool(ops) and type(ops[0]) is MergeModulelist and ops[0].dim == 0


def _stack_then_cat(ops: list[Any]) -> tuple[bool, int | None]:
    """``(True, cat_dim)`` for a converter that stacks per-expert tensors (``MergeModulelist(dim=0)``)
    and then concatenates its patterns along ``cat_dim`` of the stacked target
    (``Concatenate(dim>=1)``; ``None``: no concatenation); ``(False, None)`` for another kind."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    kinds = [type(op) for op in ops]
    if not _stacks_experts(ops):
        return False, None
    if kinds == [MergeModulelist]:
        return True, None
    if kinds == [MergeModulelist, Concatenate] and ops[1].dim >= 1:
        return True, ops[1].dim
    return False, None


def _stacked_problems(key: str, shape: tuple[int, ...], ops: list[Any], patterns: list[str],
                      subs: list[tuple[int, ...] | None]) -> list[str]:
    """Whether per-expert tensors of shapes ``subs`` (one per source pattern) make ``key``'s
    ``shape`` under a stack (``MergeModulelist(dim=0)``), optionally followed by a concatenation
    (``Concatenate(dim>=1)``); nothing is said of another converter (checked after converting)."""
    known, cat_dim = _stack_then_cat(ops)
    if not known or any(s is None for s in subs) or (cat_dim is None and len(subs) != 1):
        return []
    c = None if cat_dim is None else cat_dim - 1  # the concatenated dim of a per-expert tensor
    want = shape[1:]
    bad = [f"{p!r} is {s}" for p, s in zip(patterns, subs)
           if len(s) != len(want) or any(s[d] != want[d] for d in range(len(want)) if d != c)]
    if c is not None and not bad and sum(s[c] for s in subs) != want[c]:  # type: ignore[index]
        bad = [f"{p!r} is {s}" for p, s in zip(patterns, subs)]
    if not bad:
        return []
    return [f"{key} is {shape} ({shape[0]} experts of {want}), the files' per-expert tensors do not make it: "
            + ", ".join(bad)]


def _copy_direct(files: _Files, src: str, key: str, local: torch.Tensor, global_shape: tuple[int, ...],
                 shape: tuple[int, ...], offset: tuple[int, ...], api: str) -> None:
    if files.shape(src) != global_shape:
        raise ValueError(
            f"{api}: {src} has shape {files.shape(src)} in the files, the model's {key} is {global_shape}; "
            "the directory and its config.json do not describe the same model."
        )
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    local.copy_(files.read(src, index if index else None))


def _expert_index(pattern: str, key: str) -> int:
    """The expert number ``j`` that a converter pattern's ``*`` matches in a hub key."""
    rx = re.escape(pattern).replace(r"\*", r"(\d+)")
    m = re.search(rx, key)
    if m is None:
        raise ValueError(f"hub key {key!r} does not match its converter pattern {pattern!r}")
    return int(m.group(1))


def _copy_stacked(files: _Files, found: list[tuple[str, str | None]], by_pattern: dict[str, Any], ops: list[Any],
                  local: torch.Tensor, global_shape: tuple[int, ...], shape: tuple[int, ...],
                  offset: tuple[int, ...]) -> bool:
    """``target = cat_p(stack_j(src[p][j]), dim=c)``: read only the slices that land in this rank's
    box. Returns False when the converter is another kind (the caller converts in full)."""
    known, cat_dim = _stack_then_cat(ops)
    if not known:
        return False
    patterns = list(by_pattern[found[0][1]].source_patterns)
    per: dict[str, dict[int, str]] = {p: {} for p in patterns}
    for key, pattern in found:
        if pattern not in per:
            return False
        per[pattern][_expert_index(pattern, key)] = key
    if cat_dim is None and len(patterns) != 1:
        return False
    # extent of each pattern along the concatenated dim (of the stacked target)
    starts, start = [], 0
    for p in patterns:
        if not per[p]:
            return False
        sub = files.shape(next(iter(per[p].values())))
        starts.append((start, sub))
        start += sub[cat_dim - 1] if cat_dim is not None else 0
    for j in range(offset[0], offset[0] + shape[0]):  # only the experts of this rank's box
        for (p_start, sub), p in zip(starts, patterns):
            key = per[p].get(j)
            if key is None:
                raise ValueError(f"expert {j} of pattern {p!r} is missing from the files")
            index: list[slice] = []
            dst: list[slice] = [slice(j - offset[0], j - offset[0] + 1)]
            for d in range(1, len(global_shape)):
                lo, hi = offset[d], offset[d] + shape[d]
                if d == cat_dim:
                    lo, hi = max(lo, p_start), min(hi, p_start + sub[d - 1])
                    if lo >= hi:
                        break
                    index.append(slice(lo - p_start, hi - p_start))
                else:
                    index.append(slice(lo, hi))
                dst.append(slice(lo - offset[d], hi - offset[d]))
            else:
                local[tuple(dst)] = files.read(key, tuple(index)).unsqueeze(0)
    return True


def _convert_full(files: _Files, found: list[tuple[str, str | None]], by_pattern: dict[str, Any], target: str,
                  model: nn.Module) -> torch.Tensor:
    """Apply transformers' own converter to the full source tensors of one parameter."""
    converter = copy.deepcopy(by_pattern[found[0][1]])
    for key, pattern in found:
        converter.add_tensor(target, key, pattern, files.read(key))
    out = converter.convert(target, model=model, config=getattr(model, "config", None))
    value = out[target]
    return value[0] if isinstance(value, list) else value
