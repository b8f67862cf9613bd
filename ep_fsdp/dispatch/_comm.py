"""Collectives of the token exchange, built on ``torch.distributed._functional_collectives``.

Functional collectives are traceable by ``torch.compile`` and asynchronous: the call issues the
collective and returns a tensor that waits for it on first use, so work placed between the call and
the first use overlaps the transfer. Every rank of the group must make the same calls in the same
order, also with zero rows to send or receive.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

__all__ = ["all_to_all_rows", "exchange_sizes", "exchange_records", "all_reduce_sum_", "token_offset", "wait"]


def all_to_all_rows(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """Uneven all-to-all over dim 0, differentiable, issued asynchronously.

    ``input_splits[r]`` rows of ``x`` go to rank ``r``; ``output_splits[r]`` rows arrive from it.
    The backward sends the gradients back the same way.
    """
    return funcol.all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, group)


def exchange_sizes(sizes: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[ep, c]`` integers for each peer -> ``[ep, c]`` integers from each peer (no gradient)."""
    out = funcol.all_to_all_single(sizes.contiguous(), None, None, group)
    return funcol.wait_tensor(out)


class _RecordExchange(torch.autograd.Function):
    """Integer records and float32 gate weights of each slot in ONE all-to-all message.

    The weights travel as their int32 bit patterns next to the records; their gradient goes back
    with one all-to-all in the backward pass.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        records: torch.Tensor,  # [S, c] int32
        weights: torch.Tensor,  # [S] float32
        output_splits: list[int],
        input_splits: list[int],
        group: dist.ProcessGroup,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        packed = torch.cat([records, weights.float().contiguous().view(torch.int32).unsqueeze(1)], dim=1)  # [S, c+1]
        received = funcol.wait_tensor(funcol.all_to_all_single(packed, output_splits, input_splits, group))
        records_in = received[:, :-1].long()  # [Sr, c]
        weights_in = received[:, -1].contiguous().view(torch.float32)  # [Sr]
        ctx.mark_non_differentiable(records_in)
        return records_in, weights_in

    @staticmethod
    def backward(ctx: Any, _grad_records: torch.Tensor, grad_weights: torch.Tensor) -> tuple[Any, ...]:
        output_splits, input_splits = ctx.splits
        grad = funcol.all_to_all_single(grad_weights.contiguous(), input_splits, output_splits, ctx.group)
        return None, funcol.wait_tensor(grad), None, None, None


def exchange_records(
    records: torch.Tensor,
    weights: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: dist.ProcessGroup,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Send per-slot ``records [S, c]`` (int32) and ``weights [S]`` (float32, differentiable) together.

    Returns ``(records [Sr, c] int64, weights [Sr] float32)``.
    """
    return _RecordExchange.apply(records.to(torch.int32), weights, output_splits, input_splits, group)


def all_reduce_sum_(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Issue a sum of ``x`` over ``group`` (no gradient); :func:`wait` for the result (``x`` itself
    if no group)."""
    if group is None:
        return x
    return funcol.all_reduce(x, "sum", group)


def token_offset(num_tokens: int, device: torch.device, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Tokens held by the ranks before this one in ``group`` (0 without a group), as a device
    scalar: with each rank feeding a contiguous slice of the global batch in rank order, this
    rank's token ``t`` is global token ``offset + t``."""
    if group is None:
        return torch.zeros((), dtype=torch.long, device=device)
    mine = torch.full((1,), num_tokens, dtype=torch.long, device=device)
    sizes = funcol.wait_tensor(funcol.all_gather_tensor(mine, 0, group))  # [world]
    return sizes[: dist.get_rank(group)].sum()


def wait(x: torch.Tensor) -> torch.Tensor:
    """The value of a tensor returned by a functional collective (a no-op for plain tensors)."""
    return funcol.wait_tensor(x) if isinstance(x, funcol.AsyncCollectiveTensor) else x
