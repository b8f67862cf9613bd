"""The MoE layer: router + dispatch + grouped experts + combine.

Legend: T tokens on this rank, D model dim, E experts, k experts per token, S = T*k routed slots.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .comm import all_reduce_sum
from .config import MoEConfig
from .dispatch import (
    ExchangePlan,
    combine,
    expert_counts,
    gather_token_copies,
    scatter_to_slots,
    sort_by_expert,
)
from .dispatch_dedup import dedup_exchange
from .experts import GroupedExperts
from .router import Router, RouterOutput, balancing_losses, balancing_stats

__all__ = ["MoE", "moe_aux_loss", "moe_layers"]


class _GraphSlot:
    """Holds a tensor that is part of the autograd graph (the last aux loss). A module holding such
    a tensor directly could not be deep-copied or pickled, so the slot copies as empty."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __reduce__(self) -> tuple[type, tuple]:
        return (_GraphSlot, ())


class MoE(nn.Module):
    """Token-choice top-k Mixture-of-Experts feed-forward layer with SwiGLU experts.

    Maps ``[..., D] -> [..., D]`` in the input's dtype. Unparallelized it runs every expert on
    this process; after :func:`ep_fsdp.parallelize_moe` each rank holds a block of experts and
    tokens travel to them with ``all_to_all_single`` over the ``ep`` mesh dim, with the same
    numerics as the single-process layer on the same global batch.

    Monitoring attributes, refreshed by every forward:

    * ``last_tokens_per_expert``: ``[E]`` int64, this rank's routed slots per expert.
    * ``last_global_tokens_per_expert``: ``[E]`` int64 over all ranks (only when a balancing loss
      is enabled, since that is when the global statistics are gathered), else ``None``.
    * ``last_balance_loss`` / ``last_z_loss``: detached float32 scalars or ``None``.
    * ``last_aux_loss``: the coefficient-weighted loss *with* gradient, read by
      :func:`ep_fsdp.moe_aux_loss`.
    * ``last_expert_load``: ``[G]`` int64 rows processed by each expert held on this rank
      (``G = E / ep``); its sum over ep ranks shows the load imbalance.
    * ``last_a2a_bytes``: bytes this rank sent to other ranks in the two all-to-alls (0 when not
      parallelized).

    Example::

        layer = MoE(MoEConfig(dim=64, hidden_dim=128, num_experts=8, top_k=2, aux_loss_coef=0.01))
        y = layer(torch.randn(4, 16, 64))      # [4, 16, 64]
        loss = y.square().mean() + ep_fsdp.moe_aux_loss(layer)
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.router = Router(config)
        self.experts = GroupedExperts(config)
        # Set by parallelize_moe: the ep group (token exchange) and the group of all ranks that
        # share one global batch (balancing statistics).
        self.ep_group: dist.ProcessGroup | None = None
        self.stats_group: dist.ProcessGroup | None = None
        # Send a token once per ep rank even when several of its experts live there (see
        # dispatch_dedup.py); set by parallelize_moe.
        self.dedup_tokens: bool = True
        self.last_tokens_per_expert: torch.Tensor | None = None
        self.last_global_tokens_per_expert: torch.Tensor | None = None
        self.last_balance_loss: torch.Tensor | None = None
        self.last_z_loss: torch.Tensor | None = None
        self._aux_slot = _GraphSlot()
        self.last_expert_load: torch.Tensor | None = None
        self.last_a2a_bytes: int = 0

    @property
    def last_aux_loss(self) -> torch.Tensor | None:
        """Coefficient-weighted balancing + z loss of the last forward, with gradient (or None)."""
        return self._aux_slot.value

    @last_aux_loss.setter
    def last_aux_loss(self, value: torch.Tensor | None) -> None:
        self._aux_slot.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.shape[-1] != cfg.dim:
            raise ValueError(
                f"MoE input must end in dim={cfg.dim}, got shape {tuple(x.shape)}; "
                "reshape the input to [..., dim] or build the layer with the matching MoEConfig.dim."
            )
        tokens = x.reshape(-1, cfg.dim)  # [T, D]
        route = self.router(tokens)  # weights [T, k], expert_ids [T, k]
        counts = expert_counts(route.expert_ids, cfg.num_experts)  # [E]
        self._record_balancing(route, counts)
        if self.ep_group is not None and self.dedup_tokens:
            out, load, self.last_a2a_bytes = dedup_exchange(
                tokens, route.expert_ids, route.weights, cfg.num_experts, self.ep_group, self.experts
            )
            self.last_expert_load = load.detach()
            return out.reshape(x.shape)
        perm = sort_by_expert(route.expert_ids, cfg.num_experts, counts)  # only the plain paths sort
        x_sorted = gather_token_copies(tokens, perm)  # [S, D]
        if self.ep_group is None:
            y_sorted = self.experts(x_sorted, perm.counts)  # [S, D]
            self.last_expert_load = perm.counts.detach()
            self.last_a2a_bytes = 0
        else:
            plan = ExchangePlan.build(perm.counts, self.ep_group)
            x_local = plan.dispatch(x_sorted, self.ep_group)  # [R, D]
            y_local = self.experts(x_local, plan.local_counts, plan.local_counts_host)  # [R, D]
            y_sorted = plan.gather_back(y_local, self.ep_group)  # [S, D]
            self.last_expert_load = plan.local_counts.detach()
            row_bytes = cfg.dim * x.element_size()
            self_rank = dist.get_rank(self.ep_group)
            sent = sum(plan.input_splits) - plan.input_splits[self_rank]
            sent_back = sum(plan.output_splits) - plan.output_splits[self_rank]
            self.last_a2a_bytes = (sent + sent_back) * row_bytes
        y_slots = scatter_to_slots(y_sorted, perm)  # [T, k, D]
        out = combine(y_slots, route.weights)  # [T, D]
        return out.reshape(x.shape)

    def _record_balancing(self, route: RouterOutput, counts: torch.Tensor) -> None:
        cfg = self.config
        self.last_tokens_per_expert = counts.detach()
        if cfg.aux_loss_coef == 0 and cfg.z_loss_coef == 0:
            self.last_global_tokens_per_expert = None
            self.last_balance_loss = self.last_z_loss = self.last_aux_loss = None
            return
        stats = balancing_stats(route, counts)  # [2E + 2] float64
        if self.stats_group is not None:
            stats = all_reduce_sum(stats, self.stats_group)
        balance, z_loss = balancing_losses(stats, cfg.num_experts, cfg.top_k)
        self.last_global_tokens_per_expert = stats[cfg.num_experts : 2 * cfg.num_experts].detach().long()
        self.last_balance_loss = balance.detach()
        self.last_z_loss = z_loss.detach()
        self.last_aux_loss = cfg.aux_loss_coef * balance + cfg.z_loss_coef * z_loss


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """``(qualified name, layer)`` of every :class:`MoE` in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Coefficient-weighted balancing + z losses of all MoE layers from the most recent forward.

    Add it to the task loss before ``backward()``. The statistics behind it cover the global batch
    (all ranks), so its value and gradient equal the single-process model's on that batch. Layers
    whose coefficients are both 0 contribute nothing; returns a float32 zero if none contribute.

    Example::

        loss = F.cross_entropy(logits, targets) + ep_fsdp.moe_aux_loss(model)
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError(
            f"moe_aux_loss found no ep_fsdp.MoE layer in {type(model).__name__}; "
            "pass the model that contains the MoE layers."
        )
    terms = [m.last_aux_loss for _, m in layers if m.last_aux_loss is not None]
    if not terms:
        device = layers[0][1].router.gate.weight.device
        return torch.zeros((), dtype=torch.float32, device=device)
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total
