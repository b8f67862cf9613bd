"""The layer benchmarks run end to end on tiny shapes and print every row (figures are not checked:
timing belongs in docs/performance.md, not in tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from dist_pool import free_port

BENCH = Path(__file__).resolve().parent.parent / "recipes" / "benchmarks"
TINY = ["--tokens", "64", "--dim", "64", "--hidden-dim", "64", "--repeats", "1", "--warmup", "0"]
TIMEOUT = 180


def rows(stdout: str, dtype: str) -> dict[str, list[float]]:
    """``{row name: its numbers}`` of the table lines of ``dtype``."""
    table = {}
    for line in stdout.splitlines():
        if line.startswith(dtype + " "):
            rest = line[len(dtype):]
            name = re.split(r"\s{2,}", rest.strip())[0]  # a name may hold digits ("bf16 wire")
            numbers = rest[rest.index(name) + len(name):]
            table[name] = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", numbers)]
    return table


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=BENCH.parent.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_moe_layer_benchmark_prints_every_row():
    out = run([sys.executable, str(BENCH / "moe_layer.py"), *TINY, "--no-compile", "--no-hf", "--no-torchtitan"])
    for dtype in ("float32", "bfloat16"):
        table = rows(out, dtype)
        for name in ("dense floor", "ep_fsdp.MoE", "its experts alone", "ep_fsdp.MoE, new routing each step"):
            ms, ratio, *_ = table[name]
            assert ms > 0 and ratio > 0, (name, table[name])
        assert table["dense floor"][1] == 1.0


def test_ep_layer_benchmark_prints_every_row_on_two_processes():
    out = run([sys.executable, "-m", "torch.distributed.run", "--master-port", str(free_port()), "--nproc-per-node", "2",
               str(BENCH / "ep_layer.py"), *TINY])
    f32, bf16 = rows(out, "float32"), rows(out, "bfloat16")
    expected = ["no exchange (E/ep local)", "EP, 1 chunk", "EP, 2 chunks", "EP, 4 chunks", "EP, row per expert",
                "all-to-all alone, same bytes"]
    assert set(expected + ["EP, bf16 wire", "EP, bf16 wire, 2 chunks"]) <= set(f32), f32
    assert set(expected + ["EP, experts pad arrivals"]) <= set(bf16), bf16
    assert bf16["EP, experts pad arrivals"][2] == bf16["EP, 1 chunk"][2]  # the same exchange
    for table in (f32, bf16):
        for name, (ms, ratio, mb, *_) in table.items():
            assert ms > 0 and ratio > 0, (name, table[name])
        # the transport row sends the bytes of the one-chunk exchange, and something was sent
        assert table["all-to-all alone, same bytes"][2] == table["EP, 1 chunk"][2] > 0
    assert f32["EP, bf16 wire"][2] < f32["EP, 1 chunk"][2]  # the bf16 wire sends fewer bytes


def test_profile_layer_prints_the_step_time_and_the_op_table():
    out = run([sys.executable, str(BENCH / "profile_layer.py"), *TINY, "--dtype", "float32", "--rows", "5"])
    wall = re.search(r"wall per step \(unprofiled\): (\d+\.\d+) ms", out)
    assert wall and float(wall.group(1)) > 0, out
    table = [line for line in out.splitlines() if line.strip().startswith(("aten::", "_GroupedLinear", "_SwiGLU"))]
    assert 1 <= len(table) <= 5, out  # the ops with the most self time, --rows of them
