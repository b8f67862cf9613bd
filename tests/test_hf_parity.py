"""transformers MoE models parallelized in place: training-step parity with the unparallelized model.

One step on the global batch (float32): logits, loss (with transformers' balancing loss over the
global batch), every full gradient and every parameter after AdamW within ``REL_TOL`` of the
single-process transformers model, on (dp_shard, ep) = (2,2), (1,4), (4,1), for five families
that share the v5 experts contract but differ in router, activation, biases, layout and shared
experts. Plus a batch where one ep rank's experts receive no token, a model that mixes
``ep_fsdp.MoE`` with transformers blocks, and the contract's clear errors.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import ep_fsdp
from dist_pool import worker_mesh
from parity_utils import REL_TOL, full, mean_over_ranks, rel_err, worst

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
from hf_tiny_model import FAMILIES, tiny_config  # noqa: E402

LAYOUTS = [(2, 2), (1, 4), (4, 1)]
SEQ = 12


def build_hf(family: str, seed: int = 0, **overrides) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")):  # zero at init in some families
                p.normal_(0, 0.5)
            elif not p.any():  # zero biases: after one AdamW step their relative error would be that of the step
                p.normal_(0, 0.02)
    return model


def starve_last_rank(model: nn.Module, ep: int) -> list[int]:
    """Route nothing to the experts of the last ep rank, through the router's bias (GPT-OSS
    ``router.bias``, DeepSeek-V3 ``e_score_correction_bias``). Returns the starved experts."""
    starved: list[int] = []
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("router.bias", "gate.e_score_correction_bias")):
                E = t.shape[0]
                starved = list(range(E - E // ep, E))
                t[starved] = -1e4
    if not starved:
        raise ValueError("starve_last_rank: this family's router has no bias")
    return starved


def hf_parity_step(dp_shard: int, ep: int, family: str, starve: bool = False, mix: bool = False,
                   checkpointing: bool = False, **overrides) -> dict:
    """One AdamW step of the parallel and the reference model; errors, computed on every rank."""
    mesh = worker_mesh(dp_shard, ep)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_hf(family, **overrides)
    if mix:  # an ep_fsdp.MoE in place of layer 0's transformers MoE block
        cfg = model.config
        torch.manual_seed(1)
        model.model.layers[0].mlp = ep_fsdp.MoE(ep_fsdp.MoEConfig(
            dim=cfg.hidden_size, hidden_dim=24, num_experts=8, top_k=2, aux_loss_coef=0.01))
    starved = starve_last_rank(model, max(ep, 2)) if starve else []
    ref = copy.deepcopy(model)
    ref.config.output_router_logits = True  # transformers adds coef * its balancing loss
    names_before = [n for n, _ in model.named_parameters()]
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (2 * world, SEQ), generator=gen)

    ref.train()
    out_ref = ref(x, labels=x)
    loss_ref = out_ref.loss + (ep_fsdp.moe_aux_loss(ref) if mix else 0.0)  # the ep_fsdp.MoE layer's part
    loss_ref.backward()
    grads_ref = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
    opt = dict(lr=1e-3, weight_decay=0.1)
    torch.optim.AdamW(ref.parameters(), **opt).step()

    use_cache = model.config.use_cache
    ep_fsdp.parallelize_moe(model, mesh, activation_checkpointing=checkpointing)
    assert model.config.use_cache == use_cache  # (off in training forwards only: the config is exported)
    model.train()
    xs = x[2 * rank:2 * rank + 2]
    out = model(xs, labels=xs)
    loss = out.loss + ep_fsdp.moe_aux_loss(model)
    loss.backward()
    grad_err = {n: rel_err(full(p.grad), grads_ref[n]) for n, p in model.named_parameters() if n in grads_ref}
    missing_grads = [n for n, p in model.named_parameters() if (p.grad is None) != (n not in grads_ref)]
    torch.optim.AdamW(model.parameters(), **opt).step()
    ref_params = dict(ref.named_parameters())
    param_err = {n: rel_err(full(p), ref_params[n].detach()) for n, p in model.named_parameters()}
    layers = [m for n, m in model.named_modules() if isinstance(m, ep_fsdp.expert_modules.ExpertParallelExperts)]
    stats = ep_fsdp.routing_stats(model)
    placements = {
        n: [(type(pl).__name__, getattr(pl, "dim", None)) for pl in p.placements] for n, p in model.named_parameters() if ".experts." in n and "mlp.experts" in n
    }
    return {
        "loss": mean_over_ranks(loss),
        "loss_ref": float(loss_ref),
        "logits": rel_err(out.logits.detach(), out_ref.logits[2 * rank:2 * rank + 2].detach()),
        "grad": worst(grad_err),
        "param": worst(param_err),
        "missing_grads": missing_grads,
        "names_kept": names_before == [n for n, _ in model.named_parameters()],
        "state_dict_keys_kept": sorted(ref.state_dict()) == sorted(model.state_dict()),
        "contract_layers": len(layers),
        "rows_received": [int(m.routing.expert_load.sum()) if m.routing.expert_load is not None else 0 for m in layers],
        "starved_slots": sum(s["tokens_per_expert"][e] for s in stats.values() for e in starved if len(s["tokens_per_expert"]) > e),
        "placements": placements,
    }


def check(results: list[dict]) -> None:
    for r in results:
        assert r["names_kept"] and r["state_dict_keys_kept"], "parameter names changed"
        assert r["contract_layers"] >= 1
        assert not r["missing_grads"], r["missing_grads"]
        assert abs(r["loss"] - r["loss_ref"]) <= REL_TOL * abs(r["loss_ref"]), r
        assert r["logits"] <= REL_TOL, r["logits"]
        assert r["grad"][1] <= REL_TOL, f"gradient {r['grad']}"
        assert r["param"][1] <= REL_TOL, f"parameter after AdamW {r['param']}"
        assert r["placements"]
        for name, pl in r["placements"].items():  # (dp_shard, ep) mesh: FSDP's shard, then Shard(0) over ep
            assert len(pl) == 2 and "Shard" in pl[0][0] and pl[-1] == ("Shard", 0), (name, pl)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"dp{l[0]}xep{l[1]}")
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_model_step_matches_single_process(pools, layout, family):
    results = pools(layout[0] * layout[1]).run(hf_parity_step, *layout, family)
    check(results)


@pytest.mark.parametrize("layout", [(1, 4), (2, 2)], ids=lambda l: f"dp{l[0]}xep{l[1]}")
@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_ep_rank_without_tokens(pools, layout, family):
    results = pools(4).run(hf_parity_step, *layout, family, starve=True)
    check(results)
    assert results[0]["starved_slots"] == 0
    # the last ep rank's experts processed no row, in every layer, on every rank of that ep index
    ep = layout[1]
    for rank, r in enumerate(results):
        if rank % ep == ep - 1:
            assert all(rows == 0 for rows in r["rows_received"]), r["rows_received"]


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_activation_checkpointing_of_transformers_models(pools, family):
    """The recomputed forward must not append to the KV cache again (sliding-window and MLA
    attention read its shapes): parallelize_moe turns the cache off, as transformers does."""
    check(pools(4).run(hf_parity_step, 2, 2, family, checkpointing=True))


def decode_in_train_mode_without_grad(family: str) -> dict:
    """A train-mode model with activation checkpointing, under no_grad (sampling between training
    steps without model.eval()): the prefix's KV cache, fed back with one more token, gives the
    full sequence's last logits, as without parallelization."""
    torch.manual_seed(0)
    model = build_hf(family)
    ref = copy.deepcopy(model)
    ep_fsdp.parallelize_moe(model, worker_mesh(1, dist.get_world_size()), activation_checkpointing=True)
    ids = torch.randint(1, 256, (1, SEQ), generator=torch.Generator().manual_seed(dist.get_rank()))
    out = {}
    for name, m in (("ref", ref), ("ours", model)):
        m.train()
        with torch.no_grad():
            whole = m(input_ids=ids).logits[:, -1]
            prefix = m(input_ids=ids[:, :-1], use_cache=True)
            step = m(input_ids=ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
        out[name] = {"cache": type(prefix.past_key_values).__name__, "err": rel_err(step, whole)}
    return out


def test_decoding_in_train_mode_without_grad_keeps_the_kv_cache(pools):
    """The cache is turned off for checkpointed forwards that record a gradient only (as in
    transformers); it was off in every train-mode forward, and a decode loop then computed each
    token without its context (relative error ~0.2 in the logits, no error)."""
    for r in pools(2).run(decode_in_train_mode_without_grad, "qwen3_moe"):
        assert r["ref"]["err"] < 1e-5, r
        assert r["ours"]["cache"] == r["ref"]["cache"] != "NoneType" and r["ours"]["err"] < 1e-5, r


def test_model_mixing_ep_fsdp_moe_and_transformers_blocks(pools):
    results = pools(4).run(hf_parity_step, 2, 2, "qwen3_moe", mix=True)
    check(results)


def test_tied_input_output_embeddings(pools):
    results = pools(4).run(hf_parity_step, 2, 2, "qwen3_moe", tie_word_embeddings=True)
    check(results)


def test_import_ep_fsdp_never_imports_transformers():
    code = ("import sys, ep_fsdp, ep_fsdp.checkpoint, ep_fsdp.expert_modules; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def one_process_balancing_loss() -> tuple[float, float, float]:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    model = build_hf("qwen3_moe")
    ref = copy.deepcopy(model)
    ep_fsdp.parallelize_moe(model, worker_mesh(1, 1))
    x = torch.randint(0, 256, (3, SEQ), generator=torch.Generator().manual_seed(3))
    model.train(), ref.train()
    model(x)
    out = ref(x, output_router_logits=True)
    expected = ref.config.router_aux_loss_coef * load_balancing_loss_func(
        out.router_logits, ref.config.num_experts, ref.config.num_experts_per_tok)
    got = ep_fsdp.moe_aux_loss(model)
    return float(got), float(expected), float(ep_fsdp.moe_aux_loss(model))


def test_balancing_loss_equals_transformers_on_one_process(pools):
    """moe_aux_loss on a parallelized model (one rank) == coef * load_balancing_loss_func."""
    got, expected, after = pools(1).run(one_process_balancing_loss)[0]
    assert got == pytest.approx(expected, rel=1e-6, abs=0) and expected > 0, (got, expected)
    assert after == 0.0  # the call consumed the recorded forward


class _NoContract(nn.Module):
    """Named like an experts module, but a list of per-expert MLPs (transformers < 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))


class _Stacked(nn.Module):
    def __init__(self, E: int = 6) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 8, 4))
        self.down_proj = nn.Parameter(torch.randn(E, 4, 4))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return hidden_states


class _Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList([inner])


def test_contract_errors_name_the_module():
    from ep_fsdp.expert_modules import contract_num_experts, find_expert_modules

    with pytest.raises(ValueError, match=r"'layers.0.experts'.*no expert-leading weights"):
        find_expert_modules(_Wrapper(_NoContract()))
    bad = _Stacked()
    bad.bias = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"every own parameter must be \[E, \.\.\.\] with one E"):
        contract_num_experts("m", bad)
    wrong = _Stacked()
    wrong.num_experts = 4
    with pytest.raises(ValueError, match="num_experts=4 but its weights hold 6"):
        contract_num_experts("m", wrong)
    assert contract_num_experts("m", _Stacked()) == 6

    class _TwoInputs(_Stacked):
        def forward(self, hidden_states, top_k_index):
            return hidden_states

    block = nn.Module()
    block.experts = _TwoInputs()
    with pytest.raises(ValueError, match=r"'layers.0.experts' \(_TwoInputs\).*forward takes 2 positional inputs"):
        find_expert_modules(_Wrapper(block))
    assert find_expert_modules(_Wrapper(_TwoInputs())) == []  # not named experts, not the contract: dense


def indivisible(ep: int) -> str:
    model = _Wrapper(_Stacked(E=6))
    try:
        ep_fsdp.parallelize_moe(model, worker_mesh(4 // ep, ep))
    except ValueError as e:
        return str(e)
    return "no error"


def test_experts_not_divisible_by_ep(pools):
    msg = pools(4).run(indivisible, 4)[0]
    assert "num_experts=6 of MoE layer 'layers.0'" in msg and "not divisible by ep=4" in msg, msg


def hf_train_moves(dp_shard: int, ep: int, family: str, move_every: int, steps: int = 10) -> dict:
    """Train a transformers model whose last ep rank's experts get no token; move experts (weights,
    biases, AdamW moments) every ``move_every`` steps."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_hf(family)
    starve_last_rank(model, ep)
    ep_fsdp.parallelize_moe(model, worker_mesh(dp_shard, ep))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, moved = [], 0
    for step in range(1, steps + 1):
        x = torch.randint(0, 256, (2 * world, SEQ), generator=torch.Generator().manual_seed(step))[2 * rank:2 * rank + 2]
        out = model(x, labels=x)
        (out.loss + ep_fsdp.moe_aux_loss(model)).backward()
        opt.step()
        opt.zero_grad()
        losses.append(mean_over_ranks(out.loss))
        if move_every and step % move_every == 0:
            ep_fsdp.rebalance_experts(model, opt)
            moved += sum(r["experts_moved"] for r in ep_fsdp.last_rebalance(model).values())
    return {"losses": losses, "moved": moved}


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_transformers_experts_move_between_ranks(pools, family):
    pool = pools(4)
    still = pool.run(hf_train_moves, 1, 4, family, 0)
    moving = pool.run(hf_train_moves, 1, 4, family, 3)
    assert moving[0]["moved"] > 0
    for a, b in zip(still, moving):
        for got, want in zip(b["losses"], a["losses"]):
            assert abs(got - want) <= REL_TOL * abs(want), (b["losses"], a["losses"])


class _UserModule(nn.Module):
    """The user's own module around a transformers model (a value head, a PEFT-style wrapper)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(lm.config.hidden_size, 1)

    def forward(self, x: torch.Tensor):
        return self.lm(x, labels=x)


def wrapped_parity_step(dp_shard: int, ep: int) -> dict:
    """A transformers model inside the user's module: the global-batch balancing loss and its
    gradients are those of the unparallelized model (transformers' own loss, output_router_logits)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    lm = build_hf("qwen3_moe")
    ref = copy.deepcopy(lm)
    ref.config.output_router_logits = True
    x = torch.randint(0, 256, (2 * world, SEQ), generator=torch.Generator().manual_seed(7))
    ref.train()
    loss_ref = ref(x, labels=x).loss
    loss_ref.backward()
    model = _UserModule(lm)
    ep_fsdp.parallelize_moe(model, worker_mesh(dp_shard, ep))
    model.train()
    xs = x[2 * rank:2 * rank + 2]
    out = model(xs)
    aux = ep_fsdp.moe_aux_loss(model)
    (out.loss + aux).backward()
    ref_grads = {f"lm.{n}": p.grad for n, p in ref.named_parameters() if p.grad is not None}
    grad_err = {n: rel_err(full(p.grad), ref_grads[n]) for n, p in model.named_parameters() if n in ref_grads}
    return {"loss": mean_over_ranks(out.loss + aux), "loss_ref": float(loss_ref), "aux": float(aux),
            "grad": worst(grad_err), "compared": len(grad_err)}


def test_a_transformers_model_inside_the_users_module_keeps_its_global_balancing_loss(pools):
    for r in pools(4).run(wrapped_parity_step, 2, 2):
        assert r["aux"] > 0 and r["compared"] > 10, r
        assert abs(r["loss"] - r["loss_ref"]) <= REL_TOL * abs(r["loss_ref"]), r
        assert r["grad"][1] <= REL_TOL, r["grad"]


def bare_experts_step(dp_shard: int, ep: int) -> dict:
    """A transformers experts module as the whole model: one FSDP unit (its own), the exchange."""
    rank, world = dist.get_rank(), dist.get_world_size()
    experts = build_hf("qwen3_moe").model.layers[0].mlp.experts
    ref = copy.deepcopy(experts)
    T, g = 6, torch.Generator().manual_seed(3)
    x = torch.randn(T * world, 32, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(T * world)])  # [T, k]
    w = torch.rand(T * world, 2, generator=g)
    ref(x, ids, w).square().sum().backward()
    ep_fsdp.parallelize_moe(experts, worker_mesh(dp_shard, ep), grad_reduction="sum")
    part = slice(T * rank, T * rank + T)
    y = experts(x[part], ids[part], w[part])
    y.square().sum().backward()
    grads = dict(ref.named_parameters())
    return {"out": rel_err(y.detach(), ref(x, ids, w)[part].detach()),
            "grad": worst({n: rel_err(full(p.grad), grads[n].grad) for n, p in experts.named_parameters()})}


def test_a_transformers_experts_module_can_be_the_model(pools):
    for layout in [(1, 2), (2, 1)]:
        for r in pools(2).run(bare_experts_step, *layout):
            assert r["out"] <= REL_TOL and r["grad"][1] <= REL_TOL, (layout, r)


def router_output_dtypes_under_bf16_policy(family: str) -> dict:
    """A bf16 mp_policy: transformers routers compute in float32 (their own unit), hand their
    outputs to the block in bf16 as the rest of it computes (Inkling's shared experts multiply the
    router's gammas with bf16 weights), and the balancing loss still sees float32 logits."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from ep_fsdp.aux_loss import router_modules

    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_hf(family)
    ref = copy.deepcopy(model)
    x = torch.randint(0, 256, (2 * world, SEQ), generator=torch.Generator().manual_seed(3))
    out = ref(x, labels=x, output_router_logits=True)
    ref_aux = float(out.aux_loss) * ref.config.router_aux_loss_coef
    ep_fsdp.parallelize_moe(model, worker_mesh(1, world),
                            mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    seen: set[str] = set()
    for router in router_modules(model):
        router.register_forward_hook(lambda m, a, o: seen.update(
            str(t.dtype) for t in (o if isinstance(o, tuple) else (o,)) if t.is_floating_point()))
    loss = model(x[2 * rank:2 * rank + 2], labels=x[2 * rank:2 * rank + 2]).loss
    aux = ep_fsdp.moe_aux_loss(model)
    (loss + aux).backward()
    return {"dtypes": seen, "aux": float(aux), "ref_aux": ref_aux}


def test_routers_hand_the_policys_dtype_to_their_block(pools):
    for r in pools(2).run(router_output_dtypes_under_bf16_policy, "qwen3_moe"):
        assert r["dtypes"] == {"torch.bfloat16"}, r
        assert r["aux"] == pytest.approx(r["ref_aux"], rel=1e-2), r  # float32 logits, bf16 hidden states


def aux_loss_of_a_family_without_one() -> dict:
    """A family whose modeling module has no load_balancing_loss_func never adds a balancing loss,
    whatever its config's router_aux_loss_coef says: neither does moe_aux_loss."""
    import transformers.models.qwen3_moe.modeling_qwen3_moe as family

    kept = family.load_balancing_loss_func
    del family.load_balancing_loss_func
    try:
        model = build_hf("qwen3_moe")
        ep_fsdp.parallelize_moe(model, worker_mesh(1, 1))
    finally:
        family.load_balancing_loss_func = kept
    x = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))
    model(x, labels=x).loss.backward()
    with_loss = build_hf("qwen3_moe")
    with_loss.__class__ = type("UsersQwen3Moe", (type(with_loss),), {})  # a user's subclass, in the user's module
    ep_fsdp.parallelize_moe(with_loss, worker_mesh(1, 1))
    with_loss(x, labels=x)
    return {"without": float(ep_fsdp.moe_aux_loss(model)), "with": float(ep_fsdp.moe_aux_loss(with_loss)),
            "coef": model.config.router_aux_loss_coef}


