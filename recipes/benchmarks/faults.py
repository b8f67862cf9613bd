"""Fault matrix: the training recipe under injected faults, each in its own run, against an
uninterrupted run of the same job.

    python recipes/benchmarks/faults.py --workdir /tmp/faults            # 10 random kills + the rest
    python recipes/benchmarks/faults.py --workdir /tmp/faults --kills 3

Every run is ``torchrun --nproc-per-node 4 --max-restarts 3 recipes/train.py`` on the tiny config
(shortened: 40 steps, sequences of 64, a checkpoint every 5 steps, keep_last 3). Faults:

* ``kill-worker@N``: SIGKILL of one worker once step N is logged (``--kills`` runs, N random);
* ``kill-in-sync-save`` / ``kill-in-async-save``: SIGKILL of one worker while a checkpoint is
  being written (a ``.step_*.partial`` directory exists), synchronous or asynchronous saves;
* ``kill-all``: SIGKILL of every worker at once;
* ``disk-error``: the storage writer of one rank raises ``OSError`` in the middle of a save
  (``EP_FSDP_FAULT=write_error:STEP:RANK``, once).

For each it prints whether the job finished (exit 0), whether the final loss equals the
uninterrupted run's bitwise, and whether the newest checkpoint is complete and verifies; the
table goes to docs/recipes.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40
JOB = ["--nproc-per-node", "4", "--max-restarts", "3", str(ROOT / "recipes" / "train.py"),
       "--config", str(ROOT / "recipes" / "configs" / "tiny.toml"), "--steps", str(STEPS), "--log-every", "1",
       "--checkpoint-every", "5", "--set", "train.seq_len=64", "--set", "train.global_batch_size=8",
       "--set", "train.warmup_steps=4", "--set", "data.max_bytes=400000", "--set", "log.val_every=1000",
       "--set", "checkpoint.keep_last=3"]


def final_loss(out: Path) -> float | None:
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
    return losses.get(STEPS)


def logged_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step", 0))
        except ValueError:
            pass
    return max(steps)


def workers(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def run(out: Path, fault: str, extra: list[str], env: dict[str, str], trigger) -> tuple[int, str]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", *JOB, "--output-dir", str(out), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    fired = trigger is None
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if not fired and trigger(out):
            targets = workers(proc.pid)
            if targets:
                chosen = targets if fault == "kill-all" else [random.choice(targets)]
                for pid in chosen:
                    os.kill(pid, signal.SIGKILL)
                fired = True
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
    out_text, err = proc.communicate()
    return proc.returncode, ("" if fired else "fault never fired; ") + err[-400:]


def newest_verifies(out: Path) -> bool:
    import torch

    import ep_fsdp.checkpoint as ckpt
    from ep_fsdp.checkpoint._dcp import _verify_files

    path = ckpt.latest(out / "checkpoints")
    if path is None:
        return False
    meta = ckpt.read_metadata(path)
    try:
        _verify_files(path, meta, collective=False)
    except ValueError:
        return False
    partials = [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".partial")]
    return meta["step"] == STEPS and not any(p.name == f".{path.name}.partial" for p in partials) and torch is not None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    random.seed(args.seed)
    env = {**os.environ}
    ref = args.workdir / "reference"
    code, err = run(ref, "none", [], env, None)
    reference = final_loss(ref) if code == 0 else None
    if reference is None:
        sys.exit(f"the uninterrupted run failed: {err}")

    def at_step(n: int):
        return lambda out: logged_step(out) >= n

    def saving(out: Path) -> bool:
        d = out / "checkpoints"
        return d.is_dir() and any(p.name.endswith(".partial") for p in d.iterdir()) and logged_step(out) >= 6

    cases: list[tuple[str, list[str], dict[str, str], object]] = []
    for _ in range(args.kills):
        n = random.randint(2, STEPS - 2)
        cases.append((f"kill-worker@{n}", [], env, at_step(n)))
    cases += [
        ("kill-in-sync-save", [], env, saving),
        ("kill-in-async-save", ["--set", "checkpoint.async_save=true"], env, saving),
        ("kill-all", [], env, at_step(random.randint(6, STEPS - 6))),
        ("disk-error", [], {**env, "EP_FSDP_FAULT": f"write_error:{15}:{1}"}, None),
    ]
    rows = []
    for name, extra, case_env, trigger in cases:
        out = args.workdir / name.replace("@", "-")
        code, err = run(out, name, extra, case_env, trigger)
        loss = final_loss(out) if (out / "metrics.jsonl").exists() else None
        rows.append((name, code == 0, loss == reference, newest_verifies(out), err if code else ""))
        print(f"{name:<22} finished={code == 0!s:<6} bitwise={loss == reference!s:<6} "
              f"newest complete={rows[-1][3]!s:<6} {rows[-1][4][:120]}", flush=True)
    ok = all(r[1] and r[2] and r[3] for r in rows)
    print("\n| fault | finished | final loss bitwise | newest checkpoint complete |\n|---|---|---|---|")
    for name, finished, bitwise, complete, _ in rows:
        print(f"| {name} | {'yes' if finished else 'NO'} | {'yes' if bitwise else 'NO'} | {'yes' if complete else 'NO'} |")
    print(f"\nreference final loss {reference:.6f}; all faults recovered bitwise: {ok}")


if __name__ == "__main__":
    main()
