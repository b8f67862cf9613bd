"""The MoE layer in one process: numerics against a per-token reference, router options,
balancing losses, dtypes and config errors."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import ep_fsdp
from ep_fsdp import _blocks as blocks_mod
from ep_fsdp import _padded_experts as padded_mod
from ep_fsdp import _row_windows as windows_mod
from ep_fsdp import experts as experts_mod
from ep_fsdp.config import MoEConfig
from ep_fsdp.moe import MoE


def naive_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token, per-slot loop written straight from the definition (slow, obviously right)."""
    cfg = layer.config
    t = x.reshape(-1, cfg.dim).float()
    logits = t @ layer.router.gate.weight.float().t() / cfg.temperature
    scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    select = scores if layer.router.expert_bias is None else scores + layer.router.expert_bias
    ids = select.topk(cfg.top_k, dim=-1).indices
    w = scores.gather(-1, ids)
    if cfg.renormalize and cfg.top_k > 1:
        w = w / w.sum(-1, keepdim=True)
    w = w * cfg.route_scale
    e = layer.experts
    out = torch.zeros_like(t)
    for i in range(t.shape[0]):
        for j in range(cfg.top_k):
            k = int(ids[i, j])
            h = F.silu(e.w1[k].float() @ t[i]) * (e.w3[k].float() @ t[i])
            out[i] = out[i] + w[i, j] * (e.w2[k].float() @ h)
    return out.reshape(x.shape)


CONFIGS = [
    dict(score_func="softmax"),
    dict(score_func="sigmoid", renormalize=False),
    dict(score_func="softmax", top_k=1, temperature=0.5, route_scale=2.0),
    dict(score_func="sigmoid", top_k=3, expert_bias=True),
]


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_forward_and_gradients_match_per_token_reference(options):
    torch.manual_seed(0)
    cfg = MoEConfig(dim=12, hidden_dim=20, num_experts=5, **{"top_k": 2, **options})
    layer = MoE(cfg)
    if cfg.expert_bias:
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.3, 0.0, -0.3, 0.1]))
    x = torch.randn(2, 7, 12, requires_grad=True)
    y = layer(x)
    ref = naive_moe(layer, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    params = [x, layer.router.gate.weight, layer.experts.w1, layer.experts.w2, layer.experts.w3]
    g = torch.autograd.grad((y * y).sum(), params)
    g_ref = torch.autograd.grad((ref * ref).sum(), params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert int(layer.routing.tokens_per_expert.sum()) == 14 * cfg.top_k


def test_fallback_loop_equals_grouped_mm(monkeypatch):
    torch.manual_seed(1)
    layer = MoE(MoEConfig(dim=8, hidden_dim=16, num_experts=6, top_k=2))
    x = torch.randn(30, 8, requires_grad=True)
    y1 = layer(x)
    g1 = torch.autograd.grad(y1.square().sum(), [x, layer.experts.w1])
    monkeypatch.setitem(experts_mod._GROUPED_MM_WORKS, ("cpu", torch.float32), False)
    y2 = layer(x)
    g2 = torch.autograd.grad(y2.square().sum(), [x, layer.experts.w1])
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _backward_nodes(root: torch.Tensor) -> list[str]:
    """Names of the autograd nodes behind ``root``."""
    seen, todo, names = set(), [root.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


def test_loop_path_weight_gradient_is_one_stack_not_one_full_tensor_per_expert():
    """The per-expert loop takes its matrices from one unbind: a w[g] per expert made G zero
    [G, M, K] gradients in the backward, one per expert (O(G^2) memory traffic: 9x the dense floor
    at 128 experts on an H200); the result equals the per-expert formula."""
    torch.manual_seed(0)
    G, N, K, M = 6, 20, 8, 4
    w = torch.randn(G, M, K, requires_grad=True)
    x = torch.randn(N, K)
    counts = [5, 0, 7, 3, 0, 5]
    y = experts_mod.grouped_linear(x, w, torch.tensor(counts), counts, grouped=False)  # [N, M]
    nodes = _backward_nodes(y)
    assert nodes.count("UnbindBackward0") == 1 and "SelectBackward0" not in nodes, nodes
    grad = torch.randn(N, M)
    (g,) = torch.autograd.grad(y, w, grad)
    start = 0
    for e, c in enumerate(counts):
        torch.testing.assert_close(g[e], grad[start:start + c].t() @ x[start:start + c])
        start += c


def test_loop_path_refuses_counts_that_do_not_match_the_experts():
    w = torch.randn(3, 4, 8)  # [G, M, K]
    with pytest.raises(ValueError, match=r"counts has 2 entries for 3 experts"):
        experts_mod.grouped_linear(torch.randn(5, 8), w, torch.tensor([2, 3]), [2, 3], grouped=False)


def test_routing_totals_follow_the_layer_to_another_device():
    """A forward on one device, then the layer moved (``Module.to`` leaves the routing counters and
    ``bias_load``, plain attributes, where they were): the next forward adds on the new device (it
    raised "Expected all tensors to be on the same device" on a GPU)."""
    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=2, expert_bias=True, bias_update_rate=0.01,
                          aux_loss_coef=0.01, capacity_factor=4.0))
    layer(torch.randn(6, 8))  # training forwards on the CPU
    layer(torch.randn(6, 8))
    counters = layer.routing
    assert int(counters.tokens_per_expert.sum()) == 24 and int(layer.bias_load.sum()) == 24
    before = {name: getattr(counters, name) for name in TOTALS} | {"bias_load": layer.bias_load}
    meta = torch.device("meta")  # another device on a CPU-only machine (its tensors hold no values)
    moved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, what .to made of it)
    added: list[torch.Tensor] = []  # left operands of every +
    to, add = torch.Tensor.to, torch.Tensor.__add__

    def spy_to(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = to(self, *args, **kwargs)
        moved.append((self, out))
        return out

    def spy_add(self: torch.Tensor, other: object) -> torch.Tensor:
        added.append(self)
        return add(self, other)

    # the next forward's statistics on the new device (a forward cannot run on meta)
    slots, ids = torch.tensor([3, 2, 4, 3], device=meta), torch.zeros(6, 2, dtype=torch.long, device=meta)
    with mock.patch.object(torch.Tensor, "to", spy_to), mock.patch.object(torch.Tensor, "__add__", spy_add):
        layer._record_forward(slots, slots, ids, torch.ones(6, 2, dtype=torch.bool, device=meta), True, 0)
        counters.add_losses(torch.ones(3, dtype=torch.float64, device=meta))
    for name, old in before.items():  # each old total was moved to the new device and added to, not dropped
        now = layer.bias_load if name == "bias_load" else getattr(counters, name)
        assert now.device == meta, name
        assert any(src is old and out.device == meta and any(a is out for a in added) for src, out in moved), name


TOTALS = ("tokens_per_expert", "expert_load", "rebalance_load", "losses", "pending_aux", "dropped")


def test_float64_takes_the_loop_path():
    torch.manual_seed(7)
    layer = MoE(MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2)).double()
    x = torch.randn(20, 8, dtype=torch.float64)
    assert not experts_mod.use_grouped_mm(x.device, torch.float64)
    torch.testing.assert_close(layer(x), naive_moe(layer, x).double())


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "loop"])
def test_experts_without_tokens_get_zero_gradient(monkeypatch, grouped):
    monkeypatch.setitem(experts_mod._GROUPED_MM_WORKS, ("cpu", torch.float32), grouped)
    torch.manual_seed(2)
    layer = MoE(MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=1, expert_bias=True))
    layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 50.0, 0.0]))  # everything to expert 2
    layer(torch.randn(10, 8)).sum().backward()
    grad = layer.experts.w1.grad
    assert grad is not None
    assert layer.routing.tokens_per_expert.tolist() == [0, 0, 10, 0]
    assert grad[2].abs().sum() > 0
    for w in (layer.experts.w1, layer.experts.w3, layer.experts.w2):
        assert torch.count_nonzero(w.grad[[0, 1, 3]]) == 0


