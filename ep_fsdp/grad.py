"""Gradient clipping that is correct for DTensor gradients spread over both mesh dims."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

__all__ = ["clip_grad_norm_"]


def _local_and_replication(grad: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's values of ``grad`` and how many ranks hold each of them."""
    if not isinstance(grad, DTensor):
        return grad, 0  # 0: a plain tensor, identical on every rank
    copies = 1
    for size, placement in zip(grad.device_mesh.shape, grad.placements):
        if isinstance(placement, Replicate):
            copies *= size
    return grad.to_local(), copies


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.nn.Parameter], max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """Clip the global gradient norm of ``parameters`` in place, like
    ``torch.nn.utils.clip_grad_norm_`` on the unparallelized model; returns the total norm.

    Dense gradients (sharded over all ranks) and expert gradients (sharded over ``ep`` and
    ``dp_shard``) live on different meshes, so their norms cannot be combined by DTensor alone.
    Each rank sums ``|g|^p`` over the values it holds (dividing values that are replicated by
    their number of copies), one all-reduce over the default group adds the ranks up, and every
    gradient is scaled by ``min(1, max_norm / (total + 1e-6))``. ``norm_type`` may be ``inf``.
    Call it on every rank (collective when distributed).

    Example::

        loss.backward()
        norm = ep_fsdp.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if max_norm <= 0:
        raise ValueError(f"clip_grad_norm_: max_norm must be > 0, got {max_norm!r}.")
    device = grads[0].device if grads else torch.device("cpu")
    p = float(norm_type)
    # [0]: sum over sharded values (to be all-reduced); [1]: over values identical on all ranks
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    for g in grads:
        local, copies = _local_and_replication(g)
        if local.numel() == 0:
            continue
        if math.isinf(p):
            value = local.detach().abs().max().double()
            acc[1 if copies == 0 else 0] = torch.maximum(acc[1 if copies == 0 else 0], value)
        else:
            value = local.detach().double().abs().pow(p).sum()
            if copies == 0:
                acc[1] += value
            else:
                acc[0] += value / copies
    distributed = dist.is_available() and dist.is_initialized()
    if math.isinf(p):
        if distributed:
            dist.all_reduce(acc, op=dist.ReduceOp.MAX)
        total = acc.max()
    else:
        if distributed:
            sharded = acc[:1].clone()
            dist.all_reduce(sharded)
            acc[0] = sharded[0]
        total = acc.sum().pow(1.0 / p)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        local, _ = _local_and_replication(g)
        local.mul_(coef.to(local.dtype))
    return total.float()