def test_no_balancing_loss_for_a_family_that_has_none(pools):
    r = pools(1).run(aux_loss_of_a_family_without_one)[0]
    assert r["coef"] > 0 and r["without"] == 0.0 and r["with"] > 0, r


def test_router_logits_recorded_before_the_model_moved_are_dropped_with_a_warning():
    """A training forward whose balancing loss was never taken, then the model moved (meta stands
    for another device here): the next forward drops the old logits with a warning, and
    moe_aux_loss uses the new device's forward alone (it raised "not on the expected device")."""
    from ep_fsdp.aux_loss import _ATTR, record_router_logits

    model = build_hf("qwen3_moe").train()
    assert model.config.router_aux_loss_coef > 0
    assert record_router_logits(model, stats_group=None, grad_factor=1.0)  # what parallelize_moe does
    (state,) = getattr(model, _ATTR)
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))
    model(ids)  # on the CPU, its loss not taken
    assert len(state.logits) == state.routers
    model.to("meta", torch.bfloat16)  # (a forward runs on meta in bfloat16)
    with pytest.warns(UserWarning, match=r"before the model moved to meta; they are dropped"):
        model(ids.to("meta"))
    assert len(state.logits) == state.routers and all(t.device.type == "meta" for t in state.logits)
    loss = ep_fsdp.moe_aux_loss(model)
    assert loss.device.type == "meta" and loss.dim() == 0
