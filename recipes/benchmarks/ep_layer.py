"""One expert-parallel MoE layer's forward+backward against the same per-rank work without an exchange.

    torchrun --nproc-per-node 2 recipes/benchmarks/ep_layer.py            # gloo on CPU, NCCL on GPU
    torchrun --nproc-per-node 4 recipes/benchmarks/ep_layer.py --tokens 2048

Every rank feeds ``--tokens`` random tokens to one ``ep_fsdp.MoE`` (D=256 H=512 E=8 k=2 by
default) parallelized with ``ep = world`` (so each rank holds ``E / ep`` experts). The router is
randomly initialised, so routing is roughly even: each rank's experts get about ``tokens * k`` rows,
some ranks a few percent more than others (the slowest rank sets each step's time, as in training).

The reference (``no exchange``) is the same per-rank work with nothing on the wire: an
unparallelized ``ep_fsdp.MoE`` with the ``E / ep`` local experts, the same tokens and top-k,
so the same router, permutation, expert matmuls and combine per rank. Its experts get exactly
``tokens * k`` rows on every rank, while under EP the random router gives some ranks more than
others. ``--balanced`` removes that difference: after each router's own work, every model routes
its tokens so that each expert gets exactly ``tokens * k / E`` rows from each rank (and a token's
experts share a rank as often as under random routing, so as many rows travel), so the experts
do the reference's work under EP too and the ratio is the exchange's own cost. Rows (all interleaved,
medians, the slowest rank per step):

* ``EP`` with ``dispatch_chunks`` 1, 2 and 4, and ``dispatch_dtype=bfloat16`` (float32 compute);
  in bf16 on CPU also ``EP, experts pad arrivals``: one chunk with the experts' ``block_capacity``
  hidden, so the exchange hands them the arriving rows as they are and they pad them into their
  blocks themselves (what the exchange's gather straight into the blocks saves);
  all with ``parallelize_moe``'s default exchange (a token sent at most once to each rank), and
  ``EP, row per expert`` with ``dedup_tokens=False`` (one row per (token, expert): more bytes,
  less index work and one message fewer);
* the ratio to the reference, the MiB a rank sends in one forward (``MiB/fwd``: rows and
  records of the dispatch and the combine, from ``routing_stats``, the mean over ranks; the
  backward sends the rows' gradients back, about as many again), and the share of the step
  spent waiting on the exchange (time inside collective waits and blocking collectives, from a
  profile of a few steps);
* ``all-to-all alone, same bytes``: the transport by itself, four back-to-back
  ``all_to_all_single`` calls (a forward's two exchanges and their gradients' two) that each send
  half of the ``EP, 1 chunk`` row's bytes, split evenly over the peers, with no other work. Its
  ratio is the part of the reference's time that the backend's transport alone adds.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

import ep_fsdp
from bench_util import OneBlock, add_layer_args, shuffled_rounds
from ep_fsdp._row_windows import cpu_low_precision
from ep_fsdp.launch import exit_process
from ep_fsdp.router import RouterOutput

# Profiler events in which a rank waits for (or performs, when blocking) a collective.
_COMM_EVENTS = ("wait_tensor", "all_to_all", "allreduce", "all_reduce", "alltoall", "barrier", "c10d::")


def step_fn(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, sync: Callable[[], None]) -> Callable[[], None]:
    """One forward+backward of ``model`` on ``x``, ending with ``sync`` (the device's)."""
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).backward(grad)
        sync()

    return step


