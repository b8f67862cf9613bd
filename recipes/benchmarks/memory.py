"""Per-rank memory of parameters, gradients and optimizer state against the ideal, after one step.

    torchrun --nproc-per-node 4 recipes/benchmarks/memory.py --ep 2

The ideal for fully sharded training is ``total / world`` for each of the three: dense parameters
are sharded over all ranks, experts over ``ep`` x ``dp_shard``. The table shows each rank's bytes
(local shards of parameters, gradients and AdamW moments) and the ratio to that ideal; FSDP's
padding of uneven shards is the only expected excess.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ep_fsdp
from ep_fsdp.models import MoETransformer, TransformerConfig


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    args = p.parse_args()
    device = ep_fsdp.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    moe = ep_fsdp.MoEConfig(dim=args.dim, hidden_dim=2 * args.dim, num_experts=args.experts, top_k=2)
    cfg = TransformerConfig(vocab_size=256, dim=args.dim, num_layers=4, num_heads=8, max_seq_len=64,
                            num_dense_layers=1, moe=moe)
    torch.manual_seed(0)
    model = MoETransformer(cfg).to(device)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    expert_total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    ep_fsdp.parallelize_moe(model, ep_fsdp.build_mesh(ep=args.ep))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (2, 64), device=device)
    F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
    params = local_bytes(model.parameters())
    grads = local_bytes(p.grad for p in model.parameters() if p.grad is not None)
    states = local_bytes(v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    row = torch.tensor([params, grads, states], dtype=torch.float64, device=device)
    rows = [torch.zeros_like(row) for _ in range(world)]
    dist.all_gather(rows, row)
    if rank == 0:
        ideal = total / world
        print(f"model {total / 2**20:.1f} MiB ({expert_total / total:.0%} experts), world={world}, ep={args.ep}; "
              f"ideal per rank = total / world = {ideal / 2**20:.2f} MiB for each column")
        print(f"{'rank':<6}{'params MiB':>12}{'grads MiB':>12}{'adam MiB':>12}{'params/ideal':>14}{'adam/ideal':>12}")
        for r, v in enumerate(rows):
            pm, gm, sm = (float(a) for a in v)
            print(f"{r:<6}{pm / 2**20:>12.2f}{gm / 2**20:>12.2f}{sm / 2**20:>12.2f}{pm / ideal:>13.3f}x{sm / (2 * ideal):>11.3f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
