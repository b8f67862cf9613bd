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
from ep_fsdp.checkpoint._format import METADATA_FILE, file_crc32, metadata_crc32
from test_parity import build


class Evil:
    """Unpickling this creates ``marker`` (stands in for any code an attacker would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def reseal(path: Path) -> None:
    """Make ep_fsdp.json's sizes and CRCs (and its own CRC) match the (tampered) files."""
    meta = json.loads((path / METADATA_FILE).read_text())
    for name in meta["files"]:
        f = path / name
        meta["files"][name] = {"bytes": f.stat().st_size, "crc32": file_crc32(f)}
    meta["meta_crc32"] = metadata_crc32(meta)
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


@pytest.mark.parametrize("content", ["[]", "null", '"x"', "MALFORMED_STEP", "MISSING_FILE", "TRUNCATED"])
def test_latest_skips_what_does_not_verify(saved, tmp_path, content, capsys):
    path, model, opt = saved
    older = tmp_path / "older"
    ckpt.save(older, model, step=0)
    meta_file = path / METADATA_FILE
    if content == "MALFORMED_STEP":
        meta = json.loads(meta_file.read_text())
        meta["step"] = "one"
        meta_file.write_text(json.dumps(meta))
    elif content == "MISSING_FILE":
        (path / ".metadata").unlink()
    elif content == "TRUNCATED":
        shard = sorted(path.glob("*.distcp"))[0]
        shard.write_bytes(shard.read_bytes()[:-10])
    else:
        meta_file.write_text(content)
    assert ckpt.latest(tmp_path) == older  # never crashes, never picks the broken one
    assert info_main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_a_checkpoint_being_deleted_is_never_taken_for_complete(saved, tmp_path):
    path, model, _ = saved
    doomed = path.with_name(f".{path.name}.deleting")
    path.rename(doomed)  # what keep_last does first; a kill right after leaves this
    (doomed / "__0_0.distcp").unlink()
    assert ckpt.latest(tmp_path) is None
    ckpt.save(path, model, step=2)  # the name is free again
    assert ckpt.latest(tmp_path) == path


def test_saving_over_a_broken_directory_moves_it_aside(saved, tmp_path):
    path, model, _ = saved
    (path / ".metadata").unlink()  # not a usable checkpoint any more
    ckpt.save(path, model, step=3)
    assert ckpt.read_metadata(path)["step"] == 3
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.broken-")]
    assert len(kept) == 1 and (kept[0] / METADATA_FILE).is_file()  # nothing is lost
    with pytest.raises(FileExistsError, match="never overwritten"):
        ckpt.save(path, model, step=4)  # a good checkpoint is never replaced


def test_metadata_cannot_modify_an_allowed_class():
    from pathlib import PurePosixPath

    from ep_fsdp.checkpoint._safe import safe_metadata_load

    crafted = b"cpathlib\nPurePosixPath\n}S'injected'\nI1\nsb."  # BUILD on the class itself
    with pytest.raises(UnsafeCheckpointError, match="tries to modify the class PurePosixPath"):
        safe_metadata_load(crafted, "crafted/.metadata")
    assert not hasattr(PurePosixPath, "injected")
