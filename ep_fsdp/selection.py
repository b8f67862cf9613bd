"""Expert-selection rules beyond plain top-k: group-limited routing, expert dropout, capacity.

Legend: T tokens on this rank, E experts, k experts per token, S = T*k routed slots, Gr expert
groups, L groups each token may use.

All of them are pure tensor functions of their inputs (no RNG state, no host synchronisation), so
they are the same on every layout and hand-checkable in unit tests.
"""

from __future__ import annotations

import math

import torch

from .dispatch._ops import expert_counts

__all__ = ["group_limited_mask", "expert_dropout_mask", "capacity", "capacity_keep"]

_M32 = (1 << 32) - 1


def group_limited_mask(select: torch.Tensor, num_groups: int, num_limited: int) -> torch.Tensor:
    """``[T, E]`` bool: the experts inside each token's best ``num_limited`` groups.

    Experts form ``num_groups`` contiguous groups of ``E / num_groups``; a group's score is the sum
    of its two best selection scores (its one score when a group has a single expert), as in
    DeepSeek-V3's node-limited routing. Ties between groups go to the lower group index.
    """
    T, E = select.shape
    per = E // num_groups
    grouped = select.view(T, num_groups, per)  # [T, Gr, E/Gr]
    group_score = grouped.topk(min(2, per), dim=-1).values.sum(dim=-1)  # [T, Gr]
    # NOTE: a stable descending sort breaks ties by group index (topk's tie order is unspecified)
    best = torch.argsort(group_score, dim=-1, descending=True, stable=True)[:, :num_limited]  # [T, L]
    allowed = torch.zeros(T, num_groups, dtype=torch.bool, device=select.device)
    allowed.scatter_(1, best, True)
    return allowed.repeat_interleave(per, dim=1)  # [T, E]


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function on int64 tensors holding values in ``[0, 2**32)``.

    Multipliers stay below 2**31, so products stay below 2**63 (no signed overflow)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def expert_dropout_mask(token_index: torch.Tensor, num_experts: int, p: float, salt: tuple[int, int]) -> torch.Tensor:
    """``[T, E]`` bool, True where the (token, expert) score is dropped, with probability ``p``.

    A hash of (global token index, expert, ``salt``): the same token gets the same mask whichever
    rank holds it, so the routing is the same on every layout. ``salt`` (two ints below 2**31)
    changes the mask from one forward to the next.
    """
    experts = torch.arange(num_experts, device=token_index.device)  # [E]
    key = (token_index.long()[:, None] * num_experts + experts) & _M32  # [T, E]
    h = _mix32(_mix32(key ^ salt[0]) ^ salt[1])  # [T, E] uniform in [0, 2**32)
    return h < int(p * 2**32)


def capacity(capacity_factor: float, tokens: int, top_k: int, num_experts: int) -> int:
    """``ceil(capacity_factor * T * k / E)``: slots one expert takes from one forward call.

    NOTE: a value within floating-point noise (1e-12 relative) above an integer counts as that
    integer: ``1.1 * 100 * 2 / 4`` is 55.000000000000007 in floating point, whose plain ceiling is 56.
    (Plain float arithmetic, so that ``torch.compile`` traces it without a graph break.)
    """
    slots = capacity_factor * tokens * top_k / num_experts
    return math.ceil(slots - abs(slots) * 1e-12)


def capacity_keep(expert_ids: torch.Tensor, slot_scores: torch.Tensor, num_experts: int, limit: int) -> torch.Tensor:
    """``[T, k]`` bool: the slots each expert keeps, at most ``limit`` per expert.

    An expert keeps its highest-scored slots; among equal scores the lower token index (then the
    lower slot) wins. ``expert_ids`` and ``slot_scores`` are ``[T, k]``.
    """
    flat_e = expert_ids.reshape(-1)  # [S]
    S = flat_e.numel()
    by_score = torch.argsort(-slot_scores.reshape(-1).float(), stable=True)  # [S] score desc, slot asc
    order = by_score[torch.argsort(flat_e[by_score], stable=True)]  # [S] by (expert, score desc, slot)
    counts = expert_counts(flat_e, num_experts)  # [E]
    starts = torch.cumsum(counts, 0) - counts  # [E]
    rank_in_expert = torch.arange(S, device=flat_e.device) - starts[flat_e[order]]  # [S]
    keep = torch.empty(S, dtype=torch.bool, device=flat_e.device)
    keep[order] = rank_in_expert < limit
    return keep.view_as(expert_ids)
