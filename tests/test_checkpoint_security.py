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


@pytest.mark.parametrize("content", ["[]", "null", '"x"', "MALFORMED_STEP", "MISSING_FILE", "TRUNCATED", "NESTED"])
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
    elif content == "NESTED":  # deeper than json's recursion limit
        meta_file.write_text("[" * 100_000 + "]" * 100_000)
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
    with pytest.raises(UnsafeCheckpointError, match="tries to set the state of type"):
        safe_metadata_load(crafted, "crafted/.metadata")
    assert not hasattr(PurePosixPath, "injected")


def test_metadata_cannot_change_objects_of_the_process():
    """BUILD on an enum member or a function the allow-list reaches would change it for the whole
    process, even though the file is refused afterwards (a later save would write unreadable metadata)."""
    import pickle

    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING
    from torch.serialization import _get_layout

    from ep_fsdp.checkpoint._safe import safe_metadata_load

    member = _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT
    value, cache = member._value_, getattr(_get_layout, "cache", None)
    enum_build = (b"\x80\x02ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\n"
                  + pickle.dumps((member.value,), protocol=2)[2:-1] + b"R}X\x07\x00\x00\x00_value_X\x05\x00\x00\x00pwnedsb.")
    function_build = b"\x80\x02ctorch.serialization\n_get_layout\n}X\x05\x00\x00\x00cache}sb."
    for crafted in (enum_build, function_build):
        with pytest.raises(UnsafeCheckpointError, match="tries to set the state of"):
            safe_metadata_load(crafted, "crafted/.metadata")
    assert member._value_ == value and getattr(_get_layout, "cache", None) is cache


def _rename_storage(path: Path, name: str) -> None:
    """Point every entry of DCP's metadata at storage file ``name`` (a copy of the real shard)."""
    import pickle
    import shutil

    from ep_fsdp.checkpoint._safe import safe_metadata_load

    md = safe_metadata_load((path / ".metadata").read_bytes(), "x")
    shard = sorted(path.glob("*.distcp"))[0]
    target = Path(name) if Path(name).is_absolute() else path / name
    shutil.copy(shard, target)
    for info in md.storage_data.values():
        info.relative_path = name
    (path / ".metadata").write_bytes(pickle.dumps(md))
    reseal(path)


@pytest.mark.parametrize("where", ["outside", "absolute", "unlisted"])
def test_storage_files_the_manifest_does_not_check_are_refused(saved, tmp_path, where):
    """DCP's metadata names the files the tensors are read from: one outside the directory, or
    one ep_fsdp.json does not list (so no CRC32 covers it), is never read."""
    path, model, opt = saved
    name = {"outside": "../outside.distcp", "absolute": str(tmp_path / "abs.distcp"), "unlisted": "copy.distcp"}[where]
    _rename_storage(path, name)
    before = [p.detach().clone() for p in model.parameters()]
    for call in (lambda: ckpt.load(path, model, opt), lambda: ckpt.load(path, model),
                 lambda: ckpt.export_safetensors(path, tmp_path / "export")):
        with pytest.raises(UnsafeCheckpointError, match="names a storage file outside the checkpoint"):
            call()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert info_main(["info", str(path)]) == 2


def test_a_fifo_in_place_of_a_file_is_refused_not_waited_on(tmp_path):
    """(In a child process with a timeout: a reader that waits on the FIFO must fail the test, not hang it.)"""
    import os
    import subprocess
    import sys

    os.mkfifo(tmp_path / "shard.distcp")
    code = f"""
from ep_fsdp.checkpoint import CheckpointLoadError
from ep_fsdp.checkpoint._io import MappedFiles
try:
    MappedFiles({str(tmp_path)!r}).view("shard.distcp")
except CheckpointLoadError as e:
    print(e)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "not a regular file" in run.stdout, (run.stdout, run.stderr[-2000:])


def test_an_archive_in_another_byte_order_is_decoded_by_a_copy():
    """torch 2.13 kills the process when it byte-swaps a storage on the meta device: each archive's
    own byte order is read first (in a child process: a crash must fail the test, not the run)."""
    import subprocess
    import sys

    code = """
import io, zipfile, torch
from ep_fsdp.checkpoint._io import archive_tensor
buf = io.BytesIO(); torch.save(torch.arange(6, dtype=torch.int32), buf)
src, out = zipfile.ZipFile(io.BytesIO(buf.getvalue())), io.BytesIO()
with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
    for info in src.infolist():
        data = src.read(info)
        if info.filename.endswith("/data/0"):
            data = torch.arange(6, dtype=torch.int32).numpy().byteswap().tobytes()
        z.writestr(info.filename, b"big" if info.filename.endswith("byteorder") else data)
