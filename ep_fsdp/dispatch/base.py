"""The token dispatcher interface: move routed tokens to the experts that hold them, and back.

Legend: T tokens on this rank, D model dim, k experts per token, G local expert slots on this
rank, N rows given to this rank's experts.

An MoE layer has one path through a dispatcher::

    out, stats = dispatcher.run(tokens, expert_ids, weights, experts)

which is, for one chunk (the default)::

    rows, counts, handle = dispatcher.dispatch(tokens, expert_ids, weights)
    y = experts(rows, counts, handle.counts_host)
    out = dispatcher.combine(y, handle)

Implementations (local, all-to-all, deduplicated all-to-all) differ only in how rows travel. An
exchange may stream the tokens in chunks (``chunks``): every chunk's rows are sent before the
first chunk's experts run, so chunk ``i + 1``'s transfer is in flight while chunk ``i``'s experts
compute, and each chunk's results start back as soon as they are ready. It may also put rows on
the wire in a narrower dtype (``wire_dtype``) than the model computes in.
Ownership of experts comes from the :class:`~ep_fsdp.placement.ExpertPlacement` the dispatcher
holds; nothing else decides it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..placement import ExpertPlacement
from ._comm import RowsInFlight, exchange_sizes, send_rows
from ._ops import PaddedLayout

__all__ = [
    "TokenDispatcher", "ExchangeDispatcher", "DispatchResult", "DispatchHandle", "RunStats", "ExpertsFn",
    "flat_tokens", "check_handle", "run_experts",
]

# experts(rows [N, D], counts [G], counts_host list[int] | None) -> [N, D]; experts with a
# ``block_capacity`` method also take ``capacity=C`` and rows in zero-padded blocks ([G*C, D] -> [G*C, D])
ExpertsFn = Callable[[torch.Tensor, torch.Tensor, "list[int] | None"], torch.Tensor]


@dataclass
class DispatchHandle:
    """What ``combine`` needs to undo a ``dispatch``, plus what the layer records.

    Subclassed by each implementation with its own index tensors.
    """

    out_shape: tuple[int, ...]  # [..., D] shape of the tokens given to dispatch
    out_dtype: torch.dtype
    counts_host: list[int] | None  # [G] rows per local expert on the host, when already known
    sent_bytes: int  # bytes this rank sends to other ranks in dispatch + combine
    # the experts' zero-padded blocks when the rows are those (set by an exchange's ``_arrive``)
    blocks: PaddedLayout | None = field(default=None, init=False)


class DispatchResult(NamedTuple):
    """``rows [N, D]`` grouped by local expert slot, ``counts [G]`` (int64, on the rows' device)."""

    rows: torch.Tensor
    counts: torch.Tensor
    handle: DispatchHandle


@dataclass
class SizePlan:
    """One call's local routing work, before the size exchange: ``sizes [ep, c]`` integers for
    each peer (what the size exchange sends). Implementations subclass it with the fields their
    :meth:`ExchangeDispatcher._send` needs."""

    sizes: torch.Tensor


class RunStats(NamedTuple):
    """What one :meth:`TokenDispatcher.run` did, for the layer's counters."""

    counts: torch.Tensor  # [G] rows given to each local slot (all chunks)
    counts_exact: bool  # counts hold kept slots only (every exchange; the local one counts dropped too)
    sent_bytes: int  # bytes sent to other ranks, dispatch + combine, all chunks


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

    def run(
        self, tokens: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: ExpertsFn, *,
        keep: torch.Tensor | None = None, in_flight: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor, RunStats]:
        """``dispatch``, ``experts(rows, counts, counts_host)``, ``combine``: ``[..., D]`` like
        ``tokens``, and what was moved. Arguments as in :meth:`dispatch`."""
        rows, counts, handle = self.dispatch(tokens, expert_ids, weights, keep=keep, in_flight=in_flight)
        out = self.combine(experts(rows, counts, handle.counts_host), handle)
        return out, RunStats(counts, handle.counts_host is not None, handle.sent_bytes)


WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ExchangeDispatcher(TokenDispatcher):
    """A dispatcher that moves rows between the ranks of ``group`` (one rank per ep index).

    ``chunks``: stream each call's tokens in this many contiguous chunks (see :meth:`run`).
    ``wire_dtype``: the dtype rows and their gradients travel in (default: the rows' own); they
    are cast back on arrival, and every sum still accumulates in float32.

    Implementations split the dispatch in three: ``_plan`` (local index math and the sizes for
    each peer), ``_send`` (given the received sizes on the device and every size on the host: rows
    sent asynchronously) and ``_arrive`` (wait, regroup by local slot); the size exchange and its
    one host sync between ``_plan`` and ``_send`` are this class's, so a streamed exchange makes
    one of each for all its chunks. The return is ``_send_back`` (the experts' results sent
    asynchronously) and ``_merge`` (wait, weighted sum per token).
    """

    def __init__(
        self, placement: ExpertPlacement, group: dist.ProcessGroup, *, chunks: int = 1,
        wire_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(placement)
        if dist.get_world_size(group) != placement.ep:
            raise ValueError(
                f"{type(self).__name__}: placement.ep={placement.ep} != size of the exchange group "
                f"{dist.get_world_size(group)}; build the placement for the ep mesh dim."
            )
        check_chunks(chunks, type(self).__name__, "chunks")
        check_wire_dtype(wire_dtype, type(self).__name__, "wire_dtype")
        self.group = group
        self.chunks = chunks
        self.wire_dtype = wire_dtype

    def wire(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype rows of ``dtype`` travel in."""
        return self.wire_dtype or dtype

    def _send_rows(self, x: torch.Tensor, output_splits: list[int], input_splits: list[int]) -> RowsInFlight:
        """Send rows over this exchange's group; streamed (the gradient sent back asynchronously
        too) when the exchange is chunked."""
        return send_rows(x, output_splits, input_splits, self.group, streamed=self.chunks > 1)

    def dispatch(
        self, tokens: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, *,
        keep: torch.Tensor | None = None, in_flight: Callable[[], None] | None = None,
    ) -> DispatchResult:
        (pending,) = self._send_all([self._plan(tokens, expert_ids, weights, keep)], in_flight)
        return self._arrive(pending, None)

    def _send_all(self, plans: list[SizePlan], in_flight: Callable[[], None] | None) -> list[object]:
        """Exchange the sizes of every plan in one collective, bring every size the sends need to
        the host in one copy, and send each plan's rows; ``in_flight()`` runs once the first
        plan's rows are on the wire.

        NOTE: the one device-to-host synchronisation of the layer, also for a streamed exchange:
        with a size exchange per chunk, NCCL would queue chunk i + 1's sizes behind chunk i's rows
        on its stream, and the host would wait for each chunk before sending the next.
        """
        width = plans[0].sizes.shape[1]
        recvs = exchange_sizes(torch.cat([p.sizes for p in plans], dim=1), self.group).split(width, dim=1)  # [ep, c] each
        wanted = [self._host_sizes(p, r) for p, r in zip(plans, recvs)]
        host = torch.cat(wanted).tolist()
        issued, at = [], 0
        for plan, recv, sizes in zip(plans, recvs, wanted):
            issued.append(self._send(plan, recv, host[at:at + sizes.numel()]))
            at += sizes.numel()
            if len(issued) == 1 and in_flight is not None:
                in_flight()
        return issued

    def combine(self, expert_out: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        return self._merge(self._send_back(expert_out, handle), handle)

    def run(
        self, tokens: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: ExpertsFn, *,
        keep: torch.Tensor | None = None, in_flight: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor, RunStats]:
        """The streamed exchange: tokens split into ``chunks`` contiguous chunks (some may be
        empty; every rank makes the same collectives). One size exchange and one host sync serve
        every chunk, and all chunks' rows are sent first, so while
        chunk ``i``'s experts run, the rows of the chunks after it are on the wire, and chunk
        ``i``'s results go back while chunk ``i + 1`` computes. Each token's slots stay in one
        chunk, so every token's output is combined exactly as with one chunk; only the expert
        weight gradients sum their rows in another order. In the backward the transfers are
        issued asynchronously as well (see ``_comm._ReceiveRows``)."""
        if self.chunks == 1:
            (pending,) = self._send_all([self._plan(tokens, expert_ids, weights, keep)], in_flight)
            rows, counts, handle = self._arrive(pending, experts)
            out = self.combine(run_experts(experts, rows, counts, handle), handle)
            return out, RunStats(counts, handle.counts_host is not None, handle.sent_bytes)
        shape = tuple(tokens.shape)
        flat, ids, w = flat_tokens(tokens, expert_ids, weights)  # [T, D], [T, k], [T, k]
        parts = zip(flat.tensor_split(self.chunks), ids.tensor_split(self.chunks), w.tensor_split(self.chunks),
                    keep.reshape(ids.shape).tensor_split(self.chunks) if keep is not None else [None] * self.chunks)
        issued = self._send_all([self._plan(*part) for part in parts], in_flight)
        back = []
        for pending in issued:  # NOTE: chunk i computes while chunks > i are still arriving
            rows, counts, handle = self._arrive(pending, experts)
            back.append((self._send_back(run_experts(experts, rows, counts, handle), handle), handle, counts))
        out = torch.cat([self._merge(returned, handle) for returned, handle, _ in back])  # [T, D]
        if out.shape != shape:
            # NOTE: a fresh tensor, not a reshaped view (FSDP2 warns about module outputs that are
            # views: an in-place op on one would skip its hooks)
            out = out.reshape(shape).clone()
        stats = RunStats(
            torch.stack([c for _, _, c in back]).sum(0), True, sum(h.sent_bytes for _, h, _ in back)
        )
        return out, stats

    @abstractmethod
    def _plan(self, tokens: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
              keep: torch.Tensor | None) -> SizePlan:
        """The local index math of one call and the sizes each peer must know (no collective)."""

    @abstractmethod
    def _host_sizes(self, plan: SizePlan, recv: torch.Tensor) -> torch.Tensor:
        """The integers :meth:`_send` needs on the host, 1-D, from the plan and ``recv [ep, c]``
        (the sizes each peer sent)."""

    @abstractmethod
    def _send(self, plan: SizePlan, recv: torch.Tensor, host: list[int]) -> object:
        """Send the rows (asynchronously); what :meth:`_arrive` needs. ``host``: the values of
        :meth:`_host_sizes`."""

    @abstractmethod
    def _arrive(self, pending: object, experts: ExpertsFn | None) -> DispatchResult:
        """Wait for the rows of :meth:`_send` and group them by local slot: into the zero-padded
        blocks that ``experts`` take, when they take blocks for these counts (see
        :func:`~ep_fsdp.dispatch.local.experts_layout`; the handle's ``blocks`` then say so)."""

    @abstractmethod
    def _send_back(self, expert_out: torch.Tensor, handle: DispatchHandle) -> object:
        """Send the experts' results back (asynchronously); what :meth:`_merge` takes."""

    @abstractmethod
    def _merge(self, returned: object, handle: DispatchHandle) -> torch.Tensor:
        """Wait for the results and sum each token's, ``[..., D]`` like the dispatched tokens."""


def check_chunks(chunks: object, api: str, name: str = "dispatch_chunks") -> None:
    """Raise unless ``chunks`` (the argument ``name`` of ``api``) is a positive int."""
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise ValueError(
            f"{api}: {name} must be an int >= 1, got {chunks!r}; use 1 for one exchange per "
            "layer, or 2-4 to overlap the token exchange with the experts' compute."
        )


def check_wire_dtype(dtype: object, api: str, name: str = "dispatch_dtype") -> None:
    """Raise unless ``dtype`` (the argument ``name`` of ``api``) is None or a floating dtype the
    exchange can carry."""
    if dtype is not None and dtype not in WIRE_DTYPES:
        raise ValueError(
            f"{api}: {name} must be None or one of {list(WIRE_DTYPES)}, got {dtype!r}; "
            "use torch.bfloat16 to send activations and their gradients in half the bytes."
        )


def run_experts(experts: ExpertsFn, rows: torch.Tensor, counts: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """``experts(rows, counts, counts_host)``, with ``capacity=C`` when the rows are padded blocks."""
    if handle.blocks is None:
        return experts(rows, counts, handle.counts_host)
    return experts(rows, counts, handle.counts_host, capacity=handle.blocks.capacity)  # type: ignore[call-arg]


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
