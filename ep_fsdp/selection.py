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

__all__ = ["group_limited_mask", "expert_dropout_mask", "jitter_noise", "random_salt", "capacity", "capacity_keep"]

_M32 = (1 << 32) - 1

# A forward's salt: two ints below 2**31, or a [2] int64 tensor of them (random_salt).
Salt = tuple[int, int] | torch.Tensor


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


def expert_dropout_mask(token_index: torch.Tensor, num_experts: int, p: float, salt: Salt) -> torch.Tensor:
    """``[T, E]`` bool, True where the (token, expert) score is dropped, with probability ``p``.

    A hash of (global token index, expert, ``salt``): the same token gets the same mask whichever
    rank holds it, so the routing is the same on every layout. ``salt`` (two ints below 2**31, or
    an int64 tensor of them: :func:`random_salt`)
    changes the mask from one forward to the next.
    """
    experts = torch.arange(num_experts, device=token_index.device)  # [E]
    key = (token_index.long()[:, None] * num_experts + experts) & _M32  # [T, E]
    h = _mix32(_mix32(key ^ salt[0]) ^ salt[1])  # [T, E] uniform in [0, 2**32)
    return h < int(p * 2**32)


@torch.compiler.disable
def random_salt() -> torch.Tensor:
    """``[2]`` int64 (CPU), two ints below 2**31 from the default generator: one forward's salt
    for the hashes above (seeded alike on every rank, and restored by activation checkpointing's
    recomputation).

    NOTE: drawn eagerly also under ``torch.compile`` (a graph break): traced, the draw ran on the
    compiled graph's own random stream, so a compiled model dropped other experts than the same
    model eager. A tensor, not Python ints: a compiled graph would specialize on the ints and
    recompile for every forward's new salt (then make them symbolic, which inductor's C++ code
    for the XOR did not compile)."""
    return torch.randint(0, 2**31 - 1, (2,), dtype=torch.long)


def _unit(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> float32 in ``[0, 1)``: their top 24 bits, exact in float32."""
    return (h >> 8).float() * 2.0**-24


# Rows of each of the two noise tables a token picks from (jitter_noise).
_JITTER_ROWS = 256


@torch.compiler.disable
def _jitter_tables(dim: int, salt: Salt, device: torch.device) -> torch.Tensor:
    """``[2, R, dim]`` uniform ``[0, 1)`` tables drawn from a generator seeded by ``salt`` (the same on
    every rank, on ``device``'s generator). NOTE: eager under ``torch.compile``, whose graphs draw
    from their own stream."""
    seed = int(salt[0]) * 2**31 + int(salt[1])
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(2, _JITTER_ROWS, dim, generator=generator, device=device)


def jitter_noise(token_index: torch.Tensor, dim: int, eps: float, salt: Salt) -> torch.Tensor:
    """``[T, dim]`` float32 multiplicative noise, uniform in ``[1 - eps, 1 + eps]``, a function of
    (global token index, feature, ``salt``): like :func:`expert_dropout_mask`, the same token gets
    the same noise whichever rank holds it, and data-parallel ranks get different noise.

    A token's noise is ``frac(A[i] + B[j] + s)``: rows ``i`` and ``j`` of two ``[256, dim]``
    uniform tables drawn for this ``salt``, and a shift ``s``, all three chosen by a hash of the
    token. Within a token the features are independent uniforms (the tables' entries are); two
    tokens share both rows with probability 1/65536, and then differ by their shifts only. Hashing
    every ``(t, d)`` pair instead took ~50 ms for ``[4096, 256]`` on CPU, against ~1 ms here
    (``uniform_`` over the same shape: ~2.6 ms).

    NOTE: gathers, float32 adds, a floor and a subtraction, each exact or rounded once, so an
    element's value does not depend on the token's position in the batch.
    """
    tables = _jitter_tables(dim, salt, token_index.device)  # [2, R, D]
    tok = token_index.long() & _M32  # [T]
    h = _mix32(_mix32(tok ^ salt[0]) ^ salt[1])  # [T] in [0, 2**32)
    rows_a, rows_b = h & (_JITTER_ROWS - 1), (h >> 16) & (_JITTER_ROWS - 1)  # [T] each (R = 256: 8 bits each)
    shift = _unit(_mix32(h ^ salt[1]))  # [T]
    u = torch.add(tables[0].index_select(0, rows_a), tables[1].index_select(0, rows_b))  # [T, D]
    u = torch.add(u, shift[:, None])
    u = torch.sub(u, u.floor())  # [T, D] in [0, 1)
    return torch.add(torch.mul(u, 2.0 * eps), 1.0 - eps)


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
