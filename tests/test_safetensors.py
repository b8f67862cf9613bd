"""Safetensors export (names, values, completeness, streaming) and the sliced load."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import ep_fsdp.checkpoint as ckpt
from ckpt_utils import make_model, make_parallel
from dist_pool import worker_mesh  # noqa: F401 - imported for the workers
from ep_fsdp.checkpoint import _safetensors

E, H, D = 8, 48, 32
MOE = "layers.1.feed_forward"


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "model"
    # small shards so that the export spans several files
    ckpt.export_safetensors(Path(source, "step_2"), out, max_shard_bytes=64 * 1024)
    return out


def test_export_names_shapes_and_values(source, exported):
    ref = torch.load(Path(source, "reference.pt"))["state"]
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    tensors: dict[str, torch.Tensor] = {}
    for f in files:  # the official reader validates the format
        tensors.update(load_file(exported / f))
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    dense = {n.removeprefix("param/") for n in ref if n.startswith("param/") and ".experts." not in n}
    dense |= {n.removeprefix("buffer/") for n in ref if n.startswith("buffer/")}
    experts = {f"{MOE}.experts.{j}.{p}.weight" for j in range(E) for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(tensors) == dense | experts  # complete: every expert of every layer, nothing else
    for j in range(E):
        for w, proj, shape in (("w1", "gate_proj", (H, D)), ("w3", "up_proj", (H, D)), ("w2", "down_proj", (D, H))):
            t = tensors[f"{MOE}.experts.{j}.{proj}.weight"]
            assert t.shape == shape
            assert torch.equal(t, ref[f"param/{MOE}.experts.{w}"][j])  # bitwise
    for name in dense:
        key = f"param/{name}" if f"param/{name}" in ref else f"buffer/{name}"
        assert torch.equal(tensors[name], ref[key]), name


def test_export_streams_one_tensor_at_a_time(source, tmp_path, monkeypatch):
    live: list[tuple[str, weakref.ref]] = []
    most = 0
    original = _safetensors._read_slabs
    reads: list[str] = []

    def tracking(reader, key):
        nonlocal most
        slabs = original(reader, key)
        reads.append(key)
        live[:] = [(k, r) for k, r in live if r() is not None]
        live.extend((key, weakref.ref(t)) for t in slabs)
        most = max(most, len({k for k, _ in live}))
        return slabs

    monkeypatch.setattr(_safetensors, "_read_slabs", tracking)
    ckpt.export_safetensors(Path(source, "step_2"), tmp_path / "out")
    assert most == 1  # the pieces of one tensor at a time
    assert sorted(reads) == sorted(ckpt.read_metadata(Path(source, "step_2"))["params"])  # each read once


def test_export_refuses_existing_target(source, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken already exists; choose a new directory"):
        ckpt.export_safetensors(Path(source, "step_2"), target)
    assert (target / "keep.txt").read_text() == "mine"


def test_export_refuses_damaged_checkpoint(tmp_path):
    ckpt.save(tmp_path / "c", make_model(), step=1)
    shard = next((tmp_path / "c").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"export_safetensors: checkpoint .* is damaged: __0_0\.distcp has"):
        ckpt.export_safetensors(tmp_path / "c", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def sliced_load(exported: str, source: str, dp_shard: int, ep: int) -> dict:
    """Load the export into a parallelized model, recording every slice read."""
    reads: list[tuple[str, int]] = []

    class Recorder:
        def __init__(self, inner):
            self.inner = inner

        def __getitem__(self, index):
            t = self.inner[index]
            reads.append((self.name, t.numel()))
            return t

        def get_shape(self):
            return self.inner.get_shape()

        def get_dtype(self):
            return self.inner.get_dtype()

    real_open = _safetensors.safe_open

    class RecordingOpen:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def get_slice(self, name):
            r = Recorder(self.f.get_slice(name))
            r.name = name
            return r

    _safetensors.safe_open = RecordingOpen
    try:
        model, _ = make_parallel(dp_shard, ep, seed=99)
        ckpt.load_safetensors(model, exported)
    finally:
        _safetensors.safe_open = real_open
    from ckpt_utils import capture

    ref = torch.load(Path(source, "reference.pt"))["state"]
    got = capture(model, None)
    mismatched = [n for n in got if not torch.equal(got[n], ref[n])]
    local_numel = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.state_dict().values()
    )
    ep_rank = dist.get_rank() % ep
    experts_read = sorted({int(n.split(".experts.")[1].split(".")[0]) for n, _ in reads if ".experts." in n})
    return {"mismatched": mismatched, "experts_read": experts_read, "ep_rank": ep_rank,
            "numel_read": sum(n for _, n in reads), "local_numel": local_numel}


@pytest.mark.parametrize("layout", [(2, 2), (1, 4), (4, 1), (1, 2)], ids=lambda l: f"dp{l[0]}xep{l[1]}")
def test_sliced_load_reads_only_owned_slices(pools, source, exported, layout):
    dp_shard, ep = layout
    for r in pools(dp_shard * ep).run(sliced_load, str(exported), source, dp_shard, ep):
        assert r["mismatched"] == []  # round trip is bitwise
        g = E // ep
        owned = set(range(r["ep_rank"] * g, (r["ep_rank"] + 1) * g))
        assert set(r["experts_read"]) <= owned, (r["experts_read"], owned)
        assert r["numel_read"] == r["local_numel"]  # exactly this rank's shards, nothing more


def test_load_into_plain_model(source, exported):
    model = make_model(seed=3)
    ckpt.load_safetensors(model, exported)
    ref = torch.load(Path(source, "reference.pt"))["state"]
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), ref[f"param/{name}"]), name


def test_load_refuses_other_model(exported):
    with pytest.raises(ValueError, match=r"does not match the model, nothing was loaded: 24 tensors missing \(e\.g\. \['layers\.1\.feed_forward\.experts\.10\.down_proj\.weight'"):
        ckpt.load_safetensors(make_model(num_experts=16), exported)
    with pytest.raises(FileNotFoundError, match=r"has no model.safetensors.index.json and no \*.safetensors file"):
        ckpt.load_safetensors(make_model(), exported.parent)


def _tamper(exported: Path, out: Path, change) -> Path:
    """A copy of the export with one tensor changed by ``change(name, tensor)``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(exported, out)
    for f in out.glob("*.safetensors"):
        tensors = load_file(f)
        for name in sorted(tensors)[-1:]:  # the last tensor of each file: loaded after the others
            tensors[name] = change(name, tensors[name])
        save_file(tensors, f)
    return out


