"""Distributed checkpoints: resharding matrix (parameters and optimizer state, bitwise), exact
resume, per-rank extra state, atomic commit, damaged and foreign checkpoints, the info command."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ep_fsdp
import ep_fsdp.checkpoint as ckpt
from dist_pool import worker_mesh
from parity_utils import REL_TOL, rel_err
from ckpt_utils import SOURCE_LAYOUT, bitwise_diff, capture, make_model, make_parallel, train_step

def load_into_layout(root: str, dp_shard: int, ep: int) -> dict:
    model, opt = make_parallel(dp_shard, ep, seed=123)  # different init: everything must come from disk
    meta = ckpt.load(f"{root}/step_2", model, opt)
    ref = torch.load(f"{root}/reference.pt")
    diff = bitwise_diff(capture(model, opt), ref["state"])
    loss3 = train_step(model, opt, 3)
    return {"diff": diff, "meta_step": meta["step"], "layout": meta["layout"], "extra": meta["extra"],
            "loss3": loss3, "ref_loss3": ref["losses"][2]}


def test_source_checkpoints_are_complete(source):
    assert ckpt.list_checkpoints(source) == [Path(source, "step_1"), Path(source, "step_2")]
    assert ckpt.latest(source) == Path(source, "step_2")
    meta = json.loads(Path(source, "step_2", "ep_fsdp.json").read_text())
    assert meta["layout"] == {"world_size": 4, "dp_shard": 2, "ep": 2, "parallelized": True}
    owners = meta["moe_layers"]["layers.1.feed_forward"]["expert_owner"]
    assert owners == [{"ep_rank": 0, "experts": [0, 1, 2, 3]}, {"ep_rank": 1, "experts": [4, 5, 6, 7]}]
    placement = meta["moe_layers"]["layers.1.feed_forward"]["placement"]
    assert placement == {"ep": 2, "ranks": [0, 0, 0, 0, 1, 1, 1, 1], "physical": list(range(8))}
    assert meta["params"]["layers.1.feed_forward.experts.w1"]["shape"] == [8, 48, 32]
    assert meta["versions"]["torch"] == torch.__version__
    assert sorted(meta["extra_ranks"]) == [0, 1, 2, 3]
    assert not any(p.name.endswith(".partial") for p in Path(source).iterdir())


@pytest.mark.parametrize("layout", [(2, 2), (1, 4), (4, 1), (1, 2), (2, 1), (1, 1)], ids=lambda l: f"dp{l[0]}xep{l[1]}")
def test_load_reshards_bitwise(pools, source, layout):
    results = pools(layout[0] * layout[1]).run(load_into_layout, source, *layout)
    for rank, r in enumerate(results):
        assert r["diff"] == [], f"rank {rank}: differs after load: {r['diff'][:5]}"
        assert r["meta_step"] == 2
        assert r["layout"]["world_size"] == 4 and r["layout"]["ep"] == 2
        if layout[0] * layout[1] == 4:
            assert r["extra"]["rank"] == rank  # each rank gets its own extra back
        if layout == SOURCE_LAYOUT:
            assert r["loss3"] == r["ref_loss3"]  # resumed training is bitwise the same
        else:
            assert abs(r["loss3"] - r["ref_loss3"]) <= 1e-5 * abs(r["ref_loss3"])


def test_load_into_plain_model_without_process_group(source):
    assert not dist.is_initialized()
    model = make_model(seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    meta = ckpt.load(Path(source, "step_2"), model, opt)
    ref = torch.load(Path(source, "reference.pt"))
    assert bitwise_diff(capture(model, opt), ref["state"]) == []
    assert meta["extra"]["rank"] == 0
    assert torch.equal(meta["extra"]["rng"], ckpt.load(Path(source, "step_2"), make_model())["extra"]["rng"])


def test_async_checkpoint_loads(source):
    model = make_model(seed=9)
    meta = ckpt.load(Path(source, "step_1"), model)
    assert meta["step"] == 1 and meta["extra"] == {"rank": 0, "tag": "one"}


def test_info_command(source):
    out = subprocess.run(
        [sys.executable, "-m", "ep_fsdp.checkpoint", "info", str(Path(source, "step_2"))],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "saved on     world_size=4 dp_shard=2 ep=2" in out
    assert "step         2" in out
    # the options a model must be built with (those off their defaults), as a load's mismatch error asks
    assert ("moe layer    layers.1.feed_forward: E=8 k=2 D=32 H=48 softmax aux_loss_coef=0.01 expert_bias=True; "
            "default placement; experts ep0: 0-3, ep1: 4-7") in out
    assert f"torch {torch.__version__}" in out
    assert re.search(r"layers\.1\.feed_forward\.experts\.w1\s+float32\s+\[8, 48, 32\]", out)
    assert "on disk" in out


def test_info_prints_the_user_metadata(tmp_path):
    """The configuration a load's mismatch error asks for: the recipes store their train_config in
    save's metadata, and info prints it (before, it printed four options of each layer only)."""
    model = make_model()
    ckpt.save(tmp_path / "c", model, step=3, metadata={"train_config": {"model": {"dim": 32}, "seed": 7}})
    out = subprocess.run([sys.executable, "-m", "ep_fsdp.checkpoint", "info", str(tmp_path / "c")],
                         capture_output=True, text=True, check=True).stdout
    assert 'train_config: {"model": {"dim": 32}, "seed": 7}' in out
    assert "expert_bias=True" in out and "(unparallelized model)" in out
    ckpt.save(tmp_path / "d", model, step=3, metadata="run-5")  # any JSON value, not only a dict
    out = subprocess.run([sys.executable, "-m", "ep_fsdp.checkpoint", "info", str(tmp_path / "d")],
                         capture_output=True, text=True, check=True).stdout
    assert 'user metadata "run-5"' in out


