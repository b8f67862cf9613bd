"""Soak: the tiny job for 2,000 steps (4 processes), watching each worker's memory and file
descriptors, and the checkpoint directory.

    python recipes/benchmarks/soak.py --workdir /tmp/soak

It launches ``torchrun --nproc-per-node 4 recipes/train.py --config recipes/configs/tiny.toml
--steps 2000`` (checkpoints every 50 steps, keep_last 3) and samples every worker's resident
memory (``VmRSS``) and open descriptors (``/proc/PID/fd``) at step 110, mid-run and near the end
(steps away from checkpoint saves, all four workers alive). Prints them per rank with the growth; target: RSS growth < 2 %, no descriptor
growth, no checkpoint directories beyond ``keep_last`` at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def logged_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    best = 0
    for line in path.read_text().splitlines():
        try:
            best = max(best, int(json.loads(line).get("step", 0)))
        except (ValueError, TypeError):
            pass
    return best


def sample(pid: int) -> dict[int, tuple[int, int]]:
    """``{worker pid: (rss bytes, open fds)}`` of torchrun's workers."""
    out = {}
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return out
    for c in children:
        try:
            status = Path(f"/proc/{c}/status").read_text()
            rss = int(status.split("VmRSS:")[1].split()[0]) * 1024
            out[c] = (rss, len(list(Path(f"/proc/{c}/fd").iterdir())))
        except (FileNotFoundError, IndexError, ProcessLookupError):
            pass
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--early", type=int, default=110, help="first sample (away from a checkpoint step)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    args = p.parse_args()
    out = args.workdir / "run"
    shutil.rmtree(out, ignore_errors=True)
    keep_last = 3
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", str(ROOT / "recipes" / "train.py"),
           "--config", str(ROOT / "recipes" / "configs" / "tiny.toml"), "--output-dir", str(out),
           "--steps", str(args.steps), "--checkpoint-every", str(args.checkpoint_every), "--set", f"checkpoint.keep_last={keep_last}",
           "--set", "log.val_every=500"]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    early = late = None
    marks = sorted({args.steps // 2 + 10, args.steps - 20})  # also mid-run: growth or warm-up?
    mid: list[tuple[int, dict[int, tuple[int, int]]]] = []
    while proc.poll() is None:
        step = logged_step(out)
        if early is None and step >= args.early:
            now = sample(proc.pid)
            early = (step, now) if len(now) == 4 else None
        elif early is not None and marks and step >= marks[0]:
            marks.pop(0)
            now = sample(proc.pid)
            if len(now) == 4 and set(now) == set(early[1]):  # the same four workers, still alive
                mid.append((step, now))
                late = (step, now)
        time.sleep(0.2)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0 or early is None or late is None:
        sys.exit(f"soak run failed (exit {proc.returncode}): {err[-2000:]}")
    ckpts = sorted(d.name for d in (out / "checkpoints").iterdir())
    print(f"soak: tiny config, 4 processes, {args.steps} steps in {time.time() - start:.0f} s; checkpoints every "
          f"{args.checkpoint_every}, "
          f"keep_last {keep_last}")
    print(f"{'worker':<8}{'RSS@' + str(early[0]):>12}{'RSS@' + str(late[0]):>12}{'growth':>9}"
          f"{'fds@' + str(early[0]):>10}{'fds@' + str(late[0]):>10}")
    worst = 0.0
    for i, pid in enumerate(sorted(early[1])):
        (r0, f0), (r1, f1) = early[1][pid], late[1].get(pid, (0, 0))
        growth = (r1 - r0) / r0 * 100
        worst = max(worst, growth)
        print(f"{i:<8}{r0 / 2**20:>10.1f}MB{r1 / 2**20:>10.1f}MB{growth:>8.2f}%{f0:>10}{f1:>10}")
    if len(mid) > 1:
        (s_mid, at_mid) = mid[0]
        second = max((late[1][p][0] - at_mid[p][0]) / at_mid[p][0] * 100 for p in at_mid)
        print(f"RSS growth from step {s_mid} to {late[0]} (second half): at most {second:.2f}%")
    print(f"checkpoint directories at the end: {ckpts}")
    print(f"max RSS growth {worst:.2f}% (target < 2%); checkpoints kept {len(ckpts)} (keep_last {keep_last})")


if __name__ == "__main__":
    main()
