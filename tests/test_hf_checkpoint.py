"""transformers models: ``ep_fsdp.hf.from_pretrained`` with sliced reads, DCP checkpoints that reshard,
and the export back to a directory transformers loads."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ep_fsdp
from dist_pool import worker_mesh
from parity_utils import REL_TOL, full, rel_err

pytest.importorskip("transformers")
import ep_fsdp.hf  # noqa: E402  (the optional extra under test)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
import hf_tiny_model  # noqa: E402

SEQ = 10


@pytest.fixture(scope="module")
def hub_dirs(tmp_path_factory) -> dict[str, str]:
    """save_pretrained directories: per-expert keys (Qwen3-MoE, Qwen2-MoE, DeepSeek-V3), legacy names
    (Mixtral), fused (GPT-OSS)."""
    root = tmp_path_factory.mktemp("hub")
    out = {}
    for family in hf_tiny_model.FAMILIES:
        out[family] = str(root / family)
        hf_tiny_model.main([out[family], "--family", family, "--hidden", "32", "--seed", "1"])
    return out


def _batch(world: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 256, (2 * world, SEQ), generator=torch.Generator().manual_seed(seed))


def load_and_compare(directory: str, dp_shard: int, ep: int) -> dict:
    from transformers import AutoModelForCausalLM

    rank, world = dist.get_rank(), dist.get_world_size()
    model = ep_fsdp.hf.from_pretrained(directory, worker_mesh(dp_shard, ep))
    ref = AutoModelForCausalLM.from_pretrained(directory)
    x = _batch(world)[2 * rank:2 * rank + 2]
    model.eval(), ref.eval()
    with torch.no_grad():
        err = rel_err(model(x).logits, ref(x).logits)
    buffers = {n: b for n, b in ref.named_buffers()}
    stats = model.ep_fsdp_load_stats
    return {
        "logits": err,
        "params": max(rel_err(full(p), dict(ref.named_parameters())[n]) for n, p in model.named_parameters()),
        "buffers": max(rel_err(b, buffers[n]) for n, b in model.named_buffers()),
        "bytes_read": stats.bytes_read, "local_bytes": stats.local_bytes, "full_bytes": stats.full_bytes,
        "full_reads": stats.full_reads,
    }


@pytest.mark.parametrize("family", hf_tiny_model.FAMILIES)
@pytest.mark.parametrize("layout", [(2, 2), (1, 4)], ids=lambda l: f"dp{l[0]}xep{l[1]}")
def test_from_pretrained_reads_only_this_ranks_slices(pools, hub_dirs, family, layout):
    for r in pools(4).run(load_and_compare, hub_dirs[family], *layout):
        assert r["logits"] <= REL_TOL and r["params"] == 0.0 and r["buffers"] == 0.0, r
        assert not r["full_reads"], r["full_reads"]
        # every byte read is a byte this rank keeps: a quarter of the model, not all of it
        assert r["bytes_read"] == r["local_bytes"], r
        assert r["bytes_read"] * 3 < r["full_bytes"], r


def test_from_pretrained_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        ep_fsdp.hf.from_pretrained(tmp_path, mesh=None)  # type: ignore[arg-type]


def _tiny(**overrides) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(hf_tiny_model.tiny_config("qwen3_moe", **overrides))


@pytest.mark.parametrize(
    "saved, loaded, edit, message",
    [
        # per-expert tensors of another width: their stack would be cut (or overrun) to fit the model's
        (dict(moe_intermediate_size=32), {}, None,
         r"experts.down_proj is \(8, 32, 16\) \(8 experts of \(32, 16\)\), the files' per-expert tensors do not make it"),
        ({}, dict(moe_intermediate_size=32), None, r"the files' per-expert tensors do not make it"),
        # only the per-expert tensors in bf16, which the stacked parameter would silently cast
        ({}, {}, "bf16_experts", r"the per-expert tensors of model.layers.0.mlp.experts.\w+ are \['BF16'\]"),
        # more layers in the files than the model has
        (dict(layers=3), {}, None, r"tensors in the files map to no parameter of the model, e.g. \['model.layers.2."),
    ],
    ids=["wider-files", "narrower-files", "bf16-experts", "extra-layers"],
)
def test_load_safetensors_checks_stacked_experts_before_any_copy(tmp_path, saved, loaded, edit, message):
    from safetensors.torch import load_file, save_file

    _tiny(**saved).save_pretrained(tmp_path / "hub")
    if edit == "bf16_experts":
        for f in (tmp_path / "hub").glob("*.safetensors"):
            tensors = {k: v.bfloat16() if ".experts." in k else v for k, v in load_file(f).items()}
            save_file(tensors, f, metadata={"format": "pt"})
    model = _tiny(**loaded)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="nothing was loaded: .*" + message):
        ep_fsdp.checkpoint.load_safetensors(model, tmp_path / "hub")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_hub_tensors_the_model_does_not_use_are_a_warning_for_from_pretrained_loads(tmp_path):
    _tiny(layers=3).save_pretrained(tmp_path / "hub")
    source = _tiny(layers=3).state_dict()
    model = _tiny(layers=2)
    with pytest.warns(UserWarning, match=r"tensors of .* map to no parameter of Qwen3MoeForCausalLM and were not loaded"):
        ep_fsdp.hf.load_hub_weights(model, tmp_path / "hub")
    for key, value in model.state_dict().items():  # the shared layers are loaded
        assert torch.equal(value, source[key]), key


def test_a_directory_without_an_index_reads_what_transformers_reads(tmp_path):
    """Without an index: model.safetensors alone when it exists (as transformers), not the last
    file in name order (a model_ema.safetensors of zeros was loaded, silently); with no
    model.safetensors, a tensor in two files is an error naming both."""
    from safetensors.torch import load_file, save_file

    hub = tmp_path / "hub"
    _tiny().save_pretrained(hub)
    source = load_file(hub / "model.safetensors")
    save_file({k: torch.zeros_like(v) for k, v in source.items()}, hub / "model_ema.safetensors", metadata={"format": "pt"})
    model = _tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ep_fsdp.checkpoint.load_safetensors(model, hub)
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items() if k in source)
    (hub / "model.safetensors").rename(hub / "a.safetensors")
    with pytest.raises(ValueError, match=r"is in both a.safetensors and model_ema.safetensors in .*, which has no "
                                         r"model.safetensors.index.json to say which one to read"):
        ep_fsdp.checkpoint.load_safetensors(_tiny(), hub)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    model.train()
    out = model(x, labels=x)
    loss = out.loss + ep_fsdp.moe_aux_loss(model)
    loss.backward()
    opt.step()
    opt.zero_grad()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


def train_save_reshard_export(directory: str, root: str) -> dict:
    """(2,2): step 1, save, step 2. (1,4): load the checkpoint with the optimizer, step 2. Rank 0
    exports the checkpoint; transformers loads the export and must give the saved model's logits."""
    from transformers import AutoModelForCausalLM

    from ep_fsdp import checkpoint as ckpt

    rank, world = dist.get_rank(), dist.get_world_size()
    x1, x2 = (_batch(world, s)[2 * rank:2 * rank + 2] for s in (11, 12))
    a = ep_fsdp.hf.from_pretrained(directory, worker_mesh(2, 2))
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-3)
    _step(a, opt_a, x1)
    ckpt.save(f"{root}/step1", a, opt_a, step=1)
    a.eval()
    with torch.no_grad():
        saved_logits = a(x2).logits
    loss_a = _step(a, opt_a, x2)

    b = ep_fsdp.hf.from_pretrained(directory, worker_mesh(1, 4))
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-3)
    meta = ckpt.load(f"{root}/step1", b, opt_b)
    loss_b = _step(b, opt_b, x2)
    params = max(rel_err(full(p), full(q)) for p, q in zip(a.parameters(), b.parameters()))

    if rank == 0:
        ckpt.export_safetensors(f"{root}/step1", f"{root}/hf")
    dist.barrier()
    exported = AutoModelForCausalLM.from_pretrained(f"{root}/hf").eval()
    with torch.no_grad():
        export_err = rel_err(exported(x2).logits, saved_logits)
    files = sorted(p.name for p in Path(f"{root}/hf").iterdir())
    from ep_fsdp.checkpoint.__main__ import info

    text = info(Path(f"{root}/step1"))
    return {"loss_a": loss_a, "loss_b": loss_b, "params": params, "export": export_err, "files": files,
            "has_config": "transformers" in ckpt.read_metadata(f"{root}/step1"), "layers": sorted(meta["moe_layers"]), "info": text}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_checkpoint_reshards_and_exports_to_transformers(pools, hub_dirs, family, tmp_path):
    results = pools(4).run(train_save_reshard_export, hub_dirs[family], str(tmp_path))
    for r in results:
        assert r["has_config"] and r["layers"], r
        assert abs(r["loss_a"] - r["loss_b"]) <= REL_TOL * abs(r["loss_a"]), r
        assert r["params"] <= REL_TOL, r
        assert r["export"] <= REL_TOL, r
        assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= set(r["files"]), r
        assert "transformers " in r["info"] and "experts ep0: 0-3, ep1: 4-7" in r["info"], r["info"]


