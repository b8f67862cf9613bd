"""Fused elementwise kernels for the layer's non-matmul work on CPU in eager mode.

Legend: N rows, R segments (tokens), k rows per segment, D model dim, H expert hidden dim.

In eager mode every op of a chain like the SwiGLU's backward (``silu``, three products,
``silu_backward``) or the combine's (gather, widen, dot products, scaling) is its own pass over
``[N, H]`` or ``[N, D]``, each writing its result to memory; in bf16 each pass also converts to
float32 and back. Here each such chain is one plain-torch function that ``torch.compile`` (its
Inductor C++ backend) turns into one vectorized loop per output: measured on 2 cores of a Xeon
with AMX at D=256 H=512 N=8704, the bf16 SwiGLU backward 4.4 -> 2.0 ms, the combine's
forward+backward 2.0 -> 0.5 ms (docs/performance.md).

When they run: on CPU, in eager mode (a compiled model fuses the plain ops itself), for at
least :data:`FUSED_MIN_ELEMENTS` elements (below it the call overhead of a compiled function is
not worth it), unless ``EP_FSDP_FUSED_KERNELS=0``. Each kernel compiles once per process and
specialization (dtypes, ``k``, flags) on its first call (a few seconds; shapes are dynamic, so
new row counts reuse it). If compiling fails (no C++ compiler, say), one warning says so and the
eager ops run from then on.

Numerics: every function computes in float32 (float64 for float64 inputs) and rounds once to the
output dtype, where the eager chain rounds each intermediate to bf16; results agree with the
eager ops to a few roundings of the output dtype (tested), bf16 ones no farther from the exact
values. Every reduction sums in a fixed order, so results repeat run to run.
"""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["FUSED_MIN_ELEMENTS", "FUSED_MIN_SOFTMAX_ELEMENTS", "MAX_RAGGED", "fused_available", "ragged_segment_sum",
           "segment_sum", "segment_sum_backward", "softmax_backward", "softmax_forward", "swiglu_backward",
           "swiglu_forward"]

# Elements of the widest operand from which a fused kernel replaces the eager ops: the SwiGLU's
# forward+backward fused against eager (2 cores, AMX Xeon) was 5-10% slower at 2^17 elements (a
# compiled call's fixed cost), even at 2^18, 1.25-1.7x faster from 2^19.
FUSED_MIN_ELEMENTS = 1 << 18
# The same for the router's softmax over a narrow last dim (E scores a row), which ATen computes
# row by row: 0.29 ms eagerly for 4096 x 8 scores against 0.07 ms fused (2 cores, AMX Xeon).
FUSED_MIN_SOFTMAX_ELEMENTS = 1 << 14
ENV_SWITCH = "EP_FSDP_FUSED_KERNELS"
# Longest segment the ragged segment sum takes (it makes one pass per row of the longest segment;
# the exchanges' segments hold at most top_k rows).
MAX_RAGGED = 8

# why the fused kernels are off for the rest of this process (a failed compile), or None
_disabled: str | None = None


def fused_available(x: torch.Tensor, elements: int, min_elements: int | None = None) -> bool:
    """Whether the fused kernels run for ``x`` (``elements``: the widest operand's count; from
    ``min_elements``, default :data:`FUSED_MIN_ELEMENTS`)."""
    return (
        x.device.type == "cpu"
        and elements >= max(1, FUSED_MIN_ELEMENTS if min_elements is None else min_elements)
        and _disabled is None
        and not torch.compiler.is_compiling()
        and os.environ.get(ENV_SWITCH, "1") != "0"
    )


