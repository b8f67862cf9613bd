"""parallelize_moe and build_mesh in a 2-rank gloo world: errors, options, mixed precision."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

import ep_fsdp
from dist_pool import worker_mesh
from parity_utils import full, rel_err, worst
from ep_fsdp.parallelize import get_layout


def _error(fn) -> tuple[str, str]:
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e)
    return "no error", ""


def _moe_model(num_experts: int) -> nn.Module:
    cfg = ep_fsdp.MoEConfig(dim=8, hidden_dim=8, num_experts=num_experts, top_k=1)
    return nn.Sequential(nn.Linear(8, 8), ep_fsdp.MoE(cfg))


def error_cases() -> dict[str, tuple[str, str]]:
    mesh = worker_mesh(1, 2)
    twice = ep_fsdp.parallelize_moe(_moe_model(4), mesh)
    return {
        "ep_not_dividing_world": _error(lambda: ep_fsdp.build_mesh(ep=3)),
        "product_mismatch": _error(lambda: ep_fsdp.build_mesh(ep=1, dp_shard=3)),
        "ep_zero": _error(lambda: ep_fsdp.build_mesh(ep=0)),
        "experts_not_divisible": _error(lambda: ep_fsdp.parallelize_moe(_moe_model(3), mesh)),
        "no_moe": _error(lambda: ep_fsdp.parallelize_moe(nn.Linear(4, 4), mesh)),
        "mesh_dims": _error(
            lambda: ep_fsdp.parallelize_moe(_moe_model(4), init_device_mesh("cpu", (2,), mesh_dim_names=("dp",)))
        ),
        "mesh_order": _error(
            lambda: ep_fsdp.parallelize_moe(
                _moe_model(4), init_device_mesh("cpu", (2, 1), mesh_dim_names=("ep", "dp_shard"))
            )
        ),
        "not_a_mesh": _error(lambda: ep_fsdp.parallelize_moe(_moe_model(4), "mesh")),
        "twice": _error(lambda: ep_fsdp.parallelize_moe(twice, mesh)),
        **_bad_options(mesh),
    }


def _bad_options(mesh) -> dict[str, tuple[str, str]]:
    """Options of the wrong kind fail before the model is changed: a retry with good ones works."""
    out = {}
    for name, bad in [("mp_policy", torch.bfloat16), ("block_filter", "layers"), ("reshard_after_forward", "no")]:
        model = _moe_model(4)
        out[name] = _error(lambda: ep_fsdp.parallelize_moe(model, mesh, **{name: bad}))
        out[f"{name}_untouched"] = (str(type(model[1].experts.w1.data).__name__), "")
        out[f"{name}_retry"] = _error(lambda: ep_fsdp.parallelize_moe(model, mesh))
    return out


def test_errors_name_the_values_and_the_fix(pools):
    errors = pools(2).run(error_cases)[0]
    assert errors["ep_not_dividing_world"] == (
        "ValueError",
        "build_mesh: ep=3 does not divide world_size=2; choose ep from the divisors of 2: [1, 2].",
    )
    kind, msg = errors["product_mismatch"]
    assert kind == "ValueError" and "dp_shard=3 * ep=1 = 3 != world_size=2" in msg
    assert errors["ep_zero"][0] == "ValueError" and "got ep=0" in errors["ep_zero"][1]
    kind, msg = errors["experts_not_divisible"]
    assert kind == "ValueError"
    assert "num_experts=3 of MoE layer '1' is not divisible by ep=2" in msg
    assert "choose ep from the divisors of 3 or change num_experts to a multiple of 2" in msg
    kind, msg = errors["no_moe"]
    assert kind == "ValueError" and "Linear contains no ep_fsdp.MoE layer" in msg
    kind, msg = errors["mesh_dims"]
    assert kind == "ValueError"
    assert "mesh must be 2-D with dims ('dp_shard', 'ep') in that order, got shape (2,) with dims ('dp',)" in msg
    kind, msg = errors["mesh_order"]
    assert kind == "ValueError" and "in that order, got shape (2, 1) with dims ('ep', 'dp_shard')" in msg
    assert errors["not_a_mesh"][0] == "TypeError" and "got str" in errors["not_a_mesh"][1]
    kind, msg = errors["twice"]
    assert kind == "ValueError" and "Sequential is already parallelized" in msg
    assert errors["mp_policy"] == ("ValueError", "parallelize_moe: mp_policy must be None or a torch.distributed.fsdp."
                                   "MixedPrecisionPolicy, got torch.bfloat16; e.g. MixedPrecisionPolicy(param_dtype="
                                   "torch.bfloat16, reduce_dtype=torch.float32).")
    assert "block_filter must be None or a callable (name, module, parent) -> bool, got 'layers'" in errors["block_filter"][1]
    assert errors["reshard_after_forward"] == ("ValueError", "parallelize_moe: reshard_after_forward must be True or False, got 'no'.")
    for name in ("mp_policy", "block_filter", "reshard_after_forward"):
        assert errors[f"{name}_untouched"][0] == "Tensor" and errors[f"{name}_retry"][0] == "no error", name


def layout_and_placements(dp_shard: int, ep: int) -> dict:
    torch.manual_seed(0)
    cfg = ep_fsdp.MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=2)
    model = nn.Sequential(nn.Linear(8, 8), nn.ModuleList([ep_fsdp.MoE(cfg), nn.Linear(8, 8)]))
    full_w1 = model[1][0].experts.w1.detach().clone()
    ep_fsdp.parallelize_moe(model, worker_mesh(dp_shard, ep))
    layout = get_layout(model)
    experts = model[1][0].experts
    sharded_full = experts.w1.full_tensor()
    experts.unshard()  # FSDP all-gather over dp_shard: what the forward sees
    unsharded = experts.w1
    local_block = unsharded.to_local().clone()
    experts.reshard()
    g = 4 // ep
    ep_rank = dist.get_rank() % ep
    return {
        "layout": (layout.world_size, layout.dp_shard, layout.ep),
        "full_ok": torch.equal(sharded_full, full_w1),
        "unsharded_mesh": tuple(unsharded.device_mesh.mesh_dim_names),
        "unsharded_placements": [str(p) for p in unsharded.placements],
        "owns_its_block": torch.equal(local_block, full_w1[ep_rank * g:(ep_rank + 1) * g]),
        "owners": model[1][0].placement.ranks(),
        "fsdp": [isinstance(m, FSDPModule) for m in (model, model[1][0], experts, model[1][1], model[0])],
        "dispatcher": type(model[1][0].dispatcher).__name__,
    }


def test_expert_ownership_and_fsdp_units(pools):
    for dp_shard, ep in [(1, 2), (2, 1)]:
        for r in pools(2).run(layout_and_placements, dp_shard, ep):
            assert r["layout"] == (2, dp_shard, ep)
            assert r["full_ok"]
            assert r["unsharded_mesh"] == ("ep",)
            assert r["unsharded_placements"] == ["S(0)"]
            assert r["owns_its_block"]
            assert r["owners"] == [e // (4 // ep) for e in range(4)]
            # root, experts and ModuleList elements are FSDP units; others are not
            assert r["fsdp"] == [True, True, True, True, False]
            assert r["dispatcher"] == ("DedupAllToAllDispatcher" if ep == 2 else "LocalDispatcher")


def mixed_precision_step(chunks: int = 1) -> dict:
    """bf16 parameters with fp32 gradient reduction on (1, 2): runs, and stays close to fp32
    (also with a streamed exchange: the policy needs nothing from the user)."""
    torch.manual_seed(0)
    cfg = ep_fsdp.MoEConfig(dim=16, hidden_dim=32, num_experts=4, top_k=2, aux_loss_coef=0.01)
    model = nn.Sequential(nn.Linear(16, 16), ep_fsdp.MoE(cfg), nn.Linear(16, 16))
    ref = copy.deepcopy(model)
    x = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(1))
    rank = dist.get_rank()
    ref_loss = ref(x).square().mean()
    ep_fsdp.parallelize_moe(
        model, worker_mesh(1, 2), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
        dispatch_chunks=chunks,
    )
    out = model(x[rank:rank + 1])
    aux = ep_fsdp.moe_aux_loss(model)
    loss = out.float().square().mean() + aux
    loss.backward()
    sent = model[1].routing.a2a_bytes
    t = loss.detach().clone() - aux
    dist.all_reduce(t)
    return {
        "out_dtype": str(out.dtype),
        "grad_dtype": str(model[1].experts.w1.grad.dtype),
        "loss": float(t) / 2,
        "ref": float(ref_loss.detach()),
        "a2a_bytes": sent,
    }


def test_bf16_mixed_precision(pools):
    one = pools(2).run(mixed_precision_step)
    streamed = pools(2).run(mixed_precision_step, 3)
    for r, c in zip(one, streamed):
        for result in (r, c):
            assert result["out_dtype"] == "torch.bfloat16"
            assert result["grad_dtype"] == "torch.float32"
            assert abs(result["loss"] - result["ref"]) < 2e-2 * abs(result["ref"]), result
            assert result["a2a_bytes"] > 0
        assert c["a2a_bytes"] == r["a2a_bytes"] and abs(c["loss"] - r["loss"]) <= 4e-3 * abs(r["loss"]), (c, r)


def test_expert_fsdp_placement_is_chosen_up_front():
    from torch.distributed.tensor import Shard

    from ep_fsdp.parallelize import expert_fsdp_placement

    assert expert_fsdp_placement("w1", (4, 48, 32), 2) == Shard(0)  # whole experts per rank
    assert expert_fsdp_placement("w1", (3, 48, 32), 2) == Shard(1)  # 2 does not divide 3 experts
    assert expert_fsdp_placement("w2", (3, 6, 8), 4) == Shard(2)  # nor 6: the last dim
    assert expert_fsdp_placement("w1", (3, 6, 6), 4) == Shard(0)  # nothing even: padded dim 0
    # (parity and checkpoint resharding of the padded case: test_parity "uneven-shard0-4x1",
    # test_checkpoint "uneven")


def prefetch_plan(dp_shard: int, ep: int) -> dict:
    """Which FSDP units each unit prefetches, by name (bf16: routers are units of their own)."""
    from ep_fsdp.models import MoETransformer, TransformerConfig

    torch.manual_seed(0)
    moe = ep_fsdp.MoEConfig(dim=16, hidden_dim=16, num_experts=4, top_k=2)
    model = MoETransformer(TransformerConfig(vocab_size=32, dim=16, num_layers=3, num_heads=2, max_seq_len=8,
                                             num_dense_layers=1, moe=moe))
    ep_fsdp.parallelize_moe(model, worker_mesh(dp_shard, ep), mp_policy=MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32), grad_reduction="sum")
    names = {m._get_fsdp_state(): n or "root" for n, m in model.named_modules() if isinstance(m, FSDPModule)}
    plan = {}
    for n, m in model.named_modules():
        if isinstance(m, FSDPModule):
            st = m._get_fsdp_state()
            plan[n or "root"] = ([names[s] for s in st._states_to_forward_prefetch],
                                 [names[s] for s in st._states_to_backward_prefetch])
    factors = {n or "root": m._get_fsdp_state()._fsdp_param_group.gradient_divide_factor
               for n, m in model.named_modules() if isinstance(m, FSDPModule) and m._get_fsdp_state()._fsdp_param_group}
    keeps = {n or "root": m._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is None
             for n, m in model.named_modules() if isinstance(m, FSDPModule) and m._get_fsdp_state()._fsdp_param_group}
    return {"plan": plan, "factors": factors, "keeps": keeps}


def test_blocks_prefetch_the_next_blocks_units_and_the_last_block_keeps_its_parameters(pools):
    r = pools(2).run(prefetch_plan, 1, 2)[0]
    plan = r["plan"]
    ff = "layers.{}.feed_forward"
    assert plan["root"][0] == ["layers.0"]  # layer 0 is dense
    assert plan["layers.0"][0] == ["layers.1", ff.format(1) + ".router", ff.format(1) + ".experts"]
    assert plan["layers.1"][0] == ["layers.2", ff.format(2) + ".router", ff.format(2) + ".experts"]
    assert plan["layers.2"][1] == [ff.format(2) + ".experts", ff.format(2) + ".router",
                                   "layers.1", ff.format(1) + ".experts", ff.format(1) + ".router"]
    assert plan["layers.1"][1] == ["layers.0"]
    # grad_reduction="sum": no unit divides; the experts units (a size-1 dp_shard mesh here) leave
    # the factor unset (FSDP's plain sum there, without a division pass), the others set 1
    experts = {n for n in r["factors"] if n.endswith(".experts")}
    assert experts and all(r["factors"][n] is None for n in experts), r["factors"]
    assert {f for n, f in r["factors"].items() if n not in experts} == {1.0}, r["factors"]
    # The root and the last block with its units keep their parameters after the forward (their
    # backward comes first); every other unit reshards (reshard_after_forward=True, the default).
    last = {"root", "layers.2", ff.format(2) + ".router", ff.format(2) + ".experts"}
    assert {n for n, keep in r["keeps"].items() if keep} == last, r["keeps"]
    assert {"layers.0", "layers.1", ff.format(1) + ".experts"} <= set(r["keeps"])


def bare_layer_step(dp_shard: int, ep: int) -> dict:
    """parallelize_moe on a model that IS an MoE layer (no wrapper module)."""
    torch.manual_seed(0)
    layer = ep_fsdp.MoE(ep_fsdp.MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=2))
    ref = copy.deepcopy(layer)
    x = torch.randn(4 * dist.get_world_size(), 8, generator=torch.Generator().manual_seed(1))
    ref(x).square().mean().backward()
    ep_fsdp.parallelize_moe(layer, worker_mesh(dp_shard, ep))
    rank = dist.get_rank()
    layer(x[4 * rank:4 * rank + 4]).square().mean().backward()
    w1 = layer.experts.w1.grad.full_tensor()
    return {"err": float((w1 - ref.experts.w1.grad).norm() / ref.experts.w1.grad.norm())}


def test_a_bare_moe_layer_can_be_the_model(pools):
    for layout in [(1, 2), (2, 1)]:
        for r in pools(2).run(bare_layer_step, *layout):
            assert r["err"] < 1e-5, r


def clip_on_a_sub_mesh() -> dict:
    """Two replicas of one (dp_shard=1, ep=2) model inside a 3-D mesh: the norm sums over the
    model's ranks only, as on the unparallelized model."""
    torch.manual_seed(0)
    cfg = ep_fsdp.MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=2)
    model = nn.Sequential(nn.Linear(8, 8), ep_fsdp.MoE(cfg))
    reference = copy.deepcopy(model)
    big = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("replica", "dp_shard", "ep"))
    ep_fsdp.parallelize_moe(model, big["dp_shard", "ep"])
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))  # the same batch in both replicas
    rank = big["ep"].get_local_rank()
    model(x[rank]).square().sum().backward()
    reference(x.reshape(-1, 8)).square().sum().backward()
    return {"ours": float(ep_fsdp.clip_grad_norm_(model.parameters(), 1e9)),
            "torch": float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e9))}


