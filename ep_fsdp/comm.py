"""Differentiable collectives used by the MoE layer.

Each function here is a thin ``torch.autograd.Function`` around one ``torch.distributed`` call, so
that gradients flow back through the token exchange and through the global routing statistics.
Every rank of the group must call them in the same order (they are collectives).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_to_all_rows", "all_reduce_sum", "scale_grad"]


class _AllToAllRows(torch.autograd.Function):
    """Uneven ``all_to_all_single`` over dim 0; the backward sends gradients back the same way."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,  # [sum(input_splits), ...]
        output_splits: list[int],
        input_splits: list[int],
        group: dist.ProcessGroup,
    ) -> torch.Tensor:
        ctx.group = group
        ctx.output_splits = output_splits
        ctx.input_splits = input_splits
        return _exchange(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        # NOTE: the reverse exchange swaps the split lists: what I received I now send back.
        return _exchange(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def _exchange(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    return out


def all_to_all_rows(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """Send rows of ``x`` to the ranks of ``group``: ``input_splits[r]`` rows go to rank ``r`` and
    ``output_splits[r]`` rows arrive from rank ``r``. Differentiable."""
    return _AllToAllRows.apply(x, output_splits, input_splits, group)


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` whose backward is also an ``all_reduce(SUM)``.

    NOTE: every rank computes the same reduced value and usually adds it to its own loss, so the
    objective the ranks optimise together holds one copy per rank. Summing the incoming gradients
    over ranks gives each rank's local contribution the gradient of all copies, which the data
    parallel average (divide by world size) turns back into exactly one copy.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = x.clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone().contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable sum of ``x`` over ``group`` (see ``_AllReduceSum`` for the gradient rule)."""
    return _AllReduceSum.apply(x, group)


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``factor`` in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Return ``x`` unchanged, with its gradient multiplied by ``factor`` (no-op when 1)."""
    if factor == 1.0:
        return x
    return _ScaleGrad.apply(x, factor)
