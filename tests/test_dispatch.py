"""The token dispatchers: hand-worked index math (one process) and round trips on 2 and 4 gloo ranks
against a formula, including ranks with no tokens and ranks that receive no rows."""

from __future__ import annotations

import pytest
import torch

from ep_fsdp.dispatch import AllToAllDispatcher, DedupAllToAllDispatcher, LocalDispatcher
from ep_fsdp import _blocks as blocks_mod
from ep_fsdp.dispatch._ops import Segments, gather_rows, ordered_segment_sum, weighted_segment_sum
from ep_fsdp.dispatch.all_to_all import regroup_by_expert
from ep_fsdp.dispatch.local import combine_sorted, gather_sorted, sort_slots
from ep_fsdp.placement import ExpertPlacement

# T = 3 tokens, k = 2, E = 4. Slots in (token, slot) order: s = t*k + j.
EXPERT_IDS = torch.tensor([[2, 0], [1, 2], [0, 2]])  # flat: [2, 0, 1, 2, 0, 2]


def test_sort_slots_is_stable_and_counts():
    sort = sort_slots(EXPERT_IDS, num_experts=4)
    # expert 0: slots 1, 4; expert 1: slot 2; expert 2: slots 0, 3, 5; expert 3: none
    assert sort.sort_idx.tolist() == [1, 4, 2, 0, 3, 5]
    assert sort.counts.tolist() == [2, 1, 3, 0]
    assert sort.inverse.tolist() == [3, 0, 2, 4, 1, 5]


def test_gather_sorted_and_its_gradient():
    sort = sort_slots(EXPERT_IDS, num_experts=4)
    x = torch.tensor([[10.0], [20.0], [30.0]], requires_grad=True)
    rows = gather_sorted(x, sort)  # token of each sorted slot: sort_idx // k = [0, 2, 1, 0, 1, 2]
    assert rows.squeeze(1).tolist() == [10.0, 30.0, 20.0, 10.0, 20.0, 30.0]
    rows.backward(torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]]))
    # token 0 <- sorted rows 0 and 3 (1 + 4); token 1 <- rows 2, 4 (3 + 5); token 2 <- rows 1, 5 (2 + 6)
    assert x.grad.squeeze(1).tolist() == [5.0, 8.0, 8.0]


def test_combine_sorted_weights_in_float32():
    sort = sort_slots(EXPERT_IDS, num_experts=4)
    sorted_token = sort.sort_idx // 2
    sorted_expert = EXPERT_IDS.reshape(-1)[sort.sort_idx]
    y_sorted = (100.0 * sorted_expert + sorted_token).unsqueeze(1).requires_grad_(True)  # [6, 1]
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.5], [1.0, 0.0]], requires_grad=True)
    out = combine_sorted(y_sorted, weights, sort, torch.float32)  # [3, 1]
    # token 0: 0.75*200 + 0.25*0; token 1: 0.5*101 + 0.5*201; token 2: 1.0*2 + 0*202
    assert out.squeeze(1).tolist() == [150.0, 151.0, 2.0]
    out.sum().backward()
    # gradient of each sorted row is the weight of its slot: slots [1, 4, 2, 0, 3, 5]
    assert y_sorted.grad.squeeze(1).tolist() == [0.25, 1.0, 0.5, 0.75, 0.5, 0.0]
    assert weights.grad.tolist() == [[200.0, 0.0], [101.0, 201.0], [2.0, 202.0]]


def test_bf16_rows_are_summed_in_float32():
    # y = 1 + 2**-7 is a bfloat16; the weight 1 + 2**-12 is not. In bf16 each product would round
    # back to y and the running sum past 256 would drop the 2**-7 steps; in float32 both survive.
    y = torch.full((256, 1), 1.0 + 2.0**-7, dtype=torch.bfloat16)
    order = torch.arange(256)
    w = torch.full((256,), 1.0 + 2.0**-12)
    out = weighted_segment_sum(y, w, order, order, Segments(1, uniform=256), torch.float32)
    expected = 256 * (1.0 + 2.0**-7) * (1.0 + 2.0**-12)
    # an in-order float32 sum of n terms is within n * 2**-24 * |sum| (0.004 here); in bf16 the
    # sum would stop growing at 256 and be off by about 2
    assert abs(float(out) - expected) < 256 * 2.0**-24 * expected