# Largest relative errors of the seed code (before the float32 combine), same cases: output 4.7e-3,
# input grad 6.6e-3, expert grad 6.1e-3, gate grad 7.9e-3. The bounds below are under each of them.
BF16_BOUNDS = {"output": 4.6e-3, "x grad": 6.5e-3, "w1 grad": 6.0e-3, "gate grad": 7.5e-3}


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "loop"])
def test_bfloat16_error_against_float64_reference(monkeypatch, grouped):
    """bf16 layer vs the same bf16 weights and input evaluated in float64 (same routing)."""
    monkeypatch.setitem(experts_mod._GROUPED_MM_WORKS, ("cpu", torch.bfloat16), grouped)
    worst = dict.fromkeys(BF16_BOUNDS, 0.0)
    for seed in range(6):
        torch.manual_seed(seed)
        layer = MoE(MoEConfig(dim=64, hidden_dim=128, num_experts=8, top_k=2)).to(torch.bfloat16)
        ref = copy.deepcopy(layer).double()
        xb = torch.randn(512, 64).bfloat16().requires_grad_()
        x = xb.detach().double().requires_grad_()
        y, y_ref = layer(xb), ref(x)
        assert y.dtype == torch.bfloat16
        g = torch.autograd.grad(y.float().square().sum(), [xb, layer.experts.w1, layer.router.gate.weight])
        g_ref = torch.autograd.grad(y_ref.square().sum(), [x, ref.experts.w1, ref.router.gate.weight])
        for key, a, b in zip(BF16_BOUNDS, (y, *g), (y_ref, *g_ref)):
            err = float((a.detach().double() - b.detach()).norm() / b.detach().norm())
            worst[key] = max(worst[key], err)
    for key, bound in BF16_BOUNDS.items():
        assert worst[key] <= bound, (key, worst[key], bound)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "loop"])
def test_zero_tokens_forward_and_backward(monkeypatch, grouped):
    monkeypatch.setitem(experts_mod._GROUPED_MM_WORKS, ("cpu", torch.float32), grouped)
    layer = MoE(MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.1))
    x = torch.zeros(0, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 8)
    for w in (layer.experts.w1, layer.experts.w3, layer.experts.w2):
        assert w.grad is not None and torch.count_nonzero(w.grad) == 0


