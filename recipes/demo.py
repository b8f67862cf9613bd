"""A short multi-process demo: train the reference MoE transformer with EP + FSDP2 on CPU.

    torchrun --nproc-per-node 4 recipes/demo.py --ep 2          # dp_shard = 2, ep = 2

The data is synthetic and learnable (each sequence follows a fixed random successor table with
some noise), so the loss visibly falls within a few dozen steps. Rank 0 prints one line per step.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ep_fsdp
from ep_fsdp.models import MoETransformer, TransformerConfig


def synthetic_batch(step: int, rank: int, batch: int, seq_len: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences that follow a fixed successor table (same on all ranks), 10% random tokens."""
    successor = torch.randperm(vocab, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(10_000 * step + rank)
    tokens = torch.empty(batch, seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
    for i in range(seq_len):
        noise = torch.rand(batch, generator=g) < 0.1
        tokens[:, i + 1] = torch.where(noise, torch.randint(0, vocab, (batch,), generator=g), successor[tokens[:, i]])
    return tokens[:, :-1], tokens[:, 1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8, help="sequences per rank")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args()

    device = ep_fsdp.init_distributed()
    backend = dist.get_backend()
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = ep_fsdp.build_mesh(ep=args.ep)

    torch.manual_seed(0)  # same initial weights on every rank
    moe = ep_fsdp.MoEConfig(dim=64, hidden_dim=128, num_experts=8, top_k=2, aux_loss_coef=1e-2, z_loss_coef=1e-3)
    cfg = TransformerConfig(vocab_size=64, dim=64, num_layers=2, num_heads=4, max_seq_len=args.seq_len, moe=moe)
    model = MoETransformer(cfg).to(device)
    ep_fsdp.parallelize_moe(model, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    layers = ep_fsdp.moe_layers(model)
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"world={world} dp_shard={mesh['dp_shard'].size()} ep={args.ep} params={n / 1e6:.2f}M "
              f"experts/layer={moe.num_experts} layers={cfg.num_layers} backend={backend}")

    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        x, y = (t.to(device) for t in synthetic_batch(step, rank, args.batch, args.seq_len, cfg.vocab_size))
        logits = model(x)
        task = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        aux = ep_fsdp.moe_aux_loss(model)
        (task + aux).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Global-batch figures: mean task loss, and slots received per ep rank in the last layer.
        stats = torch.stack([task.detach().float(), layers[-1][1].last_expert_load.sum().float()])
        gathered = [torch.zeros_like(stats) for _ in range(world)]
        dist.all_gather(gathered, stats)
        if rank == 0 and (step == 1 or step % 5 == 0 or step == args.steps):
            loss = sum(float(g[0]) for g in gathered) / world
            load = [int(g[1]) for g in gathered[: args.ep]]
            print(f"step {step:3d}  loss {loss:.4f}  aux {float(aux.detach()):.4f}  "
                  f"rows per ep rank (last layer) {load}  {1e3 * (time.perf_counter() - start):.0f} ms")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
