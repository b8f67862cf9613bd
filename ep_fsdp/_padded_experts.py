"""SwiGLU experts as batched matmuls over capacity-padded row blocks (bf16 and float16 on CPU).

Legend: N rows sorted by expert (expert ``g``'s ``m_g`` rows contiguous), G experts, C capacity
(the largest ``m_g`` rounded up to :data:`PAD_ROWS`), D model dim, H expert hidden dim.

On a CPU with AMX, oneDNN runs one batched matmul over ``[G, C, K]`` blocks at about the speed of
one dense matmul over the same rows, while ``G`` separate matmuls of ~1000 rows each (the per-expert
form, :mod:`ep_fsdp._row_windows`) took about twice as long per row (D=256 H=512 E=8, 2 cores of
a Xeon with AMX; docs/performance.md). So when the experts' row counts are balanced enough that
padding every expert to the largest adds few rows (:func:`padded_capacity`), the rows are copied
into a zero-padded ``[G, C, D]`` block and the three matmuls of the SwiGLU run as ``bmm``.

The padding rows are zeros in the forward and get zero gradients in the backward, so they add
exact zeros to every weight gradient: an expert without rows gets an exact zero gradient. Only
the order in which a kernel sums may differ from the per-expert matmuls (last-bit differences).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

__all__ = ["MAX_PADDING", "PAD_ROWS", "batched_linears", "pad_rows", "padded_capacity", "unpad_rows"]

# Capacity granularity: a few capacities repeat from step to step, so oneDNN's kernel cache hits
# (it builds a kernel per shape, 0.1-0.3 ms each for bf16), and AMX tiles see whole 16-row blocks.
PAD_ROWS = 32
# Padded rows allowed beyond the N real ones, as a fraction of N; above it the per-expert path runs.
# NOTE: the padded blocks are what the backward keeps (input rows and the SwiGLU's pre-activations
# and output), so this bounds the layer's saved bytes to 1.125x those of the per-expert path
# (recipes/benchmarks/memory.py: 1.094x of the minimum at its default shape).
MAX_PADDING = 0.125


def padded_capacity(counts: list[int]) -> int | None:
    """``C``: the largest count rounded up to :data:`PAD_ROWS`, or ``None`` when there are no rows
    or ``G * C`` exceeds ``N`` by more than :data:`MAX_PADDING` (routing too uneven to pad)."""
    total = sum(counts)
    if total == 0:
        return None
    capacity = -(-max(counts) // PAD_ROWS) * PAD_ROWS
    return capacity if len(counts) * capacity <= total * (1 + MAX_PADDING) else None


def _pad(x: torch.Tensor, counts: list[int], capacity: int) -> torch.Tensor:
    """``[N, F] -> [G, C, F]``: expert ``g``'s rows first in block ``g``, zeros after them."""
    out = x.new_empty((len(counts), capacity, x.shape[1]))  # [G, C, F]
    for g, part in enumerate(torch.split(x, counts)):
        out[g, : part.shape[0]] = part
        out[g, part.shape[0]:].zero_()
    return out


def _unpad(blocks: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``[G, C, F] -> [N, F]``: the first ``m_g`` rows of each block, in expert order."""
    return torch.cat([blocks[g, :m] for g, m in enumerate(counts)])


class _PadRows(torch.autograd.Function):
    """:func:`_pad` with :func:`_unpad` as its backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, counts: list[int], capacity: int) -> torch.Tensor:  # type: ignore[override]
        ctx.counts = counts
        return _pad(x, counts, capacity)  # [G, C, D]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _unpad(grad, ctx.counts), None, None  # [N, D]


class _UnpadRows(torch.autograd.Function):
    """:func:`_unpad` with :func:`_pad` as its backward (zero gradients for the padding rows)."""

    @staticmethod
    def forward(ctx: Any, blocks: torch.Tensor, counts: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.counts, ctx.capacity = counts, blocks.shape[1]
        return _unpad(blocks, counts)  # [N, D]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _pad(grad, ctx.counts, ctx.capacity), None  # [G, C, D]


class _BatchedLinears(torch.autograd.Function):
    """``x [G, C, K]`` times each ``w [G, M, K]`` transposed -> one ``[G, C, M]`` per weight.

    NOTE: by hand so that the input gradient of several weights (gate and up share their input)
    is accumulated by the matmul itself (``baddbmm_``) instead of a separate add over ``[G, C, K]``,
    and each weight gradient comes out ``[G, M, K]`` contiguous, like its parameter (autograd's
    ``bmm`` of a transposed weight gives a transposed gradient, which the accumulation then copies).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.save_for_backward(x, *weights)
        return tuple(torch.bmm(x, w.transpose(1, 2)) for w in weights)  # [G, C, M] each

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *weights = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            for grad, w in zip(grads, weights):
                grad_x = torch.bmm(grad, w) if grad_x is None else grad_x.baddbmm_(grad, w)  # [G, C, K]
        grad_ws = tuple(
            torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[i + 1] else None  # [G, M, K]
            for i, grad in enumerate(grads)
        )
        return (grad_x, *grad_ws)


def pad_rows(x: torch.Tensor, counts: list[int], capacity: int) -> torch.Tensor:
    """``x [N, D]`` sorted by expert -> ``[G, C, D]`` zero-padded blocks (differentiable)."""
    return _PadRows.apply(x, counts, capacity)


def unpad_rows(blocks: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``[G, C, D]`` -> ``[N, D]``: the real rows of each block, in expert order (differentiable)."""
    return _UnpadRows.apply(blocks, counts)


def batched_linears(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``x [G, C, K]`` -> ``x @ w.transpose(1, 2)`` (``[G, C, M]``) for each ``w [G, M, K]`` in x's dtype."""
    return _BatchedLinears.apply(x, *weights)
