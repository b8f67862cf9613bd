"""The dispatcher of an unparallelized layer (or ``ep == 1``): sort token copies by expert.

Legend: T tokens, D model dim, k experts per token, S = T*k routed slots, E experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._ops import Segments, expert_counts, gather_rows, inverse_permutation, weighted_segment_sum
from .base import DispatchHandle, DispatchResult, TokenDispatcher, check_handle, flat_tokens

__all__ = ["LocalDispatcher", "SlotSort", "sort_slots"]


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

    def combine(self, expert_out: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        check_handle(handle, _LocalHandle, type(self).__name__)
        if handle.dropped is not None:
            expert_out = expert_out.masked_fill(handle.dropped.unsqueeze(1), 0)  # [S, D]
        return combine_sorted(expert_out, handle.weights, handle.sort, handle.out_dtype, handle.out_shape)
