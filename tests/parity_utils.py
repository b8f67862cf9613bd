"""Helpers shared by the parity tests (run inside workers and in the test process)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

# float32 parity tolerance: relative Frobenius error of each tensor.
REL_TOL = 1e-5


def full(t: torch.Tensor) -> torch.Tensor:
    """The global value of a (possibly DTensor) tensor, detached, on CPU."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / max(||b||, tiny)``; inf when shapes differ."""
    if a.shape != b.shape:
        return float("inf")
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def worst(errors: dict[str, float]) -> tuple[str, float]:
    """The largest error and its name."""
    name = max(errors, key=errors.__getitem__)
    return name, errors[name]


def mean_over_ranks(x: torch.Tensor) -> float:
    """Average of a scalar over all ranks of the default group."""
    y = x.detach().double().clone()
    dist.all_reduce(y)
    return float(y / dist.get_world_size())
