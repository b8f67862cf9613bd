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


def _model_group(grads: list[torch.Tensor]) -> dist.ProcessGroup | None:
    """The process group over the ranks the gradients are spread on: that of the largest 1-D mesh
    among them (the mesh FSDP shards dense gradients over, all ranks of the model's mesh), when
    no gradient spans more ranks; else ``None`` (the default group)."""
    meshes = [g.device_mesh for g in grads if isinstance(g, DTensor)]
    if not meshes:
        return None
    widest = max(m.size() for m in meshes)
    flat = [m for m in meshes if m.ndim == 1 and m.size() == widest]
    return flat[0].get_group() if flat else None


@torch.no_grad()
def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
    group: dist.ProcessGroup | None = None, *, error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """Clip the global gradient norm of ``parameters`` in place, like
    ``torch.nn.utils.clip_grad_norm_`` on the unparallelized model; returns the total norm.

    Dense gradients (sharded over all ranks) and expert gradients (sharded over ``ep`` and
    ``dp_shard``) live on different meshes, so their norms cannot be combined by DTensor alone.
    Each rank sums ``|g|^p`` over the values it holds (dividing values that are replicated by
    their number of copies), one all-reduce over the model's ranks adds them up, and every
    gradient is scaled by ``min(1, max_norm / (total + 1e-6))``. ``norm_type`` may be ``inf``.
    Call it on every rank of the model (collective when distributed). ``parameters``: an iterable
    of parameters or a single tensor, as in torch. ``group``: the ranks to sum over; default the
    ranks the gradients are sharded on (the mesh given to :func:`ep_fsdp.parallelize_moe`, also
    when it is part of a larger mesh, e.g. with replicas that each hold the whole model), else the
    default group. A NaN gradient on any rank makes the total NaN on every rank (as in torch,
    where the clipped gradients are then NaN too); ``error_if_nonfinite=True`` raises instead,
    on every rank.

    Example::

        loss.backward()
        norm = ep_fsdp.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]  # NOTE: iterating a tensor would give its rows, which have no .grad
    grads = [p.grad for p in parameters if p.grad is not None]
    if isinstance(max_norm, torch.Tensor) and max_norm.numel() == 1:
        max_norm = float(max_norm)
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise ValueError(
            f"clip_grad_norm_: group must be None or a torch.distributed.ProcessGroup, got {group!r}; pass "
            "error_if_nonfinite (torch's fourth argument) by keyword: error_if_nonfinite=True."
        )
    if not isinstance(max_norm, (int, float)) or isinstance(max_norm, bool) or not max_norm > 0:
        raise ValueError(
            f"clip_grad_norm_: max_norm must be a number > 0, got {max_norm!r}; e.g. 1.0, or float('inf') to "
            "only compute the norm."
        )
    if not isinstance(norm_type, (int, float)) or isinstance(norm_type, bool) or not norm_type > 0:
        raise ValueError(
            f"clip_grad_norm_: norm_type must be a number > 0 or float('inf'), got {norm_type!r}; 2.0 is the "
            "Euclidean norm."
        )
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
    if distributed and group is None:
        group = _model_group(grads)
    if math.isinf(p):
        if distributed:
            # NOTE: a MAX all-reduce does not carry a NaN through (gloo's result depends on the
            # operands' order), so a NaN travels as a flag next to the maxima
            packed = torch.cat([acc.nan_to_num(nan=0.0, posinf=math.inf), acc.isnan().any().double().reshape(1)])  # [3]
            dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
            acc = packed[:2].clone()
            if packed[2] > 0:
                acc[0] = math.nan
        total = acc.max()
    else:
        if distributed:
            sharded = acc[:1].clone()
            dist.all_reduce(sharded, group=group)
            acc[0] = sharded[0]
        total = acc.sum().pow(1.0 / p)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"clip_grad_norm_: the total norm of order {norm_type} of the gradients is {float(total)}, so they "
            "cannot be clipped; set error_if_nonfinite=False to clip anyway (the gradients become NaN), or skip "
            "this step."
        )
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        local, _ = _local_and_replication(g)
        local.mul_(coef.to(local.dtype))
    return total.float()
