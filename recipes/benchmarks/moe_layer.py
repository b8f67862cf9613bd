"""Time one MoE layer forward+backward against the dense SwiGLU floor with the same FLOPs.

The floor is one dense SwiGLU (gate and up projections fused, as in the layer) applied to all
``T*k`` routed rows: the expert matmuls of the MoE layer without routing, permutation or combine.
Layer and floor run interleaved in the same process, in a new random order each round; the table
shows medians, their ratio, and the median minor page faults per step (memory the allocator got
back from the kernel and touches again; glibc's heap trimming makes them). The
layer runs twice: on one fixed input, and on a new input every step (new routing, as in training).

With transformers installed (``--hf``, the default when it is), more rows on the same shapes:
transformers' Qwen3-MoE sparse block as transformers runs it (its ``grouped_mm`` experts), the same
block after ``ep_fsdp.parallelize_moe`` at world size 1 (ep_fsdp's dispatcher around the block's
own experts forward), and ``ep_fsdp.MoE`` parallelized the same way; ratios to the floor and
of the parallelized transformers block to the parallelized ``ep_fsdp.MoE``, and the ratio of
``ep_fsdp.MoE`` to the fastest peer measured. With torchtitan installed (``--torchtitan``, the
default when it is), its MoE layer on the same shapes: a peer of the bf16 rows (its experts
always compute in bf16). "its experts alone" times the layer's grouped experts on rows already
sorted by expert (the part no dispatcher removes); "dispatch" is the rest, as a share of the
floor. With ``--compile`` (default): the floor, the layer and its experts under
``torch.compile``, and their ratios.

    python recipes/benchmarks/moe_layer.py                       # D=256 H=512 E=8 k=2 T=4096
    python recipes/benchmarks/moe_layer.py --dtypes bfloat16 --repeats 30
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import ep_fsdp
from bench_util import OneBlock, add_layer_args, free_port, shuffled_rounds
from ep_fsdp import MoE, MoEConfig
from ep_fsdp.dispatch.local import sort_slots


try:
    import resource
except ImportError:  # not on Windows: no fault counts there
    resource = None  # type: ignore[assignment]


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def time_once(fn: Callable[[], None]) -> tuple[float, int]:
    """Seconds one call of ``fn`` took, and the minor page faults the process took meanwhile (the
    first touch of memory the allocator got back from the kernel: glibc returns freed heap to it
    past its trim threshold, and the next step faults those pages in again)."""
    faults = _minor_faults()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, _minor_faults() - faults


# the peers' own rows, which are left out when they cannot run here (ep_fsdp's rows never are), and
# with each the row that runs the same peer's experts through ep_fsdp's dispatcher
PEER_ROWS = {"transformers Qwen3-MoE block": ("  parallelized by ep_fsdp",), "torchtitan MoE": (),
             "torchtitan MoE (experts in bf16)": ()}


def moe_step(layer: MoE, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)

    return step


def fresh_routing_step(layer: MoE, xs: list[torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    """Like :func:`moe_step`, on a new input each call: routing (and every expert's row count)
    changes every step, as in training. With one fixed input the per-expert matmul shapes repeat
    and the matmul library's per-shape kernel cache always hits."""
    inputs = iter(xs)

    def step() -> None:
        x = next(inputs)
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)

    return step


