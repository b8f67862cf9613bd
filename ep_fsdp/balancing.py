"""Load-balancing losses applied as gradients, and the per-layer routing counters.

Legend: T tokens on this rank, E experts, G local expert slots, Tg tokens of the global batch.

The Switch balancing loss ``coef * E * sum_i f_i * P_i`` and the z-loss ``zcoef * mean_t
logsumexp(logits_t)^2`` are losses of the *global* batch. Each forward sums one packet of detached
statistics over all ranks (one all-reduce, no gradient), computes the loss values, and attaches
the loss gradient to the layer output with :class:`_AuxLossGrad`: an identity in the forward whose
backward adds ``d aux / d probs`` and ``d aux / d logits`` of this rank's tokens. So:

* no graph tensor is held on the module, and nothing is all-reduced in the backward;
* ``ep_fsdp.moe_aux_loss(model)`` returns the (detached) value for logging and for the loss you
  print; adding it to the loss changes no gradient;
* the gradient is scaled for the gradient reduction of the parallel model (``world`` under the
  mean-loss convention, where FSDP divides by ``world``; 1 under ``grad_reduction="sum"``), times
  the user's :func:`ep_fsdp.set_aux_loss_scale` (e.g. ``1 / grad_accum_steps``);
* activation-checkpoint recomputation (which runs inside the backward) records nothing and
  all-reduces nothing: counters advance once per forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .dispatch._comm import all_reduce_sum_
from .router import RouterOutput, balancing_losses, balancing_stats

__all__ = ["RoutingCounters", "attach_balancing_losses", "in_backward"]


def in_backward() -> bool:
    """True while autograd runs a backward pass on this thread (e.g. checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class RoutingCounters:
    """What the layer's forwards recorded since the consumer last reset them.

    Counts are local to this rank; :func:`ep_fsdp.routing_stats` sums them over ranks. Loss values
    are those of the global batch, summed over the forwards that computed them.
    """

    tokens_per_expert: torch.Tensor | None = None  # [E] int64 routed slots per logical expert
    expert_load: torch.Tensor | None = None  # [G] int64 rows processed by this rank's slots
    a2a_bytes: int = 0  # bytes sent to other ranks
    forwards: int = 0
    losses: torch.Tensor | None = None  # [3] float64: balance, z, coefficient-weighted aux
    loss_forwards: int = 0
    pending_aux: torch.Tensor | None = None  # float64 aux value not yet taken by moe_aux_loss
    pending_forwards: int = 0

    def add_forward(self, counts: torch.Tensor, load: torch.Tensor, a2a_bytes: int) -> None:
        counts, load = counts.detach(), load.detach()
        self.tokens_per_expert = counts.clone() if self.tokens_per_expert is None else self.tokens_per_expert + counts
        self.expert_load = load.clone() if self.expert_load is None else self.expert_load + load
        self.a2a_bytes += a2a_bytes
        self.forwards += 1

    def add_losses(self, values: torch.Tensor) -> None:
        """``values [3]`` float64: balance loss, z-loss, weighted aux loss of one forward."""
        self.losses = values.clone() if self.losses is None else self.losses + values
        self.loss_forwards += 1
        aux = values[2]
        self.pending_aux = aux.clone() if self.pending_aux is None else self.pending_aux + aux
        self.pending_forwards += 1

    def take_aux(self) -> torch.Tensor | None:
        """Mean weighted aux loss over the forwards since the last call, then forget it."""
        if self.pending_aux is None:
            return None
        value = self.pending_aux / self.pending_forwards
        self.pending_aux, self.pending_forwards = None, 0
        return value

    def reset(self) -> None:
        """Forget counts, bytes and loss values (the aux value pending for moe_aux_loss is kept)."""
        self.tokens_per_expert = self.expert_load = self.losses = None
        self.a2a_bytes = self.forwards = self.loss_forwards = 0


class _AuxLossGrad(torch.autograd.Function):
    """Identity on ``out``; its backward adds precomputed gradients for ``probs`` and ``logits``.

    NOTE: the gradients are kept on ``ctx`` (not ``save_for_backward``), so activation
    checkpointing neither frees nor recomputes them, and the recomputed forward may skip this node.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        out: torch.Tensor,
        probs: torch.Tensor,
        logits: torch.Tensor,
        grad_probs_row: torch.Tensor | None,  # [E] float32, the same for every token
        grad_logits: torch.Tensor | None,  # [T, E] float32
    ) -> torch.Tensor:
        ctx.grad_probs_row, ctx.grad_logits, ctx.shape = grad_probs_row, grad_logits, probs.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        grad_probs = None if ctx.grad_probs_row is None else ctx.grad_probs_row.expand(ctx.shape)
        return grad, grad_probs, ctx.grad_logits, None, None


def attach_balancing_losses(
    out: torch.Tensor,
    route: RouterOutput,
    counts: torch.Tensor,
    *,
    aux_loss_coef: float,
    z_loss_coef: float,
    top_k: int,
    group: dist.ProcessGroup | None,
    grad_scale: float,
    counters: RoutingCounters,
) -> torch.Tensor:
    """Compute the global-batch balancing losses of one forward and attach their gradient to ``out``.

    Skipped (``out`` returned as is) when both coefficients are 0, when no gradient is needed, or
    during activation-checkpoint recomputation.
    """
    if (aux_loss_coef == 0 and z_loss_coef == 0) or not torch.is_grad_enabled() or not route.logits.requires_grad:
        return out
    if in_backward():
        return out
    E = counts.numel()
    with torch.no_grad():
        stats = all_reduce_sum_(balancing_stats(route, counts), group)  # [2E + 2] float64, global batch
        balance, z_loss = balancing_losses(stats, E, top_k)
        aux = aux_loss_coef * balance.double() + z_loss_coef * z_loss.double()
        counters.add_losses(torch.stack([balance.double(), z_loss.double(), aux]))
        tokens = stats[2 * E + 1].clamp(min=1.0)  # Tg
        grad_probs_row = grad_logits = None
        if aux_loss_coef != 0:
            f = stats[E:2 * E] / (tokens * top_k)  # [E] global fraction of slots per expert
            grad_probs_row = (aux_loss_coef * grad_scale * E * f / tokens).float()  # d aux / d P[t, i]
        if z_loss_coef != 0:
            logits = route.logits.detach()  # [T, E]
            z = torch.logsumexp(logits, dim=-1, keepdim=True)  # [T, 1]
            grad_logits = (2.0 * z_loss_coef * grad_scale / tokens.float()) * z * torch.softmax(logits, dim=-1)
    return _AuxLossGrad.apply(out, route.probs, route.logits, grad_probs_row, grad_logits)
