"""The 2-D ``("dp_shard", "ep")`` device mesh and its checks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["build_mesh", "check_mesh", "MESH_DIMS", "flat_mesh"]

MESH_DIMS = ("dp_shard", "ep")
_FLAT_DIM = "dp_shard_ep"


def build_mesh(*, ep: int, dp_shard: int | None = None, device_type: str | None = None) -> DeviceMesh:
    """Build the 2-D device mesh ``("dp_shard", "ep")`` over all ranks of the default group.

    Ranks are laid out row-major: global rank ``r`` sits at ``(r // ep, r % ep)``, so the ``ep``
    peers of a rank are consecutive ranks (the fast links of one node when ``ep`` <= GPUs/node).

    Args:
        ep: expert-parallel degree; each MoE layer's experts are split into ``ep`` blocks.
        dp_shard: FSDP degree of the experts; defaults to ``world_size // ep``. Dense parameters
            are sharded over all ``dp_shard * ep`` ranks.
        device_type: ``"cuda"`` when available, else ``"cpu"``, unless given.

    Example::

        dist.init_process_group("gloo")          # torchrun --nproc-per-node 4 ...
        mesh = build_mesh(ep=2)                  # dp_shard = 4 // 2 = 2
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "build_mesh needs an initialized default process group; call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment for it)."
        )
    world = dist.get_world_size()
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise ValueError(f"build_mesh: ep must be a positive int, got ep={ep!r}; pass e.g. ep=2.")
    if dp_shard is None:
        if world % ep != 0:
            raise ValueError(
                f"build_mesh: ep={ep} does not divide world_size={world}; "
                f"choose ep from the divisors of {world}: {_divisors(world)}."
            )
        dp_shard = world // ep
    if not isinstance(dp_shard, int) or isinstance(dp_shard, bool) or dp_shard < 1:
        raise ValueError(f"build_mesh: dp_shard must be a positive int, got dp_shard={dp_shard!r}.")
    if dp_shard * ep != world:
        raise ValueError(
            f"build_mesh: dp_shard * ep must equal world_size, got dp_shard={dp_shard} * ep={ep} = "
            f"{dp_shard * ep} != world_size={world}; "
            + (f"use dp_shard={world // ep}" if world % ep == 0 else f"choose ep from the divisors of {world}: {_divisors(world)}")
            + f", or launch {dp_shard * ep} processes."
        )
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device_type, (dp_shard, ep), mesh_dim_names=MESH_DIMS)


def check_mesh(mesh: object, api: str = "parallelize_moe") -> DeviceMesh:
    """Raise a clear error unless ``mesh`` is a 2-D DeviceMesh with dims ``("dp_shard", "ep")``."""
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(
            f"{api}: mesh must be a torch DeviceMesh, got {type(mesh).__name__}; "
            "build one with ep_fsdp.build_mesh(ep=...)."
        )
    names = tuple(mesh.mesh_dim_names or ())
    if mesh.ndim != 2 or names != MESH_DIMS:
        raise ValueError(
            f"{api}: mesh must be 2-D with dims {MESH_DIMS} in that order, got shape {tuple(mesh.shape)} with dims "
            f"{names or None}; build it with ep_fsdp.build_mesh(ep=...) or "
            f"init_device_mesh(device, (dp_shard, ep), mesh_dim_names={MESH_DIMS})."
        )
    return mesh


def flat_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh over all ranks of ``mesh`` (dense parameters are sharded over it)."""
    return mesh[MESH_DIMS]._flatten(_FLAT_DIM)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
