"""Time one MoE layer forward+backward against the dense SwiGLU floor with the same FLOPs.

The floor is one dense SwiGLU (gate and up projections fused, as in the layer) applied to all
``T*k`` routed rows: the expert matmuls of the MoE layer without routing, permutation or combine.
Layer and floor run interleaved in the same process; the table shows medians and their ratio.

    python recipes/benchmarks/moe_layer.py                       # D=256 H=512 E=8 k=2 T=4096
    python recipes/benchmarks/moe_layer.py --dtypes bfloat16 --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ep_fsdp import MoE, MoEConfig


def time_once(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def moe_step(layer: MoE, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)

    return step


def dense_step(rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        rows.grad = w13.grad = w2.grad = None
        gate, up = F.linear(rows, w13).chunk(2, dim=-1)  # [T*k, H] each
        F.linear(F.silu(gate) * up, w2).backward(grad)  # [T*k, D]

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    D, H, E, k, T = args.dim, args.hidden_dim, args.experts, args.top_k, args.tokens
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"MoE layer forward+backward, D={D} H={H} E={E} k={k} T={T}, device={device}, "
          f"threads={torch.get_num_threads()}, torch {torch.__version__}")
    print(f"{'dtype':<10}{'moe layer ms':>14}{'dense floor ms':>16}{'ratio':>8}")
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
        candidates = {"moe": moe_step(layer, x, grad), "dense": dense_step(rows, w13, w2, grad_rows)}
        times: dict[str, list[float]] = {key: [] for key in candidates}
        for i in range(args.warmup + args.repeats):
            for key, fn in candidates.items():  # interleaved: noise hits both alike
                sync()
                t = time_once(lambda: (fn(), sync()))
                if i >= args.warmup:
                    times[key].append(t)
        moe_ms = statistics.median(times["moe"]) * 1e3
        dense_ms = statistics.median(times["dense"]) * 1e3
        print(f"{name:<10}{moe_ms:>14.2f}{dense_ms:>16.2f}{moe_ms / dense_ms:>7.2f}x")


if __name__ == "__main__":
    main()
