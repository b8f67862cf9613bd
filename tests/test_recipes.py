"""The recipes end to end, as a user runs them: torchrun subprocesses on CPU/gloo, bounded in time.

One uninterrupted run is the reference; the others must reproduce its losses: a run stopped and
resumed (bitwise), a run whose worker is SIGKILLed under ``torchrun --max-restarts`` (bitwise final
loss), a run resumed on another layout (close), and a two-agent multi-node launch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_pool import free_port

ROOT = Path(__file__).resolve().parent.parent
STEPS = 16
# small and fast: the tiny config with shorter sequences, a smaller corpus and frequent checkpoints
FAST = [
    "--steps", str(STEPS), "--log-every", "1", "--checkpoint-every", "4",
    "--set", "train.seq_len=64", "--set", "train.global_batch_size=8", "--set", "train.warmup_steps=4",
    "--set", "data.max_bytes=400000", "--set", "log.val_every=8", "--set", "log.val_batches=1",
]
TIMEOUT = 240


def torchrun(*args: str) -> list[str]:
    """A torchrun command; single-node launches get a free master port of their own (the default
    29500 would collide with any other job on the machine)."""
    own_port = not any(a.startswith(("--rdzv", "--master-port", "--nnodes")) for a in args)
    return [sys.executable, "-m", "torch.distributed.run", *(["--master-port", str(free_port())] if own_port else []),
            *args]


def train(out: Path, nproc: int, *extra: str, launcher: tuple[str, ...] = ()) -> str:
    cmd = torchrun("--nproc-per-node", str(nproc), *launcher, str(ROOT / "recipes" / "train.py"),
                   "--output-dir", str(out), *FAST, *extra)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def losses(out: Path) -> dict[int, float]:
    """Step -> loss; a step logged twice (after a restart) keeps its last value."""
    result = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line being written right now
            continue
        if "loss" in rec:  # (a skipped step also writes a record without it)
            result[rec["step"]] = rec["loss"]
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    train(out, 2, "--ep", "2")
    return out


def test_smoke_run_learns_and_writes_everything(reference):
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    first, last = records[0], records[-1]
    assert last["loss"] < first["loss"] - 1.0  # it learns (byte-level: from ~ln 256 down)
    for key in ("loss", "lr", "tokens_per_s", "step_time_s", "balance_loss", "z_loss", "load_imbalance",
                "peak_memory_mb", "a2a_bytes", "grad_norm", "expert_utilization"):
        assert key in last, key
    assert "val_loss" in records[7] and "val_loss" in last
    util = last["expert_utilization"]
    assert len(util) == 2 and all(len(u) == 8 and abs(sum(u) - 1) < 1e-9 for u in util.values())
    assert last["load_imbalance"] >= 1.0 and last["a2a_bytes"] > 0
    ckpts = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert ckpts == ["step_00000008", "step_00000012", "step_00000016"]  # keep_last=3
    assert json.loads((reference / "config.json").read_text())["train"]["steps"] == STEPS


def test_running_again_resumes_and_has_nothing_to_do(reference):
    out = train(reference, 2, "--ep", "2")
    assert "nothing to do: the newest checkpoint is already at step 16 of 16" in out


def test_stop_and_resume_is_bitwise(reference, tmp_path):
    train(tmp_path, 2, "--ep", "2", "--stop-after", "6")
    assert sorted(losses(tmp_path)) == list(range(1, 7))
    out = train(tmp_path, 2, "--ep", "2")
    assert "resumed from" in out and "at step 6" in out
    ref, got = losses(reference), losses(tmp_path)
    assert [got[s] for s in range(1, STEPS + 1)] == [ref[s] for s in range(1, STEPS + 1)]


def test_resume_on_another_layout(reference, tmp_path):
    train(tmp_path, 2, "--ep", "2", "--stop-after", "8")
    out = train(tmp_path, 4, "--ep", "4")
    assert "resumed from" in out and "saved on world=2 dp_shard=1 ep=2; now world=4 dp_shard=1 ep=4" in out
    ref, got = losses(reference), losses(tmp_path)
    for s in range(9, STEPS + 1):  # same data, same schedule; only the reduction order differs
        assert abs(got[s] - ref[s]) <= 1e-4 * abs(ref[s]), (s, got[s], ref[s])


def _train_fails(out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = torchrun("--nproc-per-node", str(nproc), str(ROOT / "recipes" / "train.py"), "--output-dir", str(out),
                   *FAST, *extra)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode != 0, proc.stdout[-2000:]
    return proc


def test_resume_from_an_older_checkpoint_sets_the_later_ones_aside(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    out = train(run, 2, "--ep", "2", "--resume-from", str(run / "checkpoints" / "step_00000008"))
    assert "at step 8" in out and "moved the later step_00000016 (step 16) aside to .step_00000016.superseded-" in out
    ref, got = losses(reference), losses(run)
    assert [got[s] for s in range(9, STEPS + 1)] == [ref[s] for s in range(9, STEPS + 1)]  # bitwise again
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "step_00000008", "step_00000012", "step_00000016"]  # saved again, the old ones kept aside
    assert len(list((run / "checkpoints").glob(".*.superseded-*"))) == 2


def test_resume_checks_settings_and_takes_the_new_optimizer_ones(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    # another model in this directory: an error naming the difference; nothing is renamed
    proc = _train_fails(run, 2, "--ep", "2", "--set", "model.num_layers=2")
    assert "was saved from a different model" in proc.stderr and "This run's config does not describe" in proc.stderr
    assert not list((run / "checkpoints").glob(".*"))
    # another data order on another layout: refused too
    proc = _train_fails(run, 1, "--ep", "1", "--seed", "7", "--steps", "18")
    assert "train.seed=7, but" in proc.stderr and "was saved with train.seed=0" in proc.stderr
    # more micro-batches per step and a new learning rate: both apply from the resumed step
    out = train(run, 2, "--ep", "2", "--steps", "17", "--set", "train.grad_accum_steps=2", "--set", "train.lr=1e-2")
    assert "changed settings (they apply from step 17): train.lr 0.003 -> 0.01" in out
    record = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["step"] == 17 and record["lr"] == pytest.approx(1e-2 * 0.1)  # the new lr's schedule, at its end


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def test_killed_worker_restarts_and_finishes_with_the_same_loss(reference, tmp_path):
    cmd = torchrun("--nproc-per-node", "2", "--max-restarts", "1", str(ROOT / "recipes" / "train.py"),
                   "--output-dir", str(tmp_path), *FAST, "--ep", "2")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    killed = None
    deadline = time.monotonic() + TIMEOUT
    try:
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            if (tmp_path / "checkpoints" / "step_00000004").exists():
                workers = _children(proc.pid)
                if workers:
                    killed = workers[-1]
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "the run ended before a worker could be killed"
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert "resumed from" in stdout  # the restarted workers picked up the newest checkpoint
    assert losses(tmp_path)[STEPS] == losses(reference)[STEPS]


def test_two_agent_multi_node_launch(tmp_path):
    port = free_port()
    launcher = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "ep_fsdp_test"]
    cmd = torchrun(*launcher, str(ROOT / "recipes" / "train.py"), "--output-dir", str(tmp_path), *FAST,
                   "--ep", "2", "--stop-after", "3")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
              for _ in range(2)]
    try:
        outputs = [a.communicate(timeout=TIMEOUT) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    assert [a.returncode for a in agents] == [0, 0], [o[1][-3000:] for o in outputs]
    assert any("world=2 dp_shard=1 ep=2" in o[0] for o in outputs)
    assert sorted(losses(tmp_path)) == [1, 2, 3]


def test_plot_renders_png(reference, tmp_path):
    png = tmp_path / "m.png"
    subprocess.run([sys.executable, str(ROOT / "recipes" / "plot.py"), str(reference / "metrics.jsonl"),
                    "--out", str(png)], check=True, timeout=120, capture_output=True)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 600 and height >= 600  # loss panel + one heatmap per MoE layer


def test_export_and_generate(reference, tmp_path):
    out = tmp_path / "hf"
    subprocess.run([sys.executable, str(ROOT / "recipes" / "export.py"), "--output-dir", str(reference),
                    "--out", str(out)], check=True, timeout=120, capture_output=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "layers.1.feed_forward.experts.7.down_proj.weight" in index["weight_map"]
    assert json.loads((out / "config.json").read_text())["model"]["moe"]["num_experts"] == 8
    gen = subprocess.run([sys.executable, str(ROOT / "recipes" / "generate.py"), "--output-dir", str(reference),
                          "--prompt", "import ", "--max-new-tokens", "40"],
                         check=True, timeout=120, capture_output=True, text=True).stdout
    assert "(step 16)" in gen and "import " in gen
    assert len(gen.splitlines()[-1]) > 0


def test_grad_accumulation_activation_checkpointing_async_save(reference, tmp_path):
    """grad_accum_steps=2 reads the same samples per step as the reference: step 1 (same weights)
    has the same loss; AC and async checkpoints run; the loss keeps falling."""
    train(tmp_path, 2, "--ep", "2", "--stop-after", "6", "--set", "train.grad_accum_steps=2",
          "--set", "train.activation_checkpointing=true", "--set", "checkpoint.async_save=true")
    got, ref = losses(tmp_path), losses(reference)
    assert abs(got[1] - ref[1]) <= 1e-5 * ref[1], (got[1], ref[1])
    assert got[6] < got[1] - 0.5
    assert (tmp_path / "checkpoints" / "step_00000004" / "ep_fsdp.json").is_file()
    assert (tmp_path / "checkpoints" / "step_00000006" / "ep_fsdp.json").is_file()


def test_bf16_mixed_precision_run(reference, tmp_path):
    train(tmp_path, 2, "--ep", "2", "--stop-after", "4", "--set", "train.mixed_precision=bf16")
    got, ref = losses(tmp_path), losses(reference)
    assert abs(got[1] - ref[1]) <= 2e-2 * ref[1]  # bf16 parameters, fp32 reductions
    assert got[4] < got[1]


def test_compiled_streamed_bf16_wire_run_tracks_the_reference(reference, tmp_path):
    """parallel.compile, dispatch_chunks and dispatch_dtype reach the model: the run learns like the
    reference (same data and init; the bf16 wire changes the losses by rounding only)."""
    train(tmp_path, 2, "--ep", "2", "--stop-after", "6", "--set", "log.val_every=100", "--set", "parallel.compile=true",
          "--set", "parallel.dispatch_chunks=2", "--set", "parallel.dispatch_dtype=bfloat16")
    ref, got = losses(reference), losses(tmp_path)
    assert sorted(got) == list(range(1, 7))
    assert all(abs(got[s] - ref[s]) <= 1e-2 * ref[s] for s in got), (got, ref)
    assert got != {s: ref[s] for s in got}  # the bf16 wire did round


def test_transformers_model_fine_tunes_resumes_exports_and_samples(tmp_path):
    """model.hf_path: a save_pretrained directory is fine-tuned (loss falls), a stopped run resumes
    bitwise, the export loads in transformers and generate.py samples from it."""
    pytest.importorskip("transformers")
    hub = tmp_path / "hub"
    subprocess.run([sys.executable, str(ROOT / "recipes" / "hf_tiny_model.py"), str(hub), "--family", "qwen3_moe"],
                   check=True, capture_output=True, timeout=TIMEOUT, cwd=ROOT)
    hf = ("--ep", "2", "--set", f"model.hf_path='{hub}'")
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    out = train(full, 2, *hf)
    assert "model=Qwen3MoeForCausalLM" in out
    ref = losses(full)
    assert ref[STEPS] < ref[1] - 1.0, ref  # it learns
    train(stopped, 2, *hf, "--stop-after", "6")
    assert "at step 6" in train(stopped, 2, *hf)
    got = losses(stopped)
    assert [got[s] for s in range(1, STEPS + 1)] == [ref[s] for s in range(1, STEPS + 1)]
    subprocess.run([sys.executable, str(ROOT / "recipes" / "export.py"), "--output-dir", str(full),
                    "--out", str(tmp_path / "hf")], check=True, capture_output=True, timeout=TIMEOUT, cwd=ROOT)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "qwen3_moe"
    assert json.loads((tmp_path / "hf" / "train_config.json").read_text())["model"]["hf_path"] == str(hub)
    gen = subprocess.run([sys.executable, str(ROOT / "recipes" / "generate.py"), "--hf-dir", str(tmp_path / "hf"),
                          "--max-new-tokens", "20"], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert gen.returncode == 0 and "Qwen3MoeForCausalLM" in gen.stdout, gen.stderr[-2000:]
    gen = subprocess.run([sys.executable, str(ROOT / "recipes" / "generate.py"), "--output-dir", str(full),
                          "--max-new-tokens", "20"], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert gen.returncode == 0 and f"(step {STEPS})" in gen.stdout, gen.stderr[-2000:]  # from the checkpoint itself


def test_transformers_model_with_a_small_vocabulary_is_refused(tmp_path):
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "recipes"))
    from hf_tiny_model import tiny_config
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny_config("mixtral", vocab=200)).save_pretrained(tmp_path / "hub")
    cmd = torchrun("--nproc-per-node", "1", str(ROOT / "recipes" / "train.py"), "--output-dir", str(tmp_path / "o"),
                   *FAST, "--ep", "1", "--set", f"model.hf_path='{tmp_path / 'hub'}'")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode != 0 and "vocab_size=200" in proc.stderr and "needs vocab_size >= 256" in proc.stderr


def test_deepseek_style_routing_resumes_bitwise(tmp_path):
    """deepseek_v3_tiny.toml (shared expert, sigmoid, group-limited, bias updates) plus capacity and
    expert dropout: the bias moves, slots are dropped, and a stopped run resumes bitwise."""
    config = ("--config", str(ROOT / "recipes" / "configs" / "deepseek_v3_tiny.toml"), "--ep", "2",
              "--set", "model.moe.capacity_factor=1.25", "--set", "model.moe.expert_dropout=0.1")
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train(full, 2, *config)
    train(stopped, 2, *config, "--stop-after", "6")
    assert "at step 6" in train(stopped, 2, *config)
    ref, got = losses(full), losses(stopped)
    assert [got[s] for s in range(1, STEPS + 1)] == [ref[s] for s in range(1, STEPS + 1)]
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert all(r["dropped_fraction"] > 0 for r in records)
    assert ref[STEPS] < ref[1] - 1.0


def test_expert_moves_in_the_recipe_resume_bitwise(tmp_path):
    """moe.rebalance_every: experts move every 4 steps; a run stopped between moves resumes bitwise
    (the placement comes back from the checkpoint, the load since the last move from the extras)."""
    moving = ("--ep", "2", "--set", "model.moe.rebalance_every=4")
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    out = train(full, 2, *moving)
    assert "rebalance: imbalance" in out
    train(stopped, 2, *moving, "--stop-after", "6")
    assert "at step 6" in train(stopped, 2, *moving)
    ref, got = losses(full), losses(stopped)
    assert [got[s] for s in range(1, STEPS + 1)] == [ref[s] for s in range(1, STEPS + 1)]
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "rebalance" in r] == [4, 8, 12, 16]


def test_a_nan_on_one_rank_skips_the_step_everywhere(reference, tmp_path):
    """EP_FSDP_FAULT puts a NaN into rank 1's logits at step 4: every rank skips that optimizer
    step (the parameters of steps 3 and 4 are bitwise equal), and training goes on."""
    env = {**os.environ, "EP_FSDP_FAULT": "nan:4:1"}
    cmd = torchrun("--nproc-per-node", "2", str(ROOT / "recipes" / "train.py"), "--output-dir", str(tmp_path),
                   *FAST, "--ep", "2", "--checkpoint-every", "1", "--set", "checkpoint.keep_last=20")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step     4  skipped: non-finite gradient norm" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("skipped") and r["step"] == 4 for r in records)
    ref = losses(reference)
    got = losses(tmp_path)
    assert [got[s] for s in (1, 2, 3)] == [ref[s] for s in (1, 2, 3)]
    assert got[STEPS] < got[1] - 1.0  # it went on learning
    from safetensors.torch import load_file

    import ep_fsdp.checkpoint as ckpt

    exported = {}
    for s in (3, 4):
        ckpt.export_safetensors(tmp_path / "checkpoints" / f"step_{s:08d}", tmp_path / f"x{s}")
        exported[s] = load_file(next((tmp_path / f"x{s}").glob("*.safetensors")))
    assert all(torch.equal(exported[3][k], exported[4][k]) for k in exported[3])
    plotted = subprocess.run([sys.executable, str(ROOT / "recipes" / "plot.py"), str(tmp_path / "metrics.jsonl"),
                              "--out", str(tmp_path / "m.png")], timeout=120, capture_output=True, text=True)
    assert plotted.returncode == 0 and (tmp_path / "m.png").is_file(), plotted.stderr[-2000:]  # skipped records too


def test_too_many_nonfinite_steps_stop_with_a_clear_error(tmp_path):
    env = {**os.environ, "EP_FSDP_FAULT": "nan:2:0"}
    cmd = torchrun("--nproc-per-node", "2", str(ROOT / "recipes" / "train.py"), "--output-dir", str(tmp_path),
                   *FAST, "--ep", "2", "--set", "train.max_nonfinite=1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, env=env)
    assert proc.returncode != 0
    assert "1 consecutive steps (up to 2) had a non-finite gradient norm; stopping" in proc.stderr


def test_bad_or_busy_output_directory_fails_every_rank_before_any_work(tmp_path):
    target = tmp_path / "afile"
    target.write_text("not a directory")
    cmd = torchrun("--nproc-per-node", "2", str(ROOT / "recipes" / "train.py"), "--output-dir", str(target),
                   *FAST, "--ep", "2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode != 0 and "step " not in proc.stdout
    for r in (0, 1):  # one line per rank, no traceback from the worker
        assert f"train.py: error (rank {r}): --output-dir {target} is a file; pass a directory." in proc.stderr
    assert 'train.py", line' not in proc.stderr, proc.stderr[-3000:]  # (torchrun's own report follows)
    assert proc.returncode != 0
    busy = tmp_path / "busy"
    first = subprocess.Popen(torchrun("--nproc-per-node", "1", str(ROOT / "recipes" / "train.py"), "--output-dir",
                                      str(busy), *FAST, "--ep", "1", "--steps", "400"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (busy / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.5)
        second = subprocess.run(torchrun("--nproc-per-node", "1", str(ROOT / "recipes" / "train.py"), "--output-dir",
                                         str(busy), *FAST, "--ep", "1"), capture_output=True, text=True,
                                timeout=TIMEOUT, cwd=ROOT)
        assert second.returncode != 0 and "is in use by another job (pid" in second.stderr, second.stderr[-2000:]
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the agent and its worker
        first.wait()


def test_stop_after_must_be_positive(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "train.py"), "--output-dir", str(tmp_path),
                           "--stop-after", "0"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "--stop-after must be a positive number of steps, got 0" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "train.py: error: train.steps must be >= 1, got 0."),
    (["--set", "model.moe.top_k=20"], "train.py: error: model.moe.top_k must be in 1..num_experts=8"),
    (["--set", "nosuch.key=1"], "train.py: error: config: unknown key(s) ['nosuch']"),
    (["--config", "/nonexistent.toml"], "train.py: error: --config /nonexistent.toml: [Errno 2] No such file"),
    (["--resume-from", "/nonexistent"], "train.py: error: --resume-from /nonexistent is not a directory"),
    (["--set", "model.dim=0"], "train.py: error: model.dim must be"),  # (MoEConfig's dim is the model's)
])
def test_bad_flags_and_config_values_are_one_line_errors(tmp_path, args, message):
    """Named like the flag or config key the user wrote, before any process group starts; no traceback."""
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "train.py"), "--output-dir", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("script,args,message", [
    ("export.py", ["--checkpoint", "/nonexistent", "--out", "OUT"], "export.py: error: export_safetensors: checkpoint "
     "/nonexistent does not exist"),
    ("export.py", ["--checkpoint", "CKPT", "--out", "OUT", "--max-shard-gb", "0"], "--max-shard-gb must be > 0, got 0.0"),
    ("generate.py", ["--checkpoint", "/nonexistent"], "generate.py: error: --checkpoint: checkpoint /nonexistent does "
     "not exist"),
    ("generate.py", ["--hf-dir", "OUT"], "is not a local model directory (no config.json)"),  # (not a hub repo name)
    ("generate.py", ["--checkpoint", "CKPT", "--max-new-tokens", "-5"], "--max-new-tokens must be >= 0, got -5"),
    ("plot.py", ["/nonexistent/metrics.jsonl"], "plot.py: error: /nonexistent/metrics.jsonl is not a file"),
])
def test_recipe_mistakes_are_one_line_errors(tmp_path, script, args, message):
    args = [a.replace("OUT", str(tmp_path / "out")).replace("CKPT", str(tmp_path)) for a in args]
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / script), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_device_check_prints_its_help():
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "benchmarks" / "device_check.py"), "--help"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and "One-process check of the accelerator path" in proc.stdout


def test_device_check_passes_on_the_cpu():
    """The whole accelerator check on this CPU (gloo at world size 1; the CUDA-only sync counts are
    skipped): every part runs and passes, so a GPU session's run fails only on what is GPU's own."""
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "benchmarks" / "device_check.py"), "--no-bench"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    passed = [line for line in proc.stdout.splitlines() if line.startswith("PASS")]
    assert proc.returncode == 0 and "all device checks passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert len(passed) >= 90 and any(line.startswith("PASS  transformers gpt_oss") for line in passed), len(passed)


def test_a_transformers_run_does_not_check_the_unused_moe_table():
    """With model.hf_path the [model.moe] shapes are unused; they are not validated as MoEConfig
    (num_experts=6 with the DeepSeek config's 4 expert groups was refused)."""
    sys.path.insert(0, str(ROOT / "recipes"))
    from train import parse_args

    cfg, *_ = parse_args(["--config", str(ROOT / "recipes" / "configs" / "deepseek_v3_tiny.toml"),
                          "--set", 'model.hf_path="some/dir"', "--set", "model.moe.num_experts=6"])
    assert cfg.model.hf_path == "some/dir" and cfg.model.moe.num_experts == 6


def test_a_layout_that_does_not_fit_the_job_names_the_flags(tmp_path):
    cmd = torchrun("--nproc-per-node", "2", str(ROOT / "recipes" / "train.py"), "--output-dir", str(tmp_path),
                   *FAST, "--ep", "3")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode != 0 and "step " not in proc.stdout
    for r in (0, 1):
        assert (f"train.py: error (rank {r}): --ep 3 --dp-shard auto (parallel.ep, parallel.dp_shard) do not fit this "
                "job of 2 processes: build_mesh: ep=3 does not divide world_size=2") in proc.stderr, proc.stderr[-3000:]


def test_a_damaged_newest_checkpoint_falls_back_and_is_saved_again(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    newest = run / "checkpoints" / "step_00000016"
    shard = sorted(newest.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, wrong bytes: only the CRC on load can tell
    shard.write_bytes(bytes(data))
    out = train(run, 2, "--ep", "2")
    assert "could not resume from" in out and "step_00000016" in out and "resumed from" in out and "at step 12" in out
    assert any(p.name.startswith(".step_00000016.unloadable-") for p in (run / "checkpoints").iterdir())
    ref, got = losses(reference), losses(run)
    assert [got[s] for s in range(13, STEPS + 1)] == [ref[s] for s in range(13, STEPS + 1)]  # replaced, bitwise
    assert ckpt_is_loadable(run / "checkpoints" / "step_00000016")  # the step was saved again
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in lines if "loss" in r) == list(range(1, STEPS + 1))  # no duplicated steps
    # --resume-from picks a checkpoint explicitly
    out = train(tmp_path / "explicit", 2, "--ep", "2", "--resume-from", str(run / "checkpoints" / "step_00000012"))
    assert "resumed from" in out and "at step 12" in out


def ckpt_is_loadable(path: Path) -> bool:  # (structure and sizes; CRCs are checked on load)
    from ep_fsdp.checkpoint._format import structure_problem

    return structure_problem(path) is None


def test_a_stuck_rank_fails_the_others_fast_and_torchrun_restarts(tmp_path):
    """SIGSTOP one worker: the other fails within parallel.timeout_s with an error that says where,
    and torchrun --max-restarts restarts the job from the newest checkpoint; it finishes."""
    cmd = torchrun("--nproc-per-node", "2", "--max-restarts", "1", str(ROOT / "recipes" / "train.py"),
                   "--output-dir", str(tmp_path), *FAST, "--ep", "2", "--steps", "60", "--checkpoint-every", "10",
                   "--set", "parallel.timeout_s=8")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and max([0, *(losses(tmp_path) if (tmp_path / "metrics.jsonl").exists() else [])]) < 12:
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers
        os.kill(workers[-1], signal.SIGSTOP)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "a collective timed out after parallel.timeout_s=8.0 s: another rank stopped participating" in err
    assert "resumed from" in out and losses(tmp_path)[60] < losses(tmp_path)[1]


def test_an_unsafe_newest_checkpoint_is_set_aside_and_the_run_falls_back(reference, tmp_path):
    import pickle

    from ep_fsdp.checkpoint._format import METADATA_FILE, file_crc32, metadata_crc32

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    newest = run / "checkpoints" / "step_00000016"
    (newest / ".metadata").write_bytes(pickle.dumps(Evil()))
    meta = json.loads((newest / METADATA_FILE).read_text())
    meta["files"][".metadata"] = {"bytes": (newest / ".metadata").stat().st_size, "crc32": file_crc32(newest / ".metadata")}
    meta["meta_crc32"] = metadata_crc32(meta)  # re-sealed: the refusal must come from the unpickler
    (newest / METADATA_FILE).write_text(json.dumps(meta))
    out = train(run, 2, "--ep", "2")
    assert "could not resume from" in out and "at step 12" in out
    assert not (tmp_path / "pwned").exists()
