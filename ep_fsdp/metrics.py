"""Routing figures of the last forward, summed over all ranks: what people watch while training."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .moe import moe_layers
from .parallelize import get_layout

__all__ = ["routing_stats"]


def routing_stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per MoE layer, from the most recent forward, over all ranks (collective when distributed):

    * ``utilization``: fraction of the routed slots that went to each expert (sums to 1);
    * ``imbalance``: max / mean rows processed per ep rank (1.0 is perfectly even);
    * ``a2a_bytes``: bytes all ranks sent to other ranks in the layer's two all-to-alls.

    Example::

        stats = ep_fsdp.routing_stats(model)
        stats["layers.1.feed_forward"]["imbalance"]
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"routing_stats: {type(model).__name__} contains no ep_fsdp.MoE layer.")
    if any(m.last_tokens_per_expert is None for _, m in layers):
        raise RuntimeError("routing_stats: run a forward pass first; no routing has been recorded yet.")
    layout = get_layout(model)
    ep = layout.ep if layout is not None else 1
    device = layers[0][1].last_tokens_per_expert.device
    packed = torch.cat(
        [torch.cat([m.last_tokens_per_expert.double(), torch.tensor([float(m.last_a2a_bytes)], dtype=torch.float64, device=device)])
         for _, m in layers]
    )  # [layers * (E + 1)]
    group = layers[0][1].stats_group  # all ranks of the mesh (None in a single process)
    if group is not None:
        dist.all_reduce(packed, group=group)
    out: dict[str, dict[str, Any]] = {}
    offset = 0
    for name, m in layers:
        E = m.config.num_experts
        counts = packed[offset:offset + E]
        a2a = packed[offset + E]
        offset += E + 1
        per_rank = counts.view(ep, E // ep).sum(dim=1)  # [ep]
        total = counts.sum().clamp(min=1.0)
        out[name] = {
            "utilization": (counts / total).tolist(),
            "imbalance": float(per_rank.max() / per_rank.mean().clamp(min=1e-12)),
            "a2a_bytes": int(a2a),
        }
    return out
