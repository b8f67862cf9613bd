"""Moving token copies to their experts and back.

Legend: T tokens on this rank, D model dim, E experts, k experts per token, S = T*k routed slots,
ep expert-parallel degree, G = E/ep experts per rank, R rows received by this rank's experts.

Within a rank, the ``S`` (token, slot) pairs are grouped by expert with one stable sort; the sort
indices and their inverse permutation are all that is kept ("position tracking"), so putting the
results back is a gather, never a Python loop over tokens. Under expert parallelism the sorted
rows are contiguous per destination rank (rank ``r`` owns experts ``[r*G, (r+1)*G)``), so one
``all_to_all_single`` each way moves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .comm import all_to_all_rows

__all__ = [
    "Permutation",
    "expert_counts",
    "sort_by_expert",
    "gather_token_copies",
    "scatter_to_slots",
    "combine",
    "permute_rows",
    "ep_split_sizes",
    "received_expert_order",
    "ExchangePlan",
]


@dataclass
class Permutation:
    """Sort of the ``S = T*k`` routed slots by expert id."""

    sort_idx: torch.Tensor  # [S] slot index (t*k + j) of the i-th sorted row
    inverse: torch.Tensor  # [S] sorted position of slot s: inverse[sort_idx[i]] == i
    counts: torch.Tensor  # [E] rows per expert, in expert order
    top_k: int


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routed slots per expert, ``[T, k] -> [E]`` int64, without a host synchronisation.

    NOTE: scatter_add, not bincount: bincount syncs with the host on CUDA to size its output.
    """
    flat = expert_ids.reshape(-1)  # [S]
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int, counts: torch.Tensor | None = None) -> Permutation:
    """Stable sort of the (token, slot) pairs by expert id.

    ``expert_ids`` is ``[T, k]``. Ties keep token order, so expert ``e``'s rows are its tokens in
    ascending token order. ``counts`` (from :func:`expert_counts`) is computed if not given.
    """
    flat = expert_ids.reshape(-1)  # [S]
    sort_idx = torch.argsort(flat, stable=True)  # [S]
    inverse = torch.empty_like(sort_idx)
    inverse[sort_idx] = torch.arange(sort_idx.numel(), device=sort_idx.device)  # [S]
    if counts is None:
        counts = expert_counts(expert_ids, num_experts)  # [E]
    return Permutation(sort_idx=sort_idx, inverse=inverse, counts=counts, top_k=expert_ids.shape[-1])


class _GatherTokenCopies(torch.autograd.Function):
    """``x[sort_idx // k]``: one copy of a token per routed slot, in expert order.

    NOTE: the backward is a gather with the inverse permutation followed by a sum over the k
    slots of each token, which is cheaper and deterministic compared with autograd's index-add.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, perm: Permutation) -> torch.Tensor:  # type: ignore[override]
        ctx.perm = perm
        ctx.num_tokens = x.shape[0]
        return x.index_select(0, perm.sort_idx // perm.top_k)  # [S, D]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        perm: Permutation = ctx.perm
        per_slot = grad.index_select(0, perm.inverse)  # [S, D] in (token, slot) order
        return per_slot.view(ctx.num_tokens, perm.top_k, -1).sum(dim=1), None  # [T, D]


def gather_token_copies(x: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """``[T, D] -> [S, D]``: the token copies sorted by expert."""
    return _GatherTokenCopies.apply(x, perm)


class _PermuteRows(torch.autograd.Function):
    """``x[index]`` for a permutation ``index``; the backward gathers with the inverse."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Reorder the rows of ``x`` by the permutation ``index`` (``inverse`` is its inverse)."""
    return _PermuteRows.apply(x, index, inverse)


