"""Expert migration on a skewed workload (torchrun, 4 processes, ep=4; or 2):

    torchrun --nproc-per-node 4 recipes/benchmarks/placement.py
    torchrun --nproc-per-node 2 recipes/benchmarks/placement.py     # one core per rank here

One MoE layer (D=256 H=512 E=8 k=2) whose router's selection bias sends every token to two of the
experts held by ep ranks 0 and 1: ranks 2 and 3 idle, max/mean rows per rank 2.0. It trains
``--steps`` AdamW steps, calls ``ep_fsdp.rebalance_experts(model, optimizer)`` (the load of those
steps), and trains ``--steps`` more. Rank 0 prints, before and after the move: max/mean rows per
rank (``routing_stats``), the median step time (forward + backward + optimizer step, the slowest
rank), and the move itself: experts moved, bytes sent by all ranks, and how long it took.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import ep_fsdp
from bench_util import OneBlock
from ep_fsdp.launch import exit_process


def steps(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, grad: torch.Tensor, n: int) -> list[float]:
    times = []
    for _ in range(n):
        dist.barrier()
        start = time.perf_counter()
        model(x).backward(grad)
        opt.step()
        opt.zero_grad()
        took = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        times.append(float(took))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="per rank")
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    D, H, E = 256, 512, 8
    torch.manual_seed(0)
    model = OneBlock(ep_fsdp.MoE(ep_fsdp.MoEConfig(dim=D, hidden_dim=H, num_experts=E, top_k=2, expert_bias=True)))
    with torch.no_grad():  # skew: experts 0-3 (ep ranks 0 and 1 at ep=4) win every selection
        model.layers[0].router.expert_bias[: E // 2] = 10.0
    ep_fsdp.parallelize_moe(model, ep_fsdp.build_mesh(ep=world, device_type="cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(args.tokens, D, generator=g)
    grad = torch.randn(args.tokens, D, generator=g)

    steps(model, opt, x, grad, 2)  # warm-up
    ep_fsdp.routing_stats(model)
    before = steps(model, opt, x, grad, args.steps)
    imb_before = next(iter(ep_fsdp.routing_stats(model).values()))["imbalance"]
    dist.barrier()
    placement = ep_fsdp.rebalance_experts(model, opt)
    report = next(iter(ep_fsdp.last_rebalance(model).values()))
    sent = torch.tensor([float(report["bytes_sent"])])
    dist.all_reduce(sent)
    steps(model, opt, x, grad, 2)  # warm-up on the new placement
    ep_fsdp.routing_stats(model)
    after = steps(model, opt, x, grad, args.steps)
    imb_after = next(iter(ep_fsdp.routing_stats(model).values()))["imbalance"]

    if rank == 0:
        print(f"one MoE layer, ep={world}, D={D} H={H} E={E} k=2, {args.tokens} tokens per rank, skewed to "
              f"experts 0-{E // 2 - 1}; gloo on CPU, torch {torch.__version__}")
        print(f"placement after: {next(iter(placement.values()))} (ep rank of experts 0..{E - 1})")
        print(f"{'':<22}{'max/mean rows':>15}{'step ms':>10}")
        print(f"{'before rebalance':<22}{imb_before:>15.2f}{statistics.median(before) * 1e3:>10.1f}")
        print(f"{'after rebalance':<22}{imb_after:>15.2f}{statistics.median(after) * 1e3:>10.1f}")
        print(f"move: {report['experts_moved']} experts, {float(sent) / 2**20:.2f} MiB sent by all ranks "
              f"(weights + AdamW moments), {report['seconds'] * 1e3:.0f} ms; step time "
              f"{statistics.median(after) / statistics.median(before):.2f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process()  # skips interpreter finalization (see ep_fsdp.launch.exit_process)