def test_weighted_segment_sum_keeps_its_input_only_for_the_weights_gradient():
    """Without weights the backward is a gather of the output gradient: no copy of ``y`` is kept
    (the plain exchange's return and the deduplicated exchange's merge); with weights ``y`` is
    kept for their gradient."""
    order = torch.tensor([2, 0, 1, 5, 3, 4])
    inverse = torch.argsort(order)
    for weights in (None, torch.rand(6, requires_grad=True)):
        y = torch.randn(6, 4, requires_grad=True)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = weighted_segment_sum(y, weights, order, inverse, Segments(3, uniform=2))  # [3, 4]
        assert any(t is y for t in saved) == (weights is not None)
        out.backward(torch.ones_like(out))
        w = torch.ones(6) if weights is None else weights.detach()
        torch.testing.assert_close(y.grad, w[inverse].unsqueeze(1).expand(6, 4))


def test_weighted_segment_sum_uneven_segments_and_gradients():
    y = torch.tensor([[1.0], [2.0], [3.0], [4.0]], requires_grad=True)
    order = torch.tensor([2, 0, 3, 1])  # segment order: y2, y0 | (empty) | y3, y1
    inverse = torch.tensor([1, 3, 0, 2])
    w = torch.tensor([1.0, 10.0, 100.0, 1000.0], requires_grad=True)
    seg = Segments(3, lengths=torch.tensor([2, 0, 2]))
    out = weighted_segment_sum(y, w, order, inverse, seg)
    assert out.squeeze(1).tolist() == [3.0 + 10.0, 0.0, 400.0 + 2000.0]
    out.backward(torch.tensor([[1.0], [5.0], [2.0]]))
    assert y.grad.squeeze(1).tolist() == [10.0, 2000.0, 1.0, 200.0]
    assert w.grad.tolist() == [3.0, 1.0, 8.0, 4.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("uniform", [True, False])
def test_segment_sums_in_cache_blocks_equal_one_pass(monkeypatch, dtype, uniform):
    """On CPU the widening segment sums and the combine backward run over row blocks; with
    segments never split across blocks (long and empty ones included), outputs and gradients are
    bitwise those of one pass."""
    torch.manual_seed(5)
    if uniform:
        seg, N = Segments(40, uniform=3), 120
    else:
        lengths = torch.tensor([0, 7, 1, 0, 30, 2, 5, 0, 9, 3, 1, 12, 0, 4])  # one segment longer than a block
        seg, N = Segments(lengths.numel(), lengths=lengths), int(lengths.sum())
    y0 = torch.randn(N, 8, dtype=dtype)
    w0 = torch.rand(N)
    order = torch.randperm(N)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(N)
    grad = torch.randn(seg.num, 8, dtype=dtype)
    x0 = torch.randn(seg.num, 8, dtype=dtype)  # source rows of a gather: row r has segment r's copies
    source = seg.expand(torch.arange(seg.num), N).index_select(0, inverse)  # [N] source row of each copy

    def run(block_bytes: int) -> list[torch.Tensor]:
        monkeypatch.setattr(blocks_mod, "BLOCK_BYTES", block_bytes)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
        y, w = y0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = weighted_segment_sum(y, w, order, inverse, seg, dtype)
        out.backward(grad)
        x = x0.clone().requires_grad_()
        back = gather_rows(x, source, order, seg)  # [N, 8]; its backward sums each source row's copies

        back.backward(torch.randn(back.shape, dtype=dtype, generator=torch.Generator().manual_seed(1)))
        return [out, y.grad, w.grad, x.grad]

    blocked = run(8 * 4 * 4)  # blocks of 4 float32 rows
    assert len(blocks_mod.row_blocks(N, y0.device, 8 * 4)) > 4  # (the gathers' blocks: several)
    for got, want in zip(blocked, run(1 << 30)):  # against one pass
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("blocks", [False, True], ids=["one-block", "blocks"])
def test_pair_segment_sum_is_the_float32_sum_rounded_once(monkeypatch, dtype, blocks):
    """Two rows per segment (k = 2) take one add in the rows' dtype: bitwise the float32 sum of
    the pair rounded once to that dtype, also for magnitudes far apart and for cancelling pairs,
    in one block or in blocks of 5 segments."""
    if blocks:
        monkeypatch.setattr(blocks_mod, "BLOCK_BYTES", 10 * 40 * 4)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    torch.manual_seed(6)
    R, D = 64, 40
    x = torch.randn(2 * R, D) * torch.logspace(-4, 4, 2 * R).unsqueeze(1)  # pairs of very different size
    x[:8] = 1.0 + 2.0**-7
    x[8:16] = -(1.0 + 2.0**-7)  # exact cancellation within some pairs
    x = x.to(dtype)
    order = torch.randperm(2 * R)
    got = ordered_segment_sum(x, order, Segments(R, uniform=2), out_dtype=dtype)
    rows = x.float().index_select(0, order).view(R, 2, D)
    want = (rows[:, 0] + rows[:, 1]).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    out = torch.empty(R, D, dtype=dtype)
    assert ordered_segment_sum(x, order, Segments(R, uniform=2), out=out) is out and torch.equal(out, want)


def test_regroup_by_expert_groups_by_local_slot():
    # rows arrive as peer 0: [slot0, slot0, slot1], peer 1: [slot0 x 5]
    index, inverse = regroup_by_expert(torch.tensor([[2, 1], [5, 0]]), num_rows=8)
    assert index.tolist() == [0, 1, 3, 4, 5, 6, 7, 2]
    assert inverse[index].tolist() == list(range(8))
    index, inverse = regroup_by_expert(torch.zeros(2, 2, dtype=torch.long), num_rows=0)
    assert index.numel() == 0 and inverse.numel() == 0


def test_placement_is_the_ownership_map():
    p = ExpertPlacement.contiguous(8, ep=2)
    assert p.ranks() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert (p.rank_of(5), p.slot_of(5)) == (1, 1)
    assert p.experts_on(1) == [4, 5, 6, 7]
    q = ExpertPlacement(4, 2, physical=[2, 0, 3, 1])  # expert 0 in row 2 (rank 1, slot 0), ...
    assert q.ranks() == [1, 0, 1, 0] and q.experts_on(0) == [1, 3]
    assert q.to_physical(torch.tensor([[0, 3]])).tolist() == [[2, 1]]
    with pytest.raises(ValueError, match=r"num_experts=6 must be divisible by ep=4"):
        ExpertPlacement(6, 4)
    with pytest.raises(ValueError, match=r"physical must be a permutation of 0..3, got \[0, 0, 1, 2\]"):
        ExpertPlacement(4, 2, physical=[0, 0, 1, 2])


def test_local_dispatcher_with_no_tokens():
    d = LocalDispatcher(ExpertPlacement.contiguous(4, 1))
    tokens = torch.zeros(0, 3, requires_grad=True)
    rows, counts, handle = d.dispatch(tokens, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert rows.shape == (0, 3) and counts.tolist() == [0, 0, 0, 0]
    out = d.combine(rows * 2, handle)
    out.sum().backward()
    assert out.shape == (0, 3) and tokens.grad.shape == (0, 3)


def test_local_dispatcher_drops_slots_whose_expert_output_is_not_finite():
    """A dropped slot is computed but must not reach its token: not even as 0 * inf = NaN."""
    d = LocalDispatcher(ExpertPlacement.contiguous(4, 1))
    tokens = torch.ones(3, 2, requires_grad=True)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]])
    weights = torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.5, 0.5]], requires_grad=True)
    keep = torch.tensor([[True, True], [True, False], [True, True]])  # token 1's expert 3 dropped
    rows, counts, handle = d.dispatch(tokens, ids, weights, keep=keep)
    overflow = torch.where(torch.arange(rows.shape[0]) >= counts[:3].sum(), torch.inf, 0.0)  # expert 3's rows
    out = d.combine(rows + overflow.unsqueeze(1), handle)  # expert 3 overflows
    out.sum().backward()
    assert torch.equal(out[1], torch.full((2,), 0.25))  # only expert 2's share
    assert torch.isfinite(weights.grad).all() and weights.grad[1, 1] == 0
    assert torch.isfinite(tokens.grad).all()


