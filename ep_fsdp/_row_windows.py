"""Per-expert matmuls over row windows of a fixed granularity (CPU, eager).

Legend: N rows sorted by expert (expert ``g``'s ``m_g`` rows contiguous, from row ``s_g``), G experts,
W = :data:`ROW_WINDOW`.

oneDNN builds a kernel per matmul shape (a bf16 one takes 0.1-0.3 ms to create) and handles a
ragged row tail separately. With the exact row counts, every routing decision is a new set of
shapes: in a bf16 layer with new routing each step, the weight gradient alone took 5.0 instead
of 2.8 ms per matmul type. Here every per-expert matmul runs over ``m_g`` rounded up to a multiple
of ``W`` (a *window*), so a few shapes repeat from step to step and each kernel sees whole blocks:

* :func:`rows_mm` (``[N, K] x [G, K, M] -> [N, M]``, the forward and input-gradient matmuls): the
  window's extra rows belong to the next experts and are computed with this expert's matrix;
  they are overwritten when their own expert runs, in order. A window that would run past the
  end ends at the last row instead, and its product goes to a scratch block.
* :func:`rows_weight_grad` (``[N, M]^T x [N, K] -> [G, M, K]``, the weight gradient): a window
  contracts over the expert's own rows and some neighbours' rows, which are zeroed in both
  operands for the call and restored right after, so they add exact zeros.

Every result is its own expert's product; a float32 kernel may sum in another order for another
row count (last-bit differences, as between any two matmul shapes).
"""

from __future__ import annotations

import torch

__all__ = ["ROW_WINDOW", "rows_mm", "rows_weight_grad", "windows_apply"]

# Row granularity of the windows: oneDNN's bf16 kernels work in blocks of 16 or 32 rows.
ROW_WINDOW = 32


def windows_apply(t: torch.Tensor) -> bool:
    """Whether the row windows run for ``t``: on CPU, in eager mode (a compiled graph or another
    device keeps its own ``grouped_mm``)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _window(start: int, count: int, total: int) -> tuple[int, int] | None:
    """``[lo, hi)``: ``count`` rows from ``start`` rounded up to a multiple of :data:`ROW_WINDOW`,
    from ``start`` when that fits before ``total``, else ending at ``total``; ``None`` when
    ``total`` rows are fewer than the window."""
    size = -(-count // ROW_WINDOW) * ROW_WINDOW
    if size > total:
        return None
    lo = min(start, total - size)
    return lo, lo + size


def rows_mm(a: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``a [N, K] x b [G, K, M] -> [N, M]``: expert ``g``'s rows of ``a`` times ``b[g]``, each over
    a row window (see the module docstring)."""
    N = a.shape[0]
    out = a.new_empty((N, b.shape[2]))  # [N, M]
    start = 0
    for g, m in enumerate(counts):
        if m:
            window = _window(start, m, N)
            if window is None:  # fewer rows than one window in all: the exact rows
                torch.mm(a[start : start + m], b[g], out=out[start : start + m])
            elif window[0] == start:  # forwards: spills into the next experts' rows
                torch.mm(a[window[0] : window[1]], b[g], out=out[window[0] : window[1]])
            else:  # at the end: the previous experts' rows are done, so the product goes to scratch
                block = torch.mm(a[window[0] : window[1]], b[g])  # [window, M]
                out[start : start + m] = block[start - window[0] : start - window[0] + m]
        start += m
    return out


def rows_weight_grad(grad: torch.Tensor, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``grad [N, M]``, ``x [N, K]`` -> ``[G, M, K]``: ``grad[rows of g]^T @ x[rows of g]`` per
    expert, each contracted over a row window whose foreign rows are zeroed for the call (exact
    zeros for experts without rows).

    NOTE: the foreign rows (fewer than a window, on one side or both) are zeroed in place and
    restored bit for bit before the next call, through ``.data`` so that the saved tensors'
    version counters do not change (other autograd nodes that saved ``x`` check them). Nothing
    else runs in between.
    """
    N = grad.shape[0]
    out = grad.new_zeros((len(counts), grad.shape[1], x.shape[1]))  # [G, M, K]
    g_rows, x_rows = grad.data, x.data
    g_keep = grad.new_empty((ROW_WINDOW, grad.shape[1]))  # [W, M] foreign rows while zeroed
    x_keep = x.new_empty((ROW_WINDOW, x.shape[1]))  # [W, K]
    start = 0
    for g, m in enumerate(counts):
        if m:
            window = _window(start, m, N)
            if window is None:
                torch.mm(grad[start : start + m].t(), x[start : start + m], out=out[g])
            else:
                lo, hi = window
                foreign = [(i, j) for i, j in ((lo, start), (start + m, hi)) if j > i]  # fewer than W rows in all
                at = 0
                for i, j in foreign:
                    g_keep[at : at + j - i].copy_(g_rows[i:j])
                    x_keep[at : at + j - i].copy_(x_rows[i:j])
                    g_rows[i:j].zero_()
                    x_rows[i:j].zero_()
                    at += j - i
                torch.mm(grad[lo:hi].t(), x[lo:hi], out=out[g])
                at = 0
                for i, j in foreign:
                    g_rows[i:j].copy_(g_keep[at : at + j - i])
                    x_rows[i:j].copy_(x_keep[at : at + j - i])
                    at += j - i
        start += m
    return out