def test_deterministic_mode_local_layer_bitwise():
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            layer = MoE(MoEConfig(dim=16, hidden_dim=32, num_experts=6, top_k=3, aux_loss_coef=0.1, z_loss_coef=0.1))
            x = torch.randn(64, 16, requires_grad=True)
            y = layer(x)
            y.square().sum().backward()
            runs.append([y.detach(), x.grad] + [p.grad for p in layer.parameters()])
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_checkpoint_recompute_counts_and_reduces_once(monkeypatch):
    """Under activation checkpointing the statistics are gathered once per forward, not on recompute."""
    from torch.utils.checkpoint import checkpoint

    from ep_fsdp import balancing

    calls = []
    real = balancing.all_reduce_sum_
    monkeypatch.setattr(balancing, "all_reduce_sum_", lambda x, g: calls.append(1) or real(x, g))
    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2, aux_loss_coef=0.1))
    ref = copy.deepcopy(layer)
    x = torch.randn(10, 8)
    checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    ref(x).square().sum().backward()
    assert len(calls) == 2  # one per forward (layer, ref); none during the recompute
    assert layer.routing.forwards == 1 and layer.routing.tokens_per_expert.sum() == 20
    for p, q in zip(layer.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    calls.clear()
    with torch.no_grad():
        layer(x)
    layer.eval()
    layer(x)
    assert calls == []  # no gradient needed: no statistics exchanged
    assert layer.routing.forwards == 2  # the training-mode no_grad forward counts, the eval one does not


def test_balancing_losses_match_definition():
    """Values and the attached gradient equal the textbook losses (f counts carry no gradient)."""
    torch.manual_seed(4)
    E, k = 4, 2
    layer = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=E, top_k=k, aux_loss_coef=0.5, z_loss_coef=0.1))
    x = torch.randn(50, 8)
    y = layer(x)
    (y * 0).sum().backward()  # only the balancing losses contribute a gradient
    w = layer.router.gate.weight.detach().clone().requires_grad_(True)
    logits = x @ w.t()
    probs = logits.softmax(-1)
    ids = probs.topk(k, -1).indices
    f = torch.bincount(ids.reshape(-1), minlength=E).float() / (50 * k)
    balance = E * (f * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    (0.5 * balance + 0.1 * z).backward()
    torch.testing.assert_close(layer.router.gate.weight.grad, w.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ep_fsdp.moe_aux_loss(layer), (0.5 * balance + 0.1 * z).detach())
    assert float(ep_fsdp.moe_aux_loss(layer)) == 0.0  # taken: reset by the first call
    (name, m), = ep_fsdp.moe_layers(torch.nn.Sequential(layer))
    record = ep_fsdp.routing_stats(torch.nn.Sequential(layer))[name]
    assert record["balance_loss"] == pytest.approx(float(balance), rel=1e-5)
    assert record["z_loss"] == pytest.approx(float(z), rel=1e-5)
    assert record["tokens_per_expert"] == torch.bincount(ids.reshape(-1), minlength=E).tolist()


def test_balancing_gradient_scaled_by_set_aux_loss_scale_and_skipped_without_grad():
    torch.manual_seed(4)
    layer = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=2, aux_loss_coef=0.5, z_loss_coef=0.1))
    x = torch.randn(30, 8)
    (layer(x) * 0).sum().backward()
    g1 = layer.router.gate.weight.grad.clone()
    layer.zero_grad()
    ep_fsdp.set_aux_loss_scale(layer, 0.25)
    (layer(x) * 0).sum().backward()
    torch.testing.assert_close(layer.router.gate.weight.grad, 0.25 * g1)
    ep_fsdp.moe_aux_loss(layer)
    with torch.no_grad():
        layer(x)
    assert float(ep_fsdp.moe_aux_loss(layer)) == 0.0  # nothing computed under no_grad
    layer.zero_grad()
    layer.train()
    ep_fsdp.set_aux_loss_scale(layer, 0)
    (layer(x) * 0).sum().backward()
    assert torch.count_nonzero(layer.router.gate.weight.grad) == 0  # switched off
    with pytest.raises(ValueError, match="set_aux_loss_scale: scale must be >= 0, got -1"):
        ep_fsdp.set_aux_loss_scale(layer, -1)


def test_uniform_router_has_unit_balance_loss():
    layer = MoE(MoEConfig(dim=4, hidden_dim=4, num_experts=4, top_k=2, aux_loss_coef=1.0))
    torch.nn.init.zeros_(layer.router.gate.weight)
    layer(torch.randn(8, 4))
    # all probabilities 1/E; f sums to 1 over experts: E * sum(f / E) == 1
    torch.testing.assert_close(ep_fsdp.moe_aux_loss(layer), torch.tensor(1.0))


def test_aux_loss_sums_layers_averages_forwards_and_disabled_is_zero():
    torch.manual_seed(5)
    on = MoEConfig(dim=8, hidden_dim=8, num_experts=4, aux_loss_coef=0.1)
    off = MoEConfig(dim=8, hidden_dim=8, num_experts=4)
    model = torch.nn.Sequential(MoE(on), MoE(on), MoE(off))
    x1, x2 = torch.randn(6, 8), torch.randn(6, 8)
    model(x1)
    a = [float(ep_fsdp.moe_aux_loss(m)) for m in model[:2]]
    model(x1)
    model(x2)
    b = [float(ep_fsdp.moe_aux_loss(m)) for m in model[:2]]
    model(x1)
    model(x2)
    total = ep_fsdp.moe_aux_loss(model)
    assert not total.requires_grad and total.dtype == torch.float32
    assert float(total) == pytest.approx(b[0] + b[1], rel=1e-6)  # mean of the two forwards, summed over layers
    assert b[0] != pytest.approx(a[0])
    assert float(ep_fsdp.moe_aux_loss(model[2])) == 0.0