def test_create_graph_takes_first_order_gradients_and_refuses_a_second_clearly():
    from ep_fsdp import MoE, MoEConfig

    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2))
    x = torch.randn(6, 8, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    (ref,) = torch.autograd.grad(layer(x).square().sum(), x)
    assert torch.equal(gx, ref)
    with pytest.raises(RuntimeError, match="trying to differentiate twice a function that was marked with @once_differentiable"):
        gx.sum().backward()


# ---------------------------------------------------------------- multi-process round trips

def _case_ids(case: str, rank: int, ep: int, E: int, k: int, T: int, g: torch.Generator) -> torch.Tensor:
    if case == "no_tokens_on_rank0" and rank == 0:
        return torch.zeros(0, k, dtype=torch.long)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # [T, k] distinct
    if case == "all_to_rank0_experts":  # the first max(G, k) experts only: later ranks receive no rows
        first = max(E // ep, k)
        ids = torch.stack([torch.randperm(first, generator=g)[:k] for _ in range(T)])
    return ids


def round_trip(kind: str, case: str, ep: int, E: int, k: int, permuted: bool = False) -> dict:
    """Dispatch, run 'expert e multiplies by (e + 1)', combine; return outputs and gradients."""
    import torch.distributed as dist

    from dist_pool import worker_mesh

    group = worker_mesh(1, ep)["ep"].get_group()
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(100 + rank)
    T = 5
    ids = _case_ids(case, rank, ep, E, k, T, g)
    T = ids.shape[0]
    tokens = torch.randn(T, 3, generator=g, dtype=torch.float64).float().requires_grad_(True)
    weights = torch.rand(T, k, generator=g).requires_grad_(True)
    # permuted: logical expert e lives in storage row (3e + 1) mod E (a permutation when gcd(3, E) = 1)
    placement = ExpertPlacement(E, ep, physical=[(3 * e + 1) % E for e in range(E)] if permuted else None)
    cls = {"plain": AllToAllDispatcher, "dedup": DedupAllToAllDispatcher}[kind]
    d = cls(placement, group)
    rows, counts, handle = d.dispatch(tokens, ids, weights)
    G = E // ep
    slot = torch.repeat_interleave(torch.arange(G), counts, output_size=rows.shape[0])  # [N]
    factor = (1.0 + rank * G + slot).unsqueeze(1)  # expert e = rank*G + slot multiplies by e + 1
    out = d.combine(rows * factor, handle)
    out.backward(torch.ones_like(out))
    return {
        "ids": placement.to_physical(ids), "tokens": tokens.detach(), "weights": weights.detach(), "out": out.detach(),
        "grad_tokens": tokens.grad, "grad_weights": weights.grad, "counts": counts.tolist(),
        "counts_host": handle.counts_host, "rows": rows.detach()[:, 0].tolist(), "sent": handle.sent_bytes,
    }


def expected(r: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    factor = (r["ids"] + 1).float()  # [T, k]: storage row + 1
    out = (r["weights"] * factor).sum(1, keepdim=True) * r["tokens"]
    grad_tokens = (r["weights"] * factor).sum(1, keepdim=True).expand_as(r["tokens"])
    grad_weights = factor * r["tokens"].sum(1, keepdim=True)
    return out, grad_tokens, grad_weights


@pytest.mark.parametrize("kind", ["plain", "dedup"])
@pytest.mark.parametrize("case", ["random", "no_tokens_on_rank0", "all_to_rank0_experts"])
@pytest.mark.parametrize("ep,E,k", [(2, 4, 2), (4, 8, 3), (4, 4, 1)], ids=["ep2-E4-k2", "ep4-E8-k3", "ep4-E4-k1"])
def test_dispatch_combine_round_trip(pools, kind, case, ep, E, k):
    results = pools(ep).run(round_trip, kind, case, ep, E, k)
    total_rows = sum(len(r["rows"]) for r in results)
    for rank, r in enumerate(results):
        out, grad_tokens, grad_weights = expected(r)
        torch.testing.assert_close(r["out"], out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["grad_tokens"], grad_tokens, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["grad_weights"], grad_weights, rtol=1e-5, atol=1e-6)
        assert r["counts_host"] == r["counts"]  # the per-expert counts came with the size exchange
        if case == "all_to_rank0_experts" and rank * (E // ep) >= max(E // ep, k):
            assert r["rows"] == []
    assert total_rows == sum(r["ids"].numel() for r in results)  # experts see one row per slot
    if case == "all_to_rank0_experts":
        assert results[-1]["rows"] == []


def dedup_hand_case() -> dict:
    import torch.distributed as dist

    from dist_pool import worker_mesh

    group = worker_mesh(1, 2)["ep"].get_group()
    rank = dist.get_rank()
    ids = {0: [[0, 1], [1, 2], [3, 2]], 1: [[2, 3], [0, 3]]}[rank]
    T = len(ids)
    tokens = (10.0 * rank + torch.arange(T, dtype=torch.float32)).unsqueeze(1)  # token value 10*rank + t
    d = DedupAllToAllDispatcher(ExpertPlacement.contiguous(4, 2), group)
    rows, counts, handle = d.dispatch(tokens, torch.tensor(ids), torch.full((T, 2), 0.5))
    return {"rows": rows[:, 0].tolist(), "counts": counts.tolist(), "sent": handle.sent_bytes}


def test_dedup_dispatch_hand_worked(pools):
    r0, r1 = pools(2).run(dedup_hand_case)
    # rank 0 holds experts 0, 1. Slot 0 (expert 0): rank 0 token 0, rank 1 token 1 (value 11);
    # slot 1 (expert 1): rank 0 tokens 0 and 1. Token 0 of rank 0 travelled once for two experts.
    assert r0["rows"] == [0.0, 11.0, 0.0, 1.0] and r0["counts"] == [2, 2]
    # rank 1 holds experts 2, 3. Slot 0 (expert 2): rank 0 tokens 1, 2; rank 1 token 0 (10);
    # slot 1 (expert 3): rank 0 token 2; rank 1 tokens 0, 1 (10, 11).
    assert r1["rows"] == [1.0, 2.0, 10.0, 2.0, 10.0, 11.0] and r1["counts"] == [3, 3]
    # rank 0 sends 2 rows (tokens 1, 2) to rank 1 and gets 1 row back from it... and 3 records
    row = 4  # one float32 feature
    assert r0["sent"] == (2 + 1) * row + 3 * 12


@pytest.mark.parametrize("kind", ["plain", "dedup"])
def test_round_trip_with_a_non_contiguous_placement(pools, kind):
    """The dispatchers take ownership from the placement only: a permuted map routes correctly."""
    for r in pools(4).run(round_trip, kind, "random", 4, 8, 3, permuted=True):
        out, grad_tokens, grad_weights = expected(r)
        torch.testing.assert_close(r["out"], out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["grad_tokens"], grad_tokens, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["grad_weights"], grad_weights, rtol=1e-5, atol=1e-6)


def collectives_and_host_copies(kind: str, grouped: bool) -> dict:
    """One MoE layer forward+backward on 2 ranks with c10d's blocking collectives disabled (only
    functional collectives may run) and every host copy (.tolist/.item) of the forward counted."""
    import torch.distributed as dist

    import ep_fsdp
    from dist_pool import worker_mesh
    from ep_fsdp import experts as experts_mod

    torch.manual_seed(0)
    layer = ep_fsdp.MoE(ep_fsdp.MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2, aux_loss_coef=0.1))
    group = worker_mesh(1, 2)["ep"].get_group()
    cls = {"plain": AllToAllDispatcher, "dedup": DedupAllToAllDispatcher}[kind]
    layer.dispatcher = cls(ExpertPlacement.contiguous(4, 2), group)
    layer.stats_group = group
    with torch.no_grad():  # this rank's half of the experts, as parallelize_moe would hold them
        for name in ("w1", "w3", "w2"):
            full_w = getattr(layer.experts, name)
            setattr(layer.experts, name, torch.nn.Parameter(full_w[2 * dist.get_rank():2 * dist.get_rank() + 2].clone()))
    x = torch.randn(6, 8, requires_grad=True)
    blocked = {}
    host_copies = {"n": 0}
    real_tolist, real_item = torch.Tensor.tolist, torch.Tensor.item

    def forbid(name):
        def f(*a, **k):
            raise RuntimeError(f"blocking c10d {name} called by the layer")
        return f

    def counting(real):
        def f(self, *a, **k):
            host_copies["n"] += 1
            return real(self, *a, **k)
        return f

    saved = {n: getattr(dist, n) for n in ("all_to_all_single", "all_reduce", "all_gather", "broadcast")}
    experts_mod._GROUPED_MM_WORKS[("cpu", torch.float32)] = grouped
    try:
        for n in saved:
            setattr(dist, n, forbid(n))
        torch.Tensor.tolist, torch.Tensor.item = counting(real_tolist), counting(real_item)
        y = layer(x)
        forward_copies = host_copies["n"]
        y.square().sum().backward()
        backward_copies = host_copies["n"] - forward_copies
    except RuntimeError as e:
        blocked["error"] = str(e)
        forward_copies = backward_copies = -1
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)
        torch.Tensor.tolist, torch.Tensor.item = real_tolist, real_item
        experts_mod._GROUPED_MM_WORKS.pop(("cpu", torch.float32), None)
    return {"error": blocked.get("error"), "forward": forward_copies, "backward": backward_copies}


@pytest.mark.parametrize("kind", ["plain", "dedup"])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "loop"])
def test_functional_collectives_and_one_host_copy_per_forward(pools, kind, grouped):
    for r in pools(2).run(collectives_and_host_copies, kind, grouped):
        assert r["error"] is None, r["error"]
        assert r["forward"] == 1, r  # the size exchange's one copy, also on the loop path
        assert r["backward"] == 0, r


