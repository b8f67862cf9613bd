"""Token-choice top-k router and the load-balancing statistics.

Legend for shape comments: T tokens on this rank, D model dim, E experts, k experts per token.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _fused
from ._blocks import row_blocks
from .config import MoEConfig
from .selection import Salt, expert_dropout_mask, group_limited_mask, jitter_noise, random_salt

__all__ = ["Router", "RouterOutput", "balancing_stats", "balancing_losses"]

# XOR-ed into a forward's salt for the jitter noise (below 2**31, as salts are)
_JITTER_SALT = (0x5BD1E995, 0x1B873593)


@dataclass
class RouterOutput:
    """What the router decided for each token."""

    weights: torch.Tensor  # [T, k] float32 gate weights of the chosen experts
    expert_ids: torch.Tensor  # [T, k] int64 chosen expert ids
    probs: torch.Tensor  # [T, E] float32 per-token distribution over experts (sums to 1)
    logits: torch.Tensor  # [T, E] float32 router logits after temperature
    slot_scores: torch.Tensor | None = None  # [T, k] float32 scores of the chosen experts (no grad)


class _Float32Linear(torch.autograd.Function):
    """``x.float() @ w.float().T`` that saves ``x`` in its own dtype (not a float32 copy).

    NOTE: under bf16 autograd would keep the float32 copy of the layer input, twice the bytes of
    the input itself, for the weight gradient; the cast is redone in the backward instead.
    NOTE: on CPU in eager mode both passes run over cache-sized blocks of rows
    (:func:`ep_fsdp._blocks.row_blocks`): each block of ``x`` is widened while it is in cache, and
    the float32 input gradient of a block is rounded to ``x``'s dtype there. In one pass a float32
    copy of ``x`` (twice) and a float32 ``[T, D]`` gradient went to memory and back. The weight
    gradient sums the blocks' products in float32 (another summation order than one matmul).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        blocks = _widening_blocks(x)
        if len(blocks) == 1:
            return F.linear(x.float(), w.float())  # [T, E]
        w32 = w.float().t()  # [D, E]
        out = x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)  # [T, E]
        for s, e in blocks:
            torch.mm(x[s:e].float(), w32, out=out[s:e])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, w = ctx.saved_tensors
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = grad.float()  # NOTE: float32 unless a caller cast the logits down
        w32 = w.float()  # [E, D]
        blocks = _widening_blocks(x)
        if len(blocks) == 1:
            grad_x = (grad @ w32).to(x.dtype) if want_x else None  # [T, D]
            grad_w = (grad.t() @ x.float()).to(w.dtype) if want_w else None  # [E, D]
            return grad_x, grad_w
        grad = grad.contiguous()  # [T, E]
        grad_x = torch.empty_like(x) if want_x else None  # [T, D] in x's dtype
        grad_w32 = w32.new_zeros(w32.shape) if want_w else None  # [E, D] summed over blocks
        for s, e in blocks:
            if grad_x is not None:
                grad_x[s:e] = grad[s:e] @ w32  # float32 block, rounded once to x's dtype in cache
            if grad_w32 is not None:
                grad_w32.addmm_(grad[s:e].t(), x[s:e].float())
        return grad_x, grad_w32.to(w.dtype) if grad_w32 is not None else None


def _widening_blocks(x: torch.Tensor) -> list[tuple[int, int]]:
    """Row blocks of ``x`` for :class:`_Float32Linear`: cache-sized when ``x`` needs widening, else one."""
    if x.dtype == torch.float32:
        return [(0, x.shape[0])]
    return row_blocks(x.shape[0], x.device, x.shape[1] * 4)


def _autocast_off(device_type: str) -> AbstractContextManager[Any]:
    """``torch.autocast(device_type, enabled=False)`` where autocast is on (it knows no meta device)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def float32_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits ``[T, E]`` in float32 from ``x [T, D]`` of any dtype, also inside
    ``torch.autocast`` (which would run the matmul in its low-precision dtype)."""
    with _autocast_off(x.device.type):
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            return F.linear(x, weight)
        return _Float32Linear.apply(x, weight)


class _Softmax(torch.autograd.Function):
    """``softmax(logits, -1)`` through the fused CPU kernels (:mod:`ep_fsdp._fused`)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        probs = _fused.softmax_forward(logits)
        if probs is None:  # the kernels could not be built: eager
            probs = torch.softmax(logits, dim=-1)
        ctx.save_for_backward(probs)
        return probs  # [T, E]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (probs,) = ctx.saved_tensors
        fused = (_fused.softmax_backward(grad, probs)
                 if _fused.fused_available(probs, probs.numel(), _fused.FUSED_MIN_SOFTMAX_ELEMENTS) else None)
        return fused if fused is not None else torch._softmax_backward_data(grad, probs, -1, probs.dtype)


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(logits, dim=-1)`` for router logits ``[T, E]``; on CPU in eager mode from
    :data:`ep_fsdp._fused.FUSED_MIN_SOFTMAX_ELEMENTS` scores one fused pass each way (ATen's
    softmax over a narrow last dim works row by row)."""
    if _fused.fused_available(logits, logits.numel(), _fused.FUSED_MIN_SOFTMAX_ELEMENTS):
        return _Softmax.apply(logits)
    return torch.softmax(logits, dim=-1)