def failing_save(root: str, where: str) -> str:
    """A save that fails on rank 1 (during the tensor write or the extra write)."""
    model, opt = make_parallel(1, 2)
    train_step(model, opt, 1)
    ckpt.save(f"{root}/good", model, opt, step=1)
    import torch.distributed.checkpoint.filesystem as fs

    from ep_fsdp.checkpoint import _dcp

    if dist.get_rank() == 1:
        if where == "tensors":
            original = fs.FileSystemWriter.write_data

            def broken(self, plan, planner):
                raise OSError("disk full (injected)")

            fs.FileSystemWriter.write_data = broken
        else:
            original = _dcp.torch.save

            def broken(*a, **k):
                raise OSError("disk full (injected)")

            _dcp.torch.save = broken
    try:
        ckpt.save(f"{root}/bad", model, opt, step=2, extra={"x": 1})
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        return f"{type(e).__name__}: {e}"
    finally:
        if dist.get_rank() == 1:
            if where == "tensors":
                fs.FileSystemWriter.write_data = original
            else:
                _dcp.torch.save = original
    return "no error"


@pytest.mark.parametrize("where", ["tensors", "extra"])
def test_failed_save_leaves_latest_on_previous(pools, tmp_path, where):
    results = pools(2).run(failing_save, str(tmp_path), where)
    assert all("disk full (injected)" in r for r in results), results
    assert ckpt.latest(tmp_path) == tmp_path / "good"
    assert not (tmp_path / "bad").exists()
    with pytest.raises(FileNotFoundError, match=r"A partial save exists at .*\.bad\.partial: that save did not finish"):
        ckpt.load(tmp_path / "bad", make_model())


