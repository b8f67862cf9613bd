"""clip_grad_norm_ and routing_stats against the single-process model; data split and sampler."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ep_fsdp
from dist_pool import worker_mesh
from parity_utils import REL_TOL, full, rel_err, worst
from test_parity import build

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
from data import GlobalBatchSampler, WindowDataset, build_loader, stdlib_corpus  # noqa: E402


def clip_parity(dp_shard: int, ep: int, norm_type: float) -> dict:
    torch.manual_seed(0)
    model = build("transformer")
    ref = copy.deepcopy(model)
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (4 * world, 9), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def loss(m, xs, ys):
        return F.cross_entropy(m(xs).flatten(0, 1), ys.flatten()) + ep_fsdp.moe_aux_loss(m)

    loss(ref, x, y).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05, norm_type=norm_type)
    ep_fsdp.parallelize_moe(model, worker_mesh(dp_shard, ep))
    per = x.shape[0] // world
    loss(model, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]).backward()
    norm = ep_fsdp.clip_grad_norm_(model.parameters(), 0.05, norm_type=norm_type)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    errors = {n: rel_err(full(p.grad), ref_grads[n]) for n, p in model.named_parameters()}
    stats = ep_fsdp.routing_stats(model)
    ref_util = ep_fsdp.routing_stats(ref)["layers.1.feed_forward"]["utilization"]
    return {"norm": float(norm), "ref_norm": float(ref_norm), "grad": worst(errors),
            "util": stats["layers.1.feed_forward"]["utilization"], "ref_util": ref_util,
            "imbalance": stats["layers.1.feed_forward"]["imbalance"],
            "a2a": stats["layers.1.feed_forward"]["a2a_bytes"]}


@pytest.mark.parametrize("layout", [(2, 2), (1, 4), (4, 1)], ids=lambda l: f"dp{l[0]}xep{l[1]}")
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
def test_clip_grad_norm_matches_single_process(pools, layout, norm_type):
    for r in pools(4).run(clip_parity, *layout, norm_type):
        assert abs(r["norm"] - r["ref_norm"]) <= REL_TOL * r["ref_norm"], r
        assert r["ref_norm"] > 0.05  # clipping really happened
        assert r["grad"][1] <= REL_TOL, r["grad"]
        assert np.allclose(r["util"], r["ref_util"], rtol=0, atol=1e-12)
        assert r["imbalance"] >= 1.0
        assert (r["a2a"] > 0) == (layout[1] > 1)


def clip_with_a_nan_on_one_rank(dp_shard: int, ep: int, bad_rank: int, expert: bool, bad: float = math.nan) -> dict:
    """One NaN (or ``bad``) in one rank's shard of a dense or an expert gradient."""
    torch.manual_seed(0)
    model = build("net")
    ep_fsdp.parallelize_moe(model, worker_mesh(dp_shard, ep))
    model(torch.randn(6, 8)).square().mean().backward()
    target = next(p for n, p in model.named_parameters() if ("experts" in n) == expert)
    if dist.get_rank() == bad_rank:
        target.grad.to_local().view(-1)[0] = bad
    out = {}
    saved = [p.grad.to_local().clone() for p in model.parameters()]
    for norm_type in (2.0, math.inf):
        out[norm_type] = float(ep_fsdp.clip_grad_norm_(model.parameters(), float("inf"), norm_type=norm_type))
        for p, g in zip(model.parameters(), saved):  # (a non-finite norm scales the gradients by NaN, as in torch)
            p.grad.to_local().copy_(g)
    try:
        ep_fsdp.clip_grad_norm_(model.parameters(), 1.0, norm_type=math.inf, error_if_nonfinite=True)
        out["raised"] = ""
    except RuntimeError as e:
        out["raised"] = str(e)
    return out


def test_a_nan_gradient_on_any_rank_makes_the_norm_nan_everywhere(pools):
    """torch's total norm is NaN when any gradient holds a NaN; a MAX all-reduce (the inf-norm)
    dropped a NaN held by a rank other than the first."""
    for layout, bad_rank, expert in [((1, 2), 1, False), ((1, 2), 1, True), ((2, 1), 1, True), ((1, 2), 0, False)]:
        for r in pools(2).run(clip_with_a_nan_on_one_rank, *layout, bad_rank, expert):
            assert math.isnan(r[2.0]) and math.isnan(r[math.inf]), (layout, bad_rank, expert, r)
            assert "total norm of order inf of the gradients is nan" in r["raised"], r
    # an inf element: the norm is inf everywhere, and error_if_nonfinite raises (the NaN flag's
    # nan_to_num had turned inf into the largest double, a finite norm)
    for r in pools(2).run(clip_with_a_nan_on_one_rank, 1, 2, 1, False, math.inf):
        assert r[2.0] == math.inf and r[math.inf] == math.inf, r
        assert "total norm of order inf of the gradients is inf" in r["raised"], r


