"""Load-aware expert placement: plan a balanced placement and move experts (with their optimizer
state) between ep ranks during training.

Legend: E experts of a layer, ep expert-parallel ranks, G = E / ep local slots, dp FSDP degree.

The router keeps logical expert ids; a layer's :class:`~ep_fsdp.placement.ExpertPlacement` says
which storage row (``rank * G + slot``) holds each logical expert. A move permutes the storage rows
of every ``[E, ...]`` expert tensor (weights, and the AdamW moments that have the same layout) and
installs the new placement, so the model computes the same function before and after.

How one tensor moves (``_permute_rows``): its FSDP shards are gathered over ``dp_shard`` into this
rank's ``[G, ...]`` block (what FSDP's own all-gather does every forward), rows travel between the
ranks of the ep group with one ``all_to_all_single`` (sizes known on every rank from the two
placements: no size exchange), and the new block is sliced back to this rank's FSDP shard and
copied in place. Every rank computes the same plan from the same all-reduced load.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard

from .expert_modules import ExpertParallelExperts, expert_layers, layer_num_experts
from .placement import ExpertPlacement

__all__ = ["expert_placement", "rebalance_experts", "plan_placement", "rank_loads", "last_rebalance",
           "install_placement"]

_REPORT_ATTR = "_ep_fsdp_last_rebalance"


def expert_placement(model: nn.Module) -> dict[str, list[int]]:
    """Per expert-parallel layer (by qualified name): the ep rank of each logical expert ``0..E-1``."""
    return {name: layer.placement.ranks() for name, layer in expert_layers(model)}


def rank_loads(placement: ExpertPlacement, load: Sequence[float]) -> list[float]:
    """``[ep]`` summed load of the experts each rank holds."""
    totals = [0.0] * placement.ep
    for e, value in enumerate(load):
        totals[placement.rank_of(e)] += float(value)
    return totals


def _imbalance(placement: ExpertPlacement, load: Sequence[float]) -> float:
    totals = rank_loads(placement, load)
    mean = sum(totals) / len(totals)
    return max(totals) / mean if mean > 0 else 1.0


def plan_placement(load: Sequence[float], current: ExpertPlacement) -> ExpertPlacement:
    """A placement with ``G`` experts per rank whose busiest rank is as close to the mean as whole
    experts allow, moving as few experts as it can; ``current`` if it cannot do better.

    Heaviest-first greedy into the lightest rank with a free slot, then pairwise swaps that lower
    the busiest rank while any does; ranks are matched to the current ones by overlap, and experts
    that stay keep their slot. Deterministic (ties by index), so every rank plans the same.
    """
    E, ep, G = current.num_experts, current.ep, current.experts_per_rank
    load = [float(x) for x in load]
    bins: list[list[int]] = [[] for _ in range(ep)]
    totals = [0.0] * ep
    for e in sorted(range(E), key=lambda e: (-load[e], e)):
        b = min((b for b in range(ep) if len(bins[b]) < G), key=lambda b: (totals[b], b))
        bins[b].append(e)
        totals[b] += load[e]
    for _ in range(E * E):  # swaps that lower the busiest rank
        h = max(range(ep), key=lambda b: (totals[b], -b))
        best = None
        for o in range(ep):
            if o == h:
                continue
            for a in bins[h]:
                for c in bins[o]:
                    delta = load[a] - load[c]
                    if delta <= 0:
                        continue
                    worst = max(totals[h] - delta, totals[o] + delta)
                    if worst < totals[h] - 1e-12 and (best is None or worst < best[0]):
                        best = (worst, o, a, c)
        if best is None:
            break
        _, o, a, c = best
        bins[h][bins[h].index(a)], bins[o][bins[o].index(c)] = c, a
        totals[h], totals[o] = totals[h] - load[a] + load[c], totals[o] + load[a] - load[c]
    # match bins to ranks by overlap with the current placement
    now = [set(current.experts_on(r)) for r in range(ep)]
    pairs = sorted(((len(set(bins[b]) & now[r]), b, r) for b in range(ep) for r in range(ep)),
                   key=lambda t: (-t[0], t[1], t[2]))
    rank_of_bin: dict[int, int] = {}
    for _, b, r in pairs:
        if b not in rank_of_bin and r not in rank_of_bin.values():
            rank_of_bin[b] = r
    physical = [0] * E
    for b, r in rank_of_bin.items():
        stay = [e for e in bins[b] if current.rank_of(e) == r]
        free = sorted(set(range(G)) - {current.slot_of(e) for e in stay})
        for e in stay:
            physical[e] = r * G + current.slot_of(e)
        for e, s in zip(sorted(e for e in bins[b] if current.rank_of(e) != r), free):
            physical[e] = r * G + s
    planned = ExpertPlacement(E, ep, physical)
    if max(rank_loads(planned, load)) >= max(rank_loads(current, load)) - 1e-12:
        return current
    return planned


def _expert_tensors(layer: nn.Module) -> list[nn.Parameter]:
    holder = layer if isinstance(layer, ExpertParallelExperts) else layer.experts
    return list(holder.parameters(recurse=False))


def _permute_rows(t: DTensor, old: ExpertPlacement, new: ExpertPlacement, group: dist.ProcessGroup) -> int:
    """Move the storage rows of an expert DTensor (mesh ``(dp_shard, ep)``) from ``old`` to ``new``
    in place; returns the bytes this rank sent to other ranks."""
    mesh, placements = t.device_mesh, t.placements
    block_spec = (Replicate(), Shard(0))
    block = t.redistribute(mesh, block_spec).to_local()  # [G, ...] this rank's old block
    G, me = old.experts_per_rank, dist.get_rank(group)
    send_rows: list[list[int]] = [[] for _ in range(old.ep)]  # per destination: my old slots, in its slot order
    recv_from: list[int] = []  # per new slot of mine: the source rank
    for dest in range(new.ep):
        for e in new.experts_on(dest):
            src = old.rank_of(e)
            if src == me:
                send_rows[dest].append(old.slot_of(e))
            if dest == me:
                recv_from.append(src)
    send = block[[s for rows in send_rows for s in rows]] if any(send_rows) else block[:0]  # [sum, ...]
    in_splits = [len(rows) for rows in send_rows]
    out_splits = [recv_from.count(src) for src in range(old.ep)]
    recv = block.new_empty((G,) + tuple(block.shape[1:]))
    dist.all_to_all_single(recv, send.contiguous(), out_splits, in_splits, group=group)
    # rows arrive grouped by source rank, each group in my new slot order
    order = sorted(range(G), key=lambda s: (recv_from[s], s))
    new_block = torch.empty_like(recv)
    new_block[order] = recv
    moved = DTensor.from_local(new_block, mesh, block_spec, shape=t.shape, stride=t.stride()).redistribute(mesh, placements)
    t.to_local().copy_(moved.to_local())
    row_bytes = block[0].numel() * block.element_size() if G else 0
    return (sum(in_splits) - in_splits[me]) * row_bytes


def _plain_load(load: Any) -> Any:
    """``load`` as plain Python (lists of floats, dicts of them) for a broadcast; tensors to lists."""
    if isinstance(load, Mapping):
        return {name: _plain_load(value) for name, value in load.items()}
    if isinstance(load, torch.Tensor):
        return load.detach().cpu().tolist()
    return list(load)


def _parse_load(load: Any, names: list[str], sizes: dict[str, int]) -> dict[str, list[float]] | None:
    """``{layer: [E] floats}`` from ``load`` (one ``[E]`` vector for every layer, or a mapping),
    checked: known layer names, one finite number >= 0 per logical expert."""
    if load is None:
        return None
    if not isinstance(load, Mapping):
        load = {name: load for name in names}  # one [E] vector for every layer
    out = {}
    for name, value in load.items():
        if name not in sizes:
            raise ValueError(f"rebalance_experts: load names layer {name!r}, the model's layers are {names}.")
        try:
            values = [float(v) for v in value]
        except (TypeError, ValueError):
            raise ValueError(
                f"rebalance_experts: load for layer {name!r} must be a flat sequence of numbers, one per "
                f"logical expert, got {str(value)[:120]}."
            ) from None
        if len(values) != sizes[name]:
            raise ValueError(
                f"rebalance_experts: load for layer {name!r} has {len(values)} entries, the layer has "
                f"num_experts={sizes[name]}; pass one load per logical expert."
            )
        bad = [v for v in values if not (math.isfinite(v) and v >= 0)]
        if bad:
            raise ValueError(
                f"rebalance_experts: load for layer {name!r} holds {bad[:4]}; every entry must be a finite "
                "number >= 0 (e.g. the rows each expert received)."
            )
        out[name] = values
    return out


def _shared_load(load: Any, group: dist.ProcessGroup | None) -> Any:
    """Rank 0's ``load`` on every rank, as plain Python (:func:`_plain_load`): every rank must plan
    the same moves, since they are collectives. Rank 0 sends ``None`` for no load, and an error
    text if its load cannot be read, so that every rank raises together instead of leaving the
    others waiting in a collective."""
    try:
        plain = None if load is None else ("load", _plain_load(load))
    except Exception as e:  # noqa: BLE001 (any unreadable object: raised below, on every rank)
        plain = ("error", f"{type(e).__name__}: {e}")
    if group is not None:
        shared: list[Any] = [plain if dist.get_rank(group) == 0 else None]
        dist.broadcast_object_list(shared, src=dist.get_global_rank(group, 0), group=group)
        plain = shared[0]
    if plain is None:
        return None
    kind, value = plain
    if kind == "error":
        raise ValueError(
            f"rebalance_experts: the load could not be read ({value}); pass one [E] sequence of numbers for "
            "every layer, or {layer name: [E]}."
        )
    return value


def _pending_unsynced_grads(model: nn.Module) -> bool:
    """Whether an FSDP unit holds gradients accumulated without a reduce-scatter yet
    (``set_requires_gradient_sync(False)``): unsharded, so a move could not take them along."""
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in getattr(module._get_fsdp_state(), "_fsdp_param_groups", []):
            for fsdp_param in getattr(group, "fsdp_params", []):
                if getattr(fsdp_param, "unsharded_accumulated_grad", None) is not None:
                    return True
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None and unsharded.grad is not None:
                    return True
    return False


@torch.no_grad()
def rebalance_experts(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, load: Any = None
) -> dict[str, list[int]]:
    """Move experts between ep ranks so that every rank processes about the same number of rows.

    The load of each layer is, by default, the slots its router selected per logical expert in the
    training-mode forwards since the previous call, summed over all ranks (one all-reduce for all
    layers); or pass ``load``: one ``[E]`` sequence for every layer, or ``{layer name: [E]}``, of
    finite numbers >= 0 (rank 0's is used on every rank, so all plan the same moves; the other
    ranks' may be anything, ``None`` included). Each
    layer gets the placement :func:`plan_placement` finds (``G`` experts per rank, busiest rank as
    close to the mean as whole experts allow, fewest moves); its expert weights and the
    ``optimizer``'s state of them (AdamW moments; the per-parameter step is shared) move with
    collectives over ``ep``, respecting the FSDP sharding over ``dp_shard``. The function the model
    computes does not change. Collective: every rank calls it, best between optimizer steps.
    Gradients already accumulated (a move between micro-batches) move with their experts; those
    held back by ``set_requires_gradient_sync(False)`` are unreduced and refused (call it after the
    syncing backward). Units left unsharded (the last block after a no-grad forward) are resharded
    first. Without ``optimizer`` a move warns: an optimizer holding state would keep the old order.

    Returns the new placement: per layer, the ep rank of each logical expert
    (:func:`expert_placement`). :func:`last_rebalance` reports the imbalance before and after,
    the bytes moved and the time it took.

    Example::

        optimizer.step()
        if step % 100 == 0:
            ep_fsdp.rebalance_experts(model, optimizer)
    """
    from .parallelize import get_layout

    layout = get_layout(model)
    layers = expert_layers(model)
    if layout is None or not layers:
        raise ValueError(
            f"rebalance_experts: {type(model).__name__} was not produced by ep_fsdp.parallelize_moe (no layout "
            "recorded, or no expert-parallel layer); call parallelize_moe(model, mesh) first."
        )
    names = [n for n, _ in layers]
    sizes = {n: layer_num_experts(m) for n, m in layers}
    start = time.perf_counter()
    stats_group = layers[0][1].stats_group
    given = _parse_load(_shared_load(load, stats_group), names, sizes)
    if _pending_unsynced_grads(model):
        raise ValueError(
            "rebalance_experts: gradients accumulated with set_requires_gradient_sync(False) are still "
            "unreduced; call it after the backward that syncs them (or after optimizer.step()), so that the "
            "gradients move with their experts."
        )
    # NOTE: a unit left unsharded (e.g. the last block after a no-grad forward) holds its full
    # parameters in place of the shards: the moves below work on the shards
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    if given is None:
        device = next(p.device for p in model.parameters())
        packed = torch.cat([
            m.routing.rebalance_load.to(device, torch.float64) if m.routing.rebalance_load is not None
            else torch.zeros(sizes[n], dtype=torch.float64, device=device)
            for n, m in layers
        ])
        group = layers[0][1].stats_group
        if group is not None:
            dist.all_reduce(packed, group=group)
        given, at = {}, 0
        for n, _ in layers:
            given[n] = packed[at:at + sizes[n]].tolist()
            at += sizes[n]
    plans = {n: plan_placement(given[n], m.placement) if n in given else m.placement for n, m in layers}
    ep_group = layout.mesh["ep"].get_group() if layout.ep > 1 else None
    report: dict[str, dict[str, float]] = {}
    moved_layers: list[str] = []
    for n, m in layers:
        old, new = m.placement, plans[n]
        moved_bytes = 0
        if new != old and ep_group is not None:
            tensors = _expert_tensors(m)
            states = [
                v for p in tensors for v in (optimizer.state.get(p, {}).values() if optimizer is not None else [])
                if isinstance(v, DTensor) and v.shape == p.shape
            ]
            # NOTE: gradients of micro-batches before the move (accumulation) move with their experts
            grads = [p.grad for p in tensors if isinstance(p.grad, DTensor) and p.grad.shape == p.shape]
            for t in [*tensors, *states, *grads]:
                moved_bytes += _permute_rows(t, old, new, ep_group)
            m.dispatcher.placement = new
            moved_layers.append(n)
        if n in given:
            m.routing.rebalance_load = None
        load_n = given.get(n)
        report[n] = {
            "imbalance_before": _imbalance(old, load_n) if load_n else 1.0,
            "imbalance_after": _imbalance(new, load_n) if load_n else 1.0,
            "experts_moved": sum(old.rank_of(e) != new.rank_of(e) for e in range(old.num_experts)),
            "bytes_sent": moved_bytes,
        }
    if moved_layers and optimizer is None:
        warnings.warn(
            f"rebalance_experts: the experts of {moved_layers[:4]} moved without an optimizer; an optimizer that "
            "already holds state for this model keeps its expert moments in the old order. Pass it: "
            "rebalance_experts(model, optimizer).", stacklevel=3,
        )
    seconds = time.perf_counter() - start
    for r in report.values():
        r["seconds"] = seconds
    setattr(model, _REPORT_ATTR, report)
    return expert_placement(model)


def last_rebalance(model: nn.Module) -> dict[str, dict[str, float]]:
    """What the last :func:`rebalance_experts` did, per layer: ``imbalance_before`` /
    ``imbalance_after`` (max / mean load per rank under the old and new placement, for the load it
    used), ``experts_moved``, ``bytes_sent`` by this rank and ``seconds`` (the whole call)."""
    return getattr(model, _REPORT_ATTR, {})


def install_placement(layer: nn.Module, physical: Sequence[int]) -> None:
    """Set ``layer``'s placement to the storage permutation ``physical`` (its ep unchanged)."""
    current = layer.placement
    layer.dispatcher.placement = ExpertPlacement(current.num_experts, current.ep, physical)