def test_killed_save_leaves_no_checkpoint(tmp_path):
    """A single-process save SIGKILLed while writing tensors."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import torch.distributed.checkpoint.filesystem as fs
import ep_fsdp
import ep_fsdp.checkpoint as ckpt
from dist_pool import worker_mesh
from parity_utils import REL_TOL, rel_err
from ckpt_utils import make_model
model = make_model()
ckpt.save({str(tmp_path / 'good')!r}, model, step=1)
original = fs.FileSystemWriter.write_data
def dying(self, plan, planner):
    fut = original(self, plan, planner)
    fut.wait()
    os.kill(os.getpid(), signal.SIGKILL)
fs.FileSystemWriter.write_data = dying
ckpt.save({str(tmp_path / 'killed')!r}, model, step=2)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert (tmp_path / ".killed.partial").exists()  # tensors were written...
    assert ckpt.latest(tmp_path) == tmp_path / "good"  # ...but the checkpoint never became visible
    # a new save to the same name replaces the debris and succeeds
    ckpt.save(tmp_path / "killed", make_model(), step=2)
    assert ckpt.latest(tmp_path) == tmp_path / "killed"


def test_keep_last_prunes_old_checkpoints(tmp_path):
    model = make_model()
    for step in range(1, 5):
        ckpt.save(tmp_path / f"step_{step}", model, step=step, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_3", "step_4"]


def test_never_overwrites(tmp_path):
    model = make_model()
    ckpt.save(tmp_path / "a", model, step=1)
    before = sorted(os.listdir(tmp_path / "a"))
    with pytest.raises(FileExistsError, match="already exists; checkpoints are never overwritten"):
        ckpt.save(tmp_path / "a", model, step=2)
    assert sorted(os.listdir(tmp_path / "a")) == before


def test_bad_inputs_give_clear_errors(tmp_path):
    model = make_model()
    ckpt.save(tmp_path / "ok", model, step=1)
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nope does not exist\. Check the path"):
        ckpt.load(tmp_path / "nope", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not an ep_fsdp checkpoint"):
        ckpt.load(tmp_path / "empty", model)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        ckpt.load(tmp_path / "ok", model, torch.optim.AdamW(model.parameters()))


def test_incomplete_checkpoint_is_refused(tmp_path):
    model = make_model()
    ckpt.save(tmp_path / "x", model, step=1)
    os.remove(tmp_path / "x" / "ep_fsdp.json")
    with pytest.raises(ValueError, match="is incomplete: tensor files are there but ep_fsdp.json"):
        ckpt.load(tmp_path / "x", model)
    assert ckpt.latest(tmp_path) is None


def test_truncated_and_corrupted_files_are_detected(tmp_path):
    model = make_model()
    ckpt.save(tmp_path / "t", model, step=1)
    shard = next((tmp_path / "t").glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    fresh = make_model(seed=5)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=r"is damaged: __0_0\.distcp has \d+ bytes, expected \d+ \(truncated"):
        ckpt.load(tmp_path / "t", fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # untouched
    shard.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    with pytest.raises(ValueError, match=r"__0_0\.distcp is corrupted \(CRC32"):
        ckpt.load(tmp_path / "t", fresh)


def flip_byte(f: Path, at: float = 0.5) -> None:
    """Flip one bit of ``f`` at relative position ``at`` (its size stays the same)."""
    data = bytearray(f.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("verify_first", [False, True], ids=["checked_while_read", "verify_first"])
@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata", "extra/rank_00000.pt"])
def test_corrupted_file_is_named(tmp_path, name, verify_first):
    """A flipped bit anywhere fails the load with CheckpointCorruptError naming the file. DCP's
    index and the extras are checked before anything is read; a tensor file is checked in the same
    pass as its copy (the model may then hold its values), or before it with verify_first=True."""
    model = make_model()
    ckpt.save(tmp_path / "c", model, torch.optim.AdamW(model.parameters()), step=1,
              extra={"rng": torch.get_rng_state()})
    flip_byte(tmp_path / "c" / name)
    fresh = make_model(seed=5)
    opt = torch.optim.AdamW(fresh.parameters())
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    damaged = rf"is damaged: {re.escape(name)} is corrupted \(CRC32 0x[0-9a-f]{{8}}, expected 0x[0-9a-f]{{8}}\)"
    where = re.escape(str(tmp_path / "c"))
    with pytest.raises(ckpt.CheckpointCorruptError, match=rf"^load: checkpoint {where} {damaged}") as info:
        ckpt.load(tmp_path / "c", fresh, opt, verify_first=verify_first)
    assert isinstance(info.value, ckpt.CheckpointLoadError) and isinstance(info.value, ValueError)
    if verify_first or not name.endswith(".distcp"):
        assert "Nothing was read into the model" in str(info.value)
        assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # untouched
        assert len(opt.state) == 0
    else:
        assert "the model and optimizer may hold values from it now; load an earlier checkpoint" in str(info.value)
    with pytest.raises(ckpt.CheckpointCorruptError, match=f"export_safetensors: checkpoint .* {damaged}"):
        ckpt.export_safetensors(tmp_path / "c", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_manifest_crcs_are_the_files_crcs(source):
    """The CRC32s taken while DCP writes (asynchronous save of step 1, synchronous of step 2) are
    those of the bytes on disk."""
    for step in ("step_1", "step_2"):
        meta = json.loads(Path(source, step, "ep_fsdp.json").read_text())
        assert any(name.endswith(".distcp") for name in meta["files"])
        for name, rec in meta["files"].items():
            f = Path(source, step, name)
            assert rec == {"bytes": f.stat().st_size, "crc32": zlib.crc32(f.read_bytes())}, f"{step}/{name}"


def load_corrupted(path: str, dp_shard: int, ep: int, verify_first: bool) -> dict:
    model, opt = make_parallel(dp_shard, ep, seed=7)
    before = capture(model, None)
    try:
        ckpt.load(path, model, opt, verify_first=verify_first)
        error = None
    except ckpt.CheckpointCorruptError as e:
        error = str(e)
    untouched = bitwise_diff(capture(model, None), before) == []
    return {"error": error, "untouched": untouched, "optim_state": len(opt.state)}


@pytest.mark.parametrize("verify_first", [False, True], ids=["checked_while_read", "verify_first"])
@pytest.mark.parametrize("layout", [(2, 2), (1, 2)], ids=lambda l: f"dp{l[0]}xep{l[1]}")
def test_corrupted_shard_fails_every_rank(pools, source, tmp_path, layout, verify_first):
    """One rank checks a file's CRC32 (rank 3 on the saving layout, rank 1 of 2 otherwise, which
    does not read all of it); every rank raises. With verify_first, no rank's shards or optimizer
    state were written."""
    bad = tmp_path / "bad"
    shutil.copytree(Path(source, "step_2"), bad)
    flip_byte(bad / "__3_0.distcp", at=0.7)
    results = pools(layout[0] * layout[1]).run(load_corrupted, str(bad), *layout, verify_first)
    for rank, r in enumerate(results):
        assert re.search(r"is damaged: __3_0\.distcp is corrupted \(CRC32", r["error"] or ""), (rank, r)
        if verify_first:
            assert r["untouched"] and r["optim_state"] == 0, (rank, r)


def test_load_verifying_first_matches(source):
    """verify_first reads the same values (plain model, no process group)."""
    model = make_model(seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ckpt.load(Path(source, "step_2"), model, opt, verify_first=True)
    assert bitwise_diff(capture(model, opt), torch.load(Path(source, "reference.pt"))["state"]) == []


def test_archive_tensor_decodes_in_place():
    """Stored tensors are viewed where they lie: strides, storage offsets, 0-d, empty and bfloat16."""
    import io

    from ep_fsdp.checkpoint._io import ArchiveDecoder, archive_tensor, copy_into, native_byte_order

    base = torch.arange(40, dtype=torch.float32)
    cases = [base.reshape(5, 8).t(), base[3:17], torch.tensor(2.5), torch.zeros(0, 3),
             torch.randn(4, 6).to(torch.bfloat16), torch.arange(12).reshape(3, 4), torch.tensor([True, False])]
    cases += [c + 1 for c in cases[:2]] + [torch.randn(4, 6).to(torch.bfloat16)]  # same layouts, other values
    decode = ArchiveDecoder()  # decodes each distinct pickle once: the repeats reuse its layout
    for t in cases:
        buf = io.BytesIO()
        buf.write(b"x" * 5)  # an archive at an odd offset, as in a DCP file
        torch.save(t, buf)
        view = memoryview(bytearray(buf.getvalue()))[5:]
        assert native_byte_order(view)
        for got in (archive_tensor(view, "test"), archive_tensor(view, "test", in_place=False), decode(view, "test")):
            assert got.dtype == t.dtype and got.shape == t.shape and got.stride() == t.stride() and torch.equal(got, t)
        target = torch.empty_like(t)
        copy_into(target, archive_tensor(view, "test"))
        assert torch.equal(target, t)
    for decoder in (archive_tensor, decode):
        with pytest.raises(ckpt.CheckpointLoadError, match="broken.distcp: a stored tensor could not be decoded"):
            decoder(memoryview(bytearray(b"not an archive")), "broken.distcp")


def test_checkpoint_of_another_model_is_refused(tmp_path):
    ckpt.save(tmp_path / "e8", make_model(num_experts=8), step=1)
    with pytest.raises(ValueError) as info:
        ckpt.load(tmp_path / "e8", make_model(num_experts=4))
    msg = str(info.value)
    assert "was saved from a different model" in msg
    assert "layers.1.feed_forward.experts.w1: model [4, 48, 32] vs checkpoint [8, 48, 32]" in msg
    assert "layers.1.feed_forward.num_experts: model 4 vs checkpoint 8" in msg
    assert "python -m ep_fsdp.checkpoint info" in msg
    with pytest.raises(ValueError) as info:
        ckpt.load(tmp_path / "e8", make_model(dim=64))
    assert "layers.0.attention.wq.weight: model [64, 64] vs checkpoint [32, 32]" in str(info.value)
    assert "layers.1.feed_forward.dim: model 64 vs checkpoint 32" in str(info.value)
    from ep_fsdp.models import MoETransformer, TransformerConfig

    deeper = MoETransformer(TransformerConfig(vocab_size=64, dim=32, num_layers=3, num_heads=4, max_seq_len=16,
                                              num_dense_layers=1, moe=make_model().config.moe))
    with pytest.raises(ValueError, match=r"missing from checkpoint: \['layers\.2\."):
        ckpt.load(tmp_path / "e8", deeper)


def test_refused_load_leaves_optimizer_untouched_and_coefficients_may_change(tmp_path):
    saved = make_model(num_experts=8)
    ckpt.save(tmp_path / "e8", saved, torch.optim.AdamW(saved.parameters()), step=1)
    other = make_model(num_experts=4)
    opt = torch.optim.AdamW(other.parameters())
    with pytest.raises(ValueError, match="saved from a different model"):
        ckpt.load(tmp_path / "e8", other, opt)
    assert len(opt.state) == 0  # no state was created by the refused load
    # routing options and loss coefficients are not part of the model's identity
    from dataclasses import replace

    from ep_fsdp.models import MoETransformer

    base = make_model()
    cfg = replace(base.config, moe=replace(base.config.moe, aux_loss_coef=0.5, top_k=3, z_loss_coef=0.0))
    tuned = MoETransformer(cfg)
    assert ckpt.load(tmp_path / "e8", tuned)["step"] == 1
    assert torch.equal(tuned.layers[1].feed_forward.experts.w1, base.layers[1].feed_forward.experts.w1)


def uneven_round_trip(root: str) -> dict:
    """Experts sharded with padded Shard(0) (blocks [6, 6, 6] over dp_shard=4) save, and reshard
    bitwise into (2, 2) and into a plain model."""
    import torch.distributed as dist

    import ep_fsdp
    from dist_pool import worker_mesh
    from test_parity import build

    torch.manual_seed(0)
    model = build("net6-odd")
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    ep_fsdp.parallelize_moe(model, worker_mesh(4, 1))
    ckpt.save(f"{root}/uneven", model, step=1)
    other = build("net6-odd")
    ep_fsdp.parallelize_moe(other, worker_mesh(2, 2))
    ckpt.load(f"{root}/uneven", other)
    same = all(torch.equal(p.full_tensor(), ref[n]) for n, p in other.named_parameters())
    dist.barrier()
    return {"resharded_bitwise": same}


def test_uneven_expert_sharding_saves_and_reshards(pools, tmp_path):
    for r in pools(4).run(uneven_round_trip, str(tmp_path)):
        assert r["resharded_bitwise"]
    from test_parity import build

    plain = build("net6-odd")
    ckpt.load(tmp_path / "uneven", plain)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), build("net6-odd").state_dict().values()))


def async_group_timeout() -> tuple[float, float]:
    """The background saves' gloo group fails after the job's collective timeout, not gloo's 30 min."""
    from ep_fsdp.checkpoint._dcp import _async_group, _group_timeout

    default = dist.distributed_c10d._get_default_group()
    return _group_timeout(_async_group()).total_seconds(), _group_timeout(default).total_seconds()