def test_module_can_be_copied_after_forward():
    import copy
    import pickle

    layer = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=4, aux_loss_coef=0.1))
    layer(torch.randn(6, 8))
    clone = copy.deepcopy(layer)
    assert torch.equal(clone.experts.w1, layer.experts.w1)
    assert pickle.loads(pickle.dumps(layer)).placement == layer.placement
    assert not any(isinstance(v, torch.Tensor) and v.requires_grad for v in vars(layer.routing).values())


def test_jitter_only_while_training():
    torch.manual_seed(6)
    layer = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=4, jitter_eps=0.5))
    x = torch.randn(40, 8)
    layer.eval()
    a, b = layer(x), layer(x)
    assert torch.equal(a, b)
    layer.train()
    assert not torch.equal(layer(x), a)


def test_leading_dims_and_wrong_width():
    layer = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=2, top_k=1))
    assert layer(torch.randn(2, 3, 4, 8)).shape == (2, 3, 4, 8)
    with pytest.raises(ValueError, match=r"MoE input must end in dim=8, got shape \(3, 7\)"):
        layer(torch.randn(3, 7))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(top_k=0), r"MoEConfig.top_k must be in 1..num_experts=4, got 0; choose top_k between 1 and 4"),
        (dict(top_k=5), r"MoEConfig.top_k must be in 1..num_experts=4, got 5"),
        (dict(dim=0), r"MoEConfig.dim must be a positive int, got 0; pass a size such as dim=256"),
        (dict(hidden_dim=-3), r"MoEConfig.hidden_dim must be a positive int, got -3"),
        (dict(num_experts=0, top_k=1), r"MoEConfig.num_experts must be a positive int, got 0"),
        (dict(score_func="relu"), r"MoEConfig.score_func must be one of \('softmax', 'sigmoid'\), got 'relu'; use score_func='softmax'"),
        (dict(temperature=0.0), r"MoEConfig.temperature must be > 0, got 0.0"),
        (dict(aux_loss_coef=-1.0), r"MoEConfig.aux_loss_coef must be >= 0, got -1.0; use 0 to disable"),
        (dict(jitter_eps=1.5), r"MoEConfig.jitter_eps must be in \[0, 1\), got 1.5"),
        (dict(top_k=True), r"MoEConfig.top_k must be an int, got True"),
        (dict(temperature=None), r"MoEConfig.temperature must be a finite number, got None; e.g. temperature=1.0"),
        (dict(capacity_factor=float("inf")), r"capacity_factor must be a finite number, got inf; e.g. capacity_factor=1.25, or None"),
        (dict(aux_loss_coef="0.01"), r"MoEConfig.aux_loss_coef must be a finite number, got '0.01'"),
        (dict(renormalize="yes"), r"MoEConfig.renormalize must be True or False, got 'yes'"),
    ],
)
def test_config_errors_name_field_value_and_fix(kwargs, message):
    base = dict(dim=8, hidden_dim=16, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match=message):
        MoEConfig(**{**base, **kwargs})


def test_moe_aux_loss_without_moe_layers():
    with pytest.raises(ValueError, match="moe_aux_loss found no ep_fsdp.MoE layer in Linear"):
        ep_fsdp.moe_aux_loss(torch.nn.Linear(2, 2))


def test_build_mesh_needs_process_group():
    with pytest.raises(RuntimeError, match="build_mesh needs an initialized default process group"):
        ep_fsdp.build_mesh(ep=1)


def test_weight_gradient_never_contracts_over_an_empty_expert(monkeypatch):
    """With the counts on the host (every expert-parallel path), grouped_mm's weight gradient (off
    the CPU) is called on the experts with rows only; empty experts get exact zeros."""
    torch.manual_seed(8)
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(4, 16, 8, requires_grad=True)
    counts_host = [3, 0, 2, 0]
    counts = torch.tensor(counts_host)
    seen: list[list[int]] = []
    real = torch._grouped_mm  # what ep_fsdp's grouped_mm operator runs

    def recording(a, b, offs=None, **kw):
        ends = offs.tolist()
        seen.append([e - s for s, e in zip([0] + ends[:-1], ends)])
        return real(a, b, offs=offs, **kw)

    monkeypatch.setattr(torch, "_grouped_mm", recording)
    monkeypatch.setattr(experts_mod, "windows_apply", lambda t: False)  # grouped_mm as on a GPU, not CPU row windows
    y = experts_mod.grouped_linear(x, w, counts, counts_host, grouped=True)
    y.square().sum().backward()
    assert seen[-1] == [3, 2]  # the weight-gradient call: experts 0 and 2 only
    loop_x, loop_w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    experts_mod.grouped_linear(loop_x, loop_w, counts, counts_host, grouped=False).square().sum().backward()
    torch.testing.assert_close(w.grad, loop_w.grad)
    torch.testing.assert_close(x.grad, loop_x.grad)
    assert torch.count_nonzero(w.grad[[1, 3]]) == 0