def bf16_step(directory: str) -> dict:
    """from_pretrained in bf16 of a family that keeps its router in float32 (DeepSeek-V3's
    _keep_in_fp32_modules): the router gets an FSDP unit of its own, and a training step runs."""
    model = ep_fsdp.hf.from_pretrained(directory, worker_mesh(1, 2), torch_dtype=torch.bfloat16)
    model.train()
    x = _batch(2)[2 * dist.get_rank():2 * dist.get_rank() + 2]
    loss = model(x, labels=x).loss + ep_fsdp.moe_aux_loss(model)
    loss.backward()
    dtypes = {str(p.dtype) for n, p in model.named_parameters() if "mlp.gate." in n}
    return {"loss": float(loss), "router_dtypes": dtypes,
            "grads": all(p.grad is not None for p in model.parameters() if p.requires_grad)}


def test_bf16_model_with_a_float32_router_trains(pools, hub_dirs):
    for r in pools(2).run(bf16_step, hub_dirs["deepseek_v3"]):
        assert r["router_dtypes"] == {"torch.float32"} and r["grads"] and r["loss"] == r["loss"], r


def load_plain_checkpoint(directory: str, root: str) -> dict:
    """A checkpoint of the plain transformers model (no expert-parallel layers recorded, experts in
    logical order) into the model parallelized, whose experts were moved first: the placement goes
    back to the default and every weight equals the plain model's."""
    from transformers import AutoModelForCausalLM

    rank, world = dist.get_rank(), dist.get_world_size()
    model = ep_fsdp.hf.from_pretrained(directory, worker_mesh(1, world))
    ep_fsdp.rebalance_experts(model, load=[8, 7, 6, 5, 4, 3, 2, 1])
    moved = ep_fsdp.expert_placement(model)
    meta = ep_fsdp.checkpoint.load(f"{root}/plain", model)
    plain = AutoModelForCausalLM.from_pretrained(f"{root}/hf_plain").eval()
    x = _batch(world)[2 * rank:2 * rank + 2]
    model.eval()
    with torch.no_grad():
        logits = rel_err(model(x).logits, plain(x).logits)
    ref = dict(plain.named_parameters())
    return {"moved": moved, "placement": ep_fsdp.expert_placement(model), "logits": logits,
            "params": max(rel_err(full(p), ref[n]) for n, p in model.named_parameters()),
            "saved_layers": meta["moe_layers"]}


