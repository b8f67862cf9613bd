"""Grouped SwiGLU experts.

Legend: N rows (token copies) that reach this rank's experts, sorted so that each expert's rows
are contiguous; D model dim; H expert hidden dim; G experts held here (E, or E/ep under EP).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.distributed.tensor import DTensor

from . import _fused
from ._blocks import row_blocks
from ._padded_experts import batched_linears, pad_rows, padded_capacity, unpad_rows
from ._row_windows import cpu_low_precision, rows_mm, rows_weight_grad, windows_apply
from .config import MoEConfig

__all__ = ["GroupedExperts", "SharedExperts", "grouped_linear", "swiglu", "use_grouped_mm"]

# (device type, dtype) -> forced choice of grouped_mm (True) or the per-expert loop (False).
_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(a, b, offs=offs)``; under ``torch.compile`` through the operator below.

    NOTE: eagerly the operator's Python dispatch would cost ~0.1 ms a call (9 calls a layer step).
    """
    if torch.compiler.is_compiling():
        return _grouped_mm_op(a, b, offs)
    return torch._grouped_mm(a, b, offs=offs)


def _host_counts(offs: torch.Tensor, counts_host: list[int] | None) -> list[int]:
    """Rows per group as a Python list (read from ``offs`` when not given; CPU only, no device sync)."""
    return counts_host if counts_host is not None else torch.diff(offs, prepend=offs.new_zeros(1)).tolist()


def _rows_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, counts_host: list[int] | None) -> torch.Tensor:
    """``a [N, K] x b [G, K, M] -> [N, M]``: group ``g``'s rows of ``a`` times ``b[g]`` (the row-block
    form of ``grouped_mm``); bf16/float16 on CPU over row windows
    (:func:`ep_fsdp._row_windows.rows_mm`)."""
    if not windows_apply(a):
        return _grouped_mm(a, b, offs)
    return rows_mm(a, b, _host_counts(offs, counts_host))


