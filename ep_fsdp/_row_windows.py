"""Per-expert matmuls over row windows of a fixed granularity (bf16 and float16 on CPU).

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

Every result is its own expert's product; a kernel may sum in another order for another
row count (last-bit differences, as between any two matmul shapes).
"""

from __future__ import annotations

import torch

__all__ = ["ROW_WINDOW", "cpu_low_precision", "rows_mm", "rows_weight_grad", "windows_apply"]

# Row granularity of the windows: oneDNN's bf16 kernels work in blocks of 16 or 32 rows.
ROW_WINDOW = 32


def cpu_low_precision(t: torch.Tensor) -> bool:
    """Whether ``t`` is a bf16 or float16 tensor on CPU (oneDNN's matmuls, see :func:`windows_apply`)."""
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)


def windows_apply(t: torch.Tensor) -> bool:
    """Whether the row windows run for ``t``: a bf16 or float16 tensor on CPU, in eager mode.

    NOTE: on CPU those dtypes go to oneDNN, which builds a kernel per shape; float32 goes to a
    BLAS that takes any shape at the same cost (a float32 weight gradient with new row counts
    each call: 10.98 against 10.94 ms with fixed ones), so windows would only add rows there.
    A compiled graph calls :func:`ep_fsdp.experts._grouped_mm_op`, which applies the same test.
    """
    return cpu_low_precision(t) and not torch.compiler.is_compiling()


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
    expert, each contracted over a row window whose foreign rows are zeroed in both operands
    for the call (exact zeros for experts without rows).

    NOTE: the foreign rows are zeroed in place and restored bit for bit before returning, through
    ``.data`` so that the saved tensors' version counters do not change (other autograd nodes
    that saved ``x`` check them). So a graph must not run this backward from two threads at once
    (autograd allows it with ``retain_graph``). Operands that are not contiguous (an expanded
    tensor's rows may share memory) take the exact rows instead, and are never written to.
    A window that starts at its expert's first row only reaches into later experts' rows, so
    those windows run from the last expert to the first: an expert's own rows are never zeroed
    before its turn, and one copy taken up front restores them all (a few ops per expert: ~3 us
    each here). A window that ends at the last row zeroes earlier rows, and restores them right
    after its call.
    """
    N = grad.shape[0]
    out = grad.new_empty((len(counts), grad.shape[1], x.shape[1]))  # [G, M, K]
    exact = not (grad.is_contiguous() and x.is_contiguous())  # every expert over its exact rows (see the NOTE)
    g_rows, x_rows = grad.data, x.data
    forward: list[tuple[int, int, int, int]] = []  # (expert, window start, first foreign row, window end)
    start = 0
    for g, m in enumerate(counts):
        window = _window(start, m, N) if m and not exact else None
        if not m:
            out[g].zero_()
        elif window is None:  # fewer rows than one window in all, or operands not contiguous: the exact rows
            torch.mm(grad[start : start + m].t(), x[start : start + m], out=out[g])
        elif window[0] == start:
            forward.append((g, start, start + m, window[1]))
        else:  # ends at the last row: foreign rows on both sides
            lo, hi = window
            kept = [(i, j, g_rows[i:j].clone(), x_rows[i:j].clone()) for i, j in ((lo, start), (start + m, hi)) if j > i]
            for i, j, _, _ in kept:
                g_rows[i:j].zero_()
                x_rows[i:j].zero_()
            torch.mm(grad[lo:hi].t(), x[lo:hi], out=out[g])
            for i, j, g_keep, x_keep in kept:
                g_rows[i:j].copy_(g_keep)
                x_rows[i:j].copy_(x_keep)
        start += m
    foreign = sorted({r for _, _, end, hi in forward for r in range(end, hi)})  # rows the windows below zero
    if foreign:
        index = torch.tensor(foreign, device=grad.device)  # [F]
        g_keep, x_keep = g_rows.index_select(0, index), x_rows.index_select(0, index)  # [F, M], [F, K]
    for g, lo, end, hi in reversed(forward):
        g_rows[end:hi].zero_()
        x_rows[end:hi].zero_()
        torch.mm(grad[lo:hi].t(), x[lo:hi], out=out[g])
    if foreign:
        g_rows.index_copy_(0, index, g_keep)
        x_rows.index_copy_(0, index, x_keep)
    return out
