"""Two measurements of the modern-routing features under expert parallelism (torchrun, gloo on CPU):

    torchrun --nproc-per-node 2 recipes/benchmarks/moe_features.py
    torchrun --nproc-per-node 4 recipes/benchmarks/moe_features.py

1. **Shared experts overlapped with the exchange.** One MoE layer (ep = world) forward+backward
   with ``num_shared_experts=1`` (the shared SwiGLU runs while the tokens are on the wire) against
   the same layer without it followed by the same shared SwiGLU as a separate module, and the
   layer alone; interleaved, medians over ranks' max.
2. **Group-limited routing.** The same router weights and tokens routed with
   ``num_expert_groups = ep`` (each group is one rank's experts) and ``num_limited_groups = 1``
   against plain top-k: the all-to-all bytes of one forward, summed over all ranks (the exchanges'
   own count, ``routing_stats``' ``a2a_bytes``; the backward sends the rows' gradients back, about
   as many again), and the mean number of ranks a token reaches.

The timed rows run interleaved, in a new random order every round (``bench_util.shuffled_rounds``,
the same order on every rank): in a fixed order a row's position alone moved it by up to 10% here.
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
from bench_util import shuffled_rounds
from ep_fsdp.launch import exit_process
from ep_fsdp.experts import SharedExperts


class OneLayer(nn.Module):
    def __init__(self, cfg: ep_fsdp.MoEConfig, separate_shared: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList([ep_fsdp.MoE(cfg)])
        self.shared = SharedExperts(cfg.dim, cfg.hidden_dim) if separate_shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers[0](x)
        return out if self.shared is None else out + self.shared(x)


def timed(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    dist.barrier()
    start = time.perf_counter()
    x.grad = None
    model(x).backward(grad)
    model.zero_grad(set_to_none=True)
    took = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(took, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank does
    return float(took)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=2048, help="per rank")
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    D, H, E, T = args.dim, args.hidden_dim, args.experts, args.tokens
    if E % world or E // world < 2:
        # (group-limited routing with one group per rank and one group per token needs top_k = 2
        # experts in a group)
        raise SystemExit(f"moe_features.py: need --experts divisible by the world size with at least 2 experts "
                         f"per rank (top_k = 2 inside one rank's group); got experts={E}, world={world}")
    mesh = ep_fsdp.build_mesh(ep=world, device_type="cpu")
    base = dict(dim=D, hidden_dim=H, num_experts=E, top_k=2)

    torch.manual_seed(0)
    models = {
        "layer + shared expert (overlapped)": OneLayer(ep_fsdp.MoEConfig(**base, num_shared_experts=1)),
        "layer, then a separate shared FFN": OneLayer(ep_fsdp.MoEConfig(**base), separate_shared=True),
        "layer alone": OneLayer(ep_fsdp.MoEConfig(**base)),
    }
    for m in models.values():
        ep_fsdp.parallelize_moe(m, mesh)
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    grad = torch.randn(T, D, generator=g)
    times: dict[str, list[float]] = {k: [] for k in models}
    for i, order in shuffled_rounds(list(models), 2 + args.repeats):
        for name in order:  # interleaved, in a new order each round (the same on every rank)
            t = timed(models[name], x, grad)
            if i >= 2:
                times[name].append(t)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}

    # group-limited routing: same weights, same tokens
    routed = {}
    for name, extra in (("top-k", {}), ("group-limited", dict(num_expert_groups=world, num_limited_groups=1))):
        torch.manual_seed(0)
        m = OneLayer(ep_fsdp.MoEConfig(**base, **extra))
        ep_fsdp.parallelize_moe(m, mesh)
        seen: list[torch.Tensor] = []
        m.layers[0].router.register_forward_hook(lambda mod, args, out: seen.append(out.expert_ids))
        m(x).backward(grad)
        stats = next(iter(ep_fsdp.routing_stats(m).values()))
        ids = seen[0]  # [T, k]
        ranks = m.layers[0].placement.locate(ids)[0]  # [T, k] ep rank of each slot
        reached = torch.tensor([float((ranks[:, :1] != ranks).any(dim=1).float().mean() + 1.0)])
        dist.all_reduce(reached)
        routed[name] = (stats["a2a_bytes"], float(reached) / world)

    if rank == 0:
        print(f"one MoE layer, ep={world}, D={D} H={H} E={E} k=2, {T} tokens per rank, gloo on CPU, "
              f"torch {torch.__version__}")
        print(f"{'forward+backward':<40}{'ms':>9}")
        for name, value in ms.items():
            print(f"{name:<40}{value:>9.1f}")
        shared_cost = ms["layer, then a separate shared FFN"] - ms["layer alone"]
        hidden = ms["layer, then a separate shared FFN"] - ms["layer + shared expert (overlapped)"]
        print(f"shared FFN cost {shared_cost:.1f} ms; overlapped saves {hidden:.1f} ms "
              f"({ms['layer + shared expert (overlapped)'] / ms['layer, then a separate shared FFN']:.2f}x)")
        print(f"{'routing':<16}{'fwd a2a MiB, all ranks':>24}{'ranks/token':>13}")
        for name, (nbytes, reach) in routed.items():
            print(f"{name:<16}{nbytes / 2**20:>24.2f}{reach:>13.2f}")
        print(f"group-limited / top-k bytes: {routed['group-limited'][0] / routed['top-k'][0]:.2f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process()  # skips interpreter finalization (see ep_fsdp.launch.exit_process)