def balanced_ids(T: int, k: int, E: int, device: torch.device) -> torch.Tensor:
    """``[T, k]`` expert ids in which every expert appears exactly once per slot ``j`` in each block
    of ``E`` tokens: token ``t`` takes ``(t + c_j) mod E``, with ``c_0 = 0`` and ``c_1..c_{k-1}``
    distinct offsets in ``1..E-1`` drawn (one seed) per block. A token's experts are distinct and
    fall on one rank or several as often as under a uniformly random choice, so an exchange sends
    as many rows as with random routing."""
    g = torch.Generator().manual_seed(0)
    blocks = -(-T // E)
    offsets = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(E - 1, generator=g)[: k - 1] + 1])
                           for _ in range(blocks)])  # [blocks, k]
    t = torch.arange(T)
    return ((t[:, None] + offsets[t // E]) % E).to(device)  # [T, k]


def balance_routing(model: nn.Module) -> None:
    """Route the tokens of every ``ep_fsdp.MoE`` in ``model`` by :func:`balanced_ids` after its
    router's own work (scores, top-k): with ``T`` a multiple of ``E``, every expert gets ``T * k / E``
    rows of each rank, and each rank's experts the rows of the reference. The gate weights are the
    router's probabilities of those experts, so the router still gets a gradient."""
    made: dict[tuple[int, int, int, torch.device], torch.Tensor] = {}  # made once, outside the timed steps
    for _, layer in ep_fsdp.moe_layers(model):
        routed = layer.router.forward

        def forward(x: torch.Tensor, routed=routed, E: int = layer.config.num_experts, **kwargs) -> RouterOutput:
            out = routed(x, **kwargs)
            key = (*out.expert_ids.shape, E, x.device)
            if key not in made:
                made[key] = balanced_ids(*key)
            ids = made[key]  # [T, k]
            weights = out.probs.gather(-1, ids)  # [T, k]
            return dataclasses.replace(out, expert_ids=ids, weights=weights, slot_scores=weights.detach())

        layer.router.forward = forward


def bare_exchanges(sent_bytes: float, device: torch.device, sync: Callable[[], None]) -> Callable[[], None]:
    """Four ``all_to_all_single`` calls, each waited for at once, that each send ``sent_bytes / 2``
    (half of one forward's bytes to the peers) split evenly over the peers: an expert-parallel
    step's transport (rows out and back, then their gradients) without its compute."""
    world = dist.get_world_size()
    per_peer = max(1, round(sent_bytes / 2 / max(world - 1, 1) / 4))  # float32 words to each peer
    x = torch.zeros(per_peer * world, device=device)  # [world * per_peer]
    splits = [per_peer] * world
    group = dist.group.WORLD

    def step() -> None:
        for _ in range(4):  # torch's functional collective, as the exchange uses
            funcol.wait_tensor(funcol.all_to_all_single(x, splits, splits, group))
        sync()

    return step


def slowest(seconds: float, device: torch.device) -> float:
    """The largest of every rank's ``seconds``."""
    t = torch.tensor([seconds], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def comm_share(fn: Callable[[], None], steps: int) -> float:
    """Share of the wall time of ``steps`` calls spent in collective ops (top-level events)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        wall = time.perf_counter() - start
    waited = sum(
        e.self_cpu_time_total for e in prof.key_averages() if any(k in e.key.lower() for k in _COMM_EVENTS)
    ) / 1e6
    return waited / wall


def main() -> None:
    """Time every row on every rank; rank 0 prints the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_args(p, tokens_help="per rank")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--balanced", action="store_true",
                   help="route every model's tokens evenly over the experts: the reference's rows on every rank")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = ep_fsdp.init_distributed(timeout=datetime.timedelta(seconds=300))
    torch.set_num_threads(args.threads)
    rank, world = dist.get_rank(), dist.get_world_size()
    D, H, E, k, T = args.dim, args.hidden_dim, args.experts, args.top_k, args.tokens
    if args.balanced and T % E:
        raise SystemExit(f"ep_layer.py: --balanced needs tokens % experts == 0 (every expert the same rows); got "
                         f"tokens={T}, experts={E}")
    if E % world or k > E // world:
        raise SystemExit(f"ep_layer.py: need experts % world == 0 and top_k <= experts / world; got E={E}, "
                         f"world={world}, k={k}")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    mesh = ep_fsdp.build_mesh(ep=world, device_type=device.type)
    if rank == 0:
        print(f"EP MoE layer forward+backward, ep={world}, {T} tokens per rank, D={D} H={H} E={E} k={k}, "
              f"device={device}, backend={dist.get_backend()}, threads/rank={torch.get_num_threads()}, "
              f"routing={'balanced' if args.balanced else 'random router'}, torch {torch.__version__}")
        print(f"{'dtype':<10}{'row':<30}{'ms':>9}{'/ no exch.':>11}{'MiB/fwd':>10}{'comm wait':>11}")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        cfg = ep_fsdp.MoEConfig(dim=D, hidden_dim=H, num_experts=E, top_k=k)
        local_cfg = ep_fsdp.MoEConfig(dim=D, hidden_dim=H, num_experts=E // world, top_k=k)
        torch.manual_seed(0)
        reference = OneBlock(ep_fsdp.MoE(local_cfg)).to(device=device, dtype=dtype)
        variants: dict[str, dict] = {"EP, 1 chunk": {}, "EP, 2 chunks": {"dispatch_chunks": 2},
                                     "EP, 4 chunks": {"dispatch_chunks": 4}}
        if k > 1:  # with top_k == 1 both exchanges are the same
            variants["EP, row per expert"] = {"dedup_tokens": False}
        if cpu_low_precision(torch.empty(0, device=device, dtype=dtype)):
            variants["EP, experts pad arrivals"] = {}
        if dtype == torch.float32:
            variants["EP, bf16 wire"] = {"dispatch_dtype": torch.bfloat16}
            variants["EP, bf16 wire, 2 chunks"] = {"dispatch_dtype": torch.bfloat16, "dispatch_chunks": 2}
        models = {}
        for key, options in variants.items():
            torch.manual_seed(0)
            model = OneBlock(ep_fsdp.MoE(cfg)).to(device=device, dtype=dtype)
            ep_fsdp.parallelize_moe(model, mesh, **options)
            if key == "EP, experts pad arrivals":  # the exchange leaves the padding to the experts
                for _, layer in ep_fsdp.moe_layers(model):
                    layer.experts.block_capacity = lambda x, counts: None
            models[key] = model
        if args.balanced:
            for m in (reference, *models.values()):
                balance_routing(m)
        g = torch.Generator(device=device).manual_seed(rank)
        x = torch.randn(T, D, device=device, dtype=dtype, generator=g, requires_grad=True)
        grad = torch.randn(T, D, device=device, dtype=dtype, generator=g)
        candidates = {"no exchange (E/ep local)": step_fn(reference, x, grad, sync)}
        candidates |= {key: step_fn(m, x, grad, sync) for key, m in models.items()}
        sent = {}
        for key, m in models.items():  # two steps of each model, also a warm-up
            for _ in range(2):
                candidates[key]()
            stats = ep_fsdp.routing_stats(m, reset=True)
            layer = next(iter(stats.values()))
            sent[key] = layer["a2a_bytes"] / max(layer["forwards"], 1) / world  # per rank, one forward
        bare = "all-to-all alone, same bytes"
        sent[bare] = sent["EP, 1 chunk"]
        candidates[bare] = bare_exchanges(sent[bare], device, sync)
        times: dict[str, list[float]] = {key: [] for key in candidates}
        for i, order in shuffled_rounds(list(candidates), args.warmup + args.repeats):
            for key in order:  # interleaved, in a new order each round (the same on every rank)
                fn = candidates[key]
                dist.barrier()
                start = time.perf_counter()
                fn()
                took = slowest(time.perf_counter() - start, device)
                if i >= args.warmup:
                    times[key].append(took)
        shares = {}
        for key, fn in candidates.items():
            dist.barrier()
            shares[key] = comm_share(fn, 3)
        ms = {key: statistics.median(v) * 1e3 for key, v in times.items()}
        base = ms["no exchange (E/ep local)"]
        if rank == 0:
            for key, value in ms.items():
                mb = f"{sent[key] / 2**20:.2f}" if key in sent else "0"
                print(f"{name:<10}{key:<30}{value:>9.2f}{value / base:>10.2f}x{mb:>10}{shares[key]:>10.0%}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process()
