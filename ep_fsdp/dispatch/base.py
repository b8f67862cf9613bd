"""The token dispatcher interface: move routed tokens to the experts that hold them, and back.

Legend: T tokens on this rank, D model dim, k experts per token, G local expert slots on this
rank, N rows given to this rank's experts.

An MoE layer has one path through a dispatcher::

    rows, counts, handle = dispatcher.dispatch(tokens, expert_ids, weights)
    y = experts(rows, counts, handle.counts_host)
    out = dispatcher.combine(y, handle)

Implementations (local, all-to-all, deduplicated all-to-all) differ only in how rows travel.
Ownership of experts comes from the :class:`~ep_fsdp.placement.ExpertPlacement` the dispatcher
holds; nothing else decides it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..placement import ExpertPlacement

__all__ = ["TokenDispatcher", "ExchangeDispatcher", "DispatchResult", "DispatchHandle", "flat_tokens", "check_handle"]


@dataclass
class DispatchHandle:
    """What ``combine`` needs to undo a ``dispatch``, plus what the layer records.

    Subclassed by each implementation with its own index tensors.
    """

    out_shape: tuple[int, ...]  # [..., D] shape of the tokens given to dispatch
    out_dtype: torch.dtype
    counts_host: list[int] | None  # [G] rows per local expert on the host, when already known
    sent_bytes: int  # bytes this rank sends to other ranks in dispatch + combine


class DispatchResult(NamedTuple):
    """``rows [N, D]`` grouped by local expert slot, ``counts [G]`` (int64, on the rows' device)."""

    rows: torch.Tensor
    counts: torch.Tensor
    handle: DispatchHandle


class TokenDispatcher(ABC):
    """Routes token copies to their experts' rank and slot, and combines the results.

    Every rank of the exchange group must call ``dispatch`` and ``combine`` the same number of
    times, also with zero tokens (they contain collectives).
    """

    def __init__(self, placement: ExpertPlacement) -> None:
        self.placement = placement

    @property
    def num_local_experts(self) -> int:
        """``G``: expert slots held by this rank."""
        return self.placement.experts_per_rank

    @abstractmethod
    def dispatch(
        self, tokens: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, *,
        keep: torch.Tensor | None = None, in_flight: Callable[[], None] | None = None,
    ) -> DispatchResult:
        """``tokens [..., D]`` (``T`` tokens), logical ``expert_ids [T, k]`` int64, float32
        ``weights [T, k]``.

        ``keep [T, k]`` bool (optional): slots marked False are dropped: they contribute zero and
        their gate weight gets no gradient; an exchange does not send them. ``in_flight`` (optional)
        is called once while the tokens are on the wire (after the exchange is issued, before it is
        waited on), e.g. to compute shared experts; a local dispatcher calls it at the end."""

    @abstractmethod
    def combine(self, expert_out: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """``expert_out [N, D]`` (rows as dispatched) -> ``[..., D]`` (the tokens' shape): the
        gate-weighted sum of each token's expert outputs, accumulated in float32 and cast to the
        tokens' dtype, as a fresh tensor (not a view)."""


class ExchangeDispatcher(TokenDispatcher):
    """A dispatcher that moves rows between the ranks of ``group`` (one rank per ep index)."""

    def __init__(self, placement: ExpertPlacement, group: dist.ProcessGroup) -> None:
        super().__init__(placement)
        if dist.get_world_size(group) != placement.ep:
            raise ValueError(
                f"{type(self).__name__}: placement.ep={placement.ep} != size of the exchange group "
                f"{dist.get_world_size(group)}; build the placement for the ep mesh dim."
            )
        self.group = group


def flat_tokens(tokens: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tokens [..., D] -> [T, D]``; ``expert_ids`` and ``weights`` to ``[T, k]``."""
    k = expert_ids.shape[-1]
    return tokens.reshape(-1, tokens.shape[-1]), expert_ids.reshape(-1, k), weights.reshape(-1, k)


def check_handle(handle: DispatchHandle, expected: type, dispatcher: str) -> None:
    """Raise unless ``handle`` came from this kind of dispatcher's ``dispatch``."""
    if not isinstance(handle, expected):
        raise TypeError(
            f"{dispatcher}.combine: got a {type(handle).__name__}, expected the {expected.__name__} returned "
            f"by {dispatcher}.dispatch; pass the handle of the matching dispatch call."
        )