def experts_step(layer: MoE, x: torch.Tensor, compiled: bool = False) -> Callable[[], None]:
    """The layer's experts alone (grouped matmuls and SwiGLU, forward+backward) on ``x``'s routed
    rows already sorted by expert, with the layer's own per-expert row counts: what any layer
    built on per-expert matmuls pays, with no routing, permutation or combine (``compiled``: the
    experts module under ``torch.compile``)."""
    experts = torch.compile(layer.experts) if compiled else layer.experts
    with torch.no_grad():
        ids = layer.router(x.reshape(-1, x.shape[-1])).expert_ids  # [T, k]
    sort = sort_slots(ids, layer.config.num_experts)  # the layer's own sort of its slots by expert
    rows = x.detach()[sort.sort_idx // sort.top_k].requires_grad_()  # [S, D]
    counts, counts_host = sort.counts, sort.counts.tolist()  # [E]
    grad = torch.randn_like(rows)

    def step() -> None:
        rows.grad = None
        layer.experts.zero_grad(set_to_none=True)
        experts(rows, counts, counts_host).backward(grad)

    return step


def block_step(block: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """A module of ``[1, T, D] -> [1, T, D]`` (a transformers sparse MoE block)."""
    def step() -> None:
        x.grad = None
        block.zero_grad(set_to_none=True)
        block(x[None]).backward(grad[None])

    return step


def qwen3_moe_block(D: int, H: int, E: int, k: int) -> nn.Module:
    """transformers' Qwen3-MoE sparse block (router + experts) with its grouped_mm experts."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=H, num_experts=E, num_experts_per_tok=k,
                            norm_topk_prob=True)
    config._experts_implementation = "grouped_mm"
    block = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            nn.init.uniform_(p, -p.shape[-1] ** -0.5, p.shape[-1] ** -0.5)
    return block


def torchtitan_moe(D: int, H: int, E: int, k: int) -> nn.Module:
    """torchtitan's MoE layer (softmax router with normalized top-k weights, grouped_mm experts,
    its local token dispatcher, no load-balancing bias), ``[1, T, D] -> [1, T, D]``.

    NOTE: its experts always compute in bf16 (they cast rows and weights), so it is a peer of the
    bf16 rows only; its float32 row is printed for reference and left out of the peer ratio.
    """
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import MoE as TitanMoE
    from torchtitan.models.common.moe import GroupedExperts, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    config = TitanMoE.Config(
        num_experts=E,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=D, hidden_dim=H, num_experts=E),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=k)),
        router=TokenChoiceTopKRouter.Config(num_experts=E, gate=Linear.Config(in_features=D, out_features=E),
                                            top_k=k, score_func="softmax", route_norm=True),
        load_balance_coeff=None)
    layer = config.build()
    with torch.no_grad():
        for p in layer.parameters():
            nn.init.uniform_(p, -p.shape[-1] ** -0.5, p.shape[-1] ** -0.5)
    return layer


def parallelized_world1(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` as the one block of a model parallelized by ep_fsdp on a 1-rank mesh (gloo on
    CPU, NCCL on CUDA)."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = free_port()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    holder = OneBlock(module)
    ep_fsdp.parallelize_moe(holder, ep_fsdp.build_mesh(ep=1, device_type=device.type))
    return holder


def dense_swiglu(rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The floor: one dense SwiGLU, gate and up fused, ``[T*k, D] -> [T*k, D]``."""
    gate, up = F.linear(rows, w13).chunk(2, dim=-1)  # [T*k, H] each
    return F.linear(F.silu(gate) * up, w2)  # [T*k, D]


def dense_step(rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, grad: torch.Tensor,
               fn: Callable[..., torch.Tensor] = dense_swiglu) -> Callable[[], None]:
    def step() -> None:
        rows.grad = w13.grad = w2.grad = None
        fn(rows, w13, w2).backward(grad)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_args(p)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="add torch.compile rows: the compiled floor and the compiled layer")
    p.add_argument("--torchtitan", action=argparse.BooleanOptionalAction,
                   default=importlib.util.find_spec("torchtitan") is not None,
                   help="add torchtitan's MoE layer as a peer row (default: when torchtitan is installed)")
    p.add_argument("--hf", action=argparse.BooleanOptionalAction,
                   default=importlib.util.find_spec("transformers") is not None,
                   help="add the transformers rows (default: when transformers is installed)")
    args = p.parse_args()
    D, H, E, k, T = args.dim, args.hidden_dim, args.experts, args.top_k, args.tokens
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"MoE layer forward+backward, D={D} H={H} E={E} k={k} T={T}, device={device}, "
          f"threads={torch.get_num_threads()}, torch {torch.__version__}")
    print(f"{'dtype':<10}{'row':<34}{'ms':>9}{'/ floor':>9}{'faults':>8}")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        torch.manual_seed(0)
        layer = MoE(MoEConfig(dim=D, hidden_dim=H, num_experts=E, top_k=k)).to(device=device, dtype=dtype)
        x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(T, D, device=device, dtype=dtype)
        rows = torch.randn(T * k, D, device=device, dtype=dtype, requires_grad=True)
        w13 = torch.randn(2 * H, D, device=device, dtype=dtype, requires_grad=True)
        w2 = torch.randn(D, H, device=device, dtype=dtype, requires_grad=True)
        grad_rows = torch.randn(T * k, D, device=device, dtype=dtype)
        candidates = {"dense floor": dense_step(rows, w13, w2, grad_rows), "ep_fsdp.MoE": moe_step(layer, x, grad),
                      "  its experts alone": experts_step(layer, x)}
        xs = [torch.randn(T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(args.warmup + args.repeats)]
        candidates["ep_fsdp.MoE, new routing each step"] = fresh_routing_step(layer, xs, grad)
        if args.compile:
            candidates["dense floor compiled"] = dense_step(rows, w13, w2, grad_rows, torch.compile(dense_swiglu))
            compiled = copy.deepcopy(layer)
            compiled.compile()
            candidates["ep_fsdp.MoE compiled"] = moe_step(compiled, x, grad)
            candidates["  its experts alone compiled"] = experts_step(compiled, x, compiled=True)
        if args.hf:
            block = qwen3_moe_block(D, H, E, k).to(device=device, dtype=dtype)
            candidates["transformers Qwen3-MoE block"] = block_step(block, x, grad)
            candidates["  parallelized by ep_fsdp"] = block_step(parallelized_world1(copy.deepcopy(block), device),
                                                                 x, grad)
            candidates["ep_fsdp.MoE parallelized"] = moe_step(parallelized_world1(copy.deepcopy(layer), device), x, grad)
        if args.torchtitan:
            with warnings.catch_warnings():  # its float32 gate runs under a CPU autocast it warns about
                warnings.simplefilter("ignore")
                titan = torchtitan_moe(D, H, E, k).to(device=device, dtype=dtype)
            label = "torchtitan MoE" + (" (experts in bf16)" if dtype != torch.bfloat16 else "")
            candidates[label] = block_step(titan, x, grad)
        for key in [key for key in candidates if key in PEER_ROWS]:
            try:  # a peer that cannot run here (e.g. a kernel missing for this device and dtype) is left out
                candidates[key]()
                sync()
            except Exception as e:  # noqa: BLE001 - reported, and the row left out
                print(f"{name:<10}{key:<34} left out: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                for dropped in (key, *PEER_ROWS[key]):
                    candidates.pop(dropped, None)
        times: dict[str, list[float]] = {key: [] for key in candidates}
        page_faults: dict[str, list[int]] = {key: [] for key in candidates}
        for i, order in shuffled_rounds(list(candidates), args.warmup + args.repeats):
            for key in order:  # interleaved, in a new order each round
                fn = candidates[key]
                sync()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t, faults = time_once(lambda: (fn(), sync()))
                if i >= args.warmup:
                    times[key].append(t)
                    page_faults[key].append(faults)
        ms = {key: statistics.median(v) * 1e3 for key, v in times.items()}
        for key, value in ms.items():
            print(f"{name:<10}{key:<34}{value:>9.2f}{value / ms['dense floor']:>8.2f}x"
                  f"{statistics.median(page_faults[key]):>8.0f}")
        share = (ms["ep_fsdp.MoE"] - ms["  its experts alone"]) / ms["dense floor"]
        print(f"{name:<10}{'dispatch (MoE - experts) / floor':<34}{'':>9}{share:>8.2f}x")
        if args.compile:
            ratio = ms["ep_fsdp.MoE compiled"] / ms["dense floor compiled"]
            print(f"{name:<10}{'compiled MoE / compiled floor':<34}{'':>9}{ratio:>8.2f}x")
            ratio = ms["  its experts alone compiled"] / ms["dense floor compiled"]
            print(f"{name:<10}{'  compiled experts / floor':<34}{'':>9}{ratio:>8.2f}x")
        peers = [key for key in ("transformers Qwen3-MoE block", "torchtitan MoE") if key in ms]
        if peers:
            fastest = min(peers, key=ms.__getitem__)
            print(f"{name:<10}{'ep_fsdp.MoE / fastest peer':<34}{'':>9}{ms['ep_fsdp.MoE'] / ms[fastest]:>8.2f}x  ({fastest})")
        if "  parallelized by ep_fsdp" in ms:
            ratio = ms["  parallelized by ep_fsdp"] / ms["ep_fsdp.MoE parallelized"]
            print(f"{name:<10}{'transformers block / ep_fsdp.MoE':<34}{'':>9}{ratio:>8.2f}x  (both parallelized)")


if __name__ == "__main__":
    main()
