"""``torch.compile`` runs the MoE layer and parallelized models with eager numerics.

float32: compiled equals eager within the parity tolerance (loss, every gradient, parameters after
an optimizer step), unparallelized and after ``parallelize_moe`` on several layouts, including an
idle ep rank. bfloat16: inductor fuses elementwise chains and rounds once where eager rounds after
every op, so compiled and eager differ by bf16 rounding; the bound is stated below.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ep_fsdp
from parity_utils import REL_TOL, rel_err, worst
from test_parity import batch, build, check, parity_step, set_regime
from test_streamed_exchange import BF16_WIRE_GRAD_TOL, BF16_WIRE_LOSS_TOL

# bf16 has an 8-bit mantissa (relative rounding 2**-9 = 0.002); a layer's forward and backward
# chain a few dozen rounded ops, whose errors add up in norm to about ten roundings.
BF16_REL_TOL = 2e-2


def train_step(model: torch.nn.Module, kind: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One step: loss, gradients and parameters after SGD (linear in the gradient)."""
    x, y = batch(kind, global_batch=8, seed=1)
    if x.is_floating_point():
        x = x.to(dtype)
    logits = model(x).float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)) + ep_fsdp.moe_aux_loss(model)
    loss.backward()
    out = {"loss": loss.detach().reshape(1)}
    out |= {f"grad.{n}": p.grad.detach().float().clone() for n, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    out |= {f"param.{n}": p.detach().float().clone() for n, p in model.named_parameters()}
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["transformer", "net"])
def test_compiled_model_matches_eager(kind, dtype):
    torch.manual_seed(0)
    eager = build(kind).to(dtype)
    set_regime(eager, "random", 1)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    expected = train_step(eager, kind, dtype)
    got = train_step(compiled, kind, dtype)
    errors = {k: rel_err(got[k], v) for k, v in expected.items()}
    tol = REL_TOL if dtype == torch.float32 else BF16_REL_TOL
    assert worst(errors)[1] <= tol, worst(errors)
    # the routing statistics are recorded by the compiled forward too
    stats = ep_fsdp.routing_stats(compiled)
    assert all(s["forwards"] == 1 and sum(s["tokens_per_expert"]) > 0 for s in stats.values()), stats


@pytest.mark.parametrize(
    "layout,regime,options",
    [((1, 2), "random", {}), ((2, 2), "idle_ep_rank", {}), ((1, 2), "random", {"chunks": 2, "wire_dtype": torch.bfloat16})],
    ids=["1x2", "2x2-idle-ep-rank", "1x2-streamed-bf16-wire"],
)
def test_compiled_training_step_matches_single_process(pools, layout, regime, options):
    """The parity suite's step with the parallel model compiled, against the eager reference."""
    results = pools(layout[0] * layout[1]).run(parity_step, *layout, "transformer", regime, compile_model=True, **options)
    for r in results:
        if "wire_dtype" in options:  # bf16 on the wire: the bound of test_streamed_exchange.py
            assert abs(r["loss"] - r["loss_ref"]) <= BF16_WIRE_LOSS_TOL * abs(r["loss_ref"]), r
            assert r["grad"][1] <= BF16_WIRE_GRAD_TOL, r["grad"]
        else:
            check(r)


def test_compiled_bf16_grouped_linear_with_empty_experts_equals_eager():
    """bf16 under compile with the counts on the host and empty experts (the expert-parallel
    path): the weight gradient goes through the ``ep_fsdp::grouped_mm`` operator on the busy
    experts only, whose CPU body runs the row windows; equal to eager, empty experts exactly zero."""
    from ep_fsdp.experts import grouped_linear

    torch.manual_seed(16)
    counts_host = [40, 0, 3, 70, 0]
    counts = torch.tensor(counts_host)
    x0 = torch.randn(sum(counts_host), 32, dtype=torch.bfloat16)
    w0 = torch.randn(len(counts_host), 48, 32, dtype=torch.bfloat16)
    grad = torch.randn(sum(counts_host), 48, dtype=torch.bfloat16)

    def run(fn):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = fn(x, w)
        out.backward(grad)
        return out, x.grad, w.grad

    def step(x, w):
        return grouped_linear(x, w, counts, counts_host, grouped=True)

    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True))
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=2 * 2.0**-8, atol=1e-6)
    assert torch.count_nonzero(compiled[2][[1, 4]]) == 0


