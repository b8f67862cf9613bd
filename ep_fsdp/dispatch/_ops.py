"""Deterministic row gathers and segment sums with hand-written backwards.

Legend: N gathered rows, R output rows (segments), D feature dim.

Every reduction in the dispatch path is a *segment sum over contiguous rows* computed by a kernel
that walks each segment in order (``view(...).sum`` for a uniform length, ``segment_reduce``
otherwise), never a scatter with atomics. Results are therefore bitwise reproducible run to run,
also on CUDA under ``torch.use_deterministic_algorithms(True)``. Weighted sums accumulate in
float32 whatever the row dtype.

NOTE: autograd's own backward of ``index_select``/``x[idx]`` is an ``index_add``, which uses
atomics on CUDA; the Functions below replace it with a permutation followed by a segment sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Segments", "segment_sum", "gather_rows", "weighted_segment_sum", "inverse_permutation", "expert_counts"]


@dataclass
class Segments:
    """``R`` segments of contiguous rows: all of length ``uniform``, or ``lengths [R]`` (device)."""

    num: int  # R
    uniform: int | None = None
    lengths: torch.Tensor | None = None  # [R] int64

    def expand(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """``[R, ...] -> [total, ...]``: row ``r`` repeated once per member of segment ``r``."""
        if self.uniform is not None:
            return x.repeat_interleave(self.uniform, dim=0)
        return x.repeat_interleave(self.lengths, dim=0, output_size=total)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or the input's dtype when it is wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


def segment_sum(z: torch.Tensor, seg: Segments) -> torch.Tensor:
    """``[N, D] -> [R, D]``: sum of each segment of contiguous rows, in order (no atomics).

    Accumulates in at least float32 (``segment_reduce`` would accumulate in a bf16 input's own
    dtype); the result has ``z``'s dtype.
    """
    if seg.uniform == 1:
        return z
    if seg.uniform is not None:
        return z.view(seg.num, seg.uniform, *z.shape[1:]).sum(dim=1)
    wide = z.to(accumulation_dtype(z.dtype))
    # NOTE: unsafe=True skips a check of sum(lengths) that would synchronise with the host.
    return torch.segment_reduce(wide, "sum", lengths=seg.lengths, axis=0, unsafe=True).to(z.dtype)


def inverse_permutation(index: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[index[i]] == i`` for a permutation ``index``."""
    inv = torch.empty_like(index)
    inv[index] = torch.arange(index.numel(), device=index.device)
    return inv


def expert_counts(ids: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Occurrences of each id in ``0..num_bins-1``, int64 ``[num_bins]``, without a host sync.

    NOTE: scatter_add of integers, not bincount: bincount syncs with the host on CUDA to size its
    output, and integer additions are exact in any order.
    """
    flat = ids.reshape(-1)
    return torch.zeros(num_bins, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


class _GatherRows(torch.autograd.Function):
    """``x[index]`` whose backward sums the copies of each source row deterministically.

    ``back_order`` lists the positions of the gathered rows grouped by source row (``x``'s row
    order), and ``back_seg`` gives how many copies each source row has.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: torch.Tensor, back_order: torch.Tensor, back_seg: Segments) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(back_order)
        ctx.back_seg = back_seg
        return x.index_select(0, index)  # [N, D]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (back_order,) = ctx.saved_tensors
        grouped = grad.index_select(0, back_order)  # [N, D] grouped by source row
        return segment_sum(grouped, ctx.back_seg), None, None, None  # [R, D], summed in >= float32


def gather_rows(x: torch.Tensor, index: torch.Tensor, back_order: torch.Tensor, back_seg: Segments) -> torch.Tensor:
    """``[R, D] -> [N, D]`` copies ``x[index]``; the gradient of a row is the ordered sum of its copies."""
    return _GatherRows.apply(x, index, back_order, back_seg)


class _WeightedSegmentSum(torch.autograd.Function):
    """``out[r] = sum_{j in segment r} w[j] * y[order[j]]`` accumulated in float32 (or float64).

    ``order`` is a permutation of ``y``'s rows that makes the segments contiguous; ``inverse`` is
    its inverse. Saves ``y`` in its own dtype (needed for the gate-weight gradient) and the indices.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        y: torch.Tensor,  # [N, D]
        weights: torch.Tensor | None,  # [N] float32, in segment order
        order: torch.Tensor,  # [N]
        inverse: torch.Tensor,  # [N]
        seg: Segments,
        out_dtype: torch.dtype,
        out_shape: tuple[int, ...] | None,
    ) -> torch.Tensor:
        acc = accumulation_dtype(y.dtype)
        z = y.index_select(0, order).to(acc)  # [N, D] in segment order
        if weights is not None:
            z = z * weights.unsqueeze(1).to(acc)
        ctx.seg, ctx.has_weights, ctx.y_dtype = seg, weights is not None, y.dtype
        ctx.save_for_backward(y, weights if weights is not None else y.new_empty(0), order, inverse)
        summed = segment_sum(z, seg)  # [R, D] float32
        if out_shape is None or tuple(out_shape) == tuple(summed.shape):
            return summed.to(out_dtype)
        # NOTE: written into a fresh tensor of the caller's shape, not returned as a reshaped view
        # (FSDP2 warns about modules whose output is a view: in-place ops on it would lose hooks).
        out = summed.new_empty(out_shape, dtype=out_dtype)
        out.view(summed.shape).copy_(summed)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        y, weights, order, inverse = ctx.saved_tensors
        seg: Segments = ctx.seg
        acc = accumulation_dtype(y.dtype)
        N, D = y.shape
        grad = grad.reshape(-1, D).to(acc)  # [R, D]
        if seg.uniform is not None:
            # NOTE: broadcast over each segment's k rows instead of materialising [N, D] copies
            g = grad.unsqueeze(1)  # [R, 1, D] against [R, k, D]
            shape = (seg.num, seg.uniform, D)
        else:
            g, shape = seg.expand(grad, N), (N, D)  # [N, D] in segment order
        grad_w = None
        if ctx.has_weights and ctx.needs_input_grad[1]:
            y_seg = y.index_select(0, order).to(acc).view(shape)
            grad_w = (y_seg * g).sum(dim=-1).reshape(-1).to(weights.dtype)  # [N]
            del y_seg
        grad_y = None
        if ctx.needs_input_grad[0]:
            gz = g * weights.to(acc).view(shape[:-1] + (1,)) if ctx.has_weights else g.expand(shape)
            grad_y = gz.reshape(N, D).index_select(0, inverse).to(ctx.y_dtype)  # [N, D] in y's order
        return grad_y, grad_w, None, None, None, None, None


def weighted_segment_sum(
    y: torch.Tensor,
    weights: torch.Tensor | None,
    order: torch.Tensor,
    inverse: torch.Tensor,
    seg: Segments,
    out_dtype: torch.dtype | None = None,
    out_shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Sum the rows of ``y`` (taken in ``order``) per segment, each times its float32 weight.

    Returns ``[R, D]`` (or ``out_shape``, with ``R * D`` elements) in ``out_dtype`` (default
    ``y.dtype``); the sum itself is float32.
    """
    return _WeightedSegmentSum.apply(y, weights, order, inverse, seg, out_dtype or y.dtype, out_shape)