def scatter_to_slots(y_sorted: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """``[S, D]`` expert-ordered rows -> ``[T, k, D]`` back in (token, slot) order."""
    y = permute_rows(y_sorted, perm.inverse, perm.sort_idx)  # [S, D]
    return y.view(-1, perm.top_k, y.shape[-1])  # [T, k, D]


def combine(y_slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over the k slots: ``[T, k, D]`` and ``[T, k]`` -> ``[T, D]``."""
    w = weights.to(y_slots.dtype).unsqueeze(1)  # [T, 1, k]
    return torch.bmm(w, y_slots).squeeze(1)  # [T, D]


def ep_split_sizes(counts: torch.Tensor, recv_counts: torch.Tensor, ep: int) -> tuple[list[int], list[int], list[int]]:
    """Rows to send to / receive from each ep peer, and rows per local expert, in ONE host copy.

    Args:
        counts: ``[E]`` rows this rank routes to each global expert.
        recv_counts: ``[ep * G]`` rows each peer ``s`` routes to my local expert ``g``, at ``s*G + g``.
    Returns ``(input_splits [ep], output_splits [ep], local_counts [G])`` as Python lists.
    """
    G = counts.numel() // ep
    send = counts.view(ep, G).sum(dim=1)  # [ep]
    recv = recv_counts.view(ep, G)  # [ep, G]
    # NOTE: the only device-to-host synchronisation of the layer: all sizes travel together.
    host = torch.cat([send, recv.sum(dim=1), recv.sum(dim=0)]).tolist()
    return host[:ep], host[ep : 2 * ep], host[2 * ep :]


def received_expert_order(recv_counts: torch.Tensor, ep: int, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation that regroups received rows from (source rank, expert) to (expert, source rank).

    Rows arrive as ``ep`` blocks (one per source rank), each sorted by local expert. Returns
    ``(index, inverse)`` with ``received[index]`` grouped by local expert (source order kept).
    """
    G = recv_counts.numel() // ep
    block_expert = torch.arange(G, device=recv_counts.device).repeat(ep)  # [ep*G]
    row_expert = torch.repeat_interleave(block_expert, recv_counts, output_size=num_rows)  # [R]
    index = torch.argsort(row_expert, stable=True)  # [R]
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(num_rows, device=index.device)
    return index, inverse


@dataclass
class ExchangePlan:
    """Everything one expert-parallel exchange needs, computed once per layer call."""

    input_splits: list[int]  # [ep] rows I send to each peer
    output_splits: list[int]  # [ep] rows I receive from each peer
    local_counts: torch.Tensor  # [G] rows per local expert after regrouping
    local_counts_host: list[int]
    regroup: torch.Tensor  # [R]
    regroup_inverse: torch.Tensor  # [R]

    @classmethod
    def build(cls, counts: torch.Tensor, group: dist.ProcessGroup) -> "ExchangePlan":
        """Exchange per-expert counts with the ep peers (a small all-to-all) and plan the rest."""
        ep = dist.get_world_size(group)
        recv_counts = torch.empty_like(counts)  # [ep*G]
        dist.all_to_all_single(recv_counts, counts.contiguous(), group=group)
        input_splits, output_splits, local_counts_host = ep_split_sizes(counts, recv_counts, ep)
        regroup, regroup_inverse = received_expert_order(recv_counts, ep, sum(output_splits))
        local_counts = recv_counts.view(ep, -1).sum(dim=0)  # [G]
        return cls(input_splits, output_splits, local_counts, local_counts_host, regroup, regroup_inverse)

    def dispatch(self, x_sorted: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        """``[S, D]`` sorted by global expert -> ``[R, D]`` grouped by my local experts."""
        received = all_to_all_rows(x_sorted, self.output_splits, self.input_splits, group)  # [R, D]
        return permute_rows(received, self.regroup, self.regroup_inverse)  # [R, D]

    def gather_back(self, y_local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        """``[R, D]`` expert outputs -> ``[S, D]`` back on the token's rank, in sorted order."""
        y_received = permute_rows(y_local, self.regroup_inverse, self.regroup)  # [R, D]
        return all_to_all_rows(y_received, self.input_splits, self.output_splits, group)  # [S, D]