def test_a_plain_transformers_checkpoint_loads_into_the_model_parallelized(pools, hub_dirs, tmp_path):
    import ep_fsdp.checkpoint as ckpt

    plain = _tiny()  # another init than the hub directory's
    plain.save_pretrained(tmp_path / "hf_plain")
    ckpt.save(tmp_path / "plain", plain, step=0)
    for r in pools(2).run(load_plain_checkpoint, hub_dirs["qwen3_moe"], str(tmp_path)):
        assert r["saved_layers"] == {}, r
        assert any(ranks != sorted(ranks) for ranks in r["moved"].values()), r  # moved before the load
        assert all(ranks == sorted(ranks) for ranks in r["placement"].values()), r  # logical order again
        assert r["params"] == 0.0 and r["logits"] <= REL_TOL, r


@pytest.mark.parametrize("dtype", ["bf16", 16, "int8"])
def test_from_pretrained_names_a_bad_torch_dtype(hub_dirs, dtype):
    with pytest.raises(ValueError, match=r"torch_dtype is .*; pass a floating torch\.dtype"):
        ep_fsdp.hf.from_pretrained(hub_dirs["qwen3_moe"], mesh=None, torch_dtype=dtype)  # type: ignore[arg-type]


def auto_dtype(directory: str) -> str:
    model = ep_fsdp.hf.from_pretrained(directory, worker_mesh(1, 1), torch_dtype="auto")
    return str(next(model.parameters()).dtype)


