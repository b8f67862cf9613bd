"""Expert migration: placements planned from the load, experts and their AdamW state moved between
ep ranks, numerics unchanged, placement kept in checkpoints.

Training with a move every 5 steps must reproduce the losses of the same training without moves
(float32, 1e-5 relative, 20 steps) on (2,2), (1,4), (1,2); after a move each expert's weights and
AdamW moments equal (in logical order) those of the run without moves.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ep_fsdp
import ep_fsdp.checkpoint as ckpt
from dist_pool import worker_mesh
from ep_fsdp import ExpertPlacement
from ep_fsdp.migration import plan_placement, rank_loads
from parity_utils import REL_TOL, full, mean_over_ranks, rel_err
from test_parity import batch, build, set_regime

ROWS = 4


def logical(t: torch.Tensor, placement: ExpertPlacement) -> torch.Tensor:
    """A global ``[E, ...]`` tensor in storage order -> logical expert order."""
    return t[torch.tensor([placement.physical(e) for e in range(placement.num_experts)])]


def expert_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every expert weight and AdamW moment, global, in logical expert order."""
    out = {}
    for name, layer in ep_fsdp.moe_layers(model):
        for pname, p in layer.experts.named_parameters():
            out[f"{name}.{pname}"] = logical(full(p), layer.placement)
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{name}.{pname}.{key}"] = logical(full(opt.state[p][key]), layer.placement)
    return out


def train(dp_shard: int, ep: int, regime: str, move_every: int, steps: int, uniform_move: bool = False) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = build("transformer")
    set_regime(model, regime, ep)
    ep_fsdp.parallelize_moe(model, worker_mesh(dp_shard, ep))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    losses, moves, states = [], [], []
    for step in range(1, steps + 1):
        x, y = batch("transformer", ROWS * dist.get_world_size(), seed=step)
        logits = model(x[rank * ROWS:(rank + 1) * ROWS])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[rank * ROWS:(rank + 1) * ROWS].reshape(-1))
        (loss + ep_fsdp.moe_aux_loss(model)).backward()
        opt.step()
        opt.zero_grad()
        losses.append(mean_over_ranks(loss))
        if move_every and step % move_every == 0:
            E = ep_fsdp.moe_layers(model)[0][1].config.num_experts
            before = ep_fsdp.expert_placement(model)
            after = ep_fsdp.rebalance_experts(model, opt, load=[1.0] * E if uniform_move else None)
            report = ep_fsdp.last_rebalance(model)
            moves.append({"changed": before != after, "report": report})
        if step % 5 == 0:
            states.append(expert_state(model, opt))
    return {"losses": losses, "moves": moves, "states": states, "placement": ep_fsdp.expert_placement(model)}


@pytest.mark.parametrize("layout", [(2, 2), (1, 4), (1, 2)], ids=lambda l: f"dp{l[0]}xep{l[1]}")
@pytest.mark.parametrize("regime", ["idle_ep_rank", "random"])
def test_training_with_moves_matches_training_without(pools, layout, regime):
    pool = pools(layout[0] * layout[1])
    still = pool.run(train, *layout, regime, 0, 20)
    moving = pool.run(train, *layout, regime, 5, 20)
    for a, b in zip(still, moving):
        for got, want in zip(b["losses"], a["losses"]):
            assert abs(got - want) <= REL_TOL * abs(want), (b["losses"], a["losses"])
        for sa, sb in zip(a["states"], b["states"]):  # weights and moments follow their experts
            worst = max(rel_err(sb[k], sa[k]) for k in sa)
            assert worst <= REL_TOL, worst
    if regime == "idle_ep_rank":  # every token on ep rank 0's experts: the first move spreads them
        first = moving[0]["moves"][0]
        assert first["changed"]
        report = next(iter(first["report"].values()))
        assert report["imbalance_before"] >= 2.0 - 1e-9 and report["imbalance_after"] < report["imbalance_before"]
        assert report["experts_moved"] > 0 and report["bytes_sent"] >= 0