def test_clip_grad_norm_sums_over_the_models_ranks_when_its_mesh_is_part_of_a_larger_one(pools):
    for r in pools(4).run(clip_on_a_sub_mesh):
        # "mean" divides the expert gradients by world=2 and averages the dense ones: half the sum's
        assert abs(r["ours"] - r["torch"] / 2) <= 1e-5 * r["torch"], r


class _SinkAttention(nn.Module):
    """A float32 parameter held by a module beside bf16 children (transformers' Flint keeps its
    attention ``sinks`` in float32 so)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.sinks = nn.Parameter(torch.linspace(-1.0, 1.0, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.q_proj(x) * torch.sigmoid(self.sinks).to(x.dtype))


class _SinkBlock(nn.Module):
    def __init__(self, cfg: ep_fsdp.MoEConfig) -> None:
        super().__init__()
        self.attn = _SinkAttention(cfg.dim)
        self.mix = nn.Linear(cfg.dim, cfg.dim, bias=False)  # kept float32, its weight read directly
        self.moe = ep_fsdp.MoE(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        # NOTE: like transformers BailingHybrid's conv1d weight handed to a kernel: no call of mix's forward
        x = x + torch.nn.functional.linear(x.float(), self.mix.weight).to(x.dtype)
        return x + self.moe(x)


class _SinksModel(nn.Module):
    def __init__(self, cfg: ep_fsdp.MoEConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_SinkBlock(cfg) for _ in range(2)])
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return self.head(self.norm(x.float()).to(torch.bfloat16)).float().square().mean()


def _sinks_model() -> nn.Module:
    """bf16 blocks whose attention keeps float32 sinks, and a float32 final norm at the root."""
    torch.manual_seed(0)
    model = _SinksModel(ep_fsdp.MoEConfig(dim=16, hidden_dim=32, num_experts=4, top_k=2))
    model.to(torch.bfloat16)
    for module in model.modules():
        if isinstance(module, (_SinkAttention, nn.LayerNorm)):
            for p in module.parameters(recurse=False):
                p.data = p.data.float()
    for block in model.layers:
        block.mix.float()
    return model


def odd_parameter_beside_children_step(dp_shard: int, ep: int) -> dict:
    model = _sinks_model()
    ref = copy.deepcopy(model)
    world, rank = dist.get_world_size(), dist.get_rank()
    x = torch.randn(world, 8, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref_losses = [ref(x[r:r + 1]) for r in range(world)]
    (sum(ref_losses) / world).backward()
    ep_fsdp.parallelize_moe(model, worker_mesh(dp_shard, ep))
    with torch.no_grad():  # the float32 units gathered for blocks' forwards are released after them
        model(x[rank:rank + 1])
    held = [i for i, block in enumerate(model.layers) if not isinstance(block.mix.weight, DTensor)]
    loss = model(x[rank:rank + 1])
    loss.backward()
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    unit_dtypes = []
    for unit in units:  # the parameters each unit manages (not those of the units inside it)
        inner = {id(p) for m in unit.modules() if m is not unit and isinstance(m, FSDPModule) for p in m.parameters()}
        unit_dtypes.append({str(p.dtype) for p in unit.parameters() if id(p) not in inner})
    grads = {n: rel_err(full(p.grad), r.grad) for (n, p), r in zip(model.named_parameters(), ref.parameters())}
    t = loss.detach().clone()
    dist.all_reduce(t)
    return {"held": held, "unit_dtypes": unit_dtypes, "loss": float(t) / world, "ref": float(sum(ref_losses).detach()) / world,
            "grads": grads, "sinks_dtype": str(model.layers[0].attn.sinks.dtype)}


def mixed_own_dtypes() -> dict:
    model = _sinks_model()
    model.layers[1].attn.o_proj.bias = nn.Parameter(torch.zeros(16))  # float32 beside a bf16 weight
    return {"error": _error(lambda: ep_fsdp.parallelize_moe(model, worker_mesh(1, 2))),
            "untouched": not any(isinstance(p, DTensor) for p in model.parameters())}


def test_a_module_holding_another_dtype_beside_its_children_is_split_into_units(pools):
    for layout in [(1, 2), (2, 1)]:
        for r in pools(2).run(odd_parameter_beside_children_step, *layout):
            assert all(len(d) == 1 for d in r["unit_dtypes"]), r["unit_dtypes"]
            assert r["held"] == [1], r["held"]  # only the last block keeps its units (it always does)
            assert r["sinks_dtype"] == "torch.float32", r
            assert abs(r["loss"] - r["ref"]) <= 1e-2 * abs(r["ref"]), r
            name, err = worst(r["grads"])
            assert err <= 3e-2, (layout, name, err)
    for r in pools(2).run(mixed_own_dtypes):
        kind, message = r["error"]
        assert kind == "ValueError" and "'layers.1.attn.o_proj'" in message, r
        assert "weight: bfloat16, bias: float32" in message and "MixedPrecisionPolicy" in message, r
        assert r["untouched"], r


class _NormedExperts(nn.Module):
    """An experts module of the transformers contract with a child every expert's output goes
    through: one copy shared by all experts (transformers MuseSpark's ``post_expert_norm``)."""

    def __init__(self, E: int = 4, D: int = 8, H: int = 12) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * H, D) / D**0.5)
        self.down_proj = nn.Parameter(torch.randn(E, D, H) / H**0.5)
        self.post_norm = nn.LayerNorm(D)
        with torch.no_grad():
            self.post_norm.weight.uniform_(0.5, 1.5)
            self.post_norm.bias.uniform_(-0.5, 0.5)

    def forward(self, hidden_states, top_k_index, top_k_weights):  # [T, D], [T, k], [T, k]
        out = torch.zeros_like(hidden_states)
        for e in range(self.gate_up_proj.shape[0]):
            rows, slot = torch.nonzero(top_k_index == e, as_tuple=True)
            if rows.numel() == 0:  # as MuseSpark: the child runs once per expert with rows
                continue
            gate, up = (hidden_states[rows] @ self.gate_up_proj[e].t()).chunk(2, dim=-1)
            y = (torch.nn.functional.silu(gate) * up) @ self.down_proj[e].t()
            if e % 2:  # odd experts only (local and global parity agree with 2 experts per rank)
                y = self.post_norm(y)
            out.index_add_(0, rows, y * top_k_weights[rows, slot, None])
        return out


