"""Expert-parallel exchange that sends each token at most once to each ep rank.

Legend: T tokens on this rank, D model dim, k experts per token, S = T*k routed slots, ep ranks,
G = E/ep experts per rank, U unique (token, destination rank) pairs sent, R rows received,
Sr slots received.

When a token picks several experts on the same rank, the plain exchange sends that token once per
expert. Here the sender sends one row per (token, destination rank) plus, per slot, a small record
(row index, local expert id, gate weight). The receiver expands rows to slots, runs its experts,
multiplies by the gate weights and sums the slots of each row, so one row per (token, rank) comes
back and the sender adds the rows of a token. Gradients flow through the rows and the gate
weights; the integer records carry none. One host synchronisation, as in the plain exchange.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import _exchange, all_to_all_rows

__all__ = ["DedupPlan", "dedup_exchange"]


@dataclass
class DedupPlan:
    """Sender-side arithmetic of one exchange (all on the device, except the split lists)."""

    order: torch.Tensor  # [S] slots sorted by (destination rank, token)
    row_of_sorted: torch.Tensor  # [S] unique row (dest-major) of each sorted slot
    unique_token: torch.Tensor  # [U] token of each unique row
    row_in_chunk: torch.Tensor  # [S] row index within its destination's chunk, per sorted slot
    rows_send: list[int]  # [ep]
    slots_send: list[int]  # [ep]
    rows_recv: list[int]  # [ep]
    slots_recv: list[int]  # [ep]
    rows_recv_dev: torch.Tensor  # [ep]
    slots_recv_dev: torch.Tensor  # [ep]

    @classmethod
    def build(cls, expert_ids: torch.Tensor, num_experts: int, group: dist.ProcessGroup) -> "DedupPlan":
        """Find the unique (token, destination) pairs and exchange the sizes (one host copy)."""
        ep = dist.get_world_size(group)
        G = num_experts // ep
        T, k = expert_ids.shape
        device = expert_ids.device
        flat = expert_ids.reshape(-1)  # [S]
        dest = torch.div(flat, G, rounding_mode="floor")  # [S]
        token = torch.arange(T, device=device).repeat_interleave(k)  # [S]
        order = torch.argsort(dest * T + token, stable=True)  # [S]
        s_dest, s_token = dest[order], token[order]  # [S]
        first = torch.ones_like(s_dest, dtype=torch.bool)  # [S] first slot of a (dest, token) pair
        first[1:] = (s_dest[1:] != s_dest[:-1]) | (s_token[1:] != s_token[:-1])
        row_of_sorted = torch.cumsum(first, 0) - 1  # [S]
        zeros = torch.zeros(ep, dtype=torch.long, device=device)
        rows_send = zeros.scatter_add(0, s_dest, first.long())  # [ep]
        slots_send = zeros.scatter_add(0, dest, torch.ones_like(dest))  # [ep]
        sizes = torch.stack([rows_send, slots_send], dim=1)  # [ep, 2]
        recv = torch.empty_like(sizes)
        dist.all_to_all_single(recv, sizes, group=group)  # [ep, 2] from each source
        # NOTE: the only device-to-host synchronisation of the exchange.
        host = torch.cat([rows_send, slots_send, recv[:, 0], recv[:, 1]]).tolist()
        rs, ss, rr, sr = host[:ep], host[ep:2 * ep], host[2 * ep:3 * ep], host[3 * ep:]
        unique_token = torch.empty(sum(rs), dtype=torch.long, device=device)
        unique_token.scatter_(0, row_of_sorted, s_token)  # [U] (duplicates write the same token)
        chunk_start = torch.cumsum(rows_send, 0) - rows_send  # [ep]
        row_in_chunk = row_of_sorted - chunk_start[s_dest]  # [S]
        return cls(order, row_of_sorted, unique_token, row_in_chunk, rs, ss, rr, sr,
                   recv[:, 0].contiguous(), recv[:, 1].contiguous())


def dedup_exchange(
    tokens: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    group: dist.ProcessGroup,
    run_experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Route ``tokens [T, D]`` to their experts over ``group`` and return the combined output.

    ``run_experts(rows [N, D] grouped by local expert, counts [G]) -> [N, D]`` runs this rank's
    experts. Returns ``(out [T, D], rows per local expert [G], bytes sent to other ranks)``.
    """
    ep = dist.get_world_size(group)
    me = dist.get_rank(group)
    G = num_experts // ep
    T, D = tokens.shape
    plan = DedupPlan.build(expert_ids, num_experts, group)
    flat = expert_ids.reshape(-1)  # [S]
    # sender: one row per (token, destination); per slot: (row in chunk, local expert), weight
    rows = tokens.index_select(0, plan.unique_token)  # [U, D]
    records = torch.stack([plan.row_in_chunk, flat[plan.order] % G], dim=1).to(torch.int32)  # [S, 2]
    slot_weights = weights.reshape(-1)[plan.order]  # [S] float32
    rows_in = all_to_all_rows(rows, plan.rows_recv, plan.rows_send, group)  # [R, D]
    records_in = _exchange(records, plan.slots_recv, plan.slots_send, group)  # [Sr, 2]
    weights_in = all_to_all_rows(slot_weights, plan.slots_recv, plan.slots_send, group)  # [Sr]
    # receiver: expand rows to slots, grouped by local expert
    source = torch.repeat_interleave(
        torch.arange(ep, device=tokens.device), plan.slots_recv_dev, output_size=sum(plan.slots_recv)
    )  # [Sr]
    chunk_start = torch.cumsum(plan.rows_recv_dev, 0) - plan.rows_recv_dev  # [ep]
    records_in = records_in.long()
    row_abs = records_in[:, 0] + chunk_start[source]  # [Sr]
    local = records_in[:, 1]  # [Sr]
    group_order = torch.argsort(local, stable=True)  # [Sr]
    counts = torch.zeros(G, dtype=torch.long, device=tokens.device).scatter_add_(
        0, local, torch.ones_like(local)
    )  # [G]
    slot_rows = row_abs[group_order]  # [Sr]
    y = run_experts(rows_in.index_select(0, slot_rows), counts)  # [Sr, D]
    y = y * weights_in[group_order].to(y.dtype).unsqueeze(1)  # [Sr, D]
    partial = torch.zeros(rows_in.shape[0], D, dtype=y.dtype, device=y.device).index_add(0, slot_rows, y)  # [R, D]
    back = all_to_all_rows(partial, plan.rows_send, plan.rows_recv, group)  # [U, D]
    out = torch.zeros(T, D, dtype=back.dtype, device=back.device).index_add(0, plan.unique_token, back)  # [T, D]
    row_bytes = D * tokens.element_size()
    record_bytes = records.element_size() * 2 + slot_weights.element_size()
    sent = (
        (sum(plan.rows_send) - plan.rows_send[me] + sum(plan.rows_recv) - plan.rows_recv[me]) * row_bytes
        + (sum(plan.slots_send) - plan.slots_send[me]) * record_bytes
    )
    return out, counts, sent
