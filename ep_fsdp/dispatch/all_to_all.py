"""Expert-parallel dispatcher that sends one row per (token, expert) with ``all_to_all_single``.

Legend: T tokens on this rank, D model dim, k experts per token, S = T*k routed slots, ep ranks,
G = E/ep local slots, R rows received by this rank.

Slots are sorted by storage row (``rank * G + slot``), so the rows for each destination rank are
contiguous and one uneven all-to-all moves them. Received rows come ordered (source rank, local
slot) and are regrouped to (local slot, source rank) with one stable sort.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._comm import RowsInFlight
from ._ops import Segments, gather_rows, inverse_permutation, weighted_segment_sum
from .base import DispatchHandle, DispatchResult, ExchangeDispatcher, ExpertsFn, SizePlan, check_handle, flat_tokens
from .local import SlotSort, combine_sorted, experts_layout, gather_sorted, sort_slots

__all__ = ["AllToAllDispatcher", "regroup_by_expert"]


def regroup_by_expert(recv_counts: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation taking rows ordered (source, local slot) to (local slot, source).

    ``recv_counts [ep, G]``: rows from source ``s`` for local slot ``g``. Returns ``(index,
    inverse)`` with ``received[index]`` grouped by local slot, source order kept within a slot.
    """
    ep, G = recv_counts.shape
    block_slot = torch.arange(G, device=recv_counts.device).repeat(ep)  # [ep*G]
    row_slot = torch.repeat_interleave(block_slot, recv_counts.reshape(-1), output_size=num_rows)  # [R]
    index = torch.argsort(row_slot, stable=True)  # [R]
    return index, inverse_permutation(index)


@dataclass
class _AllToAllHandle(DispatchHandle):
    sort: SlotSort | None = None
    weights: torch.Tensor | None = None  # [T, k]
    input_splits: list[int] | None = None  # [ep] rows I send to each peer
    output_splits: list[int] | None = None  # [ep] rows I receive from each peer
    regroup: torch.Tensor | None = None  # [R]
    regroup_inverse: torch.Tensor | None = None  # [R]
    dropped: int = 0  # dropped slots, sorted last and not sent


@dataclass
class _Plan(SizePlan):
    shape: tuple[int, ...]  # the tokens' shape, [..., D]
    tokens: torch.Tensor  # [T, D]
    weights: torch.Tensor  # [T, k]
    sort: SlotSort
    x_sorted: torch.Tensor  # [S, D] in the wire dtype, contiguous per destination


@dataclass
class _Issued:
    received: RowsInFlight  # [R, D] in the wire dtype
    recv: torch.Tensor  # [ep, G] rows from source s for my slot g
    handle: _AllToAllHandle


class AllToAllDispatcher(ExchangeDispatcher):
    """One row per (token, expert) to the expert's rank; results come back and are combined there."""

    def _plan(self, tokens: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
              keep: torch.Tensor | None) -> _Plan:
        ep, G, E = self.placement.ep, self.num_local_experts, self.placement.num_experts
        shape = tuple(tokens.shape)
        tokens, expert_ids, weights = flat_tokens(tokens, expert_ids, weights)  # [T, D], [T, k], [T, k]
        physical = self.placement.to_physical(expert_ids)  # [T, k]
        if keep is not None:
            physical = physical.masked_fill(~keep.reshape(physical.shape), E)  # dropped: sorted last, never sent
        sort = sort_slots(physical, E)
        x_sorted = gather_sorted(tokens.to(self.wire(tokens.dtype)), sort)  # [S, D], contiguous per destination
        send = sort.counts.view(ep, G)  # [ep, G] rows for peer r's slot g
        return _Plan(send, shape, tokens, weights, sort, x_sorted)

    def _host_sizes(self, plan: SizePlan, recv: torch.Tensor) -> torch.Tensor:
        return torch.cat([plan.sizes.sum(1), recv.sum(1), recv.sum(0)])  # [ep + ep + G]

    def _send(self, plan: _Plan, recv: torch.Tensor, host: list[int]) -> _Issued:  # type: ignore[override]
        ep = self.placement.ep
        shape, tokens, weights, sort, x_sorted = plan.shape, plan.tokens, plan.weights, plan.sort, plan.x_sorted
        input_splits, output_splits, counts_host = host[:ep], host[ep:2 * ep], host[2 * ep:]
        kept = sum(input_splits)
        received = self._send_rows(x_sorted[:kept], output_splits, input_splits)
        R = sum(output_splits)
        regroup, regroup_inverse = regroup_by_expert(recv, R)  # overlaps the transfer
        me = dist.get_rank(self.group)
        sent = (sum(input_splits) - input_splits[me]) + (sum(output_splits) - output_splits[me])
        handle = _AllToAllHandle(
            shape, tokens.dtype, counts_host, sent * tokens.shape[1] * x_sorted.element_size(),
            sort, weights, input_splits, output_splits, regroup, regroup_inverse, x_sorted.shape[0] - kept,
        )
        return _Issued(received, recv, handle)

    def _arrive(self, pending: object, experts: ExpertsFn | None) -> DispatchResult:
        p: _Issued = pending  # type: ignore[assignment]
        h = p.handle
        R = p.received.rows
        counts = p.recv.sum(0)  # [G]
        h.blocks = experts_layout(experts, h.out_dtype, counts, h.counts_host, h.regroup, h.regroup_inverse, h.regroup)
        received = p.received.arrive()  # [R, D] in the wire dtype (waits for the rows)
        if h.blocks is None:
            rows = gather_rows(received, h.regroup, h.regroup_inverse, Segments(R, uniform=1))  # [R, D]
            return DispatchResult(rows.to(h.out_dtype), counts, h)
        rows = gather_rows(received, h.blocks.source, h.blocks.slot_row, Segments(R, uniform=1), h.blocks.padding)  # [G*C, D]
        return DispatchResult(rows.to(h.out_dtype), counts, h)

    def _send_back(self, expert_out: torch.Tensor, handle: DispatchHandle) -> RowsInFlight:
        h = handle
        check_handle(h, _AllToAllHandle, type(self).__name__)
        if h.blocks is not None:  # each received row's block row, read back in received order
            R = h.blocks.slot_row.shape[0]
            y_received = weighted_segment_sum(expert_out, None, h.blocks.slot_row, h.blocks.position, Segments(R, uniform=1),
                                              self.wire(expert_out.dtype), unused_rows=h.blocks.padding)  # [R, D]
            return self._send_rows(y_received, h.input_splits, h.output_splits)
        R = expert_out.shape[0]
        y = expert_out.to(self.wire(expert_out.dtype))  # [R, D]
        y_received = gather_rows(y, h.regroup_inverse, h.regroup, Segments(R, uniform=1))  # [R, D]
        return self._send_rows(y_received, h.input_splits, h.output_splits)

    def _merge(self, returned: object, handle: DispatchHandle) -> torch.Tensor:
        h: _AllToAllHandle = handle  # type: ignore[assignment]
        y_sorted = returned.arrive()  # type: ignore[attr-defined]  # [S - dropped, D]
        if h.dropped:
            y_sorted = torch.cat([y_sorted, y_sorted.new_zeros(h.dropped, y_sorted.shape[1])])  # [S, D]
        return combine_sorted(y_sorted, h.weights, h.sort, h.out_dtype, h.out_shape)  # [..., D], float32 sum
