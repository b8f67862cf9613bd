"""Expert-parallel dispatcher that sends each token at most once to each ep rank.

Legend: T tokens on this rank, D model dim, k experts per token, S = T*k routed slots, ep ranks,
G = E/ep local slots, U unique (token, destination rank) rows sent, R rows received, Sr slots
received.

When a token picks several experts held by one rank, the plain exchange sends it there once per
expert. Here the sender sends one row per (token, destination rank) and, per slot, one record
``(row in the destination's chunk, local slot, gate weight)``; records and weights travel in one
message. The receiver expands rows to slots, runs its experts, and sums each row's slots times
their float32 gate weights (in float32, then cast to the row dtype for the wire), so one row per
(token, rank) goes back; the sender sums each token's rows in float32. Every sum is an ordered
segment sum (no atomics). One host synchronisation per layer: the size exchange carries rows per
peer and slots per (peer, local slot), so the per-expert counts are known on the host too.
It saves bytes only when ``k > 1``; with ``k == 1`` use :class:`AllToAllDispatcher`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._comm import RowsInFlight, exchange_records
from ._ops import Segments, expert_counts, gather_rows, inverse_permutation, weighted_segment_sum
from .base import DispatchHandle, DispatchResult, ExchangeDispatcher, ExpertsFn, SizePlan, check_handle, flat_tokens
from .local import experts_layout

__all__ = ["DedupAllToAllDispatcher"]

_RECORD_BYTES = 3 * 4  # (row, slot, weight) as three 32-bit words


@dataclass
class _DedupHandle(DispatchHandle):
    rows_send: list[int] | None = None  # [ep]
    rows_recv: list[int] | None = None  # [ep]
    tok_order: torch.Tensor | None = None  # [U] returned rows grouped by token
    tok_inverse: torch.Tensor | None = None  # [U]
    rows_per_token: torch.Tensor | None = None  # [T]
    weights_in: torch.Tensor | None = None  # [Sr] float32, arrival order
    group_order: torch.Tensor | None = None  # [Sr] arrival slot of each expert-ordered slot
    group_inverse: torch.Tensor | None = None  # [Sr]
    slots_per_row: torch.Tensor | None = None  # [R]


@dataclass
class _Plan(SizePlan):
    shape: tuple[int, ...]  # the tokens' shape, [..., D]
    tokens: torch.Tensor  # [T, D]
    weights: torch.Tensor  # [T, k]
    slot: torch.Tensor  # [S] local slot of each routed slot at its destination
    order: torch.Tensor  # [S] slots sorted by (destination, token); dropped slots last
    s_dest: torch.Tensor  # [S] destination of each sorted slot (ep: dropped)
    s_token: torch.Tensor  # [S] token of each sorted slot
    first: torch.Tensor  # [S] bool: the sorted slot starts a (destination, token) row
    rows_send: torch.Tensor  # [ep] rows for each destination
    slots_send: torch.Tensor  # [ep, G] slots for each destination's local slot


@dataclass
class _Issued:
    rows_in: RowsInFlight  # [R, D] in the wire dtype
    records_in: torch.Tensor  # [Sr, 2] (row in the source's chunk, local slot)
    weights_in: torch.Tensor  # [Sr] float32
    rows_recv: torch.Tensor  # [ep] rows from each source
    slots_recv: torch.Tensor  # [ep, G] slots from each source for each local slot
    handle: _DedupHandle


class DedupAllToAllDispatcher(ExchangeDispatcher):
    """One row per (token, destination rank); gate weights applied on the expert's rank."""

    def _plan(self, tokens: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
              keep: torch.Tensor | None) -> _Plan:
        ep, G = self.placement.ep, self.num_local_experts
        shape = tuple(tokens.shape)
        tokens, expert_ids, weights = flat_tokens(tokens, expert_ids, weights)  # [T, D], [T, k], [T, k]
        T, k = expert_ids.shape
        device = tokens.device
        dest, slot = (t.reshape(-1) for t in self.placement.locate(expert_ids))  # [S] ep rank, [S] local slot
        if keep is not None:  # dropped slots go to a virtual rank ep: sorted last, never sent
            kept_slot = keep.reshape(-1)
            dest, slot = dest.masked_fill(~kept_slot, ep), slot.masked_fill(~kept_slot, 0)
        token = torch.arange(T, device=device).repeat_interleave(k)  # [S]
        order = torch.argsort(dest * T + token, stable=True)  # [S] by (destination, token)
        s_dest, s_token = dest[order], token[order]  # [S]
        first = torch.ones_like(s_dest, dtype=torch.bool)  # [S] first slot of a (dest, token) pair
        first[1:] = (s_dest[1:] != s_dest[:-1]) | (s_token[1:] != s_token[:-1])
        rows_send = torch.zeros(ep + 1, dtype=torch.long, device=device).scatter_add_(0, s_dest, first.long())[:ep]
        slots_send = expert_counts(dest * G + slot, (ep + 1) * G)[:ep * G].view(ep, G)  # [ep, G]
        sizes = torch.cat([rows_send.unsqueeze(1), slots_send], dim=1)  # [ep, 1 + G]
        return _Plan(sizes, shape, tokens, weights, slot, order, s_dest, s_token, first, rows_send, slots_send)

    def _host_sizes(self, plan: _Plan, recv: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rows_recv, slots_recv = recv[:, 0], recv[:, 1:]  # [ep], [ep, G]
        return torch.cat([plan.rows_send, plan.slots_send.sum(1), rows_recv, slots_recv.sum(1), slots_recv.sum(0)])

    def _send(self, plan: _Plan, recv: torch.Tensor, host: list[int]) -> _Issued:  # type: ignore[override]
        ep = self.placement.ep
        shape, tokens, weights, slot, order = plan.shape, plan.tokens, plan.weights, plan.slot, plan.order
        s_dest, s_token, first, rows_send = plan.s_dest, plan.s_token, plan.first, plan.rows_send
        T, k = weights.shape
        rows_recv_dev, slots_recv_dev = recv[:, 0], recv[:, 1:]  # [ep], [ep, G]
        rs, ss, rr, sr, counts_host = (host[:ep], host[ep:2 * ep], host[2 * ep:3 * ep], host[3 * ep:4 * ep], host[4 * ep:])
        U, R, Sk = sum(rs), sum(rr), sum(ss)  # Sk: slots kept (sent), the first Sk sorted

        # sender: one row per (token, destination), rows ordered (destination, token)
        row_of_sorted = torch.cumsum(first, 0) - 1  # [S] unique row (destination-major)
        first_pos = torch.argsort((~first).to(torch.int8), stable=True)[:U]  # [U] sorted slot starting each row
        unique_token = s_token[first_pos]  # [U]
        tok_order = torch.argsort(unique_token, stable=True)  # [U] rows grouped by token
        rows_per_token = expert_counts(unique_token, T)  # [T]
        wire_tokens = tokens.to(self.wire(tokens.dtype))  # [T, D] (a no-op without a wire dtype)
        rows = gather_rows(wire_tokens, unique_token, tok_order, Segments(T, lengths=rows_per_token))  # [U, D]
        chunk_start = torch.cumsum(rows_send, 0) - rows_send  # [ep]
        records = torch.stack([row_of_sorted[:Sk] - chunk_start[s_dest[:Sk]], slot[order[:Sk]]], dim=1)  # [Sk, 2]
        flat_w = weights.reshape(-1, 1).float()  # [S, 1]
        w_sorted = gather_rows(flat_w, order, inverse_permutation(order), Segments(T * k, uniform=1)).squeeze(1)  # [S]

        # NOTE: the records (12 bytes a slot) go first and are waited for at once; the rows go after
        # them, so the receiver's index work on the records (in _arrive) runs while the rows travel.
        # (Sent after the rows, the records queued behind them; records first: the bf16 EP layer
        # step 1-2% faster, docs/performance.md.)
        records_in, weights_in = exchange_records(records, w_sorted[:Sk], sr, ss, self.group)  # [Sr, 2], [Sr]
        rows_in = self._send_rows(rows, rr, rs)  # [R, D]
        me = dist.get_rank(self.group)
        row_bytes = tokens.shape[1] * rows.element_size()
        sent = ((U - rs[me]) + (R - rr[me])) * row_bytes + (sum(ss) - ss[me]) * _RECORD_BYTES
        handle = _DedupHandle(shape, tokens.dtype, counts_host, sent, rs, rr, tok_order, inverse_permutation(tok_order),
                              rows_per_token)
        return _Issued(rows_in, records_in, weights_in, rows_recv_dev, slots_recv_dev, handle)

    def _arrive(self, pending: object, experts: ExpertsFn | None) -> DispatchResult:
        # receiver: slots arrive ordered (source, row); expand rows to slots grouped by local slot
        p: _Issued = pending  # type: ignore[assignment]
        h, ep = p.handle, self.placement.ep
        device = p.records_in.device
        R, Sr = p.rows_in.rows, p.records_in.shape[0]
        src_rank = torch.repeat_interleave(torch.arange(ep, device=device), p.slots_recv.sum(1), output_size=Sr)  # [Sr]
        in_start = torch.cumsum(p.rows_recv, 0) - p.rows_recv  # [ep]
        row_abs = p.records_in[:, 0] + in_start[src_rank]  # [Sr], non-decreasing
        h.group_order = torch.argsort(p.records_in[:, 1], stable=True)  # [Sr]
        h.group_inverse = inverse_permutation(h.group_order)
        h.slots_per_row = expert_counts(row_abs, R)  # [R]
        h.weights_in = p.weights_in
        counts = p.slots_recv.sum(0)  # [G]
        source = row_abs[h.group_order]  # [Sr] received row of each expert-ordered slot
        h.blocks = experts_layout(experts, h.out_dtype, counts, h.counts_host, h.group_order, h.group_inverse, source)
        per_row = Segments(R, lengths=h.slots_per_row)
        rows_in = p.rows_in.arrive().to(h.out_dtype)  # [R, D] back in the compute dtype (waits for the rows)
        if h.blocks is None:
            return DispatchResult(gather_rows(rows_in, source, h.group_inverse, per_row), counts, h)  # [Sr, D]
        x = gather_rows(rows_in, h.blocks.source, h.blocks.slot_row, per_row, h.blocks.padding)  # [G*C, D]
        return DispatchResult(x, counts, h)

    def _send_back(self, expert_out: torch.Tensor, handle: DispatchHandle) -> RowsInFlight:
        h = handle
        check_handle(h, _DedupHandle, type(self).__name__)
        R = h.slots_per_row.shape[0]
        # the expert output row of each received slot, and the received slot of each output row
        order, inverse, padding = (h.group_inverse, h.group_order, None) if h.blocks is None else (
            h.blocks.slot_row, h.blocks.position, h.blocks.padding)
        partial = weighted_segment_sum(
            expert_out, h.weights_in, order, inverse, Segments(R, lengths=h.slots_per_row),
            self.wire(expert_out.dtype), unused_rows=padding,
        )  # [R, D]: float32 sum of each row's weighted slots, cast to the wire dtype
        return self._send_rows(partial, h.rows_send, h.rows_recv)  # [U, D]

    def _merge(self, returned: object, handle: DispatchHandle) -> torch.Tensor:
        h: _DedupHandle = handle  # type: ignore[assignment]
        T = h.rows_per_token.shape[0]
        back = returned.arrive()  # type: ignore[attr-defined]  # [U, D]
        return weighted_segment_sum(
            back, None, h.tok_order, h.tok_inverse, Segments(T, lengths=h.rows_per_token), h.out_dtype, h.out_shape
        )  # [..., D], float32 sum of each token's rows