class _Kernel:
    """A plain-torch function compiled on its first call (``dynamic=True``: any row count), once
    per specialization: the dtypes of its tensor arguments, the values of the others, and whether
    torch runs one thread or several (Inductor leaves the OpenMP loop out of a kernel compiled
    for one thread, which would then stay serial after ``torch.set_num_threads(2)``).

    NOTE: each specialization compiles its own copy of the function's code object. Dynamo keeps
    its compiled graphs per code object and stops compiling one after ``recompile_limit`` (8)
    variants; dtypes, ``k`` and the flags would reach that in one process (the tests do), and
    with ``fullgraph=True`` that is a hard failure.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}

    def _compiled_for(self, args: tuple[Any, ...]) -> Callable[..., Any]:
        key = (*(a.dtype if isinstance(a, torch.Tensor) else a for a in args), torch.get_num_threads() > 1)
        compiled = self.compiled.get(key)
        if compiled is None:
            fn = self.fn
            copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
            compiled = self.compiled[key] = torch.compile(copy, dynamic=True, fullgraph=True)
        return compiled

    def __call__(self, *args: Any) -> Any:
        """The compiled function's result, or ``None`` when it cannot run here: then the caller
        runs its eager ops. A compile failure disables every kernel of this process with one
        warning; an error the eager function raises as well is the caller's and propagates."""
        global _disabled
        try:
            return self._compiled_for(args)(*args)
        except Exception as e:  # noqa: BLE001 - decided below: the compiler's failure or the input's
            self.fn(*args)  # raises the caller's own error (bad input) unchanged
            _disabled = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            warnings.warn(
                f"ep_fsdp: torch.compile could not build the fused CPU kernels ({_disabled}); the layer "
                f"runs its eager ops instead (same results, slower). Install a C++ compiler for "
                f"torch.compile, or set {ENV_SWITCH}=0 to skip this attempt.",
                RuntimeWarning, stacklevel=3,
            )
            return None


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    acc = _acc(gate.dtype)
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)  # [N, H]


def _swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acc = _acc(gate.dtype)
    a, g = gate.to(acc), grad.to(acc)  # [N, H]
    s = torch.sigmoid(a)
    grad_gate = g * up.to(acc) * (s * (1 + a * (1 - s)))  # d silu(a) / da = s + a s (1 - s)
    grad_up = g * (a * s)
    return grad_gate.to(gate.dtype), grad_up.to(up.dtype)


def _segment_sum(out: torch.Tensor, x: torch.Tensor, order: torch.Tensor, weights: torch.Tensor | None, k: int) -> torch.Tensor:
    acc = _acc(x.dtype)
    idx = order.view(-1, k)  # [R, k]
    w = weights.view(-1, k).to(acc) if weights is not None else None  # [R, k]
    total = None
    for j in range(k):  # in slot order, as the eager embedding_bag sums
        row = x[idx[:, j]].to(acc)  # [R, D]
        if w is not None:
            row = row * w[:, j:j + 1]
        total = row if total is None else total + row
    return out.copy_(total)


def _ragged_segment_sum(
    out: torch.Tensor, x: torch.Tensor, order: torch.Tensor, weights: torch.Tensor | None,
    starts: torch.Tensor, lengths: torch.Tensor, longest: int,
) -> torch.Tensor:
    acc = _acc(x.dtype)
    last = order.shape[0] - 1
    total = None
    for j in range(longest):  # in order within each segment; past its end a segment adds exact zeros
        valid = (lengths > j).unsqueeze(1)  # [R, 1]
        p = (starts + j).clamp(max=last)  # [R] position (clamped: read, then masked)
        row = x[order[p]].to(acc)  # [R, D]
        if weights is not None:
            row = row * weights[p].to(acc).unsqueeze(1)
        row = torch.where(valid, row, 0.0)
        total = row if total is None else total + row
    return out.copy_(total)


