"""Models built on the meta device: parallelized, then materialized shard by shard.

A meta-built model materialized on any layout holds the same values as the unparallelized model
materialized with the same seed, and once loaded with a CPU-built model's weights it trains
bitwise like the CPU-built parallel model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

import ep_fsdp
from dist_pool import worker_mesh
from parity_utils import full
from test_parity import batch, build, loss_fn


def meta_case(dp_shard: int, ep: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = worker_mesh(dp_shard, ep)
    with torch.device("meta"):
        meta = build("transformer")
    ep_fsdp.parallelize_moe(meta, mesh)
    assert all(p.is_meta for p in meta.parameters())  # parallelize_moe allocated nothing
    ep_fsdp.materialize(meta, "cpu", seed=3)
    local_numel = sum(p.to_local().numel() for p in meta.parameters())
    with torch.device("meta"):
        plain = build("transformer")
    ep_fsdp.materialize(plain, "cpu", seed=3)
    same_init = all(torch.equal(full(p), q.detach()) for p, q in zip(meta.parameters(), plain.parameters()))
    distinct_shards = not torch.equal(*full(meta.get_parameter("tok_embeddings.weight")).chunk(2))

    torch.manual_seed(0)
    cpu = build("transformer")
    weights = copy.deepcopy(cpu.state_dict())
    ep_fsdp.parallelize_moe(cpu, mesh)
    set_model_state_dict(meta, weights, options=StateDictOptions(full_state_dict=True))
    buffers_equal = all(torch.equal(a, b) for a, b in zip(meta.buffers(), cpu.buffers()))
    x, y = batch("transformer", 4 * world, seed=1)
    per = x.shape[0] // world
    out = {}
    for key, model in (("meta", meta), ("cpu", cpu)):
        loss, _ = loss_fn(model, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
        loss.backward()
        out[key] = (float(loss), [full(p.grad) for p in model.parameters()])
    return {
        "same_init": same_init,
        "distinct_shards": distinct_shards,
        "local_fraction": local_numel / sum(p.numel() for p in plain.parameters()),
        "buffers_equal": buffers_equal,
        "loss_equal": out["meta"][0] == out["cpu"][0],
        "grads_equal": all(torch.equal(a, b) for a, b in zip(out["meta"][1], out["cpu"][1])),
    }


@pytest.mark.parametrize("layout", [(2, 2), (1, 4)], ids=lambda l: f"dp{l[0]}xep{l[1]}")
def test_meta_build_materializes_shards_and_trains_like_cpu_build(pools, layout):
    for r in pools(4).run(meta_case, *layout):
        assert r["same_init"], "layout-dependent initialization"
        assert r["distinct_shards"]
        assert r["local_fraction"] <= 0.3  # about 1/4 of the model per rank (plus padding)
        assert r["buffers_equal"]
        assert r["loss_equal"] and r["grads_equal"]


def test_materialize_needs_an_init_for_every_parameter():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), ep_fsdp.MoE(ep_fsdp.MoEConfig(dim=4, hidden_dim=4, num_experts=2)))
    with pytest.raises(ValueError, match=r"materialize: no init for parameter '0.weight'.*pass init_fn="):
        ep_fsdp.materialize(model, "cpu")
    ep_fsdp.materialize(model, "cpu", init_fn=lambda name, t, g: torch.nn.init.normal_(t, std=0.1, generator=g))
    assert all(not p.is_meta and torch.isfinite(p).all() for p in model.parameters())
    # the MoE layer's own init_parameter needs no init_fn; to_empty's garbage bias is zeroed
    with torch.device("meta"):
        layer = ep_fsdp.MoE(ep_fsdp.MoEConfig(dim=4, hidden_dim=9, num_experts=2, expert_bias=True))
    ep_fsdp.materialize(layer, "cpu", seed=1)
    assert float(layer.experts.w2.abs().max()) <= 1 / 3 and float(layer.experts.w2.abs().max()) > 0
    assert torch.equal(layer.router.expert_bias, torch.zeros(2))


def test_the_models_own_init_scheme_wins_over_the_layers_default():
    from ep_fsdp.models import MoETransformer, TransformerConfig

    cfg = TransformerConfig(vocab_size=64, dim=64, num_layers=2, num_heads=4, max_seq_len=16,
                            moe=ep_fsdp.MoEConfig(dim=64, hidden_dim=96, num_experts=8, top_k=2))
    with torch.device("meta"):
        model = MoETransformer(cfg)
    ep_fsdp.materialize(model, "cpu", seed=0)
    w1 = model.get_parameter("layers.1.feed_forward.experts.w1")
    w2 = model.get_parameter("layers.1.feed_forward.experts.w2")
    assert abs(float(w1.std()) - 0.02) < 0.002  # the transformer's normal(0.02), not MoE's uniform(1/8)
    assert abs(float(w2.std()) - 0.02 / 2) < 0.001  # output projections scaled by depth
    assert torch.equal(model.layers[0].attention_norm.weight, torch.ones(64))


@pytest.mark.parametrize("bad, message", [
    ({"seed": 1.5}, "seed must be an int, got 1.5"), ({"seed": True}, "seed must be an int, got True"),
    ({"init_fn": "normal"}, "init_fn must be callable"), ({"device": "gpu"}, "device='gpu' is not a device"),
])
def test_materialize_arguments_are_checked_before_anything_is_allocated(bad, message):
    with torch.device("meta"):
        model = build("net")
    kwargs = {"device": "cpu", **bad}
    with pytest.raises(ValueError, match=message):
        ep_fsdp.materialize(model, kwargs.pop("device"), **kwargs)
    assert all(p.is_meta for p in model.parameters())


def test_transformers_buffers_are_recomputed():
    """to_empty leaves buffers uninitialized; a transformers model's (rotary inv_freq, DeepSeek-V3's
    e_score_correction_bias) are recomputed by its own _init_weights, its parameters kept."""
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from ep_fsdp.hf._model import build_on_meta

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
    from hf_tiny_model import tiny_config

    cfg = tiny_config("deepseek_v3", hidden=32)
    model = build_on_meta(cfg, torch.float32)
    init = lambda name, t, g: torch.nn.init.normal_(t, std=0.02, generator=g)  # noqa: E731
    ep_fsdp.materialize(model, "cpu", init_fn=init, seed=5)
    again = build_on_meta(cfg, torch.float32)
    ep_fsdp.materialize(again, "cpu", init_fn=init, seed=5)
    ref = dict(AutoModelForCausalLM.from_config(cfg).named_buffers())
    buffers = dict(model.named_buffers())
    assert {"model.rotary_emb.inv_freq"} <= set(buffers) and any("e_score_correction_bias" in n for n in buffers)
    for name, value in ref.items():
        assert torch.equal(buffers[name], value), name
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name  # the seeded init, not _init_weights' own
