"""Deterministic row gathers and segment sums with hand-written backwards.

Legend: N gathered rows, R output rows (segments), D feature dim.

Every reduction in the dispatch path is a *segment sum over rows taken in a given order*, computed
by one ``embedding_bag(mode="sum")`` call: it gathers, weights and sums each segment's rows in
order in a single pass (one kernel instead of gather, cast, multiply and reduce), never a scatter
with atomics (one row per segment is a plain gather, and two unweighted rows one add, with the
same bits: see :func:`ordered_segment_sum`). Results are therefore bitwise reproducible run to run,
also on CUDA under ``torch.use_deterministic_algorithms(True)``. Weighted sums accumulate in
float32 whatever the row dtype.

NOTE: autograd's own backward of ``index_select``/``x[idx]`` is an ``index_add``, which uses
atomics on CUDA; the Functions below replace it with a permutation followed by a segment sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .. import _fused
from .._blocks import row_blocks

__all__ = ["Segments", "ordered_segment_sum", "gather_rows", "weighted_segment_sum", "inverse_permutation", "expert_counts",
           "PaddedLayout", "padded_layout"]


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

    def save(self, ctx: Any) -> list[torch.Tensor]:
        """Keep this description on an autograd ``ctx``; returns the tensors to save with it.

        NOTE: only the static ``uniform`` goes on ``ctx``; the count ``R`` (a symbolic int under
        ``torch.compile`` with dynamic shapes, which dynamo cannot carry on ``ctx``) is derived
        again in the backward by :meth:`restore`.
        """
        ctx.seg_uniform = self.uniform
        return [self.lengths] if self.lengths is not None else []

    @staticmethod
    def restore(ctx: Any, saved: tuple[torch.Tensor, ...], num_rows: int) -> Segments:
        """The segments that :meth:`save` kept, of ``num_rows`` rows (``saved``: the tensors it returned)."""
        if ctx.seg_uniform is not None:
            return Segments(num_rows // ctx.seg_uniform, uniform=ctx.seg_uniform)
        return Segments(saved[0].shape[0], lengths=saved[0])

    def part(self, start: int, end: int) -> Segments:
        """Segments ``[start, end)`` on their own."""
        if self.uniform is not None:
            return Segments(end - start, uniform=self.uniform)
        return Segments(end - start, lengths=self.lengths[start:end])

    def offsets(self, device: torch.device) -> torch.Tensor:
        """``[R]`` int64 index of each segment's first row."""
        if self.uniform is not None:
            return torch.arange(0, self.num * self.uniform, self.uniform, device=device)
        return torch.cumsum(self.lengths, 0) - self.lengths


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or the input's dtype when it is wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