def _segment_sum_backward(
    grad: torch.Tensor, y: torch.Tensor | None, segment: torch.Tensor, position: torch.Tensor,
    weights: torch.Tensor | None, want_rows: bool, want_weights: bool, y_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    acc = _acc(y_dtype)
    row_grad = grad[segment].to(acc)  # [N, D] the gradient of each row's segment
    per_row = (row_grad * y.to(acc)).sum(1) if want_weights else None  # [N] <segment grad, row>
    grad_y = None
    if want_rows:
        scaled = row_grad * weights[position].to(acc).unsqueeze(1) if weights is not None else row_grad
        grad_y = scaled.to(y_dtype)  # [N, D]
    return grad_y, per_row


def _softmax_forward(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=-1)  # [T, E]


def _softmax_backward(grad: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    return probs * (grad - (grad * probs).sum(-1, keepdim=True))  # [T, E]


_SOFTMAX_FORWARD = _Kernel(_softmax_forward)
_SOFTMAX_BACKWARD = _Kernel(_softmax_backward)
_SWIGLU_FORWARD = _Kernel(_swiglu_forward)
_SWIGLU_BACKWARD = _Kernel(_swiglu_backward)
_SEGMENT_SUM = _Kernel(_segment_sum)
_RAGGED_SEGMENT_SUM = _Kernel(_ragged_segment_sum)
_SEGMENT_SUM_BACKWARD = _Kernel(_segment_sum_backward)


def softmax_forward(logits: torch.Tensor) -> torch.Tensor | None:
    """``softmax(logits, -1)`` (``[T, E]``, float32), or ``None`` when the kernel cannot run."""
    return _SOFTMAX_FORWARD(logits)


def softmax_backward(grad: torch.Tensor, probs: torch.Tensor) -> torch.Tensor | None:
    """The softmax's input gradient from its output ``probs`` (``[T, E]``), or ``None``."""
    return _SOFTMAX_BACKWARD(grad.contiguous(), probs)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) * up`` (``[N, H]`` each) in one pass, or ``None`` when the kernel cannot run."""
    return _SWIGLU_FORWARD(gate, up)


def swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(grad_gate, grad_up)`` of ``silu(gate) * up`` in one pass (silu recomputed), or ``None``."""
    return _SWIGLU_BACKWARD(grad.contiguous(), gate, up)


def segment_sum(
    out: torch.Tensor, x: torch.Tensor, order: torch.Tensor, weights: torch.Tensor | None, k: int
) -> bool:
    """``out[r] = sum_j weights[r*k + j] * x[order[r*k + j]]`` (``[R, D]``) summed in float32 in
    slot order ``j = 0..k-1``, rounded once to ``out``'s dtype; ``False`` when the kernel cannot run."""
    return _SEGMENT_SUM(out, x, order, weights, k) is not None


def ragged_segment_sum(
    out: torch.Tensor, x: torch.Tensor, order: torch.Tensor, weights: torch.Tensor | None,
    starts: torch.Tensor, lengths: torch.Tensor,
) -> bool:
    """:func:`segment_sum` for segments of any length: segment ``r`` is positions ``starts[r] ..
    starts[r] + lengths[r] - 1`` of ``order`` (``[R]`` each); ``False`` when the kernel cannot
    run, or the longest segment has more than :data:`MAX_RAGGED` rows (one pass per row of it)."""
    longest = int(lengths.max()) if lengths.numel() else 0
    if longest == 0 or longest > MAX_RAGGED:
        return False
    return _RAGGED_SEGMENT_SUM(out, x, order, weights, starts, lengths, longest) is not None


def segment_sum_backward(
    grad: torch.Tensor, y: torch.Tensor | None, segment: torch.Tensor, position: torch.Tensor,
    weights: torch.Tensor | None, *, want_rows: bool, want_weights: bool, y_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """The backward of a weighted segment sum by rows of ``y [N, D]`` (dtype ``y_dtype``): row
    ``i`` sits at position ``position[i]`` (its weight ``weights[position[i]]``) of segment
    ``segment[i]``. Returns ``grad_y [N, D]`` (its segment's gradient times its weight, in
    ``y_dtype``; when ``want_rows``) and ``per_row [N]`` (float32 dot product of its segment's
    gradient with the row, the weight's gradient; when ``want_weights``, which needs ``y``; else
    ``y`` may be ``None``), or ``None`` when the kernel cannot run."""
    return _SEGMENT_SUM_BACKWARD(grad.contiguous(), y, segment, position, weights, want_rows, want_weights, y_dtype)