def test_load_is_all_or_nothing(exported, tmp_path):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad_shape = _tamper(exported, tmp_path / "shape", lambda n, t: torch.zeros(t.shape[0] + 1, *t.shape[1:], dtype=t.dtype))
    with pytest.raises(ValueError, match=r"nothing was loaded: .* has shape"):
        ckpt.load_safetensors(model, bad_shape)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    for dtype in (torch.int64, torch.bfloat16, torch.float64):
        bad_dtype = _tamper(exported, tmp_path / str(dtype), lambda n, t: t.to(dtype))
        with pytest.raises(ValueError, match=r"is (I64|BF16|F64) in the files, the model holds F32.*allow_cast=True"):
            ckpt.load_safetensors(model, bad_dtype)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ckpt.load_safetensors(model, _tamper(exported, tmp_path / "f64", lambda n, t: t.double()), allow_cast=True)


def shared_verdict(exported: str, bad: str) -> str:
    """Rank 0 reads a damaged copy, the others the good one: every rank must raise."""
    model, _ = make_parallel(2, 2, seed=99)
    try:
        ckpt.load_safetensors(model, bad if dist.get_rank() == 0 else exported)
    except ValueError as e:
        return str(e)
    return "loaded"


def test_ranks_share_the_verdict(pools, exported, tmp_path):
    bad = _tamper(exported, tmp_path / "bad", lambda n, t: torch.zeros(t.shape[0] + 1, *t.shape[1:], dtype=t.dtype))
    results = pools(4).run(shared_verdict, str(exported), str(bad))
    assert all("nothing was loaded" in r for r in results), results
