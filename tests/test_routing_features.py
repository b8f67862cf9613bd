"""Modern routing in ep_fsdp.MoE (shared experts, group-limited routing, bias updates, capacity,
expert dropout, input jitter): three training steps of the parallel model against the unparallelized one on the
same global batches, on (1,1), (2,2), (1,4), (4,1): the loss and every full gradient at each step,
the parameters after the last AdamW step (float32, 1e-5 relative) and the expert bias (exactly).

With a capacity factor the limit applies per forward call on one rank, so the reference runs each
rank's slice as its own forward (with that slice's global token offset and the same random state).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ep_fsdp
from dist_pool import worker_mesh
from ep_fsdp.models import MoETransformer, TransformerConfig
from parity_utils import REL_TOL, full, mean_over_ranks, rel_err, worst

LAYOUTS = [(1, 1), (2, 2), (1, 4), (4, 1)]
NO_AUX = dict(aux_loss_coef=0.0, z_loss_coef=0.0)
FEATURES = {
    "shared": dict(num_shared_experts=2),
    "groups": dict(num_expert_groups=4, num_limited_groups=2, score_func="sigmoid"),
    "bias": dict(expert_bias=True, bias_update_rate=0.01, **NO_AUX),
    "capacity": dict(capacity_factor=1.0, **NO_AUX),
    "dropout": dict(expert_dropout=0.3),
    "jitter": dict(jitter_eps=0.1),  # (Switch used 0.01; the parallel router's float32 matmul may round a row
    # differently for another batch size, so larger noise makes near-ties, and gradients at the tolerance, likelier)
    "all": dict(num_shared_experts=1, num_expert_groups=4, num_limited_groups=2, score_func="sigmoid",
                expert_bias=True, bias_update_rate=0.01, capacity_factor=1.0, expert_dropout=0.2, jitter_eps=0.05,
                **NO_AUX),
}
ROWS = 4  # sequences per rank


def build(**moe_options) -> MoETransformer:
    options = dict(dim=32, hidden_dim=48, num_experts=8, top_k=2, aux_loss_coef=0.01, z_loss_coef=1e-3)
    options.update(moe_options)
    return MoETransformer(TransformerConfig(vocab_size=64, dim=32, num_layers=3, num_heads=4, num_kv_heads=2,
                                            max_seq_len=16, num_dense_layers=1, moe=ep_fsdp.MoEConfig(**options)))


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)) + ep_fsdp.moe_aux_loss(model)


def reference_loss(ref: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, world: int, per_slice: bool) -> torch.Tensor:
    """The global-batch loss; per rank slice (each its own forward, as each rank runs it) if asked."""
    if not per_slice:
        return _loss(ref, x, y)
    state = torch.get_rng_state()
    layers = [m for _, m in ep_fsdp.moe_layers(ref)]
    losses = []
    for r in range(world):
        torch.set_rng_state(state)  # every rank draws the same per-forward dropout salts
        for m in layers:
            m.token_offset = r * ROWS * x.shape[1]
        losses.append(_loss(ref, x[r * ROWS:(r + 1) * ROWS], y[r * ROWS:(r + 1) * ROWS]))
    return torch.stack(losses).mean()


def feature_steps(dp_shard: int, ep: int, feature: str, steps: int = 3, ac: bool = False, **changes) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build(**{**FEATURES[feature], **changes})
    ref = copy.deepcopy(model)
    ep_fsdp.parallelize_moe(model, worker_mesh(dp_shard, ep), activation_checkpointing=ac)
    opt_kwargs = dict(lr=1e-3, weight_decay=0.1)
    opt, opt_ref = torch.optim.AdamW(model.parameters(), **opt_kwargs), torch.optim.AdamW(ref.parameters(), **opt_kwargs)
    per_slice = {**FEATURES[feature], **changes}.get("capacity_factor") is not None
    losses, grad_errs = [], []
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        tokens = torch.randint(0, 64, (ROWS * world, 9), generator=g)
        x, y = tokens[:, :-1], tokens[:, 1:]
        torch.manual_seed(1000 + step)  # the same random state on every rank and in the reference
        loss_ref = reference_loss(ref, x, y, world, per_slice)
        loss_ref.backward()
        grads_ref = {n: p.grad.clone() for n, p in ref.named_parameters()}
        opt_ref.step()
        opt_ref.zero_grad()
        ep_fsdp.update_expert_bias(ref)

        torch.manual_seed(1000 + step)
        loss = _loss(model, x[rank * ROWS:(rank + 1) * ROWS], y[rank * ROWS:(rank + 1) * ROWS])
        loss.backward()
        grad_errs.append(worst({n: rel_err(full(p.grad), grads_ref[n]) for n, p in model.named_parameters()}))
        opt.step()
        opt.zero_grad()
        ep_fsdp.update_expert_bias(model)
        losses.append((mean_over_ranks(loss), float(loss_ref)))
    ref_params = dict(ref.named_parameters())
    ref_buffers = dict(ref.named_buffers())
    stats = ep_fsdp.routing_stats(model)
    return {
        "losses": losses,
        "grad": max(grad_errs, key=lambda e: e[1]),
        "param": worst({n: rel_err(full(p), ref_params[n].detach()) for n, p in model.named_parameters()}),
        "bias_equal": all(torch.equal(b, ref_buffers[n]) for n, b in model.named_buffers() if n.endswith("expert_bias")),
        "bias_moved": any(bool(b.abs().sum() > 0) for n, b in model.named_buffers() if n.endswith("expert_bias")),
        "dropped": max(s["dropped_fraction"] for s in stats.values()),
        "a2a_bytes": sum(s["a2a_bytes"] for s in stats.values()),
    }


def check(results: list[dict]) -> None:
    for r in results:
        for got, want in r["losses"]:
            assert abs(got - want) <= REL_TOL * abs(want), r["losses"]
        assert r["grad"][1] <= REL_TOL, f"gradient {r['grad']}"
        assert r["param"][1] <= REL_TOL, f"parameter after AdamW {r['param']}"
        assert r["bias_equal"], "expert_bias differs from the reference"


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"dp{l[0]}xep{l[1]}")
@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_training_matches_single_process(pools, layout, feature):
    results = pools(layout[0] * layout[1]).run(feature_steps, *layout, feature)
    check(results)
    options = FEATURES[feature]
    if options.get("bias_update_rate"):
        assert results[0]["bias_moved"]
    if options.get("capacity_factor"):
        assert results[0]["dropped"] > 0  # the limit did drop slots
    else:
        assert results[0]["dropped"] == 0


def test_all_features_under_activation_checkpointing(pools):
    """The recomputation replays the same routing: same dropout salts (restored random state), no
    second count of the bias load."""
    check(pools(4).run(feature_steps, 2, 2, "all", ac=True))


def test_dropped_slots_cost_no_bytes(pools):
    pool = pools(4)
    dropless = pool.run(feature_steps, 1, 4, "capacity", steps=1, capacity_factor=None)
    capped = pool.run(feature_steps, 1, 4, "capacity", steps=1, capacity_factor=0.5)
    check(dropless), check(capped)
    assert capped[0]["dropped"] > 0.3
    sent = [sum(r["a2a_bytes"] for r in run) for run in (dropless, capped)]
    assert sent[1] < 0.8 * sent[0], sent