def test_from_pretrained_auto_dtype_is_the_configs(pools, hub_dirs):
    assert pools(1).run(auto_dtype, hub_dirs["qwen3_moe"])[0] == "torch.float32"


def float16_dtypes(directory: str) -> dict:
    """Every parameter's dtype after from_pretrained in float16 (ep = 2), and transformers' own."""
    from transformers import AutoModelForCausalLM

    model = ep_fsdp.hf.from_pretrained(directory, worker_mesh(1, 2), torch_dtype=torch.float16)
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float16)
    ours = {n: str(p.dtype) for n, p in model.named_parameters()}
    return {"ours": ours, "ref": {n: str(p.dtype) for n, p in ref.named_parameters() if n in ours}}


def test_float16_keeps_what_transformers_keeps_in_float32(pools, hub_dirs):
    """GPT-OSS keeps its norms in float32 under float16 (_keep_in_fp32_modules): the model built on
    meta lost that list, and the norms were rounded to float16 (logits 5e-4 off transformers')."""
    r = pools(2).run(float16_dtypes, hub_dirs["gpt_oss"])[0]
    assert r["ours"] == r["ref"], {n: (d, r["ref"][n]) for n, d in r["ours"].items() if d != r["ref"][n]}
    assert "torch.float32" in r["ours"].values() and "torch.float16" in r["ours"].values()


def test_a_failed_transformers_export_leaves_no_partial_directory(tmp_path, monkeypatch):
    """As the plain export: a write error half-way (here the second file) removes .NAME.partial,
    which held up to the model's size of orphaned files."""
    from ep_fsdp.hf import _export

    ep_fsdp.checkpoint.save(tmp_path / "ck", _tiny(), step=0)
    real, calls = _export.save_file, []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(_export, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ep_fsdp.checkpoint.export_safetensors(tmp_path / "ck", tmp_path / "hf", max_shard_bytes=30_000)
    assert len(calls) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_expert_and_index_mismatches_name_what_is_wrong(tmp_path):
    """An expert the model does not have is named (the message listed the first 8 experts found,
    which all looked right); an index naming the wrong file for a tensor names the file and the
    index (safetensors' error named neither)."""
    import json

    from safetensors.torch import load_file, save_file

    hub = tmp_path / "hub"
    _tiny().save_pretrained(hub)
    tensors = load_file(hub / "model.safetensors")
    extra = "model.layers.0.mlp.experts.8.gate_proj.weight"
    tensors[extra] = tensors["model.layers.0.mlp.experts.0.gate_proj.weight"].clone()
    save_file(tensors, hub / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"has 8 experts; for 'mlp.experts.\*.gate_proj.weight' the files hold "
                                         r"experts beyond them \[8\]"):
        ep_fsdp.checkpoint.load_safetensors(_tiny(), hub)

    sharded = tmp_path / "sharded"
    _tiny().save_pretrained(sharded, max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    key = next(k for k, f in index["weight_map"].items() if f != files[0] and ".experts." in k)
    index["weight_map"][key] = files[0]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{files[0]} has no tensor '{re.escape(key)}', though the directory's "
                                         "index maps it there"):
        ep_fsdp.checkpoint.load_safetensors(_tiny(), sharded)


def test_a_tied_lm_head_in_the_float32_list_stays_tied(monkeypatch):
    """transformers re-ties an lm_head its float32 list names (HYV4 lists lm_head) to the
    embedding; the meta model had made it a float32 copy, untied and never loaded."""
    from ep_fsdp.hf._model import build_on_meta, model_class_for

    config = hf_tiny_model.tiny_config("qwen3_moe", tie_word_embeddings=True)
    monkeypatch.setattr(model_class_for(config), "_keep_in_fp32_modules_strict", ["lm_head"], raising=False)
    model = build_on_meta(config, torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.bfloat16