def test_a_move_that_changes_nothing(pools):
    pool = pools(4)
    still = pool.run(train, 2, 2, "random", 0, 6)
    noop = pool.run(train, 2, 2, "random", 3, 6, uniform_move=True)
    for a, b in zip(still, noop):
        assert b["losses"] == a["losses"]  # bitwise: nothing moved
        assert not any(m["changed"] for m in b["moves"])
        assert b["placement"] == a["placement"]


def test_plan_placement_balances_whole_experts():
    cur = ExpertPlacement.contiguous(8, 4)
    load = [10, 10, 10, 10, 0, 0, 0, 0]  # ranks 0 and 1 hold all the load: max/mean 2.0
    plan = plan_placement(load, cur)
    assert rank_loads(plan, load) == [10.0, 10.0, 10.0, 10.0]
    assert sorted(plan.experts_on(0)) == [0, 4]  # expert 0 stays in its slot; a cold one joins it
    assert plan.slot_of(0) == 0
    assert plan_placement([1.0] * 8, cur) is cur  # already balanced: no move
    assert plan_placement([50, 1, 1, 1, 1, 1, 1, 40], cur) is cur  # cannot beat expert 0 alone


def not_parallelized() -> str:
    try:
        ep_fsdp.rebalance_experts(build("transformer"))
    except ValueError as e:
        return str(e)
    return "no error"


def wrong_length() -> str:
    model = build("transformer")
    ep_fsdp.parallelize_moe(model, worker_mesh(2, 2))
    try:
        ep_fsdp.rebalance_experts(model, load=[1.0, 2.0])
    except ValueError as e:
        return str(e)
    return "no error"


def test_clear_errors(pools):
    pool = pools(4)
    assert "was not produced by ep_fsdp.parallelize_moe" in pool.run(not_parallelized)[0]
    assert "has 2 entries, the layer has num_experts=8" in pool.run(wrong_length)[0]
    with pytest.raises(ValueError, match="permutation"):
        ExpertPlacement(8, 2, [0, 1, 2, 3, 4, 5, 6, 6])  # duplicates expert 6's row, loses row 7


