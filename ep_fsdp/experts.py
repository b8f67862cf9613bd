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
from torch.distributed.tensor import DTensor

from .comm import scale_grad
from .config import MoEConfig

__all__ = ["GroupedExperts", "grouped_linear", "use_grouped_mm"]

# (device type, dtype) -> forced choice of grouped_mm (True) or the per-expert loop (False).
_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}


class _GroupedLinear(torch.autograd.Function):
    """``y[rows of g] = x[rows of g] @ w[g].T`` with ``grouped_mm`` in both passes.

    NOTE: written out by hand because the autograd formula of ``grouped_mm`` fails on CPU in
    torch 2.13 ("Invalid strides/sizes"), while the three forward-style calls below all run.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # x: [N, K], w: [G, M, K], offs: [G] int32 cumulative row ends -> [N, M]
        ctx.save_for_backward(x, w, offs)
        return F.grouped_mm(x, w.transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, w, offs = ctx.saved_tensors
        grad = grad.contiguous()  # [N, M]
        grad_x = F.grouped_mm(grad, w, offs=offs) if ctx.needs_input_grad[0] else None  # [N, K]
        # [M, N] x [N, K] grouped over N -> [G, M, K]; empty groups give zeros.
        grad_w = F.grouped_mm(grad.t(), x, offs=offs) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def _loop_linear(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Fallback: one matmul per expert (a Python loop over experts, never over tokens)."""
    # NOTE: every expert takes part, even with zero rows, so each weight always gets a gradient.
    chunks = torch.split(x, counts, dim=0)
    return torch.cat([chunk @ w[g].t() for g, chunk in enumerate(chunks)], dim=0)  # [N, M]


def use_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``grouped_mm`` takes this (device, dtype): CPU in float32/bfloat16/float16; CUDA in bfloat16
    on sm90+ (its fast path; other CUDA cases take torch's own per-group fallback, so the loop
    below is as good and avoids its host syncs). Override with ``_GROUPED_MM_WORKS``."""
    key = (device.type, dtype)
    if key in _GROUPED_MM_WORKS:
        return _GROUPED_MM_WORKS[key]
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16)


def grouped_linear(
    x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, counts_host: list[int] | None = None
) -> torch.Tensor:
    """Apply expert ``g``'s matrix to its contiguous block of rows.

    Args:
        x: ``[N, K]`` rows sorted by expert.
        w: ``[G, M, K]`` one ``M x K`` matrix per expert.
        counts: ``[G]`` rows per expert (on x's device), ``sum == N``.
        counts_host: the same counts as a Python list; required by the per-expert loop (used
            where ``grouped_mm`` does not run), computed here if missing.
    Returns ``[N, M]``.
    """
    if use_grouped_mm(x.device, x.dtype):
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)  # [G]
        return _GroupedLinear.apply(x, w, offs)
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
        # Gradient factor applied to the local weights (set by parallelize_moe to 1/ep; see
        # docs/architecture.md, "Gradient scaling").
        self.grad_scale: float = 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like ``nn.Linear``'s default bound, per expert."""
        for w in (self.w1, self.w3, self.w2):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's ``(w1, w3, w2)`` blocks as plain tensors (``[G, ...]``)."""
        out = []
        for w in (self.w1, self.w3, self.w2):
            local = w.to_local() if isinstance(w, DTensor) else w
            out.append(scale_grad(local, self.grad_scale))
        return out[0], out[1], out[2]

    def forward(
        self, x: torch.Tensor, counts: torch.Tensor, counts_host: list[int] | None = None
    ) -> torch.Tensor:
        """Run the experts on rows grouped by expert.

        Args:
            x: ``[N, D]`` rows, expert ``g``'s rows contiguous and in expert order.
            counts: ``[G]`` rows per local expert.
            counts_host: optional host copy of ``counts``.
        Returns ``[N, D]`` in x's dtype.
        """
        if counts_host is None and not use_grouped_mm(x.device, x.dtype):
            counts_host = counts.tolist()  # once for both matmuls
        w1, w3, w2 = self.local_weights()  # [G, H, D], [G, H, D], [G, D, H]
        w1, w3, w2 = w1.to(x.dtype), w3.to(x.dtype), w2.to(x.dtype)
        w13 = torch.cat([w1, w3], dim=1)  # [G, 2H, D]
        gate_up = grouped_linear(x, w13, counts, counts_host)  # [N, 2H]
        gate, up = gate_up.chunk(2, dim=-1)  # [N, H] each
        hidden = F.silu(gate) * up  # [N, H]
        return grouped_linear(hidden, w2, counts, counts_host)  # [N, D]