class Router(nn.Module):
    """Linear gate ``D -> E`` computed in float32, then softmax/sigmoid scores and top-k.

    The matmul and everything after it run in float32. Under a bfloat16 mixed-precision policy
    :func:`ep_fsdp.parallelize_moe` gives each router its own FSDP unit with float32 parameters,
    so routing decisions use the float32 gate weight.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = nn.Linear(config.dim, config.num_experts, bias=False)
        if config.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.expert_bias: torch.Tensor | None = None

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        """``nn.Module._apply`` (``.to``, ``.half()``, ``to_empty``, ...), with ``expert_bias`` kept
        in float32: a bf16 bias would lose the small steps of :func:`ep_fsdp.update_expert_bias`."""
        before = self.expert_bias
        kept = (before.detach().clone() if before is not None and before.dtype == torch.float32
                and before.device.type != "meta" else None)  # the float32 values, before any cast
        super()._apply(fn, recurse)
        bias = self.expert_bias
        if bias is not None and bias.is_floating_point() and bias.dtype != torch.float32:
            self.expert_bias = kept.to(bias.device) if kept is not None else bias.float()
        return self

    def reset_buffers(self) -> None:
        """Zero the selection bias (after ``to_empty``, see :func:`ep_fsdp.materialize`)."""
        if self.expert_bias is not None:
            with torch.no_grad():
                self.expert_bias.zero_()

    def forward(
        self, x: torch.Tensor, *, token_index: torch.Tensor | None = None, dropout_salt: Salt | None = None
    ) -> RouterOutput:
        """Route ``x [T, D]``. ``token_index [T]`` (global token indices) and ``dropout_salt`` (the
        forward's salt) drive expert dropout, applied in training mode when ``expert_dropout > 0``
        and both are given, and the jitter noise (``jitter_eps > 0``; without them: this call's
        token positions and a salt drawn from the default generator)."""
        cfg = self.config
        if self.training and cfg.jitter_eps > 0:
            # NOTE: noise keyed on the global token index (see jitter_noise): drawn from the
            # default generator, seeded alike on every rank, every data-parallel rank would
            # multiply its t-th token by the same noise, and none like the unparallelized model
            index = token_index if token_index is not None else torch.arange(x.shape[0], device=x.device)
            salt = torch.as_tensor(dropout_salt if dropout_salt is not None else random_salt(), dtype=torch.long)
            salt = salt ^ torch.tensor(_JITTER_SALT)  # [2], independent of expert dropout's mask
            x = x.float() * jitter_noise(index, x.shape[1], cfg.jitter_eps, salt)  # [T, D]
        logits = float32_logits(x, self.gate.weight)  # [T, E]
        if cfg.temperature != 1.0:
            logits = logits / cfg.temperature
        if cfg.score_func == "softmax":
            scores = softmax(logits)  # [T, E]
            probs = scores
        else:
            scores = torch.sigmoid(logits)  # [T, E]
            probs = scores / scores.sum(dim=-1, keepdim=True)
        select = scores if self.expert_bias is None else scores + self.expert_bias.float()  # [T, E]
        if self.training and cfg.expert_dropout > 0 and token_index is not None and dropout_salt is not None:
            dropped = expert_dropout_mask(token_index, cfg.num_experts, cfg.expert_dropout, dropout_salt)
            # NOTE: finite, below any score: a token with fewer than k unmasked experts in its
            # groups then takes masked ones of its groups, never experts outside them (-inf)
            select = select.masked_fill(dropped, -1e30)
        if cfg.num_expert_groups is not None:
            allowed = group_limited_mask(select.detach(), cfg.num_expert_groups, cfg.num_limited_groups)
            select = select.masked_fill(~allowed, float("-inf"))
        # NOTE: ties are broken by torch.topk; selection uses no gradient, weights come from scores.
        expert_ids = torch.topk(select.detach(), cfg.top_k, dim=-1, sorted=False).indices  # [T, k]
        weights = scores.gather(-1, expert_ids)  # [T, k]
        slot_scores = weights.detach()
        if cfg.renormalize and cfg.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if cfg.route_scale != 1.0:
            weights = weights * cfg.route_scale
        return RouterOutput(weights=weights, expert_ids=expert_ids, probs=probs, logits=logits, slot_scores=slot_scores)


def balancing_stats(route: RouterOutput, counts: torch.Tensor) -> torch.Tensor:
    """Additive per-rank statistics of one routing decision, packed in one float64 vector.

    ``counts`` is ``[E]``, the routed slots per expert.

    Layout ``[E prob sums | E token counts | z sum | token count]``; summing the vectors of all
    ranks gives the statistics of the global batch, which :func:`balancing_losses` turns into losses.
    """
    z = torch.logsumexp(route.logits, dim=-1)  # [T]
    return torch.cat(
        [
            route.probs.sum(dim=0).double(),  # [E]
            counts.double(),  # [E]
            (z * z).sum().double().reshape(1),
            torch.full((1,), float(route.probs.shape[0]), dtype=torch.float64, device=counts.device),
        ]
    )


def balancing_losses(stats: torch.Tensor, num_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch/GShard balancing loss and router z-loss from (global) statistics.

    ``f_i`` is the fraction of the ``T*k`` routed slots that went to expert ``i``, ``P_i`` the mean
    router probability of expert ``i``; the balancing loss ``E * sum_i f_i * P_i`` is 1 for a
    perfectly uniform router. The z-loss is ``mean_t logsumexp(logits_t) ** 2``.
    Returns ``(balance_loss, z_loss)``, float32 scalars.
    """
    E = num_experts
    prob_sum, counts, z_sum, tokens = stats[:E], stats[E : 2 * E], stats[2 * E], stats[2 * E + 1]
    tokens = tokens.clamp(min=1.0)
    f = counts / (tokens * top_k)  # [E]
    p = prob_sum / tokens  # [E]
    balance = E * (f * p).sum()
    z_loss = z_sum / tokens
    return balance.float(), z_loss.float()