def test_background_saves_use_the_jobs_collective_timeout(pools):
    for saves, job in pools(2).run(async_group_timeout):
        assert saves == job < 30 * 60


def wrapped_save_plain_load(root: str) -> dict:
    """A model whose MoE layer sits in an activation-checkpoint wrapper (module paths carry
    ``_checkpoint_wrapped_module``, state-dict keys do not), its experts moved: the checkpoint's
    records use the state-dict names, so it loads (into the model without the wrapper too) and
    latest() takes it."""
    import torch.nn as nn
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    def build_model(wrap: bool) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), ep_fsdp.MoE(ep_fsdp.MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2)))
        if wrap:
            model[1] = checkpoint_wrapper(model[1])
        ep_fsdp.parallelize_moe(model, worker_mesh(1, 2))
        return model

    wrapped = build_model(True)
    ep_fsdp.rebalance_experts(wrapped, load=[0, 1, 2, 3])  # a non-default placement
    ckpt.save(f"{root}/step_1", wrapped, step=1)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(dist.get_rank()))
    with torch.no_grad():
        expected = wrapped(x)
    plain = build_model(False)
    ckpt.load(f"{root}/step_1", plain)
    with torch.no_grad():
        got = plain(x)
    return {"latest": str(ckpt.latest(root)), "err": rel_err(got, expected),
            "moved": ep_fsdp.expert_placement(wrapped), "placement": ep_fsdp.expert_placement(plain)}


def test_checkpoints_of_wrapped_models_name_modules_as_the_state_dict(pools, tmp_path):
    for r in pools(2).run(wrapped_save_plain_load, str(tmp_path)):
        assert r["latest"].endswith("step_1"), r
        assert list(r["placement"].values()) == list(r["moved"].values()), r
        assert any(v != sorted(v) for v in r["moved"].values()), r
        assert r["err"] <= REL_TOL, r