@torch.library.custom_op("ep_fsdp::grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(a, b, offs=offs)`` as an opaque operator (no autograd of its own).

    ``a [N, K] x b [G, K, M] -> [N, M]`` (row blocks of ``a`` by group), or ``a [M, N] x b [N, K]
    -> [G, M, K]`` (the contraction split by group).

    NOTE: torch 2.13's fake kernel of ``_grouped_mm`` on CPU accepts only bf16 while the eager
    kernel also runs float32 and float16, so ``torch.compile`` of a float32 layer failed. Behind
    this operator compile sees the fake kernel below (any dtype) and calls the eager kernel. The
    output is made contiguous, as the fake kernel says (CUDA pads the last dim's stride to 16 bytes).
    On CPU the kernel is the row-window form (:mod:`ep_fsdp._row_windows`), as in eager mode; its
    weight gradient zeroes and restores rows of its inputs within the call, so the operator is
    still free of visible mutations.
    """
    if windows_apply(a):  # NOTE: the operator's own body runs eagerly, also in a compiled graph
        counts = _host_counts(offs, None)
        if b.dim() == 3:
            return rows_mm(a, b, counts)
        return rows_weight_grad(a.t(), b, counts)
    return torch._grouped_mm(a, b, offs=offs).contiguous()


@_grouped_mm_op.register_fake
def _grouped_mm_fake(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[2])  # [N, M]
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])  # [G, M, K]


class _GroupedLinear(torch.autograd.Function):
    """``y[rows of g] = x[rows of g] @ w[g].T`` with ``grouped_mm`` in both passes; bf16/float16
    on CPU all three matmuls run over row windows instead (:mod:`ep_fsdp._row_windows`).

    NOTE: written out by hand because the autograd formula of ``grouped_mm`` fails on CPU in
    torch 2.13 ("Invalid strides/sizes"), while the three forward-style calls below all run.
    NOTE: the weight gradient contracts over each expert's rows, so an expert without rows is a
    zero-length contraction, which upstream reports say some CUDA kernels fail on or fill with
    garbage. It is never issued when the counts are known on the host (every expert-parallel
    path: they come with the size exchange): the empty experts are left out of the call and get
    exact zeros. With no rows at all no kernel runs. Only where the counts are not on the host
    (the unparallelized layer, which makes no host sync) does the call include empty groups; there
    the CPU kernel writes zeros (tested) and other devices' results are zeroed explicitly. The
    CPU row windows skip empty experts and write their zeros.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, counts: torch.Tensor,
        counts_host: list[int] | None,
    ) -> torch.Tensor:
        # x: [N, K], w: [G, M, K], offs: [G] int32 cumulative row ends, counts: [G] -> [N, M]
        ctx.save_for_backward(x, w, offs, counts)
        ctx.counts_host = counts_host
        if x.shape[0] == 0:
            return x.new_empty(0, w.shape[1])
        return _rows_mm(x, w.transpose(-2, -1), offs, counts_host)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w, offs, counts = ctx.saved_tensors
        if x.shape[0] == 0:
            grad_x = x.new_zeros(x.shape) if ctx.needs_input_grad[0] else None
            grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
            return grad_x, grad_w, None, None, None
        grad = grad.contiguous()  # [N, M]
        grad_x = _rows_mm(grad, w, offs, ctx.counts_host) if ctx.needs_input_grad[0] else None  # [N, K]
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = _grouped_weight_grad(grad, x, offs, counts, ctx.counts_host, w)  # [G, M, K]
        return grad_x, grad_w, None, None, None


def _grouped_weight_grad(
    grad: torch.Tensor, x: torch.Tensor, offs: torch.Tensor, counts: torch.Tensor,
    counts_host: list[int] | None, w: torch.Tensor,
) -> torch.Tensor:
    """``[M, N] x [N, K]`` grouped over the rows of each expert -> ``[G, M, K]``, exact zeros for
    experts without rows (see ``_GroupedLinear``)."""
    if windows_apply(x):
        return rows_weight_grad(grad, x, _host_counts(offs, counts_host))
    # NOTE: not while compiling: a branch on the host counts is a guard on every expert's count
    # being zero or not, so each new set of idle experts recompiled the graph (until dynamo's
    # recompile limit, then it ran eagerly); there the empty groups are zeroed below instead
    if counts_host is not None and not torch.compiler.is_compiling():
        busy = [g for g, c in enumerate(counts_host) if c > 0]
        if len(busy) == len(counts_host):
            return _grouped_mm(grad.t(), x, offs)
        index = torch.tensor(busy, dtype=torch.long, device=w.device)  # [B] experts with rows
        part = _grouped_mm(grad.t(), x, offs.index_select(0, index))  # [B, M, K]
        return torch.zeros_like(w).index_copy_(0, index, part.to(w.dtype))
    grad_w = _grouped_mm(grad.t(), x, offs)
    if grad_w.device.type != "cpu":
        empty = (counts == 0).view(-1, 1, 1)  # [G, 1, 1]
        grad_w = torch.where(empty, torch.zeros((), dtype=grad_w.dtype, device=grad_w.device), grad_w)
    return grad_w


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` that saves only its two inputs (the pre-activations) for the backward.

    NOTE: autograd would also keep ``silu(gate)``, one more ``[N, H]`` tensor per layer.
    NOTE: on CPU each pass runs over blocks of rows (:func:`ep_fsdp._blocks.row_blocks`) so that the
    intermediates (``silu(gate)``, ``grad * up``) are still in cache when the next pass reads
    them: a whole ``[N, H]`` intermediate would be written to memory and read back (measured: the
    MoE layer's forward+backward ~9% faster at H=512, bf16 and float32). The results are those of
    one pass up to one ulp where a block boundary moves silu's scalar tail.
    """

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        if _fused.fused_available(gate, gate.numel()):
            fused = _fused.swiglu_forward(gate, up)  # [N, H] in one pass
            if fused is not None:
                return fused
        blocks = row_blocks(gate.shape[0], gate.device, gate.shape[1] * gate.element_size())
        if len(blocks) == 1:
            return F.silu(gate) * up  # [N, H]
        out = torch.empty_like(gate)  # [N, H]
        act = gate.new_empty((blocks[0][1], gate.shape[1]))  # [rows, H] reused by every block
        for s, e in blocks:
            a = act[: e - s]
            torch.ops.aten.silu.out(gate[s:e], out=a)
            torch.mul(a, up[s:e], out=out[s:e])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        if _fused.fused_available(gate, gate.numel()):
            fused = _fused.swiglu_backward(grad, gate, up)  # [N, H] each, in one pass
            if fused is not None:
                return fused
        blocks = row_blocks(gate.shape[0], gate.device, gate.shape[1] * gate.element_size())
        if len(blocks) == 1:
            grad_up = grad * F.silu(gate)  # [N, H] (silu recomputed: one pass instead of a saved tensor)
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)  # [N, H], fused d silu / d gate
            return grad_gate, grad_up
        grad = grad.contiguous()
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)  # [N, H] each
        tmp = gate.new_empty((blocks[0][1], gate.shape[1]))  # [rows, H] reused by every block
        for s, e in blocks:
            t, g, a = tmp[: e - s], grad[s:e], gate[s:e]
            torch.ops.aten.silu.out(a, out=t)  # silu recomputed
            torch.mul(g, t, out=grad_up[s:e])
            torch.mul(g, up[s:e], out=t)
            torch.ops.aten.silu_backward.grad_input(t, a, grad_input=grad_gate[s:e])  # fused d silu / d gate
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (``[N, H]`` each), saving only ``gate`` and ``up`` for the backward."""
    return _SwiGLU.apply(gate, up)


def _loop_linear(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Fallback: one matmul per expert (a Python loop over experts, never over tokens)."""
    # NOTE: every expert takes part, even with zero rows, so each weight always gets a gradient.
    # NOTE: the experts' matrices come from one unbind, not from w[g] per expert: the backward of
    # each w[g] is a zero [G, M, K] tensor with one slice filled, G of them summed (O(G^2) memory
    # traffic: 9x the dense floor at 128 experts on an H200), where unbind's backward stacks the
    # G slices once.
    if len(counts) != w.shape[0]:
        raise ValueError(f"grouped_linear: counts has {len(counts)} entries for {w.shape[0]} experts (w: "
                         f"{tuple(w.shape)}); pass one row count per expert of w, in expert order.")
    chunks = torch.split(x, counts, dim=0)
    mats = w.unbind(0)  # G x [M, K]
    return torch.cat([chunk @ mat.t() for chunk, mat in zip(chunks, mats)], dim=0)  # [N, M]


def use_grouped_mm(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...] = ()) -> bool:
    """Whether ``grouped_mm`` takes this (device, dtype) and matrix ``dims``: CPU in
    float32/bfloat16/float16; CUDA in bfloat16 on sm90+ (its fast path; other CUDA cases take
    torch's own per-group fallback, so the loop below is as good and avoids its host syncs). Every
    dim in ``dims`` (the experts' D and H) must span a multiple of 16 bytes, grouped_mm's stride
    rule; otherwise the per-expert loop runs. Override (device, dtype) with ``_GROUPED_MM_WORKS``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if any(d * itemsize % 16 for d in dims):
        return False
    key = (device.type, dtype)
    if key in _GROUPED_MM_WORKS:
        return _GROUPED_MM_WORKS[key]
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16)


def grouped_linear(
    x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, counts_host: list[int] | None = None,
    *, grouped: bool | None = None,
) -> torch.Tensor:
    """Apply expert ``g``'s matrix to its contiguous block of rows.

    Args:
        x: ``[N, K]`` rows sorted by expert.
        w: ``[G, M, K]`` one ``M x K`` matrix per expert.
        counts: ``[G]`` rows per expert (on x's device), ``sum == N``.
        counts_host: the same counts as a Python list when already on the host; required by the
            per-expert loop (computed here if missing), and lets ``grouped_mm`` skip empty experts.
        grouped: use ``grouped_mm`` (default: :func:`use_grouped_mm` for these shapes).
    Returns ``[N, M]``.
    """
    if grouped is None:
        grouped = use_grouped_mm(x.device, x.dtype, (x.shape[1], w.shape[1]))
    if grouped:
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)  # [G]
        return _GroupedLinear.apply(x, w, offs, counts, counts_host)
    return _loop_linear(x, w, counts_host if counts_host is not None else counts.tolist())


class GroupedExperts(nn.Module):
    """``E`` SwiGLU experts held as three global 3-D parameters.

    ``w1 [E, H, D]`` (gate), ``w3 [E, H, D]`` (up) and ``w2 [E, D, H]`` (down). Expert ``e`` maps a
    row ``x`` to ``w2[e] @ (silu(w1[e] @ x) * (w3[e] @ x))``. After :func:`ep_fsdp.parallelize_moe`
    the parameters are DTensors sharded ``Shard(0)`` over the ``ep`` mesh dim; the forward then
    works on this rank's block of experts.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        E, H, D = config.num_experts, config.hidden_dim, config.dim
        self.num_experts = E
        self.w1 = nn.Parameter(torch.empty(E, H, D))
        self.w3 = nn.Parameter(torch.empty(E, H, D))
        self.w2 = nn.Parameter(torch.empty(E, D, H))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like ``nn.Linear``'s default bound, per expert."""
        for w in (self.w1, self.w3, self.w2):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's ``(w1, w3, w2)`` blocks as plain tensors (``[G, ...]``)."""
        w1, w3, w2 = (w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w3, self.w2))
        return w1, w3, w2

    def _on_cpu_paths(self, x: torch.Tensor) -> tuple[bool, bool]:
        """``(grouped, on_cpu_paths)``: whether grouped matmuls apply to ``x``, and whether that
        is on the CPU paths (bf16/float16 on CPU, eager: padded blocks or row windows)."""
        grouped = use_grouped_mm(x.device, x.dtype, (self.w1.shape[2], self.w1.shape[1]))  # D, H
        return grouped, grouped and windows_apply(x)

    def block_capacity(self, x: torch.Tensor, counts: torch.Tensor) -> tuple[int, list[int]] | None:
        """``(C, counts on the host)`` when rows like ``x`` with these ``[G]`` counts run as
        batched matmuls over zero-padded blocks of ``C`` rows per expert (see
        :mod:`ep_fsdp._padded_experts`); ``None`` when they run as given. A dispatcher may then
        hand :meth:`forward` the blocks themselves (``capacity=C``)."""
        if not self._on_cpu_paths(x)[1]:
            return None
        counts_host = counts.tolist()  # on the CPU: no device sync
        capacity = padded_capacity(counts_host)
        return (capacity, counts_host) if capacity is not None else None

    def _blocks_forward(self, blocks: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """``[G, C, D] -> [G, C, D]``: the SwiGLU experts as batched matmuls over padded blocks."""
        G, C = blocks.shape[:2]
        gate, up = batched_linears(blocks, w1, w3)  # [G, C, H] each
        hidden = swiglu(gate.view(G * C, -1), up.view(G * C, -1))  # [G*C, H]
        (out,) = batched_linears(hidden.view(G, C, -1), w2)  # [G, C, D]
        return out

    def forward(
        self, x: torch.Tensor, counts: torch.Tensor, counts_host: list[int] | None = None,
        capacity: int | None = None,
    ) -> torch.Tensor:
        """Run the experts on rows grouped by expert.

        Args:
            x: ``[N, D]`` rows, expert ``g``'s rows contiguous and in expert order; or, with
                ``capacity``, ``[G*C, D]`` zero-padded blocks (expert ``g``'s rows first in rows
                ``g*C ..``, zeros after them), as :meth:`block_capacity` asked for.
            counts: ``[G]`` rows per local expert.
            counts_host: optional host copy of ``counts``.
            capacity: ``C`` when ``x`` holds padded blocks.
        Returns ``[N, D]`` (or ``[G*C, D]``, zero rows after each expert's) in x's dtype.
        """
        grouped, on_cpu_paths = self._on_cpu_paths(x)
        if grouped and torch.compiler.is_compiling() and cpu_low_precision(x):
            return _experts_eagerly(self, x, counts, counts_host, capacity)  # NOTE: a graph break, see there
        if counts_host is None and (not grouped or on_cpu_paths):
            counts_host = counts.tolist()  # once for the three matmuls (on the CPU paths: no device sync)
        w1, w3, w2 = self.local_weights()  # [G, H, D], [G, H, D], [G, D, H]
        w1, w3, w2 = w1.to(x.dtype), w3.to(x.dtype), w2.to(x.dtype)
        if capacity is not None:
            G = w1.shape[0]
            return self._blocks_forward(x.view(G, capacity, -1), w1, w3, w2).view(G * capacity, -1)  # [G*C, D]
        if on_cpu_paths:
            capacity = padded_capacity(counts_host)
            if capacity is not None:  # balanced enough: batched matmuls over padded blocks
                blocks = pad_rows(x, counts_host, capacity)  # [G, C, D]
                return unpad_rows(self._blocks_forward(blocks, w1, w3, w2), counts_host)  # [N, D]
        # NOTE: two matmuls instead of one over cat([w1, w3]): a concatenated weight copy would be
        # made every forward and kept alive until the backward.
        gate = grouped_linear(x, w1, counts, counts_host, grouped=grouped)  # [N, H]
        up = grouped_linear(x, w3, counts, counts_host, grouped=grouped)  # [N, H]
        hidden = swiglu(gate, up)  # [N, H]
        return grouped_linear(hidden, w2, counts, counts_host, grouped=grouped)  # [N, D]


@torch.compiler.disable
def _experts_eagerly(
    experts: GroupedExperts, x: torch.Tensor, counts: torch.Tensor, counts_host: list[int] | None, capacity: int | None
) -> torch.Tensor:
    """``experts.forward`` run eagerly from a compiled graph (bf16/float16 on CPU).

    NOTE: a graph break, like the host sync it stands for: the padded blocks' capacity comes from
    the counts on the host (free on the CPU), and eagerly the experts take the padded blocks and
    the fused kernels: alone, 24.5 ms against 30.8 ms for the compiled row windows in bf16 (D=256
    H=512 E=8 k=2 T=4096, 2 cores of a Xeon with AMX; docs/performance.md).
    """
    return experts.forward(x, counts, counts_host, capacity)


class SharedExperts(nn.Module):
    """Shared experts (DeepSeek-V3): one dense SwiGLU of width ``num_shared_experts * hidden_dim``
    applied to every token, ``[T, D] -> [T, D]``."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, width, bias=False)
        self.up_proj = nn.Linear(dim, width, bias=False)
        self.down_proj = nn.Linear(width, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, D]
        if x.dtype == self.gate_proj.weight.dtype:
            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))  # [T, D]
        # NOTE: another input dtype: the weights cast to it, as the routed experts do
        gate, up, down = (p.weight.to(x.dtype) for p in (self.gate_proj, self.up_proj, self.down_proj))
        return F.linear(swiglu(F.linear(x, gate), F.linear(x, up)), down)  # [T, D]