def test_clip_grad_norm_takes_what_torch_takes():
    """A single tensor (torch wraps it in a list; iterating it gave rows without .grad, and
    nothing was clipped), a one-element tensor max_norm, error_if_nonfinite by keyword; torch's
    fourth positional argument (error_if_nonfinite) in ep_fsdp's fourth place (group) is refused."""
    def weight() -> torch.nn.Parameter:
        w = torch.nn.Parameter(torch.zeros(3, 4))
        w.grad = torch.full((3, 4), 10.0)
        return w

    ours, theirs = weight(), weight()
    torch.testing.assert_close(ep_fsdp.clip_grad_norm_(ours, 1.0), torch.nn.utils.clip_grad_norm_(theirs, 1.0))
    torch.testing.assert_close(ours.grad, theirs.grad)
    assert float(ours.grad[0, 0]) < 1.0  # clipped
    ours, theirs = weight(), weight()
    torch.testing.assert_close(ep_fsdp.clip_grad_norm_([ours], torch.tensor(2.0)),
                               torch.nn.utils.clip_grad_norm_([theirs], torch.tensor(2.0)))
    torch.testing.assert_close(ours.grad, theirs.grad)
    bad = weight()
    bad.grad[1, 1] = float("inf")
    with pytest.raises(RuntimeError, match=r"total norm of order 2.0 of the gradients is inf"):
        ep_fsdp.clip_grad_norm_([bad], 1.0, error_if_nonfinite=True)
    with pytest.raises(ValueError, match=r"group must be None or a torch.distributed.ProcessGroup, got True"):
        ep_fsdp.clip_grad_norm_([weight()], 1.0, 2.0, True)


def test_clip_grad_norm_single_process_equals_torch():
    torch.manual_seed(0)
    a = build("net")
    b = copy.deepcopy(a)
    x = torch.randn(6, 8)
    for m in (a, b):
        m(x).square().sum().backward()
    n1 = ep_fsdp.clip_grad_norm_(a.parameters(), 0.1)
    n2 = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1)
    torch.testing.assert_close(n1, n2)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(ValueError, match=r"max_norm must be a number > 0, got 0; e.g. 1.0"):
        ep_fsdp.clip_grad_norm_(a.parameters(), 0)
    with pytest.raises(ValueError, match=r"norm_type must be a number > 0 or float\('inf'\), got 'fro'"):
        ep_fsdp.clip_grad_norm_(a.parameters(), 1.0, norm_type="fro")
    before = [p.grad.clone() for p in a.parameters()]
    assert float(ep_fsdp.clip_grad_norm_(a.parameters(), float("inf"))) == pytest.approx(0.1, rel=1e-5)  # clipped above
    assert all(torch.equal(p.grad, g) for p, g in zip(a.parameters(), before))  # inf: the norm only


def test_corpus_is_real_and_split_deterministically():
    train, val = stdlib_corpus(max_bytes=300_000, val_fraction=0.1)
    train2, val2 = stdlib_corpus(max_bytes=300_000, val_fraction=0.1)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    assert len(train) >= 300_000 and len(val) > 10_000
    text = bytes(train[:100_000]).decode("utf-8", errors="replace")
    assert "def " in text and "import " in text
    assert bytes(val[:2000]) not in bytes(train)  # different files


def test_sampler_state_is_layout_independent():
    """Two ranks of a 2-rank world together read exactly the global batches one rank reads alone."""
    ds = WindowDataset(np.arange(10_000, dtype=np.int64) % 256, seq_len=7)
    single = GlobalBatchSampler(len(ds), 8, rank=0, world=1, seed=3)
    pair = [GlobalBatchSampler(len(ds), 8, rank=r, world=2, seed=3) for r in range(2)]
    it1, it2 = iter(single), [iter(s) for s in pair]
    for _ in range(5):
        assert next(it1) == next(it2[0]) + next(it2[1])
    # resume the pair from the single sampler's state: the next global batch matches
    state = single.state_dict()
    resumed = [GlobalBatchSampler(len(ds), 8, rank=r, world=2, seed=3) for r in range(2)]
    for s in resumed:
        s.load_state_dict(state)
    assert next(it1) == next(iter(resumed[0])) + next(iter(resumed[1]))
    # epochs roll over with a new order, forever
    many = [next(it1) for _ in range(single.batches_per_epoch + 2)]
    assert all(len(b) == 8 for b in many)


def test_loader_state_round_trip():
    ds = WindowDataset(np.arange(5_000, dtype=np.int64) % 256, seq_len=15)
    loader = build_loader(ds, 4, rank=1, world=2, seed=0)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    expected = next(it)
    again = build_loader(ds, 4, rank=1, world=2, seed=0)
    again.load_state_dict(state)
    got = next(iter(again))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    other = build_loader(ds, 8, rank=1, world=2, seed=0)
    with pytest.raises(ValueError, match="saved data position was made with global_batch=4, this run has global_batch=8"):
        other.load_state_dict(state)
        next(iter(other))  # the loader applies a loaded state when it starts iterating
    with pytest.raises(ValueError, match="global_batch=5 is not divisible by world=2"):
        build_loader(ds, 5, rank=0, world=2)


def test_peer_failures_are_recognised_in_every_form_gloo_and_dcp_give_them():
    """The recipe turns these into its "another rank stopped participating" error; others pass through."""
    from torch.distributed.checkpoint.api import CheckpointException

    from ep_fsdp.launch import is_peer_failure

    gloo_timeout = RuntimeError("Application timeout caused pair closure")
    assert is_peer_failure(gloo_timeout)
    assert is_peer_failure(RuntimeError("[pair.cc:598] Timed out waiting 8000ms for recv operation to complete"))
    assert is_peer_failure(RuntimeError("Connection reset by peer"))
    assert is_peer_failure(RuntimeError("[pair.cc:553] Write error [127.0.0.1]:4312: Broken pipe"))
    assert is_peer_failure(RuntimeError("[tcp/pair.cc:171] connect [127.0.0.1]:47901: Connection refused"))
    assert is_peer_failure(RuntimeError("NCCL error: remote process exited or there was a network error"))
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = gloo_timeout
    assert is_peer_failure(wrapped)
    assert is_peer_failure(CheckpointException("save", {1: (gloo_timeout, None)}))
    assert not is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_peer_failure(ValueError("parallel.timeout_s must be > 0 seconds, got 0; e.g. 300."))
    assert not is_peer_failure(CheckpointException("load", {0: (ValueError("size mismatch"), None)}))
