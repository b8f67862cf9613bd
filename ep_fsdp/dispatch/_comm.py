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
from torch.autograd.function import once_differentiable

__all__ = ["all_to_all_rows", "send_rows", "RowsInFlight", "exchange_sizes", "exchange_records", "all_reduce_sum_", "token_offset", "wait"]


def all_to_all_rows(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """Uneven all-to-all over dim 0, differentiable, issued asynchronously.

    ``input_splits[r]`` rows of ``x`` go to rank ``r``; ``output_splits[r]`` rows arrive from it.
    The backward sends the gradients back the same way.
    """
    return funcol.all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, group)


_c10d = torch.ops._c10d_functional


class _SendRows(torch.autograd.Function):
    """Issue an uneven all-to-all and return its output buffer while it is still in flight.

    Only :class:`_ReceiveRows` may read the buffer (it waits first). In the backward, the gradient
    of ``x`` was already sent back by ``_ReceiveRows``' backward into ``box``; this waits for it.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, output_splits: list[int], input_splits: list[int],  # type: ignore[override]
                group: dist.ProcessGroup, box: dict[str, torch.Tensor]) -> torch.Tensor:
        ctx.box = box
        return _c10d.all_to_all_single(x.contiguous(), output_splits, input_splits, group.group_name)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, _grad_buffer: torch.Tensor) -> tuple[Any, ...]:
        return _c10d.wait_tensor(ctx.box.pop("grad")), None, None, None, None


class _ReceiveRows(torch.autograd.Function):
    """Wait for the rows :class:`_SendRows` issued. Its backward sends the gradient back at once
    (into ``box``) without waiting: the wait is in ``_SendRows``' backward, which autograd reaches
    later.

    NOTE: autograd runs the backward of later-created nodes first. The receive of the results
    (created last, in the merge) thus sends every chunk's gradient back before any chunk's experts
    run their backward, and the receive of a chunk's rows sends its gradient back before the
    chunks issued earlier compute theirs: the backward's exchanges overlap its compute as the
    forward's do.
    """

    @staticmethod
    def forward(ctx: Any, in_flight: torch.Tensor, output_splits: list[int], input_splits: list[int],  # type: ignore[override]
                group: dist.ProcessGroup, box: dict[str, torch.Tensor]) -> torch.Tensor:
        ctx.splits, ctx.group, ctx.box = (output_splits, input_splits), group, box
        return _c10d.wait_tensor(in_flight).view_as(in_flight)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        output_splits, input_splits = ctx.splits
        ctx.box["grad"] = _c10d.all_to_all_single(grad.contiguous(), input_splits, output_splits, ctx.group.group_name)
        return grad, None, None, None, None  # reaches _SendRows.backward, which takes the box instead


class RowsInFlight:
    """Rows sent by :func:`send_rows`; :meth:`arrive` waits for them."""

    def __init__(self, buffer: torch.Tensor, splits: tuple[list[int], list[int]], group: dist.ProcessGroup,
                 streamed: bool, box: dict[str, torch.Tensor]) -> None:
        self.buffer, self.splits, self.group, self.streamed, self.box = buffer, splits, group, streamed, box

    @property
    def rows(self) -> int:
        """Rows that arrive."""
        return self.buffer.shape[0]

    def arrive(self) -> torch.Tensor:
        """The received rows (waits for them), differentiable back to the sender."""
        if not self.streamed:
            # NOTE: waited here, not on first use: the functional collective's tensor is a Python
            # tensor subclass until it is waited for, and every op on it (or on a view of it, or
            # on it saved for the backward) went through its __torch_dispatch__ (~20 a step)
            return wait(self.buffer)
        return _ReceiveRows.apply(self.buffer, *self.splits, self.group, self.box)


def send_rows(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup, *,
    streamed: bool = False,
) -> RowsInFlight:
    """Issue :func:`all_to_all_rows` of ``x``; ``.arrive()`` gives the rows.

    ``streamed``: the gradient is sent back asynchronously too (the pair of Functions above), so
    that a streamed exchange overlaps its backward's transfers with compute. Otherwise autograd's
    functional collective, whose backward waits at once (and which ``torch.compile`` traces).
    """
    box: dict[str, torch.Tensor] = {}  # the gradient in flight, from the receive's backward to the send's
    if streamed:
        buffer = _SendRows.apply(x, output_splits, input_splits, group, box)
    else:
        buffer = all_to_all_rows(x, output_splits, input_splits, group)
    return RowsInFlight(buffer, (output_splits, input_splits), group, streamed, box)


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
    @once_differentiable
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
