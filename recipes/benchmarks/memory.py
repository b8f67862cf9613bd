"""Memory figures: per-rank training state against the ideal, and what one MoE layer saves for backward.

    torchrun --nproc-per-node 4 recipes/benchmarks/memory.py --ep 2     # both parts
    python recipes/benchmarks/memory.py --saved-only                    # part 2 only, one process
    python recipes/benchmarks/memory.py --saved-only --tokens 8192 --hidden-dim 1024

1. Per-rank table (under torchrun; gloo on CPU, NCCL on CUDA). After one AdamW step of the
   reference transformer parallelized with ``--ep``: each rank's bytes of parameters, gradients and
   AdamW moments (local shards) and their ratio to the ideal ``total / world`` (dense parameters
   are sharded over all ranks, experts over ``ep`` x ``dp_shard``; FSDP's padding of uneven shards
   is the only expected excess), and the rank's peak memory. The peak is
   ``torch.cuda.max_memory_allocated`` over the training step on CUDA; on CPU it is the process
   peak RSS (``ru_maxrss``) over the process lifetime, Python and torch libraries included, so it
   is an upper bound and not comparable with the other columns.
2. Saved-for-backward bytes of ONE unparallelized MoE layer (rank 0, or the only process), in
   bfloat16 and float32, at D/H/E/k/T from the flags (default 256/512/8/2/4096): every tensor that
   autograd keeps after the forward, seen through ``torch.autograd.graph.saved_tensors_hooks``,
   counted once per storage (storage bytes), parameters and the layer input left out. The minimum
   is ``S*D + S*2H + S*H + S*D`` elements (S = T*k: the expert input rows, the gate and up
   pre-activations, the SwiGLU output and the expert output rows) in the layer dtype; the target
   ratio is <= 1.15x. The largest storages are listed with shape, dtype and the autograd nodes that
   hold them. NOTE: tensors a custom autograd Function keeps as ``ctx`` attributes (not through
   ``save_for_backward``) are invisible to the hooks and not counted.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

import ep_fsdp
from ep_fsdp.models import MoETransformer, TransformerConfig

StorageKey = tuple[int, int]  # (data pointer, nbytes) of an untyped storage

MiB = 2**20


# ---------------------------------------------------------------- part 1: per-rank training state


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    """Peak allocated bytes since :func:`reset_peak` on CUDA; the process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def peak_label(device: torch.device) -> str:
    if device.type == "cuda":
        return "peak = torch.cuda.max_memory_allocated during the training step"
    return ("peak = process peak RSS (ru_maxrss) over the process lifetime, Python and torch libraries "
            "included: an upper bound, not comparable with the other columns")


