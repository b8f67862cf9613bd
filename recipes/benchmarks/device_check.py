"""One-process check of the accelerator path: run it on a machine with a GPU (works on CPU too).

    python recipes/benchmarks/device_check.py            # cuda if available, else cpu

1. The MoE layer on the device against the same layer on CPU in float64 (forward and gradients),
   in float32 and bfloat16, for both grouped-matmul paths (grouped_mm and the per-expert loop).
2. parallelize_moe at world size 1 (gloo on CPU, NCCL on CUDA): one AdamW step of the reference
   transformer against the unparallelized model on the same batch.
3. The layer benchmark figures (recipes/benchmarks/moe_layer.py) on the device.
Prints PASS/FAIL lines and exits non-zero on any failure.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ep_fsdp
from ep_fsdp import experts as experts_mod
from ep_fsdp.models import MoETransformer, TransformerConfig

FAILURES: list[str] = []


def report(name: str, err: float, tol: float) -> None:
    ok = err <= tol
    print(f"{'PASS' if ok else 'FAIL'}  {name:<58} rel err {err:.2e} (tol {tol:.0e})", flush=True)
    if not ok:
        FAILURES.append(name)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def layer_check(device: torch.device) -> None:
    torch.manual_seed(0)
    cfg = ep_fsdp.MoEConfig(dim=64, hidden_dim=128, num_experts=8, top_k=2, aux_loss_coef=0.01)
    ref = ep_fsdp.MoE(cfg).double()
    x = torch.randn(512, 64, dtype=torch.float64)
    y_ref = ref(x)
    g_ref = torch.autograd.grad(y_ref.square().sum(), [ref.experts.w1, ref.router.gate.weight])
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        for path in (True, False):
            experts_mod._GROUPED_MM_WORKS[(device.type, dtype)] = path
            layer = copy.deepcopy(ref).to(device=device, dtype=dtype)
            y = layer(x.to(device, dtype))
            g = torch.autograd.grad(y.float().square().sum(), [layer.experts.w1, layer.router.gate.weight])
            name = f"layer {device.type} {str(dtype)[6:]} {'grouped_mm' if path else 'loop'}"
            report(f"{name}: output", rel(y, y_ref), tol)
            report(f"{name}: expert grad", rel(g[0], g_ref[0]), 3 * tol)
            report(f"{name}: router grad", rel(g[1], g_ref[1]), 3 * tol)
            experts_mod._GROUPED_MM_WORKS.pop((device.type, dtype))


def parallel_check(device: torch.device) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = ep_fsdp.init_distributed()
    torch.manual_seed(0)
    moe = ep_fsdp.MoEConfig(dim=64, hidden_dim=96, num_experts=8, top_k=2, aux_loss_coef=0.01)
    model = MoETransformer(TransformerConfig(vocab_size=256, dim=64, num_layers=2, num_heads=4, max_seq_len=64,
                                             num_dense_layers=1, moe=moe)).to(device)
    ref = copy.deepcopy(model)
    tokens = torch.randint(0, 256, (4, 33), device=device)

    def step(m: torch.nn.Module) -> float:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        loss = F.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()) + ep_fsdp.moe_aux_loss(m)
        loss.backward()
        opt.step()
        return float(loss.detach())

    loss_ref = step(ref)
    ep_fsdp.parallelize_moe(model, ep_fsdp.build_mesh(ep=1))
    loss = step(model)
    report(f"parallelize_moe world=1 ({dist.get_backend()}): loss", abs(loss - loss_ref) / abs(loss_ref), 1e-5)
    ref_params = dict(ref.named_parameters())
    worst = max(rel(p.full_tensor(), ref_params[n]) for n, p in model.named_parameters())
    report(f"parallelize_moe world=1 ({dist.get_backend()}): params after AdamW", worst, 1e-5)
    dist.destroy_process_group()


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device check on {name}, torch {torch.__version__}", flush=True)
    layer_check(device)
    parallel_check(device)
    bench = Path(__file__).with_name("moe_layer.py")
    subprocess.run([sys.executable, str(bench), "--repeats", "20" if device.type == "cuda" else "3",
                    "--dtypes", "float32", "bfloat16"] + ([] if device.type == "cuda" else ["--tokens", "1024"]),
                   check=False)
    print(f"{len(FAILURES)} failed: {FAILURES}" if FAILURES else "all device checks passed", flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