def exchange_blocks_case(kind: str, case: str, chunks: int, fused: bool = False, wire: torch.dtype | None = None) -> dict:
    """One bf16 dispatcher run (dispatch, GroupedExperts, combine) forward+backward twice: once
    with the experts' padded blocks gathered by the exchange, once with the experts padding the
    rows themselves; outputs and gradients of both, and the capacities the experts were given.
    ``fused``: with the fused CPU kernels (from one element); ``wire``: the exchange's wire dtype."""
    import torch.distributed as dist

    from dist_pool import worker_mesh
    from ep_fsdp import _fused
    from ep_fsdp import _padded_experts as padded_mod
    from ep_fsdp import experts as experts_mod
    from ep_fsdp.config import MoEConfig

    ep, E, k, D, H = 2, 6, 2, 16, 32
    G = E // ep
    group = worker_mesh(1, ep)["ep"].get_group()
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(7 + rank)
    T = 0 if case == "no_tokens_on_rank0" and rank == 0 else 29
    first = G if case == "all_to_rank0_experts" else E - 1  # rank 1's experts receive no rows; or expert E-1 idle
    ids = torch.stack([torch.randperm(first, generator=g)[:k] for _ in range(T)] or [torch.zeros(0, k, dtype=torch.long)])
    ids = ids.reshape(T, k)  # [T, k]
    x0 = torch.randn(T, D, generator=g).bfloat16()
    w0 = torch.rand(T, k, generator=g)
    grad = torch.randn(T, D, generator=g).bfloat16()
    keep = torch.rand(T, k, generator=g) > 0.25 if case == "dropped_slots" else None  # [T, k]
    torch.manual_seed(3 + rank)
    experts = experts_mod.GroupedExperts(MoEConfig(dim=D, hidden_dim=H, num_experts=G, top_k=k)).bfloat16()
    cls = {"plain": AllToAllDispatcher, "dedup": DedupAllToAllDispatcher}[kind]
    dispatcher = cls(ExpertPlacement.contiguous(E, ep), group, chunks=chunks, wire_dtype=wire)
    capacities: list[int | None] = []
    forward = experts.forward

    def recording(rows, counts, counts_host=None, capacity=None):
        capacities.append(capacity)
        return forward(rows, counts, counts_host, capacity=capacity)

    def run() -> list[torch.Tensor]:
        experts.zero_grad(set_to_none=True)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        out, _ = dispatcher.run(x, ids, w, experts, keep=keep)
        out.backward(grad)
        zero = torch.zeros_like
        return [out.detach(), x.grad, w.grad] + [p.grad if p.grad is not None else zero(p) for p in (experts.w1, experts.w3, experts.w2)]

    saved = padded_mod.MAX_PADDING, _fused.FUSED_MIN_ELEMENTS
    padded_mod.MAX_PADDING = 10.0  # pad these small uneven counts too
    if fused:
        _fused.FUSED_MIN_ELEMENTS = 1
    experts.forward = recording
    try:
        blocks = run()
        block_capacities = list(capacities)
        experts.block_capacity = lambda x, counts: None  # the experts pad the rows themselves
        capacities.clear()
        rows = run()
    finally:
        padded_mod.MAX_PADDING, _fused.FUSED_MIN_ELEMENTS = saved
    return {"blocks": blocks, "rows": rows, "block_capacities": block_capacities, "row_capacities": capacities}


