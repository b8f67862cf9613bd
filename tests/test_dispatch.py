"""Hand-worked checks of the permutation and split arithmetic (single process)."""

from __future__ import annotations

import torch

from ep_fsdp.dispatch import (
    combine,
    ep_split_sizes,
    gather_token_copies,
    received_expert_order,
    scatter_to_slots,
    sort_by_expert,
)

# T = 3 tokens, k = 2, E = 4. Slots in (token, slot) order: s = t*k + j.
EXPERT_IDS = torch.tensor([[2, 0], [1, 2], [0, 2]])  # flat: [2, 0, 1, 2, 0, 2]


def test_sort_by_expert_is_stable_and_counts():
    perm = sort_by_expert(EXPERT_IDS, num_experts=4)
    # expert 0: slots 1, 4; expert 1: slot 2; expert 2: slots 0, 3, 5; expert 3: none
    assert perm.sort_idx.tolist() == [1, 4, 2, 0, 3, 5]
    assert perm.counts.tolist() == [2, 1, 3, 0]
    assert perm.inverse.tolist() == [3, 0, 2, 4, 1, 5]
    assert perm.top_k == 2


def test_gather_token_copies_and_its_gradient():
    perm = sort_by_expert(EXPERT_IDS, num_experts=4)
    x = torch.tensor([[10.0], [20.0], [30.0]], requires_grad=True)
    rows = gather_token_copies(x, perm)  # token of each sorted slot: sort_idx // k = [0, 2, 1, 0, 1, 2]
    assert rows.squeeze(1).tolist() == [10.0, 30.0, 20.0, 10.0, 20.0, 30.0]
    rows.backward(torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]]))
    # token 0 <- sorted rows 0 and 3 (1 + 4); token 1 <- rows 2, 4 (3 + 5); token 2 <- rows 1, 5 (2 + 6)
    assert x.grad.squeeze(1).tolist() == [5.0, 8.0, 8.0]


def test_scatter_and_combine_put_results_back_weighted():
    perm = sort_by_expert(EXPERT_IDS, num_experts=4)
    # pretend each expert returns 100 * expert id + token id, for sorted rows
    sorted_token = perm.sort_idx // 2
    sorted_expert = EXPERT_IDS.reshape(-1)[perm.sort_idx]
    y_sorted = (100.0 * sorted_expert + sorted_token).unsqueeze(1).requires_grad_(True)  # [6, 1]
    slots = scatter_to_slots(y_sorted, perm)  # [3, 2, 1] in (token, slot) order
    assert slots.squeeze(-1).tolist() == [[200.0, 0.0], [101.0, 201.0], [2.0, 202.0]]
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.5], [1.0, 0.0]])
    out = combine(slots, weights)  # [3, 1]
    assert out.squeeze(1).tolist() == [150.0, 151.0, 2.0]
    out.sum().backward()
    # gradient of each sorted row is the weight of its slot: slots [1, 4, 2, 0, 3, 5]
    assert y_sorted.grad.squeeze(1).tolist() == [0.25, 1.0, 0.5, 0.75, 0.5, 0.0]


def test_ep_split_sizes():
    # E = 4 experts over ep = 2 ranks (G = 2 each). I route [2, 1, 3, 0] rows to experts 0..3:
    # 3 rows to rank 0 (experts 0, 1), 3 rows to rank 1 (experts 2, 3).
    counts = torch.tensor([2, 1, 3, 0])
    # I own experts (2, 3) say; peer 0 sends me [2, 1], peer 1 sends me [5, 0].
    recv_counts = torch.tensor([2, 1, 5, 0])
    send, recv, local = ep_split_sizes(counts, recv_counts, ep=2)
    assert send == [3, 3]
    assert recv == [3, 5]
    assert local == [7, 1]


def test_ep_split_sizes_with_idle_rank():
    send, recv, local = ep_split_sizes(torch.tensor([4, 2, 0, 0]), torch.tensor([0, 0, 0, 0]), ep=2)
    assert (send, recv, local) == ([6, 0], [0, 0], [0, 0])


def test_received_expert_order_groups_by_local_expert():
    # rows arrive as peer 0: [e0, e0, e1], peer 1: [e0 x 5]
    recv_counts = torch.tensor([2, 1, 5, 0])
    index, inverse = received_expert_order(recv_counts, ep=2, num_rows=8)
    assert index.tolist() == [0, 1, 3, 4, 5, 6, 7, 2]
    assert inverse[index].tolist() == list(range(8))


def test_received_expert_order_empty():
    index, inverse = received_expert_order(torch.tensor([0, 0, 0, 0]), ep=2, num_rows=0)
    assert index.numel() == 0 and inverse.numel() == 0


def dedup_plan_case() -> dict:
    """Run on 2 ranks: E = 4 experts, ep = 2 (G = 2), T = 3 / 2 tokens, k = 2."""
    import torch.distributed as dist

    from dist_pool import worker_mesh
    from ep_fsdp.dispatch_dedup import DedupPlan

    group = worker_mesh(1, 2)["ep"].get_group()
    ids = {0: [[0, 1], [1, 2], [3, 2]], 1: [[2, 3], [0, 3]]}[dist.get_rank()]
    plan = DedupPlan.build(torch.tensor(ids), num_experts=4, group=group)
    return {
        "order": plan.order.tolist(),
        "unique_token": plan.unique_token.tolist(),
        "row_in_chunk": plan.row_in_chunk.tolist(),
        "sizes": (plan.rows_send, plan.slots_send, plan.rows_recv, plan.slots_recv),
    }


def test_dedup_plan_hand_worked(pools):
    r0, r1 = pools(2).run(dedup_plan_case)
    # rank 0: destinations [[0,0],[0,1],[1,1]]; pairs (d0,t0) slots 0,1; (d0,t1) slot 2;
    # (d1,t1) slot 3; (d1,t2) slots 4,5: 4 rows instead of 6 token copies
    assert r0["order"] == [0, 1, 2, 3, 4, 5]
    assert r0["unique_token"] == [0, 1, 1, 2]
    assert r0["row_in_chunk"] == [0, 0, 1, 0, 1, 1]
    assert r0["sizes"] == ([2, 2], [3, 3], [2, 1], [3, 1])
    # rank 1: destinations [[1,1],[0,1]]; pairs (d0,t1) slot 2; (d1,t0) slots 0,1; (d1,t1) slot 3
    assert r1["order"] == [2, 0, 1, 3]
    assert r1["unique_token"] == [1, 0, 1]
    assert r1["row_in_chunk"] == [0, 0, 0, 1]
    assert r1["sizes"] == ([1, 2], [1, 3], [2, 2], [3, 3])
