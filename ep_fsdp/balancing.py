"""Load-balancing losses applied as gradients, and the per-layer routing counters.

Legend: T tokens on this rank, E experts, G local expert slots, Tg tokens of the global batch.

The Switch balancing loss ``coef * E * sum_i f_i * P_i`` and the z-loss ``zcoef * mean_t
logsumexp(logits_t)^2`` are losses of the *global* batch. Each forward sums one packet of detached
statistics over all ranks (one all-reduce, no gradient, issued before the token exchange and waited
after it), computes the loss values, and hooks the loss gradient onto the gate weights with
:class:`_AuxLossGrad`: an identity in the forward whose backward adds ``d aux / d probs`` and
``d aux / d logits`` of this rank's tokens. So:

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
from torch.autograd.function import once_differentiable

from .dispatch._comm import all_reduce_sum_, wait
from .router import RouterOutput, balancing_losses, balancing_stats

__all__ = ["RoutingCounters", "PendingBalancing", "accumulate", "begin_balancing", "finish_balancing", "in_backward"]


def in_backward() -> bool:
    """True while autograd runs a backward pass on this thread (e.g. checkpoint recomputation).

    NOTE: False while ``torch.compile`` traces: a compiled region's recomputation happens inside
    its compiled backward, which never reruns the Python forward.
    """
    if torch.compiler.is_compiling():
        return False
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
    dropped: torch.Tensor | int = 0  # slots dropped by the capacity limit
    # [E] selected slots per logical expert since the last ep_fsdp.rebalance_experts (not reset
    # by routing_stats)
    rebalance_load: torch.Tensor | None = None

    def add_forward(self, counts: torch.Tensor, load: torch.Tensor, a2a_bytes: int,
                    dropped: torch.Tensor | int = 0) -> None:
        counts, load = counts.detach(), load.detach()
        self.dropped = accumulate(self.dropped, dropped)
        self.rebalance_load = accumulate(self.rebalance_load, counts)
        self.tokens_per_expert = accumulate(self.tokens_per_expert, counts)
        self.expert_load = accumulate(self.expert_load, load)
        self.a2a_bytes += a2a_bytes
        self.forwards += 1

    def add_losses(self, values: torch.Tensor) -> None:
        """``values [3]`` float64: balance loss, z-loss, weighted aux loss of one forward."""
        self.losses = accumulate(self.losses, values)
        self.loss_forwards += 1
        self.pending_aux = accumulate(self.pending_aux, values[2])
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
        self.dropped = 0


def accumulate(total: torch.Tensor | int | None, value: torch.Tensor | int) -> torch.Tensor | int:
    """``total + value``, on ``value``'s device when it is a tensor (a copy of ``value`` when
    nothing is there yet).

    NOTE: the totals follow the layer: after ``model.to("cuda")`` following a forward on the CPU
    (the counters are plain attributes, which ``Module.to`` does not move), the next forward's
    values are on the GPU and the CPU totals move there (adding across devices raised).
    """
    if total is None:
        return value.clone() if isinstance(value, torch.Tensor) else value
    if isinstance(total, torch.Tensor) and isinstance(value, torch.Tensor) and total.device != value.device:
        total = total.to(value.device)
    return total + value


@dataclass
class _AuxGrads:
    """Gradients the balancing losses add in the backward, filled in once the statistics arrive."""

    probs_row: torch.Tensor | None = None  # [E] float32, d aux / d probs[t, i], the same for every t
    logits: torch.Tensor | None = None  # [T, E] float32, d z-loss / d logits


class _AuxLossGrad(torch.autograd.Function):
    """Identity on the gate weights; its backward adds the balancing-loss gradients of ``probs``
    and ``logits``.

    NOTE: attached to the gate weights (every token's output depends on them) rather than to the
    layer output, whose identity would come back as a view. The gradients live in a holder filled
    after the forward's statistics arrive, not in ``save_for_backward``: activation checkpointing
    neither frees nor recomputes them, and the recomputed forward may skip this node.
    """

    @staticmethod
    def forward(ctx: Any, weights: torch.Tensor, probs: torch.Tensor, logits: torch.Tensor, grads: _AuxGrads) -> torch.Tensor:  # type: ignore[override]
        ctx.grads, ctx.shape = grads, probs.shape
        return weights.view_as(weights)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        g: _AuxGrads = ctx.grads
        grad_probs = None if g.probs_row is None else g.probs_row.expand(ctx.shape)
        return grad, grad_probs, g.logits, None


@dataclass
class PendingBalancing:
    """The balancing losses of one forward whose global statistics are still in flight."""

    stats: torch.Tensor  # [2E + 2] float64, all-reduce issued
    logits: torch.Tensor  # [T, E] detached
    grads: _AuxGrads
    num_experts: int
    top_k: int
    aux_loss_coef: float
    z_loss_coef: float


@torch.compiler.disable  # NOTE: the gradient hook is filled in through Python state (eager only)
def begin_balancing(
    route: RouterOutput,
    counts: torch.Tensor,
    *,
    aux_loss_coef: float,
    z_loss_coef: float,
    top_k: int,
    group: dist.ProcessGroup | None,
    in_recompute: bool = False,
) -> tuple[torch.Tensor, PendingBalancing | None]:
    """Issue the global statistics of one forward and hook the loss gradient onto the gate weights.

    Returns ``(weights to dispatch, pending)``; call :func:`finish_balancing` with ``pending``
    before the backward (the all-reduce overlaps the token exchange in between). Nothing happens
    (``route.weights, None``) when both coefficients are 0, when no gradient is needed, or during
    activation-checkpoint recomputation, unless ``in_recompute`` says this recomputation is the
    one whose graph will be backpropagated (reentrant checkpointing, see ``MoE.forward``).
    """
    if (aux_loss_coef == 0 and z_loss_coef == 0) or not torch.is_grad_enabled() or not route.logits.requires_grad:
        return route.weights, None
    if in_backward() and not in_recompute:
        return route.weights, None
    with torch.no_grad():
        stats = all_reduce_sum_(balancing_stats(route, counts), group)  # [2E + 2] float64, in flight
    grads = _AuxGrads()
    weights = _AuxLossGrad.apply(route.weights, route.probs, route.logits, grads)
    pending = PendingBalancing(stats, route.logits.detach(), grads, counts.numel(), top_k, aux_loss_coef, z_loss_coef)
    return weights, pending


@torch.compiler.disable
@torch.no_grad()
def finish_balancing(pending: PendingBalancing, *, grad_scale: float, counters: RoutingCounters) -> None:
    """Wait for the statistics, record the loss values and fill in the gradients of the backward."""
    p, E = pending, pending.num_experts
    stats = wait(p.stats)
    balance, z_loss = balancing_losses(stats, E, p.top_k)
    aux = p.aux_loss_coef * balance.double() + p.z_loss_coef * z_loss.double()
    counters.add_losses(torch.stack([balance.double(), z_loss.double(), aux]))
    tokens = stats[2 * E + 1].clamp(min=1.0)  # Tg
    if p.aux_loss_coef != 0:
        f = stats[E:2 * E] / (tokens * p.top_k)  # [E] global fraction of slots per expert
        p.grads.probs_row = (p.aux_loss_coef * grad_scale * E * f / tokens).float()  # d aux / d P[t, i]
    if p.z_loss_coef != 0:
        z = torch.logsumexp(p.logits, dim=-1, keepdim=True)  # [T, 1]
        p.grads.logits = (2.0 * p.z_loss_coef * grad_scale / tokens.float()) * z * torch.softmax(p.logits, dim=-1)
