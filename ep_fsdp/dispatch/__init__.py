"""Token dispatchers: one interface, local / all-to-all / deduplicated all-to-all implementations."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..placement import ExpertPlacement
from ._ops import expert_counts
from .all_to_all import AllToAllDispatcher
from .base import DispatchHandle, DispatchResult, ExchangeDispatcher, RunStats, TokenDispatcher
from .dedup import DedupAllToAllDispatcher
from .local import LocalDispatcher

__all__ = [
    "TokenDispatcher",
    "ExchangeDispatcher",
    "DispatchResult",
    "DispatchHandle",
    "RunStats",
    "LocalDispatcher",
    "AllToAllDispatcher",
    "DedupAllToAllDispatcher",
    "make_dispatcher",
    "expert_counts",
]


def make_dispatcher(
    placement: ExpertPlacement, group: dist.ProcessGroup | None, *, top_k: int, dedup_tokens: bool = True,
    chunks: int = 1, wire_dtype: torch.dtype | None = None,
) -> TokenDispatcher:
    """The dispatcher for a layer: local without an exchange group (or ``ep == 1``: nothing
    travels, so ``chunks`` and ``wire_dtype`` change nothing); else the deduplicated exchange when
    it can save bytes (``dedup_tokens`` and ``top_k > 1``), else the plain all-to-all, streaming
    ``chunks`` chunks with rows on the wire in ``wire_dtype``."""
    if group is None or placement.ep == 1:
        return LocalDispatcher(placement)
    cls = DedupAllToAllDispatcher if dedup_tokens and top_k > 1 else AllToAllDispatcher
    return cls(placement, group, chunks=chunks, wire_dtype=wire_dtype)
