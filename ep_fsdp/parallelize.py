"""``parallelize_moe``: expert parallelism over ``ep`` composed with FSDP2 over the mesh."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._composable.checkpoint_activation import checkpoint as checkpoint_module
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from .mesh import check_mesh, flat_mesh
from .moe import MoE, moe_layers

__all__ = ["parallelize_moe", "ParallelLayout", "default_block_filter", "get_layout"]

_LAYOUT_ATTR = "_ep_fsdp_layout"


@dataclass(frozen=True)
class ParallelLayout:
    """How a model was parallelized (read it with :func:`get_layout`)."""

    world_size: int
    dp_shard: int
    ep: int
    mesh: DeviceMesh

    def expert_owner(self, expert_id: int, num_experts: int) -> int:
        """ep rank that owns ``expert_id``: ``expert_id // (num_experts // ep)``."""
        return expert_id // (num_experts // self.ep)


def default_block_filter(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    """Default choice of FSDP blocks: every element of an ``nn.ModuleList`` (e.g. ``layers.3``)."""
    return isinstance(parent, nn.ModuleList)


def get_layout(model: nn.Module) -> ParallelLayout | None:
    """The :class:`ParallelLayout` of a model returned by :func:`parallelize_moe`, else ``None``."""
    return getattr(model, _LAYOUT_ATTR, None)


def parallelize_moe(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
    block_filter: Callable[[str, nn.Module, nn.Module | None], bool] | None = None,
    dedup_tokens: bool = True,
) -> nn.Module:
    """Apply expert parallelism and FSDP2 to every :class:`ep_fsdp.MoE` in ``model``, in place.

    What it does, in order:

    1. Each MoE layer's ``experts.w1/w3/w2`` (global ``[E, ...]``) become DTensors ``Shard(0)`` over
       the ``ep`` mesh dim: ep rank ``r`` owns experts ``[r*E/ep, (r+1)*E/ep)``. Tokens reach them
       with one ``all_to_all_single`` each way per layer; balancing statistics are summed over all
       ranks so the auxiliary losses are those of the global batch.
    2. Optional activation checkpointing of each block (composable, parameter names unchanged).
    3. FSDP2 ``fully_shard``: each MoE layer's ``experts`` over ``dp_shard`` (``Shard(0)`` of the
       local expert block when ``dp_shard`` divides ``E/ep``, else ``Shard(1)``); under a
       low-precision ``mp_policy`` each ``router`` over all ranks with float32 parameters; each
       block over all ranks; the root last.

    Every parameter's gradient equals the gradient of the global-batch mean loss when each rank
    backpropagates the mean loss over its own tokens (plus :func:`ep_fsdp.moe_aux_loss`): expert
    gradients, which already sum the tokens of all ``ep`` peers, are scaled by ``1/ep`` in the
    backward pass and FSDP averages over its mesh. Parameter names are unchanged. All ranks must
    hold the same initial weights (same seed), as with FSDP2 itself.

    Args:
        model: any ``nn.Module`` containing ``ep_fsdp.MoE`` layers.
        mesh: 2-D ``DeviceMesh`` with dims ``("dp_shard", "ep")`` (see :func:`ep_fsdp.build_mesh`).
        mp_policy: FSDP2 mixed precision (``param_dtype``, ``reduce_dtype``); default full precision.
        reshard_after_forward: free unsharded parameters after forward (ZeRO-3) or keep them
            until backward (ZeRO-2-like). The root module always keeps them.
        activation_checkpointing: recompute each block's activations in the backward pass.
        block_filter: ``(name, module, parent) -> bool`` choosing the FSDP blocks; default: every
            element of an ``nn.ModuleList`` (:func:`default_block_filter`).
        dedup_tokens: send each token at most once to each ep rank, with the gate weights, and
            combine a token's experts of one rank on that rank (fewer bytes when k > 1); ``False``
            sends one row per (token, expert).

    Returns:
        ``model`` itself, now an ``FSDPModule``.

    Example::

        mesh = ep_fsdp.build_mesh(ep=2)                 # 4 ranks: dp_shard=2, ep=2
        model = MyMoEModel()                            # same seed on every rank
        ep_fsdp.parallelize_moe(model, mesh)
        loss = F.cross_entropy(model(x_local), y_local) + ep_fsdp.moe_aux_loss(model)
        loss.backward()
    """
    check_mesh(mesh)
    if get_layout(model) is not None or isinstance(model, FSDPModule) or any(
        isinstance(p, DTensor) for p in model.parameters()
    ):
        raise ValueError(
            f"parallelize_moe: {type(model).__name__} is already parallelized (it holds DTensor/FSDP "
            "parameters); call parallelize_moe once, on a freshly built unparallelized model."
        )
    layers = moe_layers(model)
    if not layers:
        raise ValueError(
            f"parallelize_moe: {type(model).__name__} contains no ep_fsdp.MoE layer; build the model's "
            "feed-forward blocks with ep_fsdp.MoE(MoEConfig(...)), or use torch's fully_shard for dense models."
        )
    dp_shard, ep = mesh["dp_shard"].size(), mesh["ep"].size()
    for name, layer in layers:
        E = layer.config.num_experts
        if E % ep != 0:
            raise ValueError(
                f"parallelize_moe: num_experts={E} of MoE layer '{name}' is not divisible by ep={ep}; "
                f"choose ep from the divisors of {E} or change num_experts to a multiple of {ep}."
            )
    block_filter = block_filter or default_block_filter
    mp_policy = mp_policy or MixedPrecisionPolicy()
    ep_mesh, dp_mesh, all_mesh = mesh["ep"], mesh["dp_shard"], flat_mesh(mesh)
    world = all_mesh.size()

    for _, layer in layers:
        _shard_experts(layer, ep_mesh)
        layer.ep_group = ep_mesh.get_group() if ep > 1 else None
        layer.stats_group = all_mesh.get_group() if world > 1 else None
        layer.dedup_tokens = dedup_tokens

    named = dict(model.named_modules())
    blocks = [
        (name, module)
        for name, module in named.items()
        if name and block_filter(name, module, named.get(name.rpartition(".")[0]))
    ]
    if activation_checkpointing:
        for _, block in _outermost(blocks):
            checkpoint_module(block)

    fsdp_modules: list[FSDPModule] = []

    def shard(module: nn.Module, on: DeviceMesh, **kwargs: object) -> None:
        fully_shard(module, mesh=on, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward, **kwargs)
        fsdp_modules.append(module)  # type: ignore[arg-type]

    low_precision = mp_policy.param_dtype not in (None, torch.float32)
    router_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=mp_policy.reduce_dtype)
    for _, layer in layers:
        local_experts = layer.config.num_experts // ep
        placement = Shard(0) if local_experts % dp_shard == 0 else Shard(1)
        shard(layer.experts, dp_mesh, shard_placement_fn=lambda _p, pl=placement: pl)
        if low_precision:
            # NOTE: routing decisions must not see a bfloat16 gate weight: the router gets its
            # own unit whose parameters stay float32 (one small extra all-gather per layer).
            fully_shard(layer.router, mesh=all_mesh, mp_policy=router_policy,
                        reshard_after_forward=reshard_after_forward)
            fsdp_modules.append(layer.router)  # type: ignore[arg-type]
    # Children before parents: reverse module order puts nested blocks first.
    for _, block in reversed(blocks):
        if not isinstance(block, FSDPModule):
            shard(block, all_mesh)
    # NOTE: the root keeps its parameters unsharded after forward; backward needs them at once.
    fully_shard(model, mesh=all_mesh, mp_policy=mp_policy, reshard_after_forward=False)
    fsdp_modules.append(model)  # type: ignore[arg-type]

    if dist.get_backend(all_mesh.get_group()) == "gloo":
        # NOTE: gloo's reduce-scatter has no AVG; sum then divide gives the same average.
        for module in fsdp_modules:
            module.set_force_sum_reduction_for_comms(True)
    setattr(model, _LAYOUT_ATTR, ParallelLayout(world_size=world, dp_shard=dp_shard, ep=ep, mesh=mesh))
    return model


def _shard_experts(layer: MoE, ep_mesh: DeviceMesh) -> None:
    """Turn the experts' global ``[E, ...]`` parameters into ``Shard(0)`` DTensors over ``ep``."""
    experts = layer.experts
    for name, param in list(experts.named_parameters(recurse=False)):
        # NOTE: src_data_rank=None slices locally, like fully_shard: every rank holds the same init.
        dt = distribute_tensor(param.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
        experts.register_parameter(name, nn.Parameter(dt, requires_grad=param.requires_grad))
    experts.grad_scale = 1.0 / ep_mesh.size()


def _outermost(blocks: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Blocks that are not nested inside another chosen block."""
    names = [n for n, _ in blocks]
    return [(n, m) for n, m in blocks if not any(n.startswith(o + ".") for o in names if o != n)]