class _ContractBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(8, 4, bias=False)
        self.experts = _NormedExperts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: experts 2 and 3 (the last ep rank's at ep=2) get no token (its empty call goes to
        # its first, even, expert): ranks call the child a different number of times, one never
        logits = self.router(x) + torch.tensor([4.0, 4.0, -30.0, -30.0])
        weights, index = torch.softmax(logits, dim=-1).topk(2, dim=-1)
        return x + self.experts(x, index, weights)


class _ContractModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_ContractBlock(), _ContractBlock()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


def experts_child_step(dp_shard: int, ep: int) -> dict:
    torch.manual_seed(0)
    model = _ContractModel()
    ref = copy.deepcopy(model)
    world, rank = dist.get_world_size(), dist.get_rank()
    x = torch.randn(world * 6, 8, generator=torch.Generator().manual_seed(1))
    sum(ref(x[6 * r:6 * r + 6]).square().mean() for r in range(world)).div(world).backward()
    ep_fsdp.parallelize_moe(model, worker_mesh(dp_shard, ep))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x[6 * rank:6 * rank + 6]).square().mean().backward()
    grads = {n: rel_err(full(p.grad), r.grad) for (n, p), r in zip(model.named_parameters(), ref.parameters())}
    opt.step()
    copies = [full(p) for n, p in model.named_parameters() if "post_norm" in n]
    same = []
    for t in copies:  # the shared child is one tensor on every rank after a step
        other = t.clone()
        dist.broadcast(other, src=0)
        same.append(torch.equal(other, t))
    return {"grads": grads, "same": same}