def save_moved(root: str) -> dict:
    """(2,2): skewed routing, 3 steps, a move, 1 step, save; returns the logical state and the
    next step's loss for the checks in load_moved."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = build("transformer")
    set_regime(model, "idle_ep_rank", 2)
    ep_fsdp.parallelize_moe(model, worker_mesh(2, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(s: int) -> float:
        x, y = batch("transformer", ROWS * 4, seed=s)
        logits = model(x[rank * ROWS:(rank + 1) * ROWS])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[rank * ROWS:(rank + 1) * ROWS].reshape(-1))
        (loss + ep_fsdp.moe_aux_loss(model)).backward()
        opt.step()
        opt.zero_grad()
        return mean_over_ranks(loss)

    for s in range(3):
        step(s)
    placement = ep_fsdp.rebalance_experts(model, opt)
    step(3)
    ckpt.save(f"{root}/moved", model, opt, step=4)
    state = {k: v for k, v in expert_state(model, opt).items()}
    next_loss = step(4)
    if rank == 0:
        ckpt.export_safetensors(f"{root}/moved", f"{root}/export")
        torch.save(state, f"{root}/state.pt")
    dist.barrier()
    return {"placement": placement, "next_loss": next_loss}


def load_moved(root: str, dp_shard: int, ep: int) -> dict:
    import warnings

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1)
    model = build("transformer")
    set_regime(model, "idle_ep_rank", 2)
    ep_fsdp.parallelize_moe(model, worker_mesh(dp_shard, ep))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as weights_only:  # the weights alone: the placement moves
        warnings.simplefilter("always")
        ckpt.load(f"{root}/moved", model)
    with warnings.catch_warnings(record=True) as with_optimizer:  # and with the optimizer, placed alike
        warnings.simplefilter("always")
        ckpt.load(f"{root}/moved", model, opt)
    saved = torch.load(f"{root}/state.pt")
    got = expert_state(model, opt)
    x, y = batch("transformer", ROWS * 4, seed=4)
    per = ROWS * 4 // world
    logits = model(x[rank * per:(rank + 1) * per])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[rank * per:(rank + 1) * per].reshape(-1))
    return {"state": max(rel_err(got[k], saved[k]) for k in saved), "placement": ep_fsdp.expert_placement(model),
            "loss": mean_over_ranks(loss),
            "warned": ["expert moments in the old order" in str(w.message) for w in weights_only + with_optimizer]}


def test_checkpoint_keeps_the_placement(pools, tmp_path):
    root = str(tmp_path)
    saved = pools(4).run(save_moved, root)[0]
    placement = saved["placement"]
    assert any(ranks != sorted(ranks) for ranks in placement.values())  # not the default
    # same layout: the placement is restored and the next step is bitwise the same
    same = pools(4).run(load_moved, root, 2, 2)
    assert same[0]["placement"] == placement and same[0]["state"] == 0.0
    assert same[0]["warned"].count(True) == 1 and same[0]["warned"][0]  # only the weights-only load warns
    assert same[0]["loss"] == saved["next_loss"]
    # other layouts: the logical experts are right
    for layout in [(1, 4), (4, 1)]:
        other = pools(4).run(load_moved, root, *layout)[0]
        assert other["state"] == 0.0
        assert abs(other["loss"] - saved["next_loss"]) <= REL_TOL * abs(saved["next_loss"])
    # a plain model in this process: rows back in logical order
    model = build("transformer")
    ckpt.load(f"{root}/moved", model)
    state = torch.load(f"{root}/state.pt")
    for name, layer in ep_fsdp.moe_layers(model):
        assert layer.placement.is_contiguous()
        assert torch.equal(layer.experts.w1.detach(), state[f"{name}.w1"])
    # export writes experts in logical order
    from safetensors import safe_open

    with safe_open(f"{root}/export/model-00001-of-00001.safetensors", "pt") as f:
        name = ep_fsdp.moe_layers(model)[0][0]
        for e in range(8):
            assert torch.equal(f.get_tensor(f"{name}.experts.{e}.gate_proj.weight"), state[f"{name}.w1"][e])
    # and info shows how far the placement is from the default
    from ep_fsdp.checkpoint.__main__ import info
    from pathlib import Path

    assert "off their default rank" in info(Path(f"{root}/moved"))


def _two_moe_layers() -> torch.nn.Module:
    """3 blocks, the last two MoE: a move that fails half way would leave one layer moved."""
    from ep_fsdp.models import MoETransformer, TransformerConfig

    torch.manual_seed(0)
    moe = ep_fsdp.MoEConfig(dim=32, hidden_dim=48, num_experts=8, top_k=2, aux_loss_coef=0.01, expert_bias=True)
    return MoETransformer(TransformerConfig(vocab_size=64, dim=32, num_layers=3, num_heads=4, num_kv_heads=2,
                                            max_seq_len=16, num_dense_layers=1, moe=moe))


def awkward_moves(dp_shard: int, ep: int, move: bool) -> dict:
    """Moves where users make them: between two accumulated micro-batches (their gradients move
    too), and right after a no-grad validation forward (the last block is left unsharded)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _two_moe_layers()
    set_regime(model, "idle_ep_rank", ep)
    ep_fsdp.parallelize_moe(model, worker_mesh(dp_shard, ep))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    losses, changed = [], []
    for step in range(1, 5):
        for micro in range(2):
            x, y = batch("transformer", ROWS * world, seed=10 * step + micro)
            logits = model(x[rank * ROWS:(rank + 1) * ROWS])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[rank * ROWS:(rank + 1) * ROWS].reshape(-1))
            ((loss + ep_fsdp.moe_aux_loss(model)) / 2).backward()
            losses.append(mean_over_ranks(loss))
            if move and step == 2 and micro == 0:
                before = ep_fsdp.expert_placement(model)
                changed.append(ep_fsdp.rebalance_experts(model, opt) != before)
        opt.step()
        opt.zero_grad()
        if step == 3:
            model.eval()
            with torch.no_grad():
                model(x[rank * ROWS:(rank + 1) * ROWS])
            model.train()
            if move:
                before = ep_fsdp.expert_placement(model)
                changed.append(ep_fsdp.rebalance_experts(model, opt, load=[8, 7, 6, 5, 4, 3, 2, 1]) != before)
    return {"losses": losses, "state": expert_state(model, opt), "changed": changed}


