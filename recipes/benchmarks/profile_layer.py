"""Profile one MoE layer's forward+backward: where the time goes, op by op (any device).

Prints the wall time of a step, the time the device's kernels took in it (on CUDA; the rest of
the wall time the GPU waited for the host to launch work) and torch.profiler's table of the ops
with the most self time on the device (CUDA) or the host (CPU).

NOTE: on CPU the profiler's per-op overhead inflates small ops many times over (see
docs/performance.md); use it there to find which ops run, and A/B timings for their cost.

    python recipes/benchmarks/profile_layer.py --device cuda --dtype bfloat16 --dim 2048 --hidden-dim 768 \\
        --experts 128 --top-k 8 --tokens 8192
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench_util import add_layer_args
from ep_fsdp import MoE, MoEConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_args(p)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, default=25, help="ops in the table")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    D, H, E, k, T = args.dim, args.hidden_dim, args.experts, args.top_k, args.tokens
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=D, hidden_dim=H, num_experts=E, top_k=k)).to(device=device, dtype=dtype)
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)  # [T, D]
    grad = torch.randn(T, D, device=device, dtype=dtype)  # [T, D]

    def step() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)

    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.repeats):
        step()
    sync()
    wall_ms = (time.perf_counter() - start) / args.repeats * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.repeats):
            step()
        sync()
    events = prof.key_averages()
    print(f"MoE layer forward+backward, D={D} H={H} E={E} k={k} T={T}, {device} {args.dtype}, torch {torch.__version__}")
    print(f"wall per step (unprofiled): {wall_ms:.2f} ms")
    if device.type == "cuda":
        # NOTE: kernels only: an operator's row repeats the device time of the kernels it launched
        kernel_ms = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / args.repeats / 1e3
        print(f"device kernels per step: {kernel_ms:.2f} ms ({kernel_ms / wall_ms:.0%} of the wall time)")
        sort_by = "self_device_time_total"
    else:
        sort_by = "self_cpu_time_total"
    print(events.table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=48))


if __name__ == "__main__":
    main()
