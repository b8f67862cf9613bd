"""``parallelize_moe``: expert parallelism over ``ep`` composed with FSDP2 over the mesh."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._composable.checkpoint_activation import checkpoint as checkpoint_module
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard import _fsdp_common
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ._inference_mode import allow_inference_mode_first
from .aux_loss import record_router_logits, router_modules
from .dispatch import make_dispatcher
from .dispatch.base import check_chunks, check_wire_dtype
from .expert_modules import contract_num_experts, find_expert_modules, make_expert_parallel
from .mesh import check_mesh, flat_mesh
from .moe import MoE, moe_layers
from .placement import ExpertPlacement

if TYPE_CHECKING:  # torch >= 2.13 (see _check_shared_children_supported)
    from torch.distributed.fsdp._fully_shard._fsdp_common import ShardPlacementResult

__all__ = ["parallelize_moe", "ParallelLayout", "default_block_filter", "get_layout", "GRAD_REDUCTIONS"]

_LAYOUT_ATTR = "_ep_fsdp_layout"


GRAD_REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class ParallelLayout:
    """How a model was parallelized (read it with :func:`get_layout`)."""

    world_size: int
    dp_shard: int
    ep: int
    mesh: DeviceMesh
    grad_reduction: str = "mean"


def default_block_filter(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    """Default choice of FSDP blocks: every element of an ``nn.ModuleList`` (e.g. ``layers.3``)."""
    return isinstance(parent, nn.ModuleList)


def get_layout(model: nn.Module) -> ParallelLayout | None:
    """The :class:`ParallelLayout` of a model returned by :func:`parallelize_moe`, else ``None``."""
    return getattr(model, _LAYOUT_ATTR, None)


def _check_shared_children_supported(sharded: list[tuple[str, str, nn.Module, int]], ep: int) -> None:
    """Refuse, before anything is changed, an experts module with a child shared by all experts
    (parameters of its own) where this torch lacks what sharding that child needs.

    NOTE: FSDP2's per-parameter mesh (``ShardPlacementResult``, for ``ep > 1``) and
    ``set_reduce_scatter_unused_params`` came with torch 2.13; they are looked up here and where
    used, not imported at module level, so that ``import ep_fsdp`` works on an older torch (e.g. a
    GPU image's) for everything else.
    """
    shared = [f"{prefix}.{name}" for _, prefix, holder, _ in sharded for name, _ in _shared_params(holder)]
    if not shared:
        return
    missing = [what for what, needed in (
        ("FSDP2's per-parameter mesh (ShardPlacementResult)", ep > 1 and not hasattr(_fsdp_common, "ShardPlacementResult")),
        ("FSDPModule.set_reduce_scatter_unused_params", not hasattr(FSDPModule, "set_reduce_scatter_unused_params")),
    ) if needed]
    if missing:
        more = f" (and {len(shared) - 3} more)" if len(shared) > 3 else ""
        raise RuntimeError(
            f"parallelize_moe: {', '.join(repr(n) for n in shared[:3])}{more} belong to children of experts "
            f"modules, shared by all their experts; sharding them needs {' and '.join(missing)}, which torch "
            f"{torch.__version__} lacks: install torch >= 2.13.")


def _shared_params(holder: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` held by the children of an experts module (one copy shared by all its
    experts), not by the module itself; children already FSDP units shard themselves."""
    return [(f"{child_name}.{name}", p) for child_name, child in holder.named_children()
            if not isinstance(child, FSDPModule) for name, p in child.named_parameters()]


def _shard_over_all_ranks(all_mesh: DeviceMesh) -> ShardPlacementResult:
    """FSDP2's per-parameter placement ``Shard(0)`` over all ranks, for the parameters an experts
    module's child shares between all experts (torch >= 2.13, checked up front)."""
    return _fsdp_common.ShardPlacementResult(placement=Shard(0), mesh_info=_fsdp_common.FSDPMeshInfo(all_mesh, shard_mesh_dim=0))


def parallelize_moe(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
    block_filter: Callable[[str, nn.Module, nn.Module | None], bool] | None = None,
    dedup_tokens: bool = True,
    grad_reduction: str = "mean",
    dispatch_chunks: int = 1,
    dispatch_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Apply expert parallelism and FSDP2 to ``model`` in place: every :class:`ep_fsdp.MoE` and every
    experts module of the transformers contract (see docs/transformers.md) it contains.

    What it does, in order (for a transformers experts module the same steps, with its own
    parameters in place of ``w1/w3/w2`` and its block's router):

    1. Each MoE layer gets an :class:`~ep_fsdp.placement.ExpertPlacement` (contiguous blocks: ep
       rank ``r`` holds experts ``[r*E/ep, (r+1)*E/ep)``) and a token dispatcher over the ``ep``
       mesh dim; its ``experts.w1/w3/w2`` (global ``[E, ...]``) become DTensors ``Shard(0)`` over
       ``ep``. Balancing statistics are summed over all ranks, so the auxiliary losses are those
       of the global batch.
    2. Optional activation checkpointing of each block (composable, parameter names unchanged).
    3. FSDP2 ``fully_shard``: each MoE layer's ``experts`` over ``dp_shard`` (placement chosen up
       front per weight: ``Shard(0)`` of the local expert block when ``dp_shard`` divides
       ``E/ep``, else the first other dim it divides, else ``Shard(0)`` padded); under a
       low-precision ``mp_policy`` each ``router`` over all ranks with float32 parameters; each
       block over all ranks; the root last. Each block prefetches the next block and its expert
       and router units (forward), and the previous ones (backward).
    4. Gradient divide factors on every FSDP unit, so that every gradient is that of the
       global-batch loss under the chosen ``grad_reduction``.

    Gradient conventions (``grad_reduction``):

    * ``"mean"`` (default): each rank backpropagates the mean loss over its own tokens; the
      parameter gradients are those of the mean over ranks. Expert gradients, which already sum
      the tokens of all ``ep`` peers, are divided by ``world_size`` in FSDP's reduce-scatter over
      ``dp_shard``; dense gradients are averaged over all ranks.
    * ``"sum"``: each rank backpropagates the *sum* of its token losses divided by the global
      token count (torchtitan's convention); gradients are summed over ranks, with no division.

    The model may live on the ``meta`` device: nothing is materialized here. Afterwards call
    :func:`ep_fsdp.materialize` (``to_empty`` of this rank's shards, a layout-independent init of
    every parameter, ``reset_buffers()`` of every module that has one), and load a checkpoint over
    it if you have one; each rank then only ever allocates its own shards. All ranks must hold the
    same initial weights when the model is built on a real device (same seed), as with FSDP2 itself.

    Args:
        model: any ``nn.Module`` containing ``ep_fsdp.MoE`` layers or transformers experts modules.
        mesh: 2-D ``DeviceMesh`` with dims ``("dp_shard", "ep")`` (see :func:`ep_fsdp.build_mesh`).
        mp_policy: FSDP2 mixed precision (``param_dtype``, ``reduce_dtype``); default full precision.
        reshard_after_forward: free unsharded parameters after forward (ZeRO-3) or keep them
            until backward (ZeRO-2-like). The root module always keeps them, and so does the
            last block in module order with the units inside it (its backward comes first).
        activation_checkpointing: recompute each block's activations in the backward pass
            (training forwards of transformers models then run with ``use_cache=False``, as their
            own gradient checkpointing does).
            NOTE: in torch 2.13 it does not combine with ``model.compile()``: the compiled
            backward fails (also for a dense FSDP2 model with the composable checkpoint).
        block_filter: ``(name, module, parent) -> bool`` choosing the FSDP blocks; default: every
            element of an ``nn.ModuleList`` (:func:`default_block_filter`).
        dedup_tokens: when ``top_k > 1``, send each token at most once to each ep rank, with the
            gate weights, and combine a token's experts of one rank on that rank (fewer bytes);
            ``False`` sends one row per (token, expert). With ``top_k == 1`` the plain exchange is
            used either way (deduplication cannot save a byte).
        grad_reduction: ``"mean"`` or ``"sum"``, see above.
        dispatch_chunks: stream each MoE layer's token exchange in this many chunks of its
            tokens: all chunks are sent before the experts start, so the transfer of chunk
            ``i + 1`` overlaps the experts of chunk ``i``, and results go back chunk by chunk. The
            outputs equal those of one chunk (each token's experts are combined in one chunk);
            the expert weight gradients sum their rows chunk by chunk (float rounding only).
            Every rank runs the same number of exchanges, also with tokens for fewer chunks.
        dispatch_dtype: the dtype token rows and their gradients travel in between ep ranks
            (e.g. ``torch.bfloat16`` under a float32 model: half the bytes); they are cast back on
            arrival and every sum still accumulates in float32. Default: the activations' dtype.
            The gate weights always travel in float32.

    Returns:
        ``model`` itself, now an ``FSDPModule``.

    Example::

        mesh = ep_fsdp.build_mesh(ep=2)                 # 4 ranks: dp_shard=2, ep=2
        with torch.device("meta"):
            model = MyMoEModel()
        ep_fsdp.parallelize_moe(model, mesh)
        ep_fsdp.materialize(model, "cuda", seed=0)      # then load a checkpoint, if any
        loss = F.cross_entropy(model(x_local), y_local) + ep_fsdp.moe_aux_loss(model)
        loss.backward()
    """
    check_chunks(dispatch_chunks, "parallelize_moe")
    check_wire_dtype(dispatch_dtype, "parallelize_moe")
    _check_options(mp_policy, block_filter, reshard_after_forward=reshard_after_forward,
                   activation_checkpointing=activation_checkpointing, dedup_tokens=dedup_tokens)
    check_mesh(mesh)
    if get_layout(model) is not None or isinstance(model, FSDPModule) or any(
        isinstance(p, DTensor) for p in model.parameters()
    ):
        raise ValueError(
            f"parallelize_moe: {type(model).__name__} is already parallelized (it holds DTensor/FSDP "
            "parameters); call parallelize_moe once, on a freshly built unparallelized model."
        )
    _check_own_dtypes(model)
    if grad_reduction not in GRAD_REDUCTIONS:
        raise ValueError(
            f"parallelize_moe: grad_reduction must be one of {GRAD_REDUCTIONS}, got {grad_reduction!r}; "
            "use 'mean' when each rank's loss is the mean over its tokens, 'sum' when it is the sum "
            "divided by the global token count."
        )
    layers = moe_layers(model)
    contract = find_expert_modules(model, skip=(MoE,))
    if not layers and not contract:
        raise ValueError(
            f"parallelize_moe: {type(model).__name__} contains no ep_fsdp.MoE layer and no experts module "
            "of the transformers v5 contract (experts(hidden_states, top_k_index, top_k_weights) with [E, ...] "
            "weights); build the feed-forward blocks with ep_fsdp.MoE(MoEConfig(...)), or use torch's "
            "fully_shard for dense models."
        )
    dp_shard, ep = mesh["dp_shard"].size(), mesh["ep"].size()
    # (layer name, name of the module holding the [E, ...] weights, that module, E)
    sharded: list[tuple[str, str, nn.Module, int]] = [
        (name, f"{name}.experts" if name else "experts", layer.experts, layer.config.num_experts)
        for name, layer in layers
    ] + [(name, name, module, contract_num_experts(name, module)) for name, module in contract]
    _check_shared_children_supported(sharded, ep)
    expert_placements: dict[tuple[str, str], Shard] = {}
    for name, prefix, holder, E in sharded:
        if E % ep != 0:
            raise ValueError(
                f"parallelize_moe: num_experts={E} of MoE layer '{name}' is not divisible by ep={ep}; "
                f"choose ep from the divisors of {E} or change num_experts to a multiple of {ep}."
            )
        for pname, param in holder.named_parameters(recurse=False):
            local_shape = (E // ep,) + tuple(param.shape[1:])
            full_name = f"{prefix}.{pname}" if prefix else pname
            expert_placements[(name, pname)] = expert_fsdp_placement(full_name, local_shape, dp_shard)
    block_filter = block_filter or default_block_filter
    mp_policy = mp_policy or MixedPrecisionPolicy()
    ep_mesh, dp_mesh, all_mesh = mesh["ep"], mesh["dp_shard"], flat_mesh(mesh)
    world = all_mesh.size()
    ep_group = ep_mesh.get_group() if ep > 1 else None
    stats_group = all_mesh.get_group() if world > 1 else None
    # what FSDP divides every gradient by (see grad_reduction), and what an injected global-loss
    # gradient is multiplied by beforehand
    factor = float(world) if grad_reduction == "mean" else 1.0

    for _, layer in layers:
        placement = ExpertPlacement.contiguous(layer.config.num_experts, ep)
        _shard_experts(layer.experts, ep_mesh)
        layer.dispatcher = make_dispatcher(placement, ep_group, top_k=layer.config.top_k, dedup_tokens=dedup_tokens,
                                           chunks=dispatch_chunks, wire_dtype=dispatch_dtype)
        layer.stats_group = stats_group
        # NOTE: under "mean" FSDP divides every gradient by world; the balancing-loss gradient
        # each rank injects is the partial derivative of the global loss, so it is multiplied back.
        layer.aux_grad_factor = factor
    for name, module in contract:
        E = contract_num_experts(name, module)
        _shard_experts(module, ep_mesh)
        dispatcher = make_dispatcher(ExpertPlacement.contiguous(E, ep), ep_group, top_k=_contract_top_k(module),
                                     dedup_tokens=dedup_tokens, chunks=dispatch_chunks, wire_dtype=dispatch_dtype)
        make_expert_parallel(module, num_experts=E, dispatcher=dispatcher, stats_group=stats_group)
    if contract:
        record_router_logits(model, stats_group=stats_group,
                             grad_factor=factor)

    named = dict(model.named_modules())
    blocks = [
        (name, module)
        for name, module in named.items()
        if name and block_filter(name, module, named.get(name.rpartition(".")[0]))
    ]
    outermost = _outermost(blocks)
    if activation_checkpointing:
        for _, block in outermost:
            checkpoint_module(block)
        # NOTE: a recomputed forward would append its keys and values to a transformers KV cache a
        # second time (wrong shapes in the backward); transformers' own gradient checkpointing
        # turns the cache off likewise. Only for training forwards, and the config is left as it
        # is (it is recorded in checkpoints and exports).
        for module in model.modules():
            if hasattr(module, "_can_record_outputs") and hasattr(getattr(module, "config", None), "use_cache"):
                module.register_forward_pre_hook(_no_cache_in_training, with_kwargs=True)

    units: list[tuple[FSDPModule, DeviceMesh]] = []
    module_names = {id(m): n for n, m in named.items()}
    last_block = outermost[-1][0] if outermost else None

    def in_last_block(module: nn.Module) -> bool:
        name = module_names.get(id(module), "")
        return last_block is not None and (name == last_block or name.startswith(last_block + "."))

    def shard(module: nn.Module, on: DeviceMesh, policy: MixedPrecisionPolicy = mp_policy, keep: bool = False,
              **kwargs: object) -> None:
        # NOTE: the last block (in module order) and the units inside it keep their parameters
        # after the forward, as the root does (torchtitan's default): their backward runs right
        # after the forward, so a reshard would only be undone at once by another all-gather.
        # A model that registers last a block it runs early only holds that block unsharded longer.
        last = in_last_block(module)
        fully_shard(module, mesh=on, mp_policy=policy, reshard_after_forward=reshard_after_forward and not last and not keep,
                    **kwargs)
        units.append((module, on))  # type: ignore[arg-type]

    low_precision = mp_policy.param_dtype not in (None, torch.float32)
    router_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=mp_policy.reduce_dtype)
    for name, _, holder, _ in sharded:
        by_param: dict[int, Shard | ShardPlacementResult] = {
            id(p): expert_placements[(name, pname)] for pname, p in holder.named_parameters(recurse=False)
        }
        # NOTE: a child of an experts module (e.g. a norm every expert's output goes through,
        # transformers MuseSpark's post_expert_norm) holds one copy for all experts: each rank's
        # gradient of it covers only its own experts' rows, so it is sharded and reduced over all
        # ranks like a dense layer, in a parameter group of its own inside the experts' unit
        # (FSDP2's per-parameter mesh: Shard(0) over all ranks). (A unit of its own would gather at
        # every call of its forward: once per expert with rows, a different count on each rank,
        # which hung.)
        # At ep = 1 the experts' own mesh is already all ranks (one process group, one group).
        shared = [p for _, p in _shared_params(holder)]
        if ep > 1 and shared:
            over_all_ranks = _shard_over_all_ranks(all_mesh)
            by_param.update({id(p): over_all_ranks for p in shared})
        shard(holder, dp_mesh, shard_placement_fn=lambda p, by_param=by_param: by_param.get(id(p)))
        if shared:
            # NOTE: a rank whose experts never call the child has no gradient for it; its
            # reduce-scatter must still run, with zeros, as the other ranks' does
            holder.set_reduce_scatter_unused_params(True, recurse=False)  # type: ignore[operator]
    if low_precision:
        # NOTE: routing decisions must not see a bfloat16 gate weight: each router gets its own
        # unit whose parameters stay float32 (one small extra all-gather per layer); a transformers
        # router (the module it records as router_logits) also gets its input cast to float32, and
        # its outputs cast back to the policy's dtype, as the rest of its block computes in it
        # (e.g. Inkling's router returns gammas in its input's dtype, which its shared experts
        # multiply with bf16 weights). The balancing loss records the float32 logits first (its
        # hook runs before FSDP's output cast).
        for _, layer in layers:
            shard(layer.router, all_mesh, router_policy)
        hf_router_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=mp_policy.reduce_dtype,
                                                output_dtype=mp_policy.param_dtype)
        for router in router_modules(model) if contract else []:
            shard(router, all_mesh, hf_router_policy)
    # Children before parents: reverse module order puts nested blocks first.
    # NOTE: FSDP2 takes one parameter dtype per unit: a module that keeps another dtype than the
    # rest of its block (transformers' _keep_in_fp32_modules, e.g. DeepSeek-V3's float32 router in
    # a bf16 model) gets a unit of its own first.
    def shard_split(owner: nn.Module) -> None:
        # NOTE: a unit of the other dtype is gathered before its parent's forward: a parent may read
        # its weights directly instead of calling its forward (transformers BailingHybrid passes its
        # float32 conv1d's weight to a kernel), which would otherwise see the shards. See _GatherBefore.
        for unit, parent, other in _odd_dtype_modules(owner):
            shard(unit, all_mesh, keep=other)
            if other:
                _GatherBefore(unit, parent, reshard=reshard_after_forward and not in_last_block(unit))

    for _, block in reversed(blocks):
        if not isinstance(block, FSDPModule):
            shard_split(block)
            shard(block, all_mesh)
    if not isinstance(model, FSDPModule):  # (a model that is itself an experts module is its unit already)
        shard_split(model)
        # NOTE: the root keeps its parameters unsharded after forward; backward needs them at once.
        fully_shard(model, mesh=all_mesh, mp_policy=mp_policy, reshard_after_forward=False)
        units.append((model, all_mesh))  # type: ignore[arg-type]

    gloo = dist.get_backend(all_mesh.get_group()) == "gloo"
    for module, on in units:
        # NOTE: under "mean" every unit divides by world: dense units reduce over all ranks, and the
        # expert units' gradients already sum the tokens of all ep peers before FSDP sums over
        # dp_shard. FSDP applies the factor also on a size-1 mesh (no communication). There a
        # factor of 1 is left unset: FSDP's default on a size-1 mesh is a plain sum, while a set
        # factor costs a division pass over the gradients (~0.3 ms a step at world size 1 here).
        if not (on.size() == 1 and factor == 1.0):
            module.set_gradient_divide_factor(factor)
        if gloo and on.size() > 1:
            # NOTE: gloo has no AVG or PREMUL_SUM: sum, then divide. Not on a size-1 mesh, where
            # torch 2.13 would apply the divide factor twice.
            module.set_force_sum_reduction_for_comms(True)
    _set_prefetch(model, [b for _, b in outermost])  # type: ignore[arg-type]
    allow_inference_mode_first(model)  # type: ignore[arg-type]
    setattr(model, _LAYOUT_ATTR, ParallelLayout(world_size=world, dp_shard=dp_shard, ep=ep, mesh=mesh,
                                                grad_reduction=grad_reduction))
    return model


def _no_cache_in_training(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: ``use_cache=False`` in a training forward of a transformers model.

    NOTE: only when a gradient is recorded, as transformers' own gradient checkpointing does: a
    train-mode forward under ``no_grad`` or ``inference_mode`` (sampling between training steps
    without ``model.eval()``) recomputes nothing and keeps its KV cache (without it, a decode loop
    that feeds ``past_key_values`` back computed each new token without its context).
    """
    if module.training and torch.is_grad_enabled():
        kwargs["use_cache"] = False
    return args, kwargs


class _GatherBefore:
    """Hooks that all-gather ``unit`` (an FSDP unit inside ``parent``, made with
    ``reshard_after_forward=False``) before ``parent``'s forward. After it, the unit is resharded
    (when ``reshard``) if its own forward ran (FSDP gathers it again for its backward) or no grad
    is recorded. If the parent read its weights directly instead, autograd holds the gathered
    tensors for the backward, so they stay until the backward's end (what
    ``reshard_after_forward=False`` does).

    NOTE: a parent that both calls the unit and reads its weights directly in one forward is not
    supported (FSDP reshards the unit when its own backward has run, before or after the read's).
    """

    def __init__(self, unit: nn.Module, parent: nn.Module, reshard: bool) -> None:
        self.unit, self.reshard, self.called = unit, reshard, False
        parent.register_forward_pre_hook(self.before_parent)
        parent.register_forward_hook(self.after_parent)
        unit.register_forward_pre_hook(self.before_unit)

    @torch.compiler.disable
    def before_parent(self, module: nn.Module, args: tuple) -> None:
        self.called = False
        self.unit.unshard()  # type: ignore[operator]

    @torch.compiler.disable
    def before_unit(self, module: nn.Module, args: tuple) -> None:
        self.called = True

    @torch.compiler.disable
    def after_parent(self, module: nn.Module, args: tuple, output: object) -> None:
        # NOTE: without grad no backward needs the gathered weights, read directly or not
        if self.reshard and (self.called or not torch.is_grad_enabled()):
            self.unit.reshard()  # type: ignore[operator]


def _odd_dtype_modules(owner: nn.Module) -> list[tuple[nn.Module, nn.Module, bool]]:
    """``(module, its parent, whether it holds another dtype than the main one)`` for each module
    inside ``owner`` (not inside another FSDP unit) that gets an FSDP unit of its own, children
    before parents, so that every unit holds one trainable parameter dtype (FSDP2 takes one per
    unit). The main dtype is the one most of ``owner``'s trainable elements have.

    * A module whose trainable parameters all have one other dtype (e.g. a float32 router in a bf16
      block) is taken whole, so that its unit is gathered by its own forward (the router reads its
      gate's weight directly).
    * A module of mixed dtypes is split: the parts of it that differ from its own parameters'
      dtype (or, without parameters of its own, from the main dtype) get units. E.g. an attention
      module holding float32 ``sinks`` beside bf16 projections: the projections get units, then the
      module's unit holds ``sinks`` alone.

    A module holding parameters of two dtypes itself is refused up front
    (:func:`_check_own_dtypes`).
    """
    taken: set[int] = set()

    def trainable(module: nn.Module) -> list[nn.Parameter]:
        out = [p for p in module.parameters(recurse=False) if p.requires_grad]
        for child in module.children():
            if not isinstance(child, FSDPModule) and id(child) not in taken:
                out += trainable(child)
        return out

    sizes: dict[torch.dtype, int] = {}
    for p in trainable(owner):
        sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    if len(sizes) < 2:
        return []
    main = max(sizes, key=lambda d: sizes[d])
    found: list[tuple[nn.Module, nn.Module, bool]] = []

    def split(module: nn.Module) -> torch.dtype | None:
        """Give units to the parts of ``module`` of another dtype; return the dtype of the rest."""
        own = {p.dtype for p in module.parameters(recurse=False) if p.requires_grad}
        rest: dict[nn.Module, torch.dtype | None] = {}
        for child in module.children():
            if isinstance(child, FSDPModule):
                continue
            dtypes = {p.dtype for p in trainable(child)}
            if dtypes:
                rest[child] = dtypes.pop() if len(dtypes) == 1 else split(child)
        kept = next(iter(own)) if own else main if main in rest.values() else next(iter(rest.values()), None)
        for child, dtype in rest.items():
            if dtype != kept:
                found.append((child, module, dtype != main))
                taken.add(id(child))
        return kept

    split(owner)
    return found


def _check_own_dtypes(model: nn.Module) -> None:
    """Raise for a module that holds trainable parameters of two dtypes itself: no FSDP2 unit can
    take them (it takes one parameter dtype per unit), and a module is the finest unit."""
    for name, module in model.named_modules():
        own = {n: p.dtype for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if len(set(own.values())) > 1:
            listed = ", ".join(f"{n}: {str(d).removeprefix('torch.')}" for n, d in own.items())
            raise ValueError(
                f"parallelize_moe: module '{name or type(module).__name__}' holds trainable parameters of "
                f"several dtypes itself ({listed}); FSDP2 takes one parameter dtype per unit. Load the "
                "model in one dtype (e.g. torch_dtype=torch.float32) and compute in bf16 with "
                "mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16), or freeze the odd parameters."
            )


def _check_options(mp_policy: object, block_filter: object, **flags: object) -> None:
    """Raise, before anything is changed, for an option of the wrong kind (named, with its value)."""
    if mp_policy is not None and not isinstance(mp_policy, MixedPrecisionPolicy):
        raise ValueError(
            f"parallelize_moe: mp_policy must be None or a torch.distributed.fsdp.MixedPrecisionPolicy, got "
            f"{mp_policy!r}; e.g. MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)."
        )
    if block_filter is not None and not callable(block_filter):
        raise ValueError(
            f"parallelize_moe: block_filter must be None or a callable (name, module, parent) -> bool, got "
            f"{block_filter!r}; e.g. lambda name, module, parent: name.startswith('layers.') and name.count('.') == 1."
        )
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"parallelize_moe: {name} must be True or False, got {value!r}.")


def expert_fsdp_placement(name: str, local_shape: tuple[int, ...], dp_shard: int) -> Shard:
    """FSDP placement of one expert weight's local block ``[G, a, b]`` over ``dp_shard`` ranks.

    ``Shard(0)`` when ``dp_shard`` divides ``G`` (whole experts per rank); else the first of dims
    1, 2 that it divides (FSDP2 shards dims other than 0 only evenly); else ``Shard(0)`` uneven
    (FSDP2 pads dim 0: some ranks hold one expert row more than others). Every layout shards; the
    choice is made before any collective. ``name`` is used in the error for a bad ``dp_shard``.
    """
    if not isinstance(dp_shard, int) or dp_shard < 1:
        raise ValueError(f"parallelize_moe: dp_shard must be a positive int for '{name}', got {dp_shard!r}.")
    if local_shape[0] % dp_shard == 0:
        return Shard(0)
    for dim in range(1, len(local_shape)):
        if local_shape[dim] % dp_shard == 0:
            return Shard(dim)
    # NOTE: the last resort; parity and checkpoint resharding are tested for it.
    return Shard(0)


def _fsdp_units_inside(block: nn.Module) -> list[FSDPModule]:
    """FSDP units nested in ``block`` (expert and router units), in module (forward) order."""
    return [m for m in block.modules() if m is not block and isinstance(m, FSDPModule)]  # type: ignore[misc]


def _set_prefetch(root: nn.Module, blocks: list[FSDPModule]) -> None:
    """Explicit FSDP prefetch: each block's all-gathers start one block early.

    Forward: the root prefetches the first block and its expert/router units; block ``i`` the
    next block and its units. Backward: the last block prefetches its own units, block ``i`` the
    previous block and its units (in backward order: experts before router).
    """
    blocks = [b for b in blocks if isinstance(b, FSDPModule)]
    if not blocks:
        return
    ahead = [[b, *_fsdp_units_inside(b)] for b in blocks]
    root.set_modules_to_forward_prefetch(ahead[0])  # type: ignore[attr-defined]
    for i, block in enumerate(blocks):
        if i + 1 < len(blocks):
            block.set_modules_to_forward_prefetch(ahead[i + 1])
        behind = [blocks[i - 1], *reversed(_fsdp_units_inside(blocks[i - 1]))] if i > 0 else []
        if i == len(blocks) - 1:
            behind = [*reversed(_fsdp_units_inside(block)), *behind]
        if behind:
            block.set_modules_to_backward_prefetch(behind)


def _contract_top_k(module: nn.Module) -> int:
    """``k`` of a contract experts module when its config says (``num_experts_per_tok``); else 2,
    which only chooses the deduplicated exchange (correct for any ``k``)."""
    k = getattr(getattr(module, "config", None), "num_experts_per_tok", None)
    return k if isinstance(k, int) and k > 0 else 2


def _shard_experts(experts: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Turn an experts module's global ``[E, ...]`` parameters into ``Shard(0)`` DTensors over ``ep``."""
    for name, param in list(experts.named_parameters(recurse=False)):
        # NOTE: src_data_rank=None slices locally, like fully_shard: every rank holds the same init
        # (or nothing yet, on the meta device).
        dt = distribute_tensor(param.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
        experts.register_parameter(name, nn.Parameter(dt, requires_grad=param.requires_grad))


def _outermost(blocks: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Blocks that are not nested inside another chosen block."""
    names = [n for n, _ in blocks]
    return [(n, m) for n, m in blocks if not any(n.startswith(o + ".") for o in names if o != n)]
