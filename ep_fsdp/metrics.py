"""Routing figures summed over all ranks: what people watch while training."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .expert_modules import expert_layers, layer_num_experts

__all__ = ["routing_stats"]


def routing_stats(model: nn.Module, *, reset: bool = True) -> dict[str, dict[str, Any]]:
    """Per MoE layer (``ep_fsdp.MoE`` or expert-parallelized transformers experts module), over the forwards since the last call and over all ranks (collective when
    distributed; call it on every rank):

    * ``tokens_per_expert``: routed slots of each logical expert (global batch);
    * ``utilization``: fraction of the routed slots that went to each expert (sums to 1);
    * ``imbalance``: max / mean over ranks of the rows each rank's experts processed (1.0 is
      perfectly even; the busiest rank sets the step time);
    * ``a2a_bytes``: bytes all ranks sent to other ranks in the layer's exchanges;
    * ``dropped_fraction``: fraction of the routed slots dropped by the capacity limit (0 when
      dropless);
    * ``balance_loss`` / ``z_loss``: mean global-batch values over the forwards that computed
      them (``None`` if none did);
    * ``forwards``: how many forwards the figures cover.

    The counters are reset afterwards unless ``reset=False``.

    Example::

        stats = ep_fsdp.routing_stats(model)
        stats["layers.1.feed_forward"]["imbalance"]
    """
    layers = expert_layers(model)
    if not layers:
        raise ValueError(
            f"routing_stats: {type(model).__name__} contains no ep_fsdp.MoE layer and no expert-parallelized "
            "experts module; pass the model after ep_fsdp.parallelize_moe (or one built with ep_fsdp.MoE)."
        )
    if any(m.routing.tokens_per_expert is None for _, m in layers):
        raise RuntimeError(
            "routing_stats: no routing recorded since the last reset; counters advance in training-mode "
            "forwards only (model.train()), so run one first."
        )
    # NOTE: gathered on one device (a layer's totals stay where its last forward ran)
    device = layers[0][1].routing.tokens_per_expert.device
    # per layer: [E counts | a2a bytes | dropped slots | rows processed by this rank's experts]
    packed = torch.cat([
        torch.cat([
            m.routing.tokens_per_expert.to(device, torch.float64),
            torch.full((1,), float(m.routing.a2a_bytes), dtype=torch.float64, device=device),
            torch.as_tensor(m.routing.dropped, device=device).double().reshape(1),
            m.routing.expert_load.sum().to(device, torch.float64).reshape(1),
        ])
        for _, m in layers
    ])
    ends = torch.tensor([layer_num_experts(m) + 3 for _, m in layers]).cumsum(0).tolist()  # per-layer ends
    loads = packed[[e - 1 for e in ends]].clone()  # [layers] this rank's rows
    group = layers[0][1].stats_group  # all ranks of the mesh (None in a single process)
    world = 1
    if group is not None:
        world = dist.get_world_size(group)
        dist.all_reduce(packed, group=group)
        dist.all_reduce(loads, op=dist.ReduceOp.MAX, group=group)
    out: dict[str, dict[str, Any]] = {}
    for i, (name, m) in enumerate(layers):
        E = layer_num_experts(m)
        row = packed[ends[i] - E - 3:ends[i]]
        counts, a2a, dropped, mean_load = row[:E], row[E], row[E + 1], row[E + 2] / world
        losses = None if m.routing.losses is None else (m.routing.losses / m.routing.loss_forwards).tolist()
        out[name] = {
            "tokens_per_expert": [int(c) for c in counts.tolist()],
            "utilization": (counts / counts.sum().clamp(min=1.0)).tolist(),
            "imbalance": float(loads[i] / mean_load) if mean_load > 0 else 1.0,
            "a2a_bytes": int(a2a),
            "dropped_fraction": float(dropped / counts.sum().clamp(min=1.0)),
            "balance_loss": None if losses is None else losses[0],
            "z_loss": None if losses is None else losses[1],
            "forwards": m.routing.forwards,
        }
        if reset:
            m.routing.reset()
    return out