def test_dims_grouped_mm_cannot_take_use_the_loop():
    # grouped_mm needs strides of whole 16 bytes: dim 6 in float32 is 24 bytes
    assert not experts_mod.use_grouped_mm(torch.device("cpu"), torch.float32, (6, 8))
    assert experts_mod.use_grouped_mm(torch.device("cpu"), torch.float32, (4, 8))
    layer = MoE(MoEConfig(dim=6, hidden_dim=6, num_experts=3, top_k=2))
    x = torch.randn(7, 6, requires_grad=True)
    torch.testing.assert_close(layer(x), naive_moe(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_balancing_gradient_under_either_checkpoint_flavour(reentrant):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2, aux_loss_coef=0.5, z_loss_coef=0.1))
    ref = copy.deepcopy(layer)
    x = torch.randn(10, 8, requires_grad=True)
    checkpoint(layer, x, use_reentrant=reentrant).square().sum().backward()
    ref(x).square().sum().backward()
    for p, q in zip(layer.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert layer.routing.forwards == 1 and layer.routing.loss_forwards == 1  # values logged once
    assert layer._balancing_to_replay == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_in_row_blocks_equals_the_plain_formula(monkeypatch, dtype):
    """On CPU the SwiGLU runs over blocks of rows (a last partial block here); forward and both
    gradients are those of autograd's ``silu(gate) * up`` (to the last bit: silu's vectorized
    and scalar paths round alike up to one ulp, and a block boundary moves where each runs)."""
    monkeypatch.setattr(blocks_mod, "BLOCK_BYTES", 7 * 16 * torch.empty((), dtype=dtype).element_size())
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # blocks of 7 rows whatever the machine
    torch.manual_seed(3)
    gate = torch.randn(45, 16, dtype=dtype, requires_grad=True)
    up = torch.randn(45, 16, dtype=dtype, requires_grad=True)
    grad = torch.randn(45, 16, dtype=dtype)
    assert len(blocks_mod.row_blocks(45, gate.device, 16 * gate.element_size())) == 7  # 6 blocks of 7 rows and one of 3
    out = experts_mod.swiglu(gate, up)
    out.backward(grad)
    ref_gate, ref_up = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    ref = torch.nn.functional.silu(ref_gate) * ref_up
    ref.backward(grad)
    ulp = torch.finfo(dtype).eps
    for got, want in ((out, ref), (gate.grad, ref_gate.grad), (up.grad, ref_up.grad)):
        torch.testing.assert_close(got, want, rtol=ulp, atol=ulp)


def test_bf16_layer_in_row_blocks_equals_one_pass(monkeypatch):
    """The whole bf16 layer (SwiGLU, combine, gather backward) with tiny CPU row blocks against
    one pass: the same output and gradients (to silu's last-bit tail)."""
    torch.manual_seed(11)
    layer = MoE(MoEConfig(dim=32, hidden_dim=48, num_experts=4, top_k=2)).to(torch.bfloat16)
    x0 = torch.randn(37, 32, dtype=torch.bfloat16)
    grad = torch.randn(37, 32, dtype=torch.bfloat16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)

    def run(block_bytes: int) -> list[torch.Tensor]:
        monkeypatch.setattr(blocks_mod, "BLOCK_BYTES", block_bytes)
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        out = layer(x)
        out.backward(grad)
        return [out, x.grad] + [p.grad for p in layer.parameters()]

    blocked = run(5 * 48 * 4)  # a few rows per block: many blocks, partial last ones
    assert len(blocks_mod.row_blocks(74, x0.device, 48 * 2)) == 8  # the SwiGLU: 74 rows, blocks of 10
    for got, want in zip(blocked, run(1 << 30)):
        torch.testing.assert_close(got.float(), want.float(), rtol=2 * 2.0**-8, atol=1e-6)


# Row counts per expert for the row-window tests: empty experts, experts smaller than a window (a
# forward window spilling across several), a last expert whose window ends at the last row, one
# whose window has foreign rows on both sides, and fewer rows than one window (exact rows).
_WINDOW_COUNTS = [[40, 0, 3, 1, 0, 70, 5], [33, 64, 2, 0], [2, 29, 2], [0, 7, 5, 0], [36, 0]]


@pytest.mark.parametrize("counts", _WINDOW_COUNTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_row_windows_equal_grouped_mm(dtype, counts):
    """The CPU row-window matmuls (each expert over its rows rounded up to a window, spilling into
    the next experts' rows, which their own expert then overwrites; backwards into scratch at the
    end) give grouped_mm's result. Every row is its own expert's product, to the last bit
    (float32 kernels may sum a row of a 3-row matmul differently from a 32-row one)."""
    torch.manual_seed(12)
    N, K, M = sum(counts), 16, 24
    a = torch.randn(N, K, dtype=dtype)
    b = torch.randn(len(counts), M, K, dtype=dtype).transpose(-2, -1)  # [G, K, M], column-major like the layer's
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    want = torch._grouped_mm(a, b, offs=offs)
    assert windows_mod.ROW_WINDOW > 5
    eps = torch.finfo(dtype).eps
    assert experts_mod.windows_apply(a) == (dtype != torch.float32)  # float32 keeps grouped_mm (BLAS takes any shape)
    for got in (windows_mod.rows_mm(a, b, counts), experts_mod._rows_mm(a, b, offs, None)):  # counts read from offs
        torch.testing.assert_close(got, want, rtol=4 * eps, atol=4 * eps * float(want.abs().max()))


@pytest.mark.parametrize("counts", _WINDOW_COUNTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_row_window_weight_gradient_equals_grouped_mm(dtype, counts):
    """The weight gradient over row windows (the neighbours' rows zeroed in both operands for the
    call) equals grouped_mm's per-expert contraction, also when a neighbour's rows hold inf and
    nan (zeroed, they add nothing); empty experts get exact zeros, and both operands come back
    bit for bit with unchanged version counters (other autograd nodes saved them)."""
    torch.manual_seed(13)
    N, K, M = sum(counts), 16, 24
    grad, x = torch.randn(N, M, dtype=dtype), torch.randn(N, K, dtype=dtype)
    big = counts.index(max(counts))  # the largest expert: its first row lies in earlier experts' windows
    first = sum(counts[:big])
    grad[first, 0], x[first, 1] = float("inf"), float("nan")
    grad_before, x_before, versions = grad.clone(), x.clone(), (grad._version, x._version)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    want = torch._grouped_mm(grad.t(), x, offs=offs)  # [G, M, K]
    got = windows_mod.rows_weight_grad(grad, x, counts)
    eps = torch.finfo(dtype).eps
    finite = [g for g in range(len(counts)) if g != big]
    torch.testing.assert_close(got[finite], want[finite], rtol=4 * eps, atol=4 * eps * float(want[finite].abs().max()))
    assert not torch.isfinite(got[big]).all()  # the non-finite row stays with its own expert
    for g, c in enumerate(counts):
        if c == 0:
            assert torch.count_nonzero(got[g]) == 0
    assert torch.equal(grad.isnan(), grad_before.isnan()) and torch.equal(grad.nan_to_num(), grad_before.nan_to_num())
    assert torch.equal(x.isnan(), x_before.isnan()) and torch.equal(x.nan_to_num(), x_before.nan_to_num())
    assert (grad._version, x._version) == versions


def test_row_window_weight_gradient_leaves_non_contiguous_operands_alone():
    """An operand whose rows may share memory (an expanded tensor) cannot be zeroed row by row:
    every expert then contracts over its exact rows, and nothing is written to the operands."""
    torch.manual_seed(15)
    counts = [40, 0, 3, 70]
    N = sum(counts)
    grad = torch.randn(N, 24, dtype=torch.bfloat16)
    x = torch.randn(1, 16, dtype=torch.bfloat16).expand(N, 16)  # every row the same memory
    got = windows_mod.rows_weight_grad(grad, x, counts)
    starts = [sum(counts[:g]) for g in range(len(counts))]
    for g, (s, m) in enumerate(zip(starts, counts)):
        torch.testing.assert_close(got[g], grad[s:s + m].t() @ x[s:s + m], rtol=0, atol=0)


def test_padded_capacity_pads_to_the_largest_expert_only_when_routing_is_balanced_enough():
    assert padded_mod.PAD_ROWS == 32 and padded_mod.MAX_PADDING == 0.125
    assert padded_mod.padded_capacity([120, 110, 115, 125]) == 128  # 4 * 128 = 512 <= 1.125 * 470
    assert padded_mod.padded_capacity([120, 100, 110, 115]) is None  # 4 * 128 = 512 > 1.125 * 445
    assert padded_mod.padded_capacity([0, 0, 0]) is None  # no rows
    assert padded_mod.padded_capacity([5, 3]) is None  # 2 * 32 rows for 8
    assert padded_mod.padded_capacity([32]) == 32


# Row counts for the padded-experts tests: balanced (with an expert of exact capacity), with an
# idle expert, and a capacity that is not a multiple of the counts.
_PADDED_COUNTS = [[30, 29, 32, 28], [64, 0, 64, 64, 64, 64, 64, 64, 64, 63], [64, 60, 57]]


@pytest.mark.parametrize("counts", _PADDED_COUNTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_padded_experts_equal_the_per_expert_path_and_a_float64_reference(monkeypatch, dtype, counts):
    """bf16/float16 experts on CPU with balanced counts run as batched matmuls over zero-padded
    blocks: output and every gradient equal the per-expert row-window path to the dtype's
    rounding (kernels sum in another order), and a float64 per-expert reference; an expert
    without rows gets an exact zero gradient; weight gradients come out contiguous."""
    assert padded_mod.padded_capacity(counts) is not None
    torch.manual_seed(21)
    D, H = 16, 32
    experts = experts_mod.GroupedExperts(MoEConfig(dim=D, hidden_dim=H, num_experts=len(counts), top_k=1)).to(dtype)
    x0 = torch.randn(sum(counts), D, dtype=dtype)
    grad = torch.randn(sum(counts), D, dtype=dtype)
    counts_t = torch.tensor(counts)
    bmm_calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: bmm_calls.append(1) or real_bmm(*a, **k))

    def run(counts_host: list[int] | None) -> list[torch.Tensor]:
        experts.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        out = experts(x, counts_t, counts_host)  # None: counts read from the tensor (the local path)
        out.backward(grad)
        return [out, x.grad, experts.w1.grad, experts.w3.grad, experts.w2.grad]

    padded = run(None)
    assert len(bmm_calls) == 3 + 5  # forward: gate, up, down; backward: 3 weight and 2 input gradients (up's is a baddbmm_ into gate's)
    assert all(g.is_contiguous() for g in padded[2:])
    assert torch.equal(torch.stack(run(counts)[0:1]), torch.stack(padded[0:1]))  # host counts given: the same path
    monkeypatch.setattr(experts_mod, "padded_capacity", lambda counts: None)
    bmm_calls.clear()
    per_expert = run(counts)
    assert not bmm_calls
    eps = torch.finfo(dtype).eps
    for got, want in zip(padded, per_expert):
        torch.testing.assert_close(got.float(), want.float(), rtol=4 * eps, atol=4 * eps * float(want.detach().abs().max()))
    # float64 reference, expert by expert
    w1, w3, w2 = (w.detach().double().requires_grad_() for w in (experts.w1, experts.w3, experts.w2))
    x = x0.double().requires_grad_()
    out = torch.cat([F.linear(F.silu(F.linear(part, w1[g])) * F.linear(part, w3[g]), w2[g])
                     for g, part in enumerate(torch.split(x, counts))])
    out.backward(grad.double())
    for got, want in zip(padded, [out, x.grad, w1.grad, w3.grad, w2.grad]):
        torch.testing.assert_close(got.double(), want, rtol=16 * eps, atol=16 * eps * float(want.detach().abs().max()))
    for g, c in enumerate(counts):
        if c == 0:
            assert all(torch.count_nonzero(w[g]) == 0 for w in padded[2:])


def test_padded_experts_are_skipped_for_uneven_routing_float32_and_no_rows(monkeypatch):
    """Too uneven for padding (one expert with most rows), float32 (BLAS, no gain measured) and no
    rows at all take the per-expert path: no batched matmul."""
    bmm_calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: bmm_calls.append(1) or real_bmm(*a, **k))
    for dtype, counts in ((torch.bfloat16, [90, 5, 3, 2]), (torch.float32, [30, 25, 32, 28]), (torch.bfloat16, [0, 0, 0, 0])):
        experts = experts_mod.GroupedExperts(MoEConfig(dim=16, hidden_dim=32, num_experts=4, top_k=1)).to(dtype)
        x = torch.randn(sum(counts), 16, dtype=dtype, requires_grad=True)
        experts(x, torch.tensor(counts)).sum().backward()
        assert x.grad.shape == x.shape
        assert not bmm_calls, (dtype, counts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", [True, False])
def test_local_dispatcher_gathers_into_padded_blocks_and_combines_from_them(monkeypatch, dtype, fused):
    """With the padded experts, the local dispatcher gathers the tokens straight into the experts'
    zero-padded blocks and combines straight from them: bitwise the results of gathering rows,
    padding them in the experts and unpadding after (output, token, gate-weight and expert
    gradients), with the fused kernels and with the eager ops; an expert without rows gets exact
    zero gradients; float32 takes the plain rows."""
    from ep_fsdp import _fused
    from ep_fsdp.dispatch.local import LocalDispatcher
    from ep_fsdp.placement import ExpertPlacement

    monkeypatch.setattr(padded_mod, "MAX_PADDING", 10.0)  # pad these small uneven counts too
    monkeypatch.setattr(_fused, "FUSED_MIN_ELEMENTS", 1 if fused else 1 << 60)
    torch.manual_seed(22)
    T, D, H, E, k = 37, 16, 32, 5, 2
    experts = experts_mod.GroupedExperts(MoEConfig(dim=D, hidden_dim=H, num_experts=E, top_k=k)).to(dtype)
    dispatcher = LocalDispatcher(ExpertPlacement.contiguous(E, 1))
    ids = torch.stack([torch.randperm(E - 1)[:k] for _ in range(T)])  # [T, k], expert E - 1 gets no rows
    x0, w0 = torch.randn(T, D, dtype=dtype), torch.rand(T, k)
    grad = torch.randn(T, D, dtype=dtype)
    capacities = []
    forward = experts.forward

    def recording(rows, counts, counts_host=None, capacity=None):
        capacities.append(capacity)
        return forward(rows, counts, counts_host, capacity=capacity)

    monkeypatch.setattr(experts, "forward", recording)

    def run() -> list[torch.Tensor]:
        experts.zero_grad(set_to_none=True)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        out, stats = dispatcher.run(x, ids, w, experts)
        out.backward(grad)
        assert torch.equal(stats.counts, torch.bincount(ids.flatten(), minlength=E))
        return [out, x.grad, w.grad, experts.w1.grad, experts.w3.grad, experts.w2.grad]

    blocks = run()
    assert capacities == [padded_mod.padded_capacity(torch.bincount(ids.flatten(), minlength=E).tolist())]
    monkeypatch.setattr(experts_mod.GroupedExperts, "block_capacity", lambda self, x, counts: None)
    rows = run()
    assert capacities[-1] is None  # the experts padded the rows themselves
    for got, want in zip(blocks, rows):
        assert torch.equal(got, want)
    assert all(torch.count_nonzero(g[E - 1]) == 0 for g in blocks[3:])
    monkeypatch.undo()
    experts32 = experts_mod.GroupedExperts(MoEConfig(dim=D, hidden_dim=H, num_experts=E, top_k=k))
    assert experts32.block_capacity(x0.float(), torch.tensor([8, 8, 8, 8, 8])) is None


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_router_logits_in_row_blocks_equal_one_pass(monkeypatch, weight_dtype):
    """The float32 router matmul of a bf16 input over CPU row blocks (each block widened in cache,
    the input gradient rounded per block, the weight gradient summed over blocks) equals one
    pass: logits and input gradient to float32 rounding, the weight gradient to the order of its
    float32 sum."""
    from ep_fsdp.router import float32_logits

    torch.manual_seed(14)
    x0 = torch.randn(45, 16, dtype=torch.bfloat16)
    w0 = torch.randn(4, 16, dtype=weight_dtype)
    grad = torch.randn(45, 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)

    def run(block_bytes: int) -> list[torch.Tensor]:
        monkeypatch.setattr(blocks_mod, "BLOCK_BYTES", block_bytes)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        logits = float32_logits(x, w)
        logits.backward(grad)
        return [logits, x.grad, w.grad]

    blocked = run(7 * 16 * 4)  # blocks of 7 rows, a last one of 3
    assert len(blocks_mod.row_blocks(45, x0.device, 16 * 4)) == 7
    got_logits, got_x, got_w = blocked
    want_logits, want_x, want_w = run(1 << 30)
    assert got_logits.dtype == torch.float32 and got_x.dtype == torch.bfloat16 and got_w.dtype == weight_dtype
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_x, want_x, rtol=2.0**-8, atol=0)
    torch.testing.assert_close(got_w.float(), want_w.float(), rtol=2.0**-7 if weight_dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_a_layer_with_shared_experts_takes_an_input_of_another_dtype_like_its_routed_experts():
    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2, num_shared_experts=1))
    x = torch.randn(5, 8)
    out = layer(x.bfloat16())  # float32 weights, bf16 rows: both kinds of experts compute in bf16
    assert out.dtype == torch.bfloat16
    ref = layer(x)
    assert torch.allclose(out.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_kv_heads=-2), r"TransformerConfig.num_kv_heads must be None \(as many as num_heads\) or a positive int, got -2"),
        (dict(rope_theta=0.0), r"TransformerConfig.rope_theta must be a finite number > 0, got 0.0; e.g. rope_theta=10000.0"),
        (dict(norm_eps=float("nan")), r"TransformerConfig.norm_eps must be a finite number > 0, got nan"),
        (dict(num_dense_layers=1.5), r"TransformerConfig.num_dense_layers must be an int, got 1.5"),
        (dict(vocab_size=True), r"TransformerConfig.vocab_size must be a positive int, got True"),
    ],
)
def test_transformer_config_errors_name_field_and_value(kwargs, message):
    from ep_fsdp.models import TransformerConfig

    with pytest.raises(ValueError, match=message):
        TransformerConfig(**kwargs)