def test_a_child_of_an_experts_module_is_shared_by_all_experts(pools):
    for layout in [(1, 2), (2, 2), (2, 1), (1, 1)]:
        for r in pools(layout[0] * layout[1]).run(experts_child_step, *layout):
            name, err = worst(r["grads"])
            assert err <= 1e-5, (layout, name, err, r["grads"])
            assert r["same"] and all(r["same"]), r


def test_one_stacked_parameter_does_not_make_an_experts_module():
    from ep_fsdp.expert_modules import find_expert_modules

    class _LoopResidual(nn.Module):  # transformers Inkling2Loop's message residual: query [loops, 4, D]
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Parameter(torch.zeros(3, 4, 8))

        def forward(self, block_states, partial, loop_layer_idx):
            return partial

    model = nn.Module()
    model.message = _LoopResidual()
    model.block = _ContractBlock()
    assert [n for n, _ in find_expert_modules(model)] == ["block.experts"]


def contract_experts_from_safetensors(root: str) -> dict:
    """A moved experts module of the contract (not in a transformers model) reads its storage rows
    from their logical rows in exported safetensors."""
    import ep_fsdp.checkpoint

    torch.manual_seed(0)
    model = _ContractModel()
    ep_fsdp.parallelize_moe(model, worker_mesh(1, 2))
    ep_fsdp.rebalance_experts(model, load=[0, 1, 2, 3])
    ep_fsdp.checkpoint.save(f"{root}/ckpt", model, step=1)
    if dist.get_rank() == 0:
        ep_fsdp.checkpoint.export_safetensors(f"{root}/ckpt", f"{root}/hub")
    dist.barrier()
    torch.manual_seed(1)
    other = _ContractModel()
    ep_fsdp.parallelize_moe(other, worker_mesh(1, 2))
    ep_fsdp.rebalance_experts(other, load=[0, 1, 2, 3])
    ep_fsdp.checkpoint.load_safetensors(other, f"{root}/hub")
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(dist.get_rank()))
    with torch.no_grad():
        return {"err": rel_err(other(x), model(x)), "moved": ep_fsdp.expert_placement(other)}


