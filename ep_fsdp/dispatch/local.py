"""The dispatcher of an unparallelized layer (or ``ep == 1``): sort token copies by expert.

Legend: T tokens, D model dim, k experts per token, S = T*k routed slots, E experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._row_windows import cpu_low_precision
from ._ops import PaddedLayout, Segments, expert_counts, gather_rows, inverse_permutation, padded_layout, weighted_segment_sum
from .base import DispatchHandle, DispatchResult, ExpertsFn, RunStats, TokenDispatcher, check_handle, flat_tokens

__all__ = ["LocalDispatcher", "SlotSort", "experts_layout", "sort_slots"]


@dataclass
class SlotSort:
    """A stable sort of the ``S`` routed slots (``s = t*k + j``) by storage row of their expert."""

    sort_idx: torch.Tensor  # [S] slot of the i-th sorted row
    inverse: torch.Tensor  # [S] sorted position of slot s
    counts: torch.Tensor  # [E] slots per storage row (expert), in storage order
    top_k: int


def sort_slots(physical_ids: torch.Tensor, num_experts: int) -> SlotSort:
    """``[T, k]`` storage rows -> stable sort; ties keep token order (no per-token Python).

    A storage row of ``num_experts`` marks a dropped slot: it sorts last and is not counted."""
    flat = physical_ids.reshape(-1)  # [S]
    sort_idx = torch.argsort(flat, stable=True)  # [S]
    counts = expert_counts(flat, num_experts + 1)[:num_experts]  # [E]
    return SlotSort(sort_idx, inverse_permutation(sort_idx), counts, physical_ids.shape[-1])


def gather_sorted(tokens: torch.Tensor, sort: SlotSort) -> torch.Tensor:
    """``[T, D] -> [S, D]``: one copy of each token per slot, in expert order."""
    T = tokens.shape[0]
    return gather_rows(tokens, sort.sort_idx // sort.top_k, sort.inverse, Segments(T, uniform=sort.top_k))


def combine_sorted(
    y_sorted: torch.Tensor, weights: torch.Tensor, sort: SlotSort, out_dtype: torch.dtype,
    out_shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """``[S, D]`` in expert order, ``weights [T, k]`` -> ``[T, D]`` or ``out_shape`` (float32 weighted sum)."""
    T = weights.shape[0]
    flat_w = weights.reshape(-1).float()  # [S] in (token, slot) order
    return weighted_segment_sum(
        y_sorted, flat_w, sort.inverse, sort.sort_idx, Segments(T, uniform=sort.top_k), out_dtype, out_shape
    )


def experts_layout(
    experts: ExpertsFn, dtype: torch.dtype, counts: torch.Tensor, counts_host: list[int] | None,
    order: torch.Tensor, inverse: torch.Tensor, source: torch.Tensor,
) -> PaddedLayout | None:
    """The :class:`~ep_fsdp.dispatch._ops.PaddedLayout` in which ``experts`` take rows of
    ``dtype`` with these ``[G]`` counts (their ``block_capacity``, see
    :meth:`ep_fsdp.experts.GroupedExperts.block_capacity`), or ``None`` when they take the sorted
    rows as they are. Other arguments as in :func:`~ep_fsdp.dispatch._ops.padded_layout`.

    NOTE: never while compiling: the capacity is a host value (the experts pad behind their own
    graph break there)."""
    block_capacity = getattr(experts, "block_capacity", None)
    if block_capacity is None or torch.compiler.is_compiling():
        return None
    like = torch.empty(0, dtype=dtype, device=counts.device)  # what block_capacity reads of the rows: dtype, device
    blocks = block_capacity(like, counts)  # (C, counts on the host) or None
    if blocks is None or sum(blocks[1]) != order.shape[0]:  # (a slot marked dropped: not in the blocks)
        return None
    capacity, host = blocks
    return padded_layout(order, inverse, source, counts, counts_host if counts_host is not None else host, capacity)


@dataclass
class _LocalHandle(DispatchHandle):
    sort: SlotSort | None = None
    weights: torch.Tensor | None = None  # [T, k] float32
    dropped: torch.Tensor | None = None  # [S] bool, in expert order: rows whose slot was dropped


class LocalDispatcher(TokenDispatcher):
    """All experts on this process: rows are the token copies sorted by expert."""

    def dispatch(
        self, tokens: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, *,
        keep: torch.Tensor | None = None, in_flight: Callable[[], None] | None = None,
    ) -> DispatchResult:
        shape = tuple(tokens.shape)
        tokens, expert_ids, weights = flat_tokens(tokens, expert_ids, weights)  # [T, D], [T, k], [T, k]
        sort = sort_slots(self.placement.to_physical(expert_ids), self.placement.num_experts)
        return self._dispatch_sorted(shape, tokens, weights, sort, keep, in_flight)

    def _dispatch_sorted(
        self, shape: tuple[int, ...], tokens: torch.Tensor, weights: torch.Tensor, sort: SlotSort,
        keep: torch.Tensor | None, in_flight: Callable[[], None] | None,
    ) -> DispatchResult:
        """:meth:`dispatch` once the slots are sorted (``tokens [T, D]``, ``weights [T, k]``)."""
        dropped = None
        if keep is not None:
            # NOTE: dropped slots are still computed here (no host sync to size the kept rows; only
            # an exchange saves their bytes), with a zero weight, and their rows are zeroed before
            # the combine: 0 * inf would be NaN where an expert's output overflowed.
            weights = weights * keep.reshape(weights.shape)
            dropped = ~keep.reshape(-1)[sort.sort_idx]  # [S] in expert order
        rows = gather_sorted(tokens, sort)  # [S, D]
        handle = _LocalHandle(shape, tokens.dtype, None, 0, sort, weights, dropped)
        if in_flight is not None:
            in_flight()
        return DispatchResult(rows, sort.counts, handle)

    def run(
        self, tokens: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: ExpertsFn, *,
        keep: torch.Tensor | None = None, in_flight: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor, RunStats]:
        """As :meth:`TokenDispatcher.run`; when ``experts`` take zero-padded blocks for these
        counts (``experts.block_capacity``, see :meth:`ep_fsdp.experts.GroupedExperts.block_capacity`),
        the tokens are gathered straight into the blocks and combined straight from them, with
        no separate pad and unpad pass."""
        if keep is not None or getattr(experts, "block_capacity", None) is None:
            return super().run(tokens, expert_ids, weights, experts, keep=keep, in_flight=in_flight)
        if torch.compiler.is_compiling() and cpu_low_precision(tokens):
            return _run_eagerly(self, tokens, expert_ids, weights, experts, in_flight)  # NOTE: a graph break, see there
        shape = tuple(tokens.shape)
        flat, ids, w = flat_tokens(tokens, expert_ids, weights)  # [T, D], [T, k], [T, k]
        sort = sort_slots(self.placement.to_physical(ids), self.placement.num_experts)
        layout = experts_layout(experts, flat.dtype, sort.counts, None, sort.sort_idx, sort.inverse, sort.sort_idx // sort.top_k)
        if layout is None:
            rows, counts, handle = self._dispatch_sorted(shape, flat, w, sort, None, in_flight)
            return self.combine(experts(rows, counts, handle.counts_host), handle), RunStats(counts, False, 0)
        segments = Segments(flat.shape[0], uniform=sort.top_k)
        rows = gather_rows(flat, layout.source, layout.slot_row, segments, layout.padding)  # [G*C, D]
        if in_flight is not None:
            in_flight()
        y = experts(rows, sort.counts, layout.counts_host, capacity=layout.capacity)  # [G*C, D]
        out = weighted_segment_sum(
            y, w.reshape(-1).float(), layout.slot_row, layout.position, segments, flat.dtype, shape, layout.padding
        )  # [..., D]
        return out, RunStats(sort.counts, False, 0)

    def combine(self, expert_out: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        check_handle(handle, _LocalHandle, type(self).__name__)
        if handle.dropped is not None:
            expert_out = expert_out.masked_fill(handle.dropped.unsqueeze(1), 0)  # [S, D]
        return combine_sorted(expert_out, handle.weights, handle.sort, handle.out_dtype, handle.out_shape)


@torch.compiler.disable
def _run_eagerly(
    dispatcher: LocalDispatcher, tokens: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
    experts: ExpertsFn, in_flight: Callable[[], None] | None,
) -> tuple[torch.Tensor, RunStats]:
    """:meth:`LocalDispatcher.run` eagerly from a compiled graph (bf16/float16 on CPU).

    NOTE: a graph break, like the host sync it stands for: whether the experts take padded
    blocks, and their capacity, come from the counts on the host (free on the CPU); eagerly the
    tokens go straight into the blocks and the fused kernels run (docs/performance.md: the
    compiled layer against the compiled row windows).
    """
    return dispatcher.run(tokens, expert_ids, weights, experts, in_flight=in_flight)