def test_expert_bias_stays_float32_in_a_bf16_layer():
    layer = MoE(MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2, expert_bias=True, bias_update_rate=1e-3))
    trained = torch.tensor([1e-3, 1.001, -2e-4, 3.0001])
    with torch.no_grad():
        layer.router.expert_bias.copy_(trained)
    layer.to(torch.bfloat16)
    assert torch.equal(layer.router.expert_bias, trained)  # the values too, not only the dtype
    assert layer.router.expert_bias.dtype == torch.float32 and layer.router.gate.weight.dtype == torch.bfloat16
    with torch.no_grad():
        layer.router.expert_bias.fill_(0.6)  # where a bf16 step is 2**-8: a 1e-3 update would be lost
    layer.bias_load = torch.tensor([1.0, 1.0, 3.0, 3.0])
    ep_fsdp.update_expert_bias(layer)
    assert torch.allclose(layer.router.expert_bias, torch.tensor([0.601, 0.601, 0.599, 0.599]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_leaves_the_router_in_float32(dtype):
    """Inside torch.autocast the router's matmul stays float32 (autocast would run it in bf16 and
    route on rounded logits; the backward then failed on the mixed dtypes), and the layer computes
    what it computes outside autocast."""
    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=16, hidden_dim=32, num_experts=4, top_k=2, aux_loss_coef=0.01)).to(dtype)
    ref = copy.deepcopy(layer)
    x = torch.randn(64, 16).to(dtype)
    expected = ref(x)
    expected.float().square().mean().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        logits = layer.router(x).logits
        loss = out.float().square().mean()
    loss.backward()
    assert logits.dtype == torch.float32
    assert torch.equal(out, expected)
    for p, q in zip(layer.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_the_router_runs_on_the_meta_device():
    """(Shape inference before materialization; autocast knows no meta device.)"""
    with torch.device("meta"):
        layer = MoE(MoEConfig(dim=16, hidden_dim=32, num_experts=4, top_k=2))
        out = layer.router(torch.empty(8, 16))
    assert out.logits.shape == (8, 4) and out.logits.device.type == "meta"