def test_moved_contract_experts_load_from_safetensors(pools, tmp_path):
    for r in pools(2).run(contract_experts_from_safetensors, str(tmp_path)):
        assert any(v != sorted(v) for v in r["moved"].values()), r
        assert r["err"] <= 1e-6, r


def inference_mode_first(dp_shard: int, ep: int) -> dict:
    """The first forward after parallelize_moe under torch.inference_mode(), then a training step,
    then inference_mode again, against the unparallelized model on the same global batch.

    NOTE: torch 2.13's FSDP2 creates its all-gather buffers at a unit's first unshard; under
    inference_mode they were inference tensors: the unshard failed on a size-1 group (the experts'
    units at dp_shard = 1) and the training step after it failed on larger groups."""
    torch.manual_seed(0)
    cfg = ep_fsdp.MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=2)
    model = nn.Sequential(nn.Linear(8, 8), ep_fsdp.MoE(cfg), nn.Linear(8, 8))
    reference = copy.deepcopy(model)
    ep_fsdp.parallelize_moe(model, worker_mesh(dp_shard, ep))
    x = torch.randn(8 * dist.get_world_size(), 8, generator=torch.Generator().manual_seed(1))
    mine = x.view(dist.get_world_size(), 8, 8)[dist.get_rank()]
    out: dict = {}
    try:
        with torch.inference_mode():
            first = model(mine)
            want = reference(x).view(dist.get_world_size(), 8, 8)[dist.get_rank()]
        out["first"] = rel_err(first.clone(), want.clone())
        model(mine).square().mean().backward()  # grad_reduction "mean": the global batch's mean
        reference(x).square().mean().backward()
        grads = {n: rel_err(full(p.grad), r.grad) for (n, p), r in zip(model.named_parameters(), reference.parameters())}
        out["grad"] = worst(grads)
        with torch.inference_mode():
            again = model(mine)
        out["again"] = rel_err(again.clone(), first.clone())
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def test_the_first_forward_may_run_under_inference_mode(pools):
    for layout in [(1, 2), (2, 1)]:
        for r in pools(2).run(inference_mode_first, *layout):
            assert "error" not in r, (layout, r)
            assert r["first"] < 1e-6 and r["again"] == 0.0, (layout, r)
            assert r["grad"][1] < 1e-5, (layout, r)