@pytest.mark.parametrize("layout", [(2, 2), (1, 2)], ids=lambda l: f"dp{l[0]}xep{l[1]}")
def test_moves_between_micro_batches_and_after_a_validation_forward(pools, layout):
    pool = pools(layout[0] * layout[1])
    still = pool.run(awkward_moves, *layout, False)
    moving = pool.run(awkward_moves, *layout, True)
    for a, b in zip(still, moving):
        assert b["changed"] == [True, True], b["changed"]
        for got, want in zip(b["losses"], a["losses"]):
            assert abs(got - want) <= REL_TOL * abs(want), (b["losses"], a["losses"])
        worst = max(rel_err(b["state"][k], a["state"][k]) for k in a["state"])
        assert worst <= REL_TOL, worst


def load_arguments() -> dict:
    """``load=`` is rank 0's on every rank (the others may pass None); unreadable or invalid loads
    raise on every rank; a move without the optimizer warns."""
    import warnings

    rank = dist.get_rank()
    model = build("transformer")
    ep_fsdp.parallelize_moe(model, worker_mesh(1, 2))
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["placement"] = ep_fsdp.rebalance_experts(model, load=[9, 9, 0, 0, 0, 0, 0, 0] if rank == 0 else None)
    out["warned"] = any("moved without an optimizer" in str(w.message) for w in caught)
    for name, bad in [("nan", [1, 1, 1, float("nan"), 1, 1, 1, 1]), ("negative", [-1.0] * 8),
                      ("nested", [[1.0] * 8] * 2), ("not_a_sequence", 5),
                      ("rank0_only_bad", [1.0, 2.0] if rank == 0 else [1.0] * 8)]:
        try:
            ep_fsdp.rebalance_experts(model, load=bad)
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    model.set_requires_gradient_sync(False)  # accumulation without sync: unreduced gradients cannot move
    x, _ = batch("transformer", ROWS, seed=rank)
    model(x).float().square().mean().backward()
    try:
        ep_fsdp.rebalance_experts(model, load=[1, 2, 3, 4, 5, 6, 7, 8])
        out["unsynced"] = "no error"
    except ValueError as e:
        out["unsynced"] = str(e)
    return out


def test_load_argument_is_rank_zeros_and_checked_on_every_rank(pools):
    results = pools(2).run(load_arguments)
    assert results[0]["placement"] == results[1]["placement"]
    assert any(r != sorted(r) for r in results[0]["placement"].values())  # it moved
    for r in results:
        assert r["warned"], r
        assert "every entry must be a finite number >= 0" in r["nan"] and "nan" in r["nan"], r
        assert "every entry must be a finite number >= 0" in r["negative"], r
        assert "flat sequence of numbers" in r["nested"], r
        assert "could not be read" in r["not_a_sequence"], r
        assert "has 2 entries" in r["rank0_only_bad"], r
        assert "set_requires_gradient_sync(False)" in r["unsynced"], r


@pytest.mark.parametrize("args, message", [
    ((8, 2, [0, 1.9, 2, 3, 4, 5, 6, 7]), "physical holds 1.9"),
    ((8, 2, [True, 1, 2, 3, 4, 5, 6, 7]), "physical holds True"),
    ((-4, 2), "num_experts must be a positive int, got -4"),
    ((0, 2), "num_experts must be a positive int, got 0"),
    ((True, 1), "num_experts must be a positive int, got True"),
])
def test_placement_arguments_are_checked(args, message):
    with pytest.raises(ValueError, match=message):
        ExpertPlacement(*args)


def test_placement_lookups_are_range_checked_and_placements_hash():
    p = ExpertPlacement.contiguous(8, 2)
    with pytest.raises(IndexError, match="expert -1 is not in 0..7"):
        p.rank_of(-1)
    with pytest.raises(IndexError, match="rank 5 is not in 0..1"):
        p.experts_on(5)
    assert len({p, ExpertPlacement(8, 2, list(range(8)))}) == 1
    assert ExpertPlacement(8, 2, torch.arange(8)) == p  # integer tensors and numpy ints are rows too