def train_state_table(args: argparse.Namespace) -> None:
    """Part 1: one AdamW step of the parallelized transformer, then the per-rank table on rank 0."""
    device = ep_fsdp.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    moe = ep_fsdp.MoEConfig(dim=args.dim, hidden_dim=args.hidden_dim, num_experts=args.experts, top_k=args.top_k)
    cfg = TransformerConfig(vocab_size=256, dim=args.dim, num_layers=4, num_heads=8, max_seq_len=64,
                            num_dense_layers=1, moe=moe)
    torch.manual_seed(0)
    model = MoETransformer(cfg).to(device)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    expert_total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    ep_fsdp.parallelize_moe(model, ep_fsdp.build_mesh(ep=args.ep))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (2, 64), device=device)  # [B, L]
    reset_peak(device)
    F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
    peak = peak_bytes(device)
    params = local_bytes(model.parameters())
    grads = local_bytes(p.grad for p in model.parameters() if p.grad is not None)
    states = local_bytes(v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    row = torch.tensor([params, grads, states, peak], dtype=torch.float64, device=device)
    rows = [torch.zeros_like(row) for _ in range(world)]
    dist.all_gather(rows, row)
    if rank == 0:
        ideal = total / world
        print(f"model {total / MiB:.1f} MiB ({expert_total / total:.0%} experts), world={world}, ep={args.ep}; "
              f"ideal per rank = total / world = {ideal / MiB:.2f} MiB for each column")
        print(f"{'rank':<6}{'params MiB':>12}{'grads MiB':>12}{'adam MiB':>12}{'params/ideal':>14}{'adam/ideal':>12}"
              f"{'peak MiB':>12}")
        for r, v in enumerate(rows):
            pm, gm, sm, pk = (float(a) for a in v)
            print(f"{r:<6}{pm / MiB:>12.2f}{gm / MiB:>12.2f}{sm / MiB:>12.2f}{pm / ideal:>13.3f}x{sm / (2 * ideal):>11.3f}x"
                  f"{pk / MiB:>12.1f}")
        print(peak_label(device), flush=True)


# ---------------------------------------------------------------- part 2: saved for backward


@dataclass
class SavedStorage:
    """One storage kept for the backward: the first tensor saved on it, and who holds it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int  # storage bytes (a view counts its whole storage)
    holders: Counter[str] = field(default_factory=Counter)  # autograd node name -> nodes of that name


class _Packed:
    """What the pack hook returns: the saved tensor, reachable only while autograd keeps it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def storage_key(t: torch.Tensor) -> StorageKey:
    t = t.to_local() if isinstance(t, DTensor) else t
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def parameter_storages(module: nn.Module) -> set[StorageKey]:
    """Storages of ``module``'s parameters (the local tensor of a DTensor parameter)."""
    return {storage_key(p) for p in module.parameters()}


def saved_storages(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[StorageKey, SavedStorage]]:
    """Run ``layer(x)`` and return its output and the storages autograd keeps for the backward.

    A saved tensor counts only if its graph node is still alive after the forward (a node that no
    output reaches, e.g. ``topk``'s when only its indices are used, is freed with what it saved).
    Parameters and ``x``'s storage are left out.
    """
    packed: list[weakref.ref[_Packed]] = []

    def pack(t: torch.Tensor) -> _Packed:
        p = _Packed(t)
        packed.append(weakref.ref(p))
        return p

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda p: p.tensor):
        y = layer(x)
    skip = parameter_storages(layer) | {storage_key(x)}
    saved: dict[StorageKey, SavedStorage] = {}
    for ref in packed:
        p = ref()
        if p is None:
            continue
        key = storage_key(p.tensor)
        if key not in skip and key not in saved:
            saved[key] = SavedStorage(tuple(p.tensor.shape), p.tensor.dtype, key[1])
    label_holders(y, saved)
    return y, saved


def node_saved_tensors(node: torch.autograd.graph.Node) -> list[torch.Tensor]:
    """The tensors one autograd node saved (built-in ``_saved_*`` fields, or a Function's ``saved_tensors``)."""
    out: list[torch.Tensor] = []
    if hasattr(node, "saved_tensors"):
        out.extend(t for t in node.saved_tensors if isinstance(t, torch.Tensor))
    for name in dir(node):
        if name.startswith("_saved_"):
            value = getattr(node, name)
            out.extend(v for v in (value if isinstance(value, (tuple, list)) else [value]) if isinstance(v, torch.Tensor))
    return out


