"""Damaged or unusual checkpoints and exports, single process: the metadata's own CRC and
structure, unreadable neighbours, dtypes and 0-dim tensors in safetensors, a model that is itself
one MoE layer, and tied weights through ``materialize``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import ep_fsdp
import ep_fsdp.checkpoint as ckpt
from ep_fsdp.checkpoint import _dcp
from ep_fsdp.checkpoint._format import METADATA_FILE, metadata_crc32

CFG = ep_fsdp.MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2)


class WithExtras(nn.Module):
    """One MoE layer plus extra tensors of chosen dtypes (parameters if floating, else buffers)."""

    def __init__(self, extras: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.moe = ep_fsdp.MoE(CFG)
        for name, value in extras.items():
            if value.is_floating_point():
                setattr(self, name, nn.Parameter(value.clone()))
            else:
                self.register_buffer(name, value.clone())


def _saved(tmp_path: Path, model: nn.Module | None = None) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = model or ep_fsdp.MoE(CFG)
    ckpt.save(tmp_path / "ck", model, step=3)
    return tmp_path / "ck", model


def _edit(path: Path, change, reseal: bool) -> None:
    meta = json.loads((path / METADATA_FILE).read_text())
    change(meta)
    if reseal:
        meta["meta_crc32"] = metadata_crc32(meta)
    else:
        meta.pop("meta_crc32", None)  # as written before the record had its own CRC
    (path / METADATA_FILE).write_text(json.dumps(meta))


def test_a_changed_but_valid_placement_is_caught_by_the_metadata_crc(tmp_path):
    path, model = _saved(tmp_path)
    meta = json.loads((path / METADATA_FILE).read_text())
    assert meta["meta_crc32"] == metadata_crc32(meta)
    # experts 0 and 1 swapped: still a permutation, so only the CRC can tell
    raw = (path / METADATA_FILE).read_text().replace('"physical": [\n     0,\n     1,', '"physical": [\n     1,\n     0,')
    assert raw != (path / METADATA_FILE).read_text()
    (path / METADATA_FILE).write_text(raw)
    with pytest.raises(ValueError, match=r"ep_fsdp.json is corrupted \(its content does not match its meta_crc32"):
        ckpt.load(path, ep_fsdp.MoE(CFG))
    assert ckpt.list_checkpoints(tmp_path) == [] and ckpt.latest(tmp_path) is None
    with pytest.raises(ValueError, match="meta_crc32"):
        ckpt.export_safetensors(path, tmp_path / "hf")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["moe_layers"][""]["placement"].update(physical=[0, 1, 2, 2]),
         r"placement.physical is \[0, 1, 2, 2\], expected a permutation of range\(4\)"),
        (lambda m: m["moe_layers"][""]["placement"].update(physical=[0, 1, 2]),
         r"placement.physical is \[0, 1, 2\], expected a permutation of range\(4\)"),
        (lambda m: m["params"]["experts.w1"].update(dtype="float17"),
         r"params\['experts.w1'\].dtype is 'float17', expected a torch dtype name"),
        (lambda m: m["params"]["experts.w1"].update(shape=[4, "16", 8]),
         r"params\['experts.w1'\].shape is \[4, '16', 8\], expected a list of ints >= 0"),
    ],
    ids=["duplicate-expert", "short-permutation", "dtype", "shape"],
)
def test_metadata_without_its_crc_is_still_checked_for_structure(tmp_path, change, message):
    path, _ = _saved(tmp_path)
    _edit(path, change, reseal=False)
    with pytest.raises(ValueError, match=message):
        ckpt.load(path, ep_fsdp.MoE(CFG))
    assert ckpt.latest(tmp_path) is None


def test_metadata_written_before_the_crc_existed_still_loads(tmp_path):
    path, model = _saved(tmp_path)
    _edit(path, lambda m: None, reseal=False)
    fresh = ep_fsdp.MoE(CFG)
    ckpt.load(path, fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_an_unreadable_neighbour_neither_hides_checkpoints_nor_fails_a_committed_save(tmp_path, monkeypatch):
    path, model = _saved(tmp_path)
    (tmp_path / "lost+found").mkdir()
    original = _dcp.is_complete

    def is_complete(d: Path) -> bool:  # what a directory this process may not enter does
        if d.name == "lost+found":
            raise PermissionError(13, "Permission denied", str(d / METADATA_FILE))
        return original(d)

    monkeypatch.setattr(_dcp, "is_complete", is_complete)
    assert ckpt.latest(tmp_path) == path
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        ckpt.save(tmp_path / "ck2", model, step=4, keep_last=1)
    assert not [w for w in warned if "keep_last" in str(w.message)]  # listing skipped the unreadable one
    assert ckpt.list_checkpoints(tmp_path) == [tmp_path / "ck2"] and not path.exists()


@pytest.mark.parametrize(
    "extra",
    [torch.tensor(2.5), torch.zeros(0, 3), torch.randn(3, 3).to(torch.float8_e4m3fn),
     torch.randn(3, 3).to(torch.float8_e5m2), torch.tensor([1, 2, 60000], dtype=torch.uint16),
     torch.tensor([1, 2**31 + 5], dtype=torch.uint32)],
    ids=["0-dim", "empty", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32"],
)
def test_export_and_load_round_trip_every_safetensors_dtype_and_rank(tmp_path, extra):
    path, model = _saved(tmp_path, WithExtras({"extra": extra}))
    ckpt.export_safetensors(path, tmp_path / "hf")
    fresh = WithExtras({"extra": torch.zeros_like(extra)})
    ckpt.load_safetensors(fresh, tmp_path / "hf")
    for key, value in model.state_dict().items():
        got = fresh.state_dict()[key]
        assert got.dtype == value.dtype and got.shape == value.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), key  # bitwise


def test_export_of_a_dtype_safetensors_lacks_is_refused_up_front(tmp_path):
    path, _ = _saved(tmp_path, WithExtras({"phase": torch.randn(2, dtype=torch.complex64)}))
    with pytest.raises(ValueError, match=r"safetensors has no dtype for 1 tensors, e\.g\. \{'phase': 'complex64'\}"):
        ckpt.export_safetensors(path, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no partial directory left


def test_a_failed_export_leaves_no_partial_directory(tmp_path, monkeypatch):
    path, _ = _saved(tmp_path)
    from ep_fsdp.checkpoint import _safetensors

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_safetensors, "_write_tensor", broken)
    with pytest.raises(OSError, match="No space left"):
        ckpt.export_safetensors(path, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_model_that_is_one_moe_layer_exports_per_expert_keys(tmp_path):
    path, model = _saved(tmp_path)
    ckpt.export_safetensors(path, tmp_path / "hf")
    (file,) = sorted((tmp_path / "hf").glob("*.safetensors"))
    tensors = load_file(file)
    experts = {f"experts.{j}.{p}.weight" for j in range(4) for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(tensors) == experts | {"router.gate.weight"}
    assert torch.equal(tensors["experts.2.up_proj.weight"], model.experts.w3[2])
    fresh = ep_fsdp.MoE(CFG)
    ckpt.load_safetensors(fresh, tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.moe = ep_fsdp.MoE(CFG)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight


def test_materialize_keeps_tied_weights_tied_and_initializes_them_once():
    names: list[str] = []

    def init(name: str, t: torch.Tensor, g: torch.Generator) -> None:
        names.append(name)
        nn.init.normal_(t, generator=g)

    with torch.device("meta"):
        model = Tied()
    ep_fsdp.materialize(model, "cpu", init_fn=init)
    assert model.head.weight is model.emb.weight and model.emb.weight.device.type == "cpu"
    assert "emb.weight" in names and "head.weight" not in names
    assert len(names) == len(set(names))


def test_a_checkpoint_of_another_model_is_a_mismatch_not_damage(tmp_path):
    path, _ = _saved(tmp_path)
    other = ep_fsdp.MoE(ep_fsdp.MoEConfig(dim=8, hidden_dim=16, num_experts=8, top_k=2))
    with pytest.raises(ckpt.CheckpointMismatchError, match="was saved from a different model"):
        ckpt.load(path, other)
    with pytest.raises(ckpt.CheckpointMismatchError, match="holds no optimizer state"):
        ckpt.load(path, ep_fsdp.MoE(CFG), torch.optim.SGD(ep_fsdp.MoE(CFG).parameters(), lr=0.1))
    assert issubclass(ckpt.CheckpointMismatchError, ValueError)  # what it was before it had a name


def test_metadata_with_non_string_keys_reads_back(tmp_path):
    """JSON turns keys into strings, which may sort otherwise: the CRC is that of what is read."""
    torch.manual_seed(0)
    ckpt.save(tmp_path / "ck", ep_fsdp.MoE(CFG), metadata={"per_layer_lr": {i: 0.1 for i in range(12)}})
    assert ckpt.read_metadata(tmp_path / "ck")["user"]["per_layer_lr"]["11"] == 0.1
    assert ckpt.latest(tmp_path) == tmp_path / "ck"
