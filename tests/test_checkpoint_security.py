"""Loading a checkpoint never executes code from it: a crafted ``.metadata``, ``extra`` file or
optimizer param-group entry (each a pickle that would create a file when unpickled) is refused by
load, resume (load with an optimizer), export and info, and the file is never created. The
checkpoints are re-sealed (sizes and CRCs in ep_fsdp.json updated) so that only the unpickling
stands between the attacker and the process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn

import ep_fsdp.checkpoint as ckpt
from ep_fsdp.checkpoint import UnsafeCheckpointError
from ep_fsdp.checkpoint.__main__ import main as info_main
from ep_fsdp.checkpoint._dcp import _app_state, _quiet_single_process
from ep_fsdp.checkpoint._format import METADATA_FILE, file_crc32
from test_parity import build


class Evil:
    """Unpickling this creates ``marker`` (stands in for any code an attacker would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def reseal(path: Path) -> None:
    """Make ep_fsdp.json's sizes and CRCs match the (tampered) files."""
    meta = json.loads((path / METADATA_FILE).read_text())
    for name in meta["files"]:
        f = path / name
        meta["files"][name] = {"bytes": f.stat().st_size, "crc32": file_crc32(f)}
    (path / METADATA_FILE).write_text(json.dumps(meta))


@pytest.fixture()
def saved(tmp_path) -> tuple[Path, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build("net")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    path = tmp_path / "ckpt"
    ckpt.save(path, model, opt, step=1, extra={"rng": torch.get_rng_state()})
    return path, model, opt


def refused_everywhere(path: Path, model: nn.Module, opt: torch.optim.Optimizer, marker: Path,
                       tmp_path: Path, *, by_info: bool) -> None:
    with pytest.raises(UnsafeCheckpointError):
        ckpt.load(path, model, opt)  # resume
    assert not marker.exists()
    if by_info:
        with pytest.raises(UnsafeCheckpointError):
            ckpt.load(path, model)
        with pytest.raises(UnsafeCheckpointError):
            ckpt.export_safetensors(path, tmp_path / "export")
        assert info_main(["info", str(path)]) == 2
    assert not marker.exists()


def test_crafted_dcp_metadata_is_refused(saved, tmp_path):
    path, model, opt = saved
    marker = tmp_path / "pwned-metadata"
    import pickle

    (path / ".metadata").write_bytes(pickle.dumps(Evil(marker)))
    reseal(path)
    refused_everywhere(path, model, opt, marker, tmp_path, by_info=True)


def test_crafted_extra_is_refused(saved, tmp_path, capsys):
    path, model, opt = saved
    marker = tmp_path / "pwned-extra"
    torch.save({"rng": Evil(marker)}, path / "extra" / "rank_00000.pt")
    reseal(path)
    with pytest.raises(UnsafeCheckpointError, match=r"rank_00000\.pt holds a type"):
        ckpt.load(path, model)
    assert not marker.exists()


def test_crafted_param_group_is_refused(saved, tmp_path):
    path, model, opt = saved
    marker = tmp_path / "pwned-param-group"
    state = _app_state(model, opt)
    state["optim"]["param_groups"][0]["lr"] = Evil(marker)
    for f in path.glob("*.distcp"):
        f.unlink()
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(path), no_dist=True)
    reseal(path)
    with pytest.raises(UnsafeCheckpointError, match="param_groups"):
        ckpt.load(path, model, opt)
    assert not marker.exists()
    ckpt.load(path, model)  # the model alone reads no pickled entry: still loads


def test_an_honest_checkpoint_still_loads_with_its_extra(saved):
    path, model, opt = saved
    meta = ckpt.load(path, model, opt)
    assert torch.equal(meta["extra"]["rng"], torch.load(path / "extra" / "rank_00000.pt", weights_only=True)["rng"])
    assert info_main(["info", str(path)]) == 0


def test_a_second_async_save_before_wait_is_an_error(tmp_path):
    torch.manual_seed(0)
    model = build("net")
    first = ckpt.save(tmp_path / "a", model, async_save=True)
    with pytest.raises(RuntimeError, match=r"asynchronous save of .*a is still in flight; call its wait\(\)"):
        ckpt.save(tmp_path / "b", model)
    assert first.wait() == tmp_path / "a"
    ckpt.save(tmp_path / "b", model)  # after wait(): fine
    assert ckpt.latest(tmp_path) == tmp_path / "b"