@pytest.mark.parametrize("kind", ["plain", "dedup"])
@pytest.mark.parametrize("case,chunks,options", [
    ("random", 1, {}), ("random", 2, {}), ("no_tokens_on_rank0", 2, {}), ("all_to_rank0_experts", 1, {}),
    ("dropped_slots", 1, {}), ("random", 1, {"fused": True}), ("random", 2, {"wire": torch.float32}),
], ids=["random", "2-chunks", "no-tokens-on-rank0", "all-to-rank0-experts", "dropped-slots", "fused-kernels",
        "float32-wire"])
def test_exchange_gathers_into_the_experts_padded_blocks(pools, kind, case, chunks, options):
    """bf16 on CPU: the exchanges gather the arriving rows straight into the experts' zero-padded
    blocks and send the results back from them: bitwise the results of the experts padding and
    unpadding the rows themselves (outputs, token, gate-weight and expert gradients), including
    an idle expert, a rank without tokens, a rank whose experts receive no rows, chunks, dropped
    slots, the fused CPU kernels and a float32 wire."""
    for rank, r in enumerate(pools(2).run(exchange_blocks_case, kind, case, chunks, **options)):
        assert all(c is None for c in r["row_capacities"]), r["row_capacities"]
        receives_rows = not (case == "all_to_rank0_experts" and rank == 1)
        assert len(r["block_capacities"]) == chunks
        assert any(c is not None for c in r["block_capacities"]) == receives_rows, r["block_capacities"]
        for got, want in zip(r["blocks"], r["rows"]):
            assert torch.equal(got, want)
        assert any(torch.count_nonzero(t) for t in r["blocks"][3:]) == receives_rows
