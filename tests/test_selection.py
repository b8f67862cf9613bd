"""Hand-worked checks of the selection rules: group-limited routing, capacity dropping (ties
included), expert dropout masks, the bias update, and the config errors."""

from __future__ import annotations

import pytest
import torch

import ep_fsdp
from ep_fsdp import MoE, MoEConfig
from ep_fsdp.selection import capacity, capacity_keep, expert_dropout_mask, group_limited_mask, jitter_noise


def test_group_limited_mask_keeps_the_best_groups():
    # 8 experts in 4 groups of 2; group score = sum of its two scores
    select = torch.tensor([[0.9, 0.1, 0.2, 0.3, 0.8, 0.05, 0.4, 0.4],    # groups 1.0 .5 .85 .8 -> {0, 2}
                           [0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.1, 0.0]])   # tie 1.0/1.0 -> {1, 2}
    allowed = group_limited_mask(select, num_groups=4, num_limited=2)
    assert allowed[0].tolist() == [True, True, False, False, True, True, False, False]
    assert allowed[1].tolist() == [False, False, True, True, True, True, False, False]
    # groups of 4: score = sum of the two best of the four
    allowed = group_limited_mask(select, num_groups=2, num_limited=1)
    assert allowed[0].tolist() == [True] * 4 + [False] * 4  # 0.9+0.3 > 0.8+0.4


def test_router_picks_top_k_inside_the_limited_groups():
    cfg = MoEConfig(dim=4, hidden_dim=4, num_experts=8, top_k=2, num_expert_groups=4, num_limited_groups=1,
                    score_func="sigmoid")
    layer = MoE(cfg)
    route = layer.router(torch.randn(64, 4))
    groups = route.expert_ids // 2  # [T, k]
    assert torch.equal(groups[:, 0], groups[:, 1])  # both experts of a token in its one group


def test_capacity_is_the_ceiling():
    assert capacity(1.25, 10, 2, 8) == 4  # ceil(3.125)
    assert capacity(1.0, 8, 2, 4) == 4
    # exact on the factor as written: in floating point 1.1 * 100 * 2 / 4 is 55.000000000000007
    assert capacity(1.1, 100, 2, 4) == 55 and capacity(1.1, 200, 2, 8) == 55 and capacity(1.1, 101, 2, 4) == 56


def test_capacity_drops_the_lowest_scores_and_breaks_ties_by_token():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    scores = torch.tensor([[0.5, 0.3], [0.7, 0.9], [0.5, 0.4], [0.6, 0.2]])
    keep = capacity_keep(ids, scores, num_experts=3, limit=2)
    # expert 0: t1 (0.7) and t0 (0.5; ties t2, lower token wins); expert 1: t3 (0.6), t2 (0.4); expert 2: t1
    assert keep.tolist() == [[True, False], [True, True], [False, True], [True, False]]


def test_expert_dropout_mask_depends_on_the_global_index_only():
    salt = (12345, 678)
    whole = expert_dropout_mask(torch.arange(1000), 8, 0.25, salt)
    part = expert_dropout_mask(torch.arange(300, 700), 8, 0.25, salt)
    assert torch.equal(whole[300:700], part)  # the same token has the same mask on any rank
    assert abs(whole.float().mean().item() - 0.25) < 0.02
    assert not torch.equal(whole, expert_dropout_mask(torch.arange(1000), 8, 0.25, (12346, 678)))


def test_jitter_noise_depends_on_the_global_index_only():
    """The same token gets bitwise the same noise in any batch (whichever rank holds it, at any
    position); the noise fills [1 - eps, 1 + eps] evenly, differs between tokens and between a
    token's features, and changes with the salt."""
    index = torch.arange(1000, 1000 + 4099)  # an odd count: the vectorized body and the scalar tail both run
    noise = jitter_noise(index, 37, 0.25, (11, 22))  # [T, 37]
    assert torch.equal(jitter_noise(index[1001:1005], 37, 0.25, (11, 22)), noise[1001:1005])
    assert torch.equal(jitter_noise(index.flip(0), 37, 0.25, (11, 22)), noise.flip(0))
    assert noise.dtype == torch.float32 and float(noise.min()) >= 0.75 and float(noise.max()) <= 1.25
    u = ((noise - 0.75) / 0.5).flatten()  # uniform in [0, 1)
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert torch.histc(u, bins=10, min=0, max=1).div(u.numel()).sub(0.1).abs().max() < 0.01
    features = torch.corrcoef(noise.T).fill_diagonal_(0)  # [37, 37] over 4099 tokens
    assert float(features.abs().max()) < 0.1, float(features.abs().max())  # every pair of features (an
    # earlier form, frac(a_t * f_d + b_t), had pairs of features at 0.99)
    assert abs(float(torch.corrcoef(torch.stack([noise[:-1, 0], noise[1:, 0]]))[0, 1])) < 0.05  # neighbour tokens
    assert not torch.equal(jitter_noise(index, 37, 0.25, (11, 23)), noise)


def test_expert_dropout_changes_training_routing_only():
    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=8, top_k=2, expert_dropout=0.5))
    plain = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=8, top_k=2))
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(32, 8)
    layer.eval(), plain.eval()
    assert torch.equal(layer(x), plain(x))
    layer.train(), plain.train()
    assert not torch.equal(layer(x), plain(x))


def test_update_expert_bias_moves_toward_the_mean_load():
    layer = MoE(MoEConfig(dim=4, hidden_dim=4, num_experts=4, top_k=1, expert_bias=True, bias_update_rate=0.1))
    layer.bias_load = torch.tensor([3, 1, 2, 2])  # mean 2
    assert ep_fsdp.update_expert_bias(layer) == 1
    assert layer.router.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])
    assert ep_fsdp.update_expert_bias(layer) == 0  # nothing recorded since: unchanged
    layer.train()
    layer(torch.randn(10, 4))
    assert int(layer.bias_load.sum()) == 10  # one selected slot per token


@pytest.mark.parametrize("options,match", [
    (dict(num_expert_groups=3, num_limited_groups=1), "num_expert_groups must be a positive divisor of num_experts=8"),
    (dict(num_expert_groups=4, num_limited_groups=5), r"num_limited_groups must be in 1..num_expert_groups=4, got 5"),
    (dict(num_expert_groups=4, num_limited_groups=1, top_k=3), r"top_k=3 > num_limited_groups \* experts per group"),
    (dict(num_expert_groups=4), "set both"),
    (dict(bias_update_rate=0.01), "needs expert_bias=True"),
    (dict(capacity_factor=0.0), "capacity_factor must be > 0 or None"),
    (dict(capacity_factor=-1.0), "capacity_factor must be > 0 or None"),
    (dict(expert_dropout=1.0), r"expert_dropout must be in \[0, 1\)"),
    (dict(num_shared_experts=-1), "num_shared_experts must be an int >= 0"),
])
def test_config_errors(options, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(dim=8, hidden_dim=8, num_experts=8, top_k=options.pop("top_k", 2), **options)