def ordered_segment_sum(
    x: torch.Tensor, order: torch.Tensor, seg: Segments, weights: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[r] = sum_{j in segment r} weights[j] * x[order[j]]``, ``[N, D] -> [R, D]``.

    Segment ``r`` is the ``r``-th run of ``seg`` in ``order [N]``; ``weights [N]`` (optional) are
    per position of ``order``. Summed in order, in at least float32 (the accumulation dtype:
    float32, or float64 for a float64 ``x``); the result is rounded once to ``out_dtype``
    (default: the accumulation dtype), or written into ``out [R, D]`` (contiguous) when given.

    NOTE: ``embedding_bag`` does the gather, the weighting and the in-order sum in one pass and
    without atomics. A row narrower than float32 is widened first, so that a bf16 row is never
    summed in bf16; on CPU that runs over cache-sized blocks of segments (gather, widen, sum per
    block) instead of widening all ``N`` rows to memory and reading them back.
    """
    acc = accumulation_dtype(x.dtype)
    out_dtype = out.dtype if out is not None else out_dtype or acc
    if seg.uniform == 1 and weights is None:  # one row per segment: a permutation, nothing is summed
        rows = x.index_select(0, order)  # [R, D]
        return rows.to(out_dtype) if out is None else out.copy_(rows)
    if _fused.fused_available(x, order.shape[0] * x.shape[1]):
        # one fused pass on CPU: gather, widen, weight and sum each segment's rows
        fused_out = out if out is not None else x.new_empty((seg.num, x.shape[1]), dtype=out_dtype)  # [R, D]
        if seg.uniform is not None:
            done = _fused.segment_sum(fused_out, x, order, weights, seg.uniform)
        else:
            done = _fused.ragged_segment_sum(fused_out, x, order, weights, seg.offsets(x.device), seg.lengths)
        if done:
            return fused_out
    if seg.uniform == 2 and weights is None and out_dtype == x.dtype:
        # NOTE: two rows per segment (k = 2): one add in x's dtype, which computes a narrower dtype
        # in float32 and rounds once, so the bits equal the float32 sum below (0 + a + b) rounded
        # once, without the widening pass.
        if out is None:
            out = x.new_empty((seg.num, x.shape[1]))  # [R, D]
        for r0, r1, p0, p1 in _segment_blocks(x.device, seg, order.shape[0], x.shape[1] * acc.itemsize):
            pairs = x.index_select(0, order[p0:p1]).view(r1 - r0, 2, x.shape[1])  # [b, 2, D]
            torch.add(pairs[:, 0], pairs[:, 1], out=out[r0:r1])
        return out
    w = weights.to(acc) if weights is not None else None
    blocks = [] if x.dtype == acc else _segment_blocks(x.device, seg, order.shape[0], x.shape[1] * acc.itemsize)
    if len(blocks) <= 1:  # one pass: nothing to widen (the rows are read where they are), GPU, compile
        summed = _segment_sum(x if x.dtype == acc else x.to(acc), order, seg, w)  # [R, D]
        return summed.to(out_dtype) if out is None else out.copy_(summed)
    if out is None:
        out = x.new_empty((seg.num, x.shape[1]), dtype=out_dtype)  # [R, D]
    for r0, r1, p0, p1 in blocks:
        rows = x.index_select(0, order[p0:p1]).to(acc)  # [p1 - p0, D] this block's rows, in order
        local = seg.part(r0, r1)
        out[r0:r1] = _segment_sum(rows, torch.arange(p1 - p0, device=x.device), local, w[p0:p1] if w is not None else None)
    return out


def _segment_sum(wide: torch.Tensor, order: torch.Tensor, seg: Segments, weights: torch.Tensor | None) -> torch.Tensor:
    """:func:`ordered_segment_sum` in one pass over rows already in the accumulation dtype."""
    if seg.uniform == 1:  # one row per segment: a gather (and a scale)
        out = wide.index_select(0, order)
        return out * weights.unsqueeze(1) if weights is not None else out
    return torch.nn.functional.embedding_bag(
        order, wide, seg.offsets(order.device), mode="sum", per_sample_weights=weights,
    )  # [R, D]


def _segment_blocks(device: torch.device, seg: Segments, positions: int, row_bytes: int) -> list[tuple[int, int, int, int]]:
    """``(r0, r1, p0, p1)``: segments ``[r0, r1)`` covering positions ``[p0, p1)`` of ``order``, in
    blocks of about :data:`ep_fsdp._blocks.BLOCK_BYTES` (a segment is never split); one block off
    the CPU or under ``torch.compile``."""
    pos = row_blocks(positions, device, row_bytes)
    if len(pos) == 1:
        return [(0, seg.num, 0, positions)]
    rows = pos[0][1]  # positions per block
    if seg.uniform is not None:
        per = max(1, rows // seg.uniform)  # segments per block
        return [(r, min(r + per, seg.num), r * seg.uniform, min(r + per, seg.num) * seg.uniform)
                for r in range(0, seg.num, per)]
    starts = seg.offsets(seg.lengths.device)  # [R] (host: CPU only reaches here)
    cut = torch.nonzero(starts[1:] // rows != starts[:-1] // rows).flatten().add_(1).tolist()  # first segment of each new block
    bounds = [0] + cut + [seg.num]
    ends = starts.tolist() + [positions]
    return [(a, b, ends[a], ends[b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


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


@dataclass
class PaddedLayout:
    """Rows sorted by local slot placed in ``G`` blocks of ``capacity`` rows: slot ``g``'s ``m_g``
    rows first in block ``g``, zero rows after them (padding), ``[G*C, D]`` in all."""

    capacity: int  # C
    counts_host: list[int]  # [G] rows of each slot
    source: torch.Tensor  # [G*C] source row each block row copies (0 for padding rows)
    position: torch.Tensor  # [G*C] input position (slot) of each block row (0 for padding rows)
    slot_row: torch.Tensor  # [S] block row of each input position
    padding: list[tuple[int, int]]  # [start, end) block rows that are padding


def padded_layout(
    order: torch.Tensor, inverse: torch.Tensor, source: torch.Tensor, counts: torch.Tensor, counts_host: list[int],
    capacity: int,
) -> PaddedLayout:
    """Where ``S`` rows sorted by local slot go in blocks of ``capacity`` rows.

    ``order [S]``: the input position of the ``i``-th sorted row (``inverse``: its inverse);
    ``source [S]``: the row of the gathered tensor that the ``i``-th sorted row copies;
    ``counts [G]`` rows per local slot (``counts_host``: the same on the host, summing to ``S``).
    """
    G, S = len(counts_host), order.shape[0]
    device = order.device
    starts = torch.cumsum(counts, 0) - counts  # [G] first sorted row of each slot
    shift = torch.arange(G, device=device) * capacity - starts  # [G] block row - sorted row, per slot
    row = torch.arange(S, device=device) + shift.repeat_interleave(counts, output_size=S)  # [S] block row of sorted row i
    source_rows = torch.zeros(G * capacity, dtype=torch.long, device=device).index_copy_(0, row, source)
    position = torch.zeros(G * capacity, dtype=torch.long, device=device).index_copy_(0, row, order)
    padding = [(g * capacity + m, (g + 1) * capacity) for g, m in enumerate(counts_host) if m < capacity]
    return PaddedLayout(capacity, counts_host, source_rows, position, row.index_select(0, inverse), padding)


class _GatherRows(torch.autograd.Function):
    """``x[index]`` whose backward sums the copies of each source row deterministically.

    ``back_order`` lists the positions of the gathered rows grouped by source row (``x``'s row
    order), and ``back_seg`` gives how many copies each source row has.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, index: torch.Tensor, back_order: torch.Tensor, back_seg: Segments,
        zero_rows: list[tuple[int, int]] | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(back_order, *back_seg.save(ctx))
        return _zeroed(x.index_select(0, index), zero_rows)  # [N, D]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        back_order, *seg_saved = ctx.saved_tensors
        back_seg = Segments.restore(ctx, tuple(seg_saved), back_order.shape[0])
        summed = ordered_segment_sum(grad, back_order, back_seg, out_dtype=grad.dtype)  # [R, D] copies of each source row, in order
        return summed, None, None, None, None


def gather_rows(
    x: torch.Tensor, index: torch.Tensor, back_order: torch.Tensor, back_seg: Segments,
    zero_rows: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """``[R, D] -> [N, D]`` copies ``x[index]``; the gradient of a row is the ordered sum of its copies.

    ``zero_rows``: ``[start, end)`` ranges of the result set to zero (rows that are no copy:
    their ``index`` entries are ignored, and ``back_order`` must not list them).
    """
    return _GatherRows.apply(x, index, back_order, back_seg, zero_rows)


class _WeightedSegmentSum(torch.autograd.Function):
    """``out[r] = sum_{j in segment r} w[j] * y[order[j]]`` accumulated in float32 (or float64).

    ``order`` is a permutation of ``y``'s rows that makes the segments contiguous; ``inverse`` is
    its inverse. Saves the indices, and ``y`` in its own dtype when there are weights (the gate-weight
    gradient needs it; without weights the backward is a gather of the output gradient).
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
        unused_rows: list[tuple[int, int]] | None,
    ) -> torch.Tensor:
        ctx.has_weights, ctx.y_dtype, ctx.unused_rows = weights is not None, y.dtype, unused_rows
        ctx.save_for_backward(y if weights is not None else None, weights, order, inverse, *seg.save(ctx))
        if out_shape is None:
            return ordered_segment_sum(y, order, seg, weights, out_dtype=out_dtype)  # [R, D] summed in float32
        # NOTE: written into a fresh tensor of the caller's shape, not returned as a reshaped view
        # (FSDP2 warns about modules whose output is a view: in-place ops on it would lose hooks).
        out = y.new_empty(out_shape, dtype=out_dtype)
        ordered_segment_sum(y, order, seg, weights, out=out.view(seg.num, y.shape[1]))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        y, weights, order, inverse, *seg_saved = ctx.saved_tensors
        seg = Segments.restore(ctx, tuple(seg_saved), order.shape[0])
        acc = accumulation_dtype(ctx.y_dtype)
        N, D = inverse.shape[0], grad.shape[-1]  # y's rows (padding included) and width
        grad = grad.reshape(-1, D)  # [R, D] in the output's dtype, widened per block below
        want_w = ctx.has_weights and ctx.needs_input_grad[1]
        if not (want_w or ctx.needs_input_grad[0]):
            return None, None, None, None, None, None, None, None
        # row i of y sits at position inverse[i], in that position's segment
        row_segment = (inverse // seg.uniform if seg.uniform is not None
                       else seg.expand(torch.arange(seg.num, device=grad.device), order.shape[0]).index_select(0, inverse))  # [N]
        if _fused.fused_available(grad, N * D):
            # one fused pass on CPU over the rows of y: gather the segment's gradient, dot, scale
            fused = _fused.segment_sum_backward(
                grad, y, row_segment, inverse, weights, want_rows=ctx.needs_input_grad[0], want_weights=want_w,
                y_dtype=ctx.y_dtype,
            )
            if fused is not None:
                grad_y, per_row = fused
                grad_w = per_row.index_select(0, order).to(weights.dtype) if per_row is not None else None  # [N] segment order
                return _zeroed(grad_y, ctx.unused_rows), grad_w, None, None, None, None, None, None
        # NOTE: one gather by row_segment gives every row its segment's gradient, shared by both results. On CPU it runs over cache-sized blocks of rows, so
        # the gathered block is still in cache for the dot products and the scaling.
        need_y = ctx.needs_input_grad[0]
        row_weight = weights.index_select(0, inverse).to(acc) if ctx.has_weights and need_y else None  # [N]
        per_row = grad.new_empty(N, dtype=acc) if want_w else None  # [N] gate-weight gradient in y's row order
        grad_y = grad.new_empty((N, D), dtype=ctx.y_dtype) if need_y else None  # [N, D]
        for s, e in row_blocks(N, grad.device, D * acc.itemsize):
            row_grad = grad.index_select(0, row_segment[s:e]).to(acc)  # [b, D] each row's segment gradient
            if per_row is not None:  # b dot products: the products in acc (y widened on the fly), summed per row
                # NOTE: one batched mat-vec (bmm of [b, 1, D] x [b, D, 1]) took ~30% longer here
                torch.sum(torch.mul(row_grad, y[s:e]), 1, out=per_row[s:e])
            if grad_y is not None and row_weight is not None:
                torch.mul(row_grad, row_weight[s:e].unsqueeze(1), out=grad_y[s:e])  # computed in acc, stored in y's dtype
            elif grad_y is not None:
                grad_y[s:e] = row_grad
        grad_w = per_row.index_select(0, order).to(weights.dtype) if per_row is not None else None  # [N] segment order
        return _zeroed(grad_y, ctx.unused_rows), grad_w, None, None, None, None, None, None


def _zeroed(x: torch.Tensor | None, rows: list[tuple[int, int]] | None) -> torch.Tensor | None:
    """``x`` with the ``[start, end)`` row ranges ``rows`` set to zero (in place)."""
    if x is not None and rows:
        for start, end in rows:
            x[start:end].zero_()
    return x


def weighted_segment_sum(
    y: torch.Tensor,
    weights: torch.Tensor | None,
    order: torch.Tensor,
    inverse: torch.Tensor,
    seg: Segments,
    out_dtype: torch.dtype | None = None,
    out_shape: tuple[int, ...] | None = None,
    unused_rows: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Sum the rows of ``y`` (taken in ``order``) per segment, each times its float32 weight.

    Returns ``[R, D]`` (or ``out_shape``, with ``R * D`` elements) in ``out_dtype`` (default
    ``y.dtype``); the sum itself is float32. ``unused_rows``: ``[start, end)`` ranges of rows of
    ``y`` that ``order`` does not list (padding); they get a zero gradient, and their entries of
    ``inverse`` may be any valid position.
    """
    return _WeightedSegmentSum.apply(y, weights, order, inverse, seg, out_dtype or y.dtype, out_shape, unused_rows)