def experts_recompiles(steps: int) -> int:
    """Recompilations of the experts' forward in a compiled ep=2 model over ``steps`` steps whose
    routing leaves a different set of local experts idle each time (16 experts, 8 tokens per rank)."""
    import logging

    import torch.distributed as dist
    import torch.nn as nn

    from dist_pool import worker_mesh

    seen: list[str] = []

    class _Recompiles(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            first = record.getMessage().split("\n")[0]
            if "Recompiling function" in first and "experts.py" in first:
                seen.append(first)

    handler = _Recompiles()
    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        torch.manual_seed(0)
        cfg = ep_fsdp.MoEConfig(dim=32, hidden_dim=48, num_experts=16, top_k=2)
        model = nn.Sequential(nn.Linear(32, 32), ep_fsdp.MoE(cfg), nn.Linear(32, 5))
        ep_fsdp.parallelize_moe(model, worker_mesh(1, 2))
        model.compile()
        for step in range(steps):
            x = torch.randn(8, 32, generator=torch.Generator().manual_seed(100 * step + dist.get_rank()))
            model(x).square().mean().backward()
            model.zero_grad()
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
        torch._logging.set_logs()
        torch._dynamo.reset()
    return len(seen)


def test_idle_experts_do_not_recompile_the_compiled_experts(pools):
    """A branch on the host row counts in the compiled backward was a guard on which experts got
    no rows: each new set recompiled, until dynamo's limit (8), after which the experts ran eagerly."""
    for count in pools(2).run(experts_recompiles, 10):
        assert count <= 1, count  # one recompile for dynamic shapes, then a stable graph


def test_compiled_expert_dropout_and_jitter_draw_what_eager_draws():
    """The per-forward salt is drawn eagerly: traced, it came from the compiled graph's own random
    stream (other dropped experts than eager, 0.41 apart in the output); and it is a tensor, so a
    new salt every forward recompiles nothing (as Python ints, the jitter's recompile with
    symbolic ints produced C++ that did not compile)."""
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    torch.manual_seed(0)
    eager = ep_fsdp.MoE(ep_fsdp.MoEConfig(dim=16, hidden_dim=16, num_experts=4, top_k=2, expert_dropout=0.3,
                                          jitter_eps=0.2))
    compiled = copy.deepcopy(eager)
    compiled.compile()
    x = torch.randn(32, 16)
    graphs = []
    try:
        for step in range(6):
            outs = []
            for model in (eager, compiled):
                torch.manual_seed(10 + step)  # the same random state for both
                outs.append(model(x))
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
            graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
        assert graphs[2] == graphs[-1], graphs  # after one recompile (dynamic shapes), a new salt compiles nothing
    finally:
        torch._dynamo.reset()


def test_compiled_bf16_cpu_layer_runs_dispatch_and_padded_experts_eagerly(monkeypatch):
    """bf16 on CPU under ``torch.compile``: the local dispatch with its experts runs eagerly
    behind a graph break (the padded blocks' capacity is a host value), so the compiled layer
    takes the padded blocks; equal to eager to bf16 rounding, and new routing every step (new
    capacities) compiles nothing new."""
    from torch._dynamo.utils import counters

    from ep_fsdp import _padded_experts, experts as experts_mod

    monkeypatch.setattr(_padded_experts, "MAX_PADDING", 10.0)  # pad these small uneven counts too
    capacities = []
    forward = experts_mod.GroupedExperts.forward

    def recording(self, x, counts, counts_host=None, capacity=None):
        capacities.append(capacity)
        return forward(self, x, counts, counts_host, capacity)

    monkeypatch.setattr(experts_mod.GroupedExperts, "forward", recording)
    torch.manual_seed(4)
    eager = ep_fsdp.MoE(ep_fsdp.MoEConfig(dim=32, hidden_dim=64, num_experts=4, top_k=2)).to(torch.bfloat16)
    compiled = copy.deepcopy(eager)
    compiled.compile()

    def step(layer, seed):
        layer.zero_grad(set_to_none=True)
        x = torch.randn(48, 32, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).requires_grad_()
        out = layer(x)
        out.float().square().mean().backward()
        return [out.detach().float(), x.grad.float()] + [p.grad.float() for p in layer.parameters()]

    torch._dynamo.reset()
    counters.clear()
    for seed in range(3):
        capacities.clear()
        got, want = step(compiled, seed), step(eager, seed)
        assert capacities[0] is not None and capacities[0] == capacities[1]  # padded blocks, compiled and eager
        errors = {i: rel_err(g, w) for i, (g, w) in enumerate(zip(got, want))}
        assert worst(errors)[1] <= BF16_REL_TOL, worst(errors)
        if seed == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_bf16_cpu_experts_run_eagerly_behind_a_graph_break(monkeypatch):
    """The experts alone under ``torch.compile`` (as an exchange calls them on arriving rows),
    bf16 on CPU: they run eagerly, with the padded blocks (batched matmuls), and equal eager."""
    from ep_fsdp import _padded_experts, experts as experts_mod

    monkeypatch.setattr(_padded_experts, "MAX_PADDING", 10.0)
    torch.manual_seed(6)
    experts = experts_mod.GroupedExperts(ep_fsdp.MoEConfig(dim=32, hidden_dim=64, num_experts=4, top_k=1)).to(torch.bfloat16)
    counts = torch.tensor([9, 0, 14, 11])
    x0, grad = torch.randn(34, 32, dtype=torch.bfloat16), torch.randn(34, 32, dtype=torch.bfloat16)
    bmm_calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: bmm_calls.append(1) or real_bmm(*a, **k))

    def run(fn):
        experts.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        out = fn(x, counts)
        out.backward(grad)
        return [out.detach(), x.grad] + [p.grad for p in experts.parameters()]

    want = run(experts)
    bmm_calls.clear()
    got = run(torch.compile(experts))
    assert len(bmm_calls) == 8  # the padded path's batched matmuls, run eagerly
    for g, w in zip(got, want):
        assert torch.equal(g, w)