print(archive_tensor(memoryview(out.getvalue()), "crafted").tolist())
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[0, 1, 2, 3, 4, 5]", run.stdout


def test_a_tensor_declaring_more_elements_than_its_record_holds_is_refused():
    """A stride of 0 would let a 4-byte record stand for 1 GiB, allocated by the first copy."""
    from ep_fsdp.checkpoint import CheckpointLoadError
    from ep_fsdp.checkpoint._io import _Layout, _view

    layout = _Layout(start=0, nbytes=4, dtype=torch.float32, shape=(16384, 16384), stride=(0, 0), offset=0)
    with pytest.raises(CheckpointLoadError, match="overlapping strides"):
        _view(memoryview(bytearray(4)), layout)


def _edit_record(path: Path, edit) -> None:
    meta = json.loads((path / METADATA_FILE).read_text())
    edit(meta)
    meta["meta_crc32"] = metadata_crc32(meta)
    (path / METADATA_FILE).write_text(json.dumps(meta))


def _first_layer(meta: dict) -> dict:
    return next(iter(meta["moe_layers"].values()))


@pytest.mark.parametrize("edit, message", [
    (lambda m: _first_layer(m).update(placement=[0, 1]), "placement is"),
    (lambda m: _first_layer(m).update(expert_params="w1"), "expert_params is"),
    (lambda m: _first_layer(m).update(expert_params=[next(k for k in m["params"] if "experts" not in k)]),
     "one row per expert"),
    (lambda m: _first_layer(m)["placement"].update(ranks=[0]), "placement is"),
    (lambda m: _first_layer(m).update(expert_owner={"ep_rank": 0}), "expert_owner is"),
    (lambda m: m["files"].update({"../elsewhere.distcp": {"bytes": 1, "crc32": 0}}), "could point outside"),
])
def test_the_records_loads_read_are_checked_before_anything_is_copied(saved, edit, message):
    path, model, opt = saved
    _edit_record(path, edit)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        ckpt.load(path, model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_export_checks_the_record_against_dcps_metadata(saved, tmp_path):
    """export writes each header from ep_fsdp.json and the bytes from DCP: they must agree."""
    from ep_fsdp.checkpoint import CheckpointLoadError

    path, _, _ = saved
    key = next(iter(json.loads((path / METADATA_FILE).read_text())["params"]))
    _edit_record(path, lambda m: m["params"][key].update(dtype="int32"))
    with pytest.raises(CheckpointLoadError, match="records .* as .* int32, DCP's metadata as"):
        ckpt.export_safetensors(path, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_an_extra_the_manifest_does_not_list_is_not_read(saved):
    path, model, _ = saved
    _edit_record(path, lambda m: m["files"].pop("extra/rank_00000.pt"))
    assert ckpt.load(path, model)["extra"] is None


@pytest.mark.parametrize("index", ["OUTSIDE", "ABSOLUTE", "{not json", '{"weights": {}}', '{"weight_map": []}'])
def test_a_hub_index_is_checked(saved, tmp_path, index):
    path, model, _ = saved
    out = tmp_path / "export"
    ckpt.export_safetensors(path, out)
    index_file = out / "model.safetensors.index.json"
    if index in ("OUTSIDE", "ABSOLUTE"):
        record = json.loads(index_file.read_text())
        elsewhere = "../other/model.safetensors" if index == "OUTSIDE" else str(tmp_path / "other.safetensors")
        record["weight_map"] = {k: elsewhere for k in record["weight_map"]}
        index_file.write_text(json.dumps(record))
    else:
        index_file.write_text(index)
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json"):
        ckpt.load_safetensors(model, out)


def test_manifest_names_written_on_windows_still_load(saved):
    """Before names were written with "/", a Windows save recorded "extra\\\\rank_00000.pt"."""
    path, model, _ = saved
    _edit_record(path, lambda m: m["files"].update({"extra\\rank_00000.pt": m["files"].pop("extra/rank_00000.pt")}))
    assert ckpt.latest(path.parent) == path
    extra = ckpt.load(path, model)["extra"]
    assert torch.equal(extra["rng"], torch.load(path / "extra" / "rank_00000.pt", weights_only=True)["rng"])


def test_info_checks_the_metadata_crc_before_unpickling(saved, capsys):
    path, _, _ = saved
    data = bytearray((path / ".metadata").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / ".metadata").write_bytes(bytes(data))  # the manifest keeps the old CRC32
    assert info_main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert ".metadata is corrupted (CRC32" in err and "Traceback" not in err
