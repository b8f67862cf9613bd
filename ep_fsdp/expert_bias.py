"""Auxiliary-loss-free balancing (DeepSeek-V3): move each layer's selection bias toward even load.

Legend: E experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .moe import MoE, moe_layers

__all__ = ["update_expert_bias"]


@torch.no_grad()
def update_expert_bias(model: nn.Module) -> int:
    """Update ``router.expert_bias`` of every MoE layer with ``bias_update_rate > 0``.

    Each such layer counts the slots its router selected for each logical expert in the
    training-mode forwards since the previous call (every micro-batch; checkpoint recomputation
    is not counted again). Here the counts are summed over all ranks (one all-reduce for all
    layers), so every rank sees the load of the global batch, and the bias moves by
    ``bias_update_rate * sign(mean_load - load)``: up for experts below the mean, down above it.
    The result is identical on every rank. Call it after ``optimizer.step()``; collective when
    distributed (every rank calls it). Layers without a forward since the last call keep their
    bias. Returns the number of layers updated.

    Example::

        loss.backward(); optimizer.step()
        ep_fsdp.update_expert_bias(model)
    """
    layers: list[MoE] = [m for _, m in moe_layers(model) if m.config.bias_update_rate > 0]
    if not layers:
        return 0
    device = layers[0].router.expert_bias.device
    loads = [
        m.bias_load.to(device, torch.float64) if m.bias_load is not None  # (still where the last forward ran)
        else torch.zeros(m.config.num_experts, dtype=torch.float64, device=device)
        for m in layers
    ]
    packed = torch.cat(loads)  # [sum E]
    group = layers[0].stats_group
    if group is not None:
        dist.all_reduce(packed, group=group)
    updated, start = 0, 0
    for m in layers:
        E = m.config.num_experts
        load = packed[start:start + E]  # [E] global selected slots
        start += E
        m.bias_load = None
        if load.sum() == 0:
            continue
        step = m.config.bias_update_rate * torch.sign(load.mean() - load)  # [E]
        m.router.expert_bias.add_(step.to(m.router.expert_bias.dtype))
        updated += 1
    return updated
