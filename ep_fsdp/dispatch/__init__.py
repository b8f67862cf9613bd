"""Token dispatchers: one interface, local / all-to-all / deduplicated all-to-all implementations."""

from __future__ import annotations

import torch.distributed as dist

from ..placement import ExpertPlacement
from ._ops import expert_counts
from .all_to_all import AllToAllDispatcher
from .base import DispatchHandle, DispatchResult, ExchangeDispatcher, TokenDispatcher
from .dedup import DedupAllToAllDispatcher
from .local import LocalDispatcher

__all__ = [
    "TokenDispatcher",
    "ExchangeDispatcher",
    "DispatchResult",
    "DispatchHandle",
    "LocalDispatcher",
    "AllToAllDispatcher",
    "DedupAllToAllDispatcher",
    "make_dispatcher",
    "expert_counts",
]


def make_dispatcher(
    placement: ExpertPlacement, group: dist.ProcessGroup | None, *, top_k: int, dedup_tokens: bool = True
) -> TokenDispatcher:
    """The dispatcher for a layer: local without an exchange group (or ``ep == 1``); else the
    deduplicated exchange when it can save bytes (``dedup_tokens`` and ``top_k > 1``), else the
    plain all-to-all."""
    if group is None or placement.ep == 1:
        return LocalDispatcher(placement)
    if dedup_tokens and top_k > 1:
        return DedupAllToAllDispatcher(placement, group)
    return AllToAllDispatcher(placement, group)