def label_holders(y: torch.Tensor, saved: dict[StorageKey, SavedStorage]) -> None:
    """Name, for each saved storage, the autograd nodes of ``y``'s graph that hold it."""
    seen: set[torch.autograd.graph.Node] = set()
    stack = [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for t in node_saved_tensors(node):
            entry = saved.get(storage_key(t))
            if entry is not None:
                entry.holders[node.name()] += 1
        stack.extend(fn for fn, _ in node.next_functions)


def holders_text(holders: Counter[str]) -> str:
    return ", ".join(name + (f" x{n}" if n > 1 else "") for name, n in sorted(holders.items())) or "?"


def minimum_saved_bytes(T: int, k: int, D: int, H: int, dtype: torch.dtype) -> int:
    """``S*D + S*2H + S*H + S*D`` elements (S = T*k) in ``dtype``: rows in, gate+up, SwiGLU out, rows out."""
    S = T * k
    return (S * D + S * 2 * H + S * H + S * D) * dtype.itemsize


def saved_report(args: argparse.Namespace, device: torch.device) -> None:
    """Part 2: saved-for-backward bytes of one MoE layer in bfloat16 and float32, with the largest storages."""
    D, H, E, k, T = args.dim, args.hidden_dim, args.experts, args.top_k, args.tokens
    print(f"\nsaved for backward by ONE MoE layer (unparallelized, training mode), D={D} H={H} E={E} k={k} T={T}, "
          f"S=T*k={T * k}, device={device}; parameters and the layer input left out, each storage once")
    print(f"{'dtype':<10}{'saved MiB':>11}{'minimum MiB':>13}{'ratio':>8}{'storages':>10}")
    details: list[tuple[str, list[SavedStorage]]] = []
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        layer = ep_fsdp.MoE(ep_fsdp.MoEConfig(dim=D, hidden_dim=H, num_experts=E, top_k=k)).to(device=device, dtype=dtype)
        x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)  # [T, D]
        _, saved = saved_storages(layer, x)
        got, least = sum(s.nbytes for s in saved.values()), minimum_saved_bytes(T, k, D, H, dtype)
        ratio = got / least
        verdict = "ok" if ratio <= 1.15 else "over the 1.15x target"
        name = str(dtype).removeprefix("torch.")
        print(f"{name:<10}{got / MiB:>11.2f}{least / MiB:>13.2f}{ratio:>7.3f}x{len(saved):>10}  {verdict}")
        details.append((name, sorted(saved.values(), key=lambda s: -s.nbytes)))
    for name, storages in details:
        print(f"\n{name}: largest saved storages (top {args.top} of {len(storages)})")
        print(f"  {'MiB':>8}  {'shape':<16}{'dtype':<16}held by")
        for s in storages[: args.top]:
            print(f"  {s.nbytes / MiB:>8.3f}  {str(list(s.shape)):<16}{str(s.dtype).removeprefix('torch.'):<16}"
                  f"{holders_text(s.holders)}")
        rest = storages[args.top:]
        if rest:
            print(f"  {sum(s.nbytes for s in rest) / MiB:>8.3f}  ({len(rest)} smaller storages)")


# ---------------------------------------------------------------- entry point


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep", type=int, default=2, help="expert-parallel degree of the per-rank table")
    p.add_argument("--dim", type=int, default=256, help="D, model dim (both parts)")
    p.add_argument("--hidden-dim", type=int, default=None, help="H, expert hidden dim (default 2 * dim)")
    p.add_argument("--experts", type=int, default=8, help="E (both parts)")
    p.add_argument("--top-k", type=int, default=2, help="k (both parts)")
    p.add_argument("--tokens", type=int, default=4096, help="T, tokens given to the layer of the saved-tensor part")
    p.add_argument("--top", type=int, default=8, help="saved storages listed per dtype")
    p.add_argument("--saved-only", action="store_true", help="only the saved-tensor part, in one process (no torchrun)")
    args = p.parse_args()
    if args.hidden_dim is None:
        args.hidden_dim = 2 * args.dim
    return args


def main() -> None:
    args = parse_args()
    if not args.saved_only and "RANK" not in os.environ:
        print("not launched by torchrun: only the saved-tensor part runs "
              "(torchrun --nproc-per-node 4 recipes/benchmarks/memory.py --ep 2 for the per-rank table)")
        args.saved_only = True
    if args.saved_only:
        saved_report(args, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return
    train_state_table(args)
    if dist.get_rank() == 0:
        saved_report(args, torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                     else torch.device("cpu"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