def test_an_older_torch_is_refused_up_front_for_an_experts_child(monkeypatch):
    """Sharding an experts module's shared child needs FSDP2's per-parameter mesh (ep > 1) and
    set_reduce_scatter_unused_params (any ep), both new in torch 2.13: without them the call is
    refused before anything is changed, naming the module, the torch version and the fix (torch
    2.11 raised a bare AttributeError with the experts already wrapped)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_common

    from ep_fsdp.experts import GroupedExperts
    from ep_fsdp.parallelize import _check_shared_children_supported

    with_child = [("layers.0.experts", "layers.0.experts", _NormedExperts(), 4)]
    grouped = GroupedExperts(ep_fsdp.MoEConfig(dim=8, hidden_dim=8, num_experts=4))
    without_child = [("moe.experts", "moe.experts", grouped, 4)]
    _check_shared_children_supported(with_child, ep=2)  # this torch has both
    monkeypatch.delattr(_fsdp_common, "ShardPlacementResult")
    _check_shared_children_supported(with_child, ep=1)  # only ep > 1 needs the per-parameter mesh
    _check_shared_children_supported(without_child, ep=2)
    with pytest.raises(RuntimeError, match=r"'layers\.0\.experts\.post_norm\.weight'.*per-parameter mesh.*torch >= 2\.13"):
        _check_shared_children_supported(with_child, ep=2)
    monkeypatch.delattr(FSDPModule, "set_reduce_scatter_unused_params")
    with pytest.raises(RuntimeError, match=r"set_reduce_scatter_unused_params, which torch .* lacks"):
        _check_shared_children_supported(with_child, ep=1)


def refused_without_new_fsdp() -> dict:
    """parallelize_moe of the model with an experts child, where FSDPModule lacks
    set_reduce_scatter_unused_params (as in torch 2.11): the error, and whether the model is untouched."""
    saved = FSDPModule.set_reduce_scatter_unused_params
    del FSDPModule.set_reduce_scatter_unused_params
    try:
        model = _ContractModel()
        error = _error(lambda: ep_fsdp.parallelize_moe(model, worker_mesh(1, 2)))
    finally:
        FSDPModule.set_reduce_scatter_unused_params = saved
    return {"error": error,
            "untouched": not any(isinstance(p, DTensor) for p in model.parameters())
            and not any(isinstance(m, FSDPModule) or hasattr(m, "dispatcher") for m in model.modules())}


def test_parallelize_refuses_an_experts_child_on_an_older_torch_before_changing_anything(pools):
    for r in pools(2).run(refused_without_new_fsdp):
        kind, message = r["error"]
        assert kind == "RuntimeError" and "'layers.0.experts.post_norm.weight'" in message, r
        assert "(and 1 more)" in message and "torch >= 2.13" in message, r  # 4 shared parameters in 2 layers
        assert r["untouched"], r
