"""One-process check of the accelerator path: run it on a machine with a GPU (works on CPU too).

    python recipes/benchmarks/device_check.py            # cuda if available, else cpu

1. The MoE layer on the device against the same layer on CPU in float64 (forward and gradients),
   in float32 and bfloat16, for both grouped-matmul paths (grouped_mm and the per-expert loop).
2. Empty inputs, in both dtypes and both paths: a layer given zero tokens (``[0, D]``) returns
   ``[0, D]``, its backward runs and the expert gradients are exactly zero; experts that receive
   no rows (routing forced with ``expert_bias``) get exactly zero w1/w3/w2 gradient slices while
   the other experts match the float64 CPU reference.
3. Deterministic mode (``torch.use_deterministic_algorithms(True)``): the layer's forward and
   backward run twice on the device give bitwise identical outputs and gradients, in float32 and
   bfloat16, for both paths.
4. parallelize_moe at world size 1 (gloo on CPU, NCCL on CUDA), in one process group: one AdamW
   step of the reference transformer against the unparallelized model on the same batch; and an
   idle rank: a Linear + MoE model given a batch of zero tokens after a normal step, whose backward
   runs and leaves exactly zero expert gradients.
5. The exchange paths on the same 1-rank group (gloo on CPU, NCCL on CUDA), which world size 1
   otherwise never takes (parallelize_moe picks the local dispatcher there):
   a. AllToAllDispatcher and DedupAllToAllDispatcher set on copies of the layer against the layer
      with its LocalDispatcher: output and input, gate, w1/w3/w2 gradients (rel err <= 1e-5 in
      float32, <= 2e-2 in bfloat16), for normal routing, experts without rows (``expert_bias``)
      and zero tokens (``[0, D]`` out, exactly zero expert gradients), with the contiguous
      placement and a permuted one (``physical[e] = (3e + 1) % 8``, expert weights moved to the
      rows it names, gradients compared in logical order). That the permutation matters is
      checked too: permuted weights read through the contiguous placement give another output.
   b. Host synchronisations of one layer forward, per dispatcher and dtype (CUDA only, sync debug
      mode; SKIP on CPU): exactly 1 for the exchanges (the split sizes), 0 for the local layer on
      the grouped_mm path (bfloat16 on sm90+; 1 on the per-expert loop path).
   c. Deterministic mode: each exchange's forward+backward run twice give bitwise identical
      outputs and gradients, in float32 and bfloat16 (CUBLAS_WORKSPACE_CONFIG is set by main()
      before any CUDA work).
6. torch.compile on the device: the layer compiled against eager (output, input, gate, w1/w3/w2
   gradients; float32 rel err <= 1e-4, bfloat16 <= 2e-2, where inductor rounds fused chains once),
   and parallelize_moe at world size 1 followed by ``model.compile()``: one AdamW step of the
   reference transformer against the unparallelized eager model (float32, <= 1e-4).
7. transformers models (with transformers installed): each family of recipes/hf_tiny_model.py
   parallelized in place at world size 1 on the device, one AdamW step against the unparallelized
   model on the same batch (loss with transformers' balancing loss, every parameter; <= 1e-5).
8. The layer benchmark figures (recipes/benchmarks/moe_layer.py) on the device; on CUDA (``--large``)
   also at Qwen3-30B-A3B's expert shape (D=2048 H=768 E=128 k=8, 8192 tokens), eager, compiled
   bf16, and a profile of the bf16 step (recipes/benchmarks/profile_layer.py).
Each part runs even when an earlier one raised (the traceback is printed and counted as a failure).
Prints PASS/FAIL lines and exits non-zero on any failure.
"""

from __future__ import annotations

import contextlib
import copy
import argparse
import os
import subprocess
import sys
import traceback
import warnings
from unittest import mock
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

import ep_fsdp
from bench_util import free_port
from ep_fsdp import experts as experts_mod
from ep_fsdp.dispatch import (AllToAllDispatcher, DedupAllToAllDispatcher, LocalDispatcher, TokenDispatcher,
                              expert_counts)
from ep_fsdp.models import MoETransformer, TransformerConfig

FAILURES: list[str] = []


DTYPES = ((torch.float32, 1e-4), (torch.bfloat16, 5e-2))  # (dtype, forward tolerance)


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name:<60} {detail}".rstrip(), flush=True)
    if not ok:
        FAILURES.append(name)


def report(name: str, err: float, tol: float) -> None:
    check(name, err <= tol, f"rel err {err:.2e} (tol {tol:.0e})")


@contextlib.contextmanager
def grouped_path(device: torch.device, dtype: torch.dtype, grouped_mm: bool) -> Iterator[str]:
    """Force the grouped_mm path (True) or the per-expert loop (False) for (device, dtype); yields its name."""
    experts_mod._GROUPED_MM_WORKS[(device.type, dtype)] = grouped_mm
    try:
        yield "grouped_mm" if grouped_mm else "loop"
    finally:
        experts_mod._GROUPED_MM_WORKS.pop((device.type, dtype), None)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def expert_grads(layer: ep_fsdp.MoE) -> list[torch.Tensor | None]:
    """Full ``[E, ...]`` gradients of w1, w3, w2 (None where a weight got no gradient)."""
    e = layer.experts
    return [None if w.grad is None else local(w.grad) for w in (e.w1, e.w3, e.w2)]


def exactly_zero(t: torch.Tensor | None) -> bool:
    return t is not None and bool((t == 0).all())


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
    for dtype, tol in DTYPES:
        for path in (True, False):
            with grouped_path(device, dtype, path) as path_name:
                layer = copy.deepcopy(ref).to(device=device, dtype=dtype)
                y = layer(x.to(device, dtype))
                g = torch.autograd.grad(y.float().square().sum(), [layer.experts.w1, layer.router.gate.weight])
            name = f"layer {device.type} {str(dtype)[6:]} {path_name}"
            report(f"{name}: output", rel(y, y_ref), tol)
            report(f"{name}: expert grad", rel(g[0], g_ref[0]), 3 * tol)
            report(f"{name}: router grad", rel(g[1], g_ref[1]), 3 * tol)


def zero_token_check(device: torch.device) -> None:
    """A layer given ``[0, D]``: output ``[0, D]``, backward runs, expert gradients exactly zero."""
    torch.manual_seed(0)
    ref = ep_fsdp.MoE(ep_fsdp.MoEConfig(dim=64, hidden_dim=128, num_experts=8, top_k=2, aux_loss_coef=0.01))
    for dtype, _ in DTYPES:
        for path in (True, False):
            with grouped_path(device, dtype, path) as path_name:
                name = f"zero tokens {device.type} {str(dtype)[6:]} {path_name}"
                layer = copy.deepcopy(ref).to(device=device, dtype=dtype)
                x = torch.zeros(0, 64, device=device, dtype=dtype, requires_grad=True)  # [0, D]
                try:
                    y = layer(x)  # [0, D]
                    y.sum().backward()
                except Exception as e:  # noqa: BLE001 - reported as a failure
                    check(f"{name}: forward+backward", False, f"{type(e).__name__}: {e}")
                    continue
            check(f"{name}: output shape", tuple(y.shape) == (0, 64), f"shape {list(y.shape)}")
            grads = expert_grads(layer)
            check(f"{name}: expert grads == 0", all(exactly_zero(g) for g in grads),
                  "w1/w3/w2: " + ", ".join("None" if g is None else f"max |g| {float(g.abs().max()):.1e}" for g in grads))


def idle_expert_check(device: torch.device) -> None:
    """Experts that receive no rows (routing forced by expert_bias): exact zero gradient slices;
    the busy experts' gradients match a float64 CPU reference."""
    torch.manual_seed(0)
    E, busy = 8, [1, 4, 6]  # idle experts at the start, in the middle (two in a row) and at the end
    idle = [e for e in range(E) if e not in busy]
    cfg = ep_fsdp.MoEConfig(dim=64, hidden_dim=128, num_experts=E, top_k=2, expert_bias=True)
    ref = ep_fsdp.MoE(cfg).double()
    with torch.no_grad():
        bias = torch.zeros(E)
        bias[busy] = 10.0  # scores are in (0, 1): every token picks 2 of the busy experts
        ref.router.expert_bias.copy_(bias)
    x = torch.randn(512, 64, dtype=torch.float64)
    ref(x).square().sum().backward()
    g_ref = expert_grads(ref)
    counts = expert_counts(ref.router(x).expert_ids, E)
    for dtype, tol in DTYPES:
        for path in (True, False):
            with grouped_path(device, dtype, path) as path_name:
                layer = copy.deepcopy(ref).to(device=device, dtype=dtype)
                layer(x.to(device, dtype)).float().square().sum().backward()
            name = f"idle experts {device.type} {str(dtype)[6:]} {path_name}"
            grads = expert_grads(layer)
            check(f"{name}: idle slices == 0", all(exactly_zero(g[idle] if g is not None else None) for g in grads),
                  f"w1/w3/w2 of experts {idle}; reference rows per expert {counts.tolist()}")
            worst = max(rel(g[busy], r[busy]) for g, r in zip(grads, g_ref))
            report(f"{name}: busy slices vs float64", worst, 3 * tol)


def determinism_check(device: torch.device) -> None:
    """Forward+backward twice under use_deterministic_algorithms(True): bitwise identical results."""
    torch.manual_seed(0)
    ref = ep_fsdp.MoE(ep_fsdp.MoEConfig(dim=64, hidden_dim=128, num_experts=8, top_k=2, aux_loss_coef=0.01))
    x = torch.randn(1024, 64)
    torch.use_deterministic_algorithms(True)
    try:
        for dtype, _ in DTYPES:
            for path in (True, False):
                with grouped_path(device, dtype, path) as path_name:
                    name = f"deterministic {device.type} {str(dtype)[6:]} {path_name}"
                    layer = copy.deepcopy(ref).to(device=device, dtype=dtype)
                    try:
                        first, second = (forward_backward(layer, x.to(device, dtype)) for _ in range(2))
                    except Exception as e:  # noqa: BLE001 - e.g. an op without a deterministic kernel
                        check(f"{name}: runs", False, f"{type(e).__name__}: {e}")
                        continue
                same = [torch.equal(a, b) for a, b in zip(first, second)]
                check(f"{name}: bitwise identical", all(same),
                      f"{sum(same)}/{len(same)} of output, input grad, gate/w1/w3/w2 grads")
    finally:
        torch.use_deterministic_algorithms(False)


def forward_backward(layer: ep_fsdp.MoE, x: torch.Tensor) -> list[torch.Tensor]:
    """Output, input gradient and parameter gradients of one forward+backward (clones)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = layer(x)
    y.float().square().sum().backward()
    params = [layer.router.gate.weight, layer.experts.w1, layer.experts.w3, layer.experts.w2]
    return [y.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in params]


class LinearMoE(nn.Module):
    """The smallest model around one MoE layer whose input may have zero rows: ``[N, D] -> [N, D]``."""

    def __init__(self, cfg: ep_fsdp.MoEConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.moe = ep_fsdp.MoE(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(self.proj(x))


def parallel_checks(device: torch.device) -> None:
    """The world-size-1 parallel cases, inside one process group."""
    # NOTE: the rendezvous variables are set for these checks only, so that the benchmark run
    # afterwards (a subprocess) makes its own rendezvous instead of reusing this one's port
    # (EADDRINUSE while it is in TIME_WAIT)
    rendezvous = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    with mock.patch.dict(os.environ, rendezvous):
        device = ep_fsdp.init_distributed()
        try:
            for part in (parallel_step_check, idle_rank_check, exchange_parity_check, placement_matters_check,
                         host_sync_check, exchange_determinism_check):
                run_part(part, device)
            run_part(parallel_step_check, device, True, 1e-4)
            run_part(hf_step_check, device)
        finally:
            dist.destroy_process_group()


EXCHANGE_DTYPES = ((torch.float32, 1e-5), (torch.bfloat16, 2e-2))  # (dtype, tolerance against the local layer)
EXCHANGES: tuple[type[TokenDispatcher], ...] = (AllToAllDispatcher, DedupAllToAllDispatcher)
PERMUTED = [(3 * e + 1) % 8 for e in range(8)]  # storage row of each logical expert: a non-contiguous placement
RESULTS = ("output", "input grad", "gate grad", "w1 grad", "w3 grad", "w2 grad")  # what forward_backward returns


def exchange_ref(device: torch.device, dtype: torch.dtype, case: str) -> ep_fsdp.MoE:
    """The local layer of one exchange case; for ``"empty experts"`` every token picks experts 1
    and 4 (``expert_bias``), so the six other experts get no rows."""
    torch.manual_seed(0)
    cfg = ep_fsdp.MoEConfig(dim=64, hidden_dim=128, num_experts=8, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001,
                            expert_bias=case == "empty experts")
    layer = ep_fsdp.MoE(cfg).to(device=device, dtype=dtype)
    if case == "empty experts":
        with torch.no_grad():
            layer.router.expert_bias[[1, 4]] = 100.0  # scores are in (0, 1)
    return layer


def with_dispatcher(ref: ep_fsdp.MoE, cls: type[TokenDispatcher], physical: list[int] | None) -> ep_fsdp.MoE:
    """A copy of ``ref`` that routes through ``cls`` on the 1-rank WORLD group; with ``physical``,
    a non-contiguous placement and the expert weights moved to the rows it names."""
    layer = copy.deepcopy(ref)
    if physical is None:
        placement = ep_fsdp.ExpertPlacement.contiguous(8, 1)
    else:
        placement = ep_fsdp.ExpertPlacement(8, 1, physical=physical)
        permute_experts(layer, physical)
    layer.dispatcher = cls(placement, dist.group.WORLD) if cls is not LocalDispatcher else cls(placement)
    return layer


def permute_experts(layer: ep_fsdp.MoE, physical: list[int]) -> None:
    """Store logical expert ``e`` in row ``physical[e]`` of w1/w3/w2 (what a placement map expects)."""
    with torch.no_grad():
        for w in (layer.experts.w1, layer.experts.w3, layer.experts.w2):
            moved = torch.empty_like(w)
            moved[physical] = w
            w.copy_(moved)


def to_logical(results: list[torch.Tensor], physical: list[int] | None) -> list[torch.Tensor]:
    """forward_backward results with the expert gradients (w1/w3/w2) back in logical expert order."""
    return results if physical is None else results[:3] + [g[physical] for g in results[3:]]


def exchange_parity_check(device: torch.device) -> None:
    """The all-to-all and deduplicated dispatchers on the 1-rank group against the local layer:
    output, input/gate/w1/w3/w2 gradients, for each case, dtype and placement."""
    for dtype, tol in EXCHANGE_DTYPES:
        for case in ("routing", "empty experts", "zero tokens"):
            ref = exchange_ref(device, dtype, case)
            x = torch.randn(0 if case == "zero tokens" else 512, 64, device=device, dtype=dtype)  # [T, D]
            want = forward_backward(ref, x)
            for cls in EXCHANGES:
                for physical in (None, PERMUTED):
                    name = f"{cls.__name__} {device.type} {str(dtype)[6:]} {case}"
                    compare_exchange(name + (" permuted" if physical else ""), with_dispatcher(ref, cls, physical),
                                     x, want, tol, physical)


def compare_exchange(name: str, layer: ep_fsdp.MoE, x: torch.Tensor, want: list[torch.Tensor], tol: float,
                     physical: list[int] | None) -> None:
    try:
        got = to_logical(forward_backward(layer, x), physical)
    except Exception as e:  # noqa: BLE001 - reported as a failure
        check(f"{name}: forward+backward", False, f"{type(e).__name__}: {e}")
        return
    worst_name(f"{name}: vs local", {what: rel(a, b) for what, a, b in zip(RESULTS, got, want)}, tol)
    if x.shape[0] == 0:
        check(f"{name}: [0, D] out, expert grads == 0", tuple(got[0].shape) == (0, 64)
              and all(exactly_zero(g) for g in got[3:]), f"shape {list(got[0].shape)}")


def placement_matters_check(device: torch.device) -> None:
    """The permuted comparisons can fail: permuted weights read through the contiguous placement
    give another layer."""
    for dtype, tol in EXCHANGE_DTYPES:
        ref = exchange_ref(device, dtype, "routing")
        x = torch.randn(512, 64, device=device, dtype=dtype)
        layer = copy.deepcopy(ref)
        permute_experts(layer, PERMUTED)
        with torch.no_grad():
            err = rel(layer(x), ref(x))
        check(f"permuted weights, contiguous placement {device.type} {str(dtype)[6:]}: differ", err > 0.1,
              f"rel err {err:.2e} (must exceed 1e-01, far above the tolerance {tol:.0e})")


def host_syncs(fn: Callable[[], object]) -> list[str]:
    """Where ``fn()`` synchronised the device with the host (``file:line`` of each; CUDA sync
    debug mode, CUDA only)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # NOTE: the words of the sync warning itself: the one-time notice that sync debug mode is a
    # prototype also says "synchronizing", and was counted as a sync of the first check
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "called a synchronizing" in str(w.message)]


def host_sync_check(device: torch.device) -> None:
    """Host syncs of one layer forward: 1 per exchange (the split sizes), 0 for the local layer on
    the grouped_mm path (1 on the loop path, which needs the counts on the host)."""
    for dtype, _ in EXCHANGE_DTYPES:
        ref = exchange_ref(device, dtype, "routing")
        x = torch.randn(512, 64, device=device, dtype=dtype)
        for cls in (LocalDispatcher,) + EXCHANGES:
            name = f"{cls.__name__} {device.type} {str(dtype)[6:]}: host syncs per forward"
            if device.type != "cuda":
                print(f"SKIP  {name} (CUDA only)", flush=True)
                continue
            layer = with_dispatcher(ref, cls, None)
            try:
                layer(x)  # warm-up: lazy initialisation is not counted
                syncs = host_syncs(lambda: layer(x))
            except Exception as e:  # noqa: BLE001 - reported as a failure
                check(name, False, f"{type(e).__name__}: {e}")
                continue
            grouped = experts_mod.use_grouped_mm(device, dtype, (64, 128))
            expected = 0 if cls is LocalDispatcher and grouped else 1
            path = "grouped_mm" if grouped else "loop"
            where = f" at {', '.join(syncs)}" if syncs else ""
            check(name, len(syncs) == expected, f"{len(syncs)} (expected {expected}, {path} path){where}")


def exchange_determinism_check(device: torch.device) -> None:
    """Each exchange, forward+backward twice under use_deterministic_algorithms(True): bitwise identical."""
    torch.use_deterministic_algorithms(True)
    try:
        for dtype, _ in DTYPES:
            ref = exchange_ref(device, dtype, "routing")
            x = torch.randn(1024, 64, device=device, dtype=dtype)
            for cls in EXCHANGES:
                name = f"deterministic {cls.__name__} {device.type} {str(dtype)[6:]}"
                layer = with_dispatcher(ref, cls, None)
                try:
                    first, second = (forward_backward(layer, x) for _ in range(2))
                except Exception as e:  # noqa: BLE001 - e.g. an op without a deterministic kernel
                    check(f"{name}: runs", False, f"{type(e).__name__}: {e}")
                    continue
                same = [torch.equal(a, b) for a, b in zip(first, second)]
                check(f"{name}: bitwise identical", all(same), f"{sum(same)}/{len(same)} of {', '.join(RESULTS)}")
    finally:
        torch.use_deterministic_algorithms(False)


def idle_rank_check(device: torch.device) -> None:
    """A parallelized model whose MoE layer gets zero tokens in a step: backward runs, expert grads exactly zero."""
    torch.manual_seed(0)
    cfg = ep_fsdp.MoEConfig(dim=64, hidden_dim=96, num_experts=8, top_k=2, aux_loss_coef=0.01)
    model = LinearMoE(cfg).to(device)
    ep_fsdp.parallelize_moe(model, ep_fsdp.build_mesh(ep=1))
    name = f"parallelize_moe world=1 ({dist.get_backend()}): idle rank"
    for tokens in (32, 0):  # a normal step first, then one with no tokens
        model.zero_grad(set_to_none=True)
        x = torch.randn(tokens, cfg.dim, device=device)  # [N, D]
        try:
            y = model(x)
            (y.square().sum() + ep_fsdp.moe_aux_loss(model)).backward()
        except Exception as e:  # noqa: BLE001 - reported as a failure
            check(f"{name}: {tokens} tokens forward+backward", False, f"{type(e).__name__}: {e}")
            return
    check(f"{name}: output shape", tuple(y.shape) == (0, cfg.dim), f"shape {list(y.shape)}")
    grads = expert_grads(model.moe)
    check(f"{name}: expert grads == 0", all(exactly_zero(g) for g in grads),
          "w1/w3/w2: " + ", ".join("None" if g is None else f"max |g| {float(g.abs().max()):.1e}" for g in grads))


def parallel_step_check(device: torch.device, compiled: bool = False, tol: float = 1e-5) -> None:
    """One AdamW step of the reference transformer parallelized at world size 1 (then compiled,
    with ``compiled``) against the unparallelized eager model."""
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
    name = f"parallelize_moe world=1 ({dist.get_backend()})" + (", compiled" if compiled else "")
    if compiled:
        model.compile()
    loss = step(model)
    report(f"{name}: loss", abs(loss - loss_ref) / abs(loss_ref), tol)
    ref_params = dict(ref.named_parameters())
    worst = max(rel(p.full_tensor(), ref_params[n]) for n, p in model.named_parameters())
    report(f"{name}: params after AdamW", worst, tol)


def hf_step_check(device: torch.device) -> None:
    """Each tiny transformers family parallelized at world size 1: one AdamW step against the
    unparallelized model (loss including transformers' balancing loss, every parameter)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("SKIP  transformers models (transformers is not installed)", flush=True)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # recipes/
    from hf_tiny_model import FAMILIES, tiny_config

    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7)).to(device)
    for family in FAMILIES:
        name = f"transformers {family} parallelized world=1 ({dist.get_backend()})"
        torch.manual_seed(0)
        try:
            model = AutoModelForCausalLM.from_config(tiny_config(family)).float()
        except Exception as e:  # noqa: BLE001 - a family this transformers version lacks
            print(f"SKIP  {name} ({type(e).__name__}: {e})", flush=True)
            continue
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith(("gate.weight", "router.weight")):  # zero at init in some families
                    p.normal_(0, 0.5)
        model = model.to(device)
        ref = copy.deepcopy(model)
        ref.config.output_router_logits = True  # transformers adds coef * its balancing loss
        again = copy.deepcopy(ref)  # the reference run twice: the device's own run-to-run noise
        losses, grads = [], []
        for m, parallel in ((ref, False), (model, True), (again, False)):
            if parallel:  # ep_fsdp records the router logits; moe_aux_loss adds the same loss
                ep_fsdp.parallelize_moe(m, ep_fsdp.build_mesh(ep=1))
            m.train()
            loss = m(tokens, labels=tokens).loss + (ep_fsdp.moe_aux_loss(m) if parallel else 0.0)
            loss.backward()
            grads.append({n: local(p.grad) for n, p in m.named_parameters() if p.grad is not None})
            torch.optim.AdamW(m.parameters(), lr=1e-3).step()
            losses.append(float(loss.detach()))
        report(f"{name}: loss", abs(losses[1] - losses[0]) / abs(losses[0]), 1e-5)
        check(f"{name}: same parameters get gradients", grads[0].keys() == grads[1].keys(),
              f"{len(grads[1])} of {len(grads[0])}")
        noise = max(rel(g, grads[0][n]) for n, g in grads[2].items())
        worst_name(f"{name}: grads", {n: rel(g, grads[0][n]) for n, g in grads[1].items() if n in grads[0]}, 1e-5,
                   f"reference run twice: {noise:.1e}")
        ref_params, again_params = dict(ref.named_parameters()), dict(again.named_parameters())
        noise = max(rel(p, ref_params[n]) for n, p in again_params.items())
        worst_name(f"{name}: params after AdamW", {n: rel(local(p), ref_params[n]) for n, p in model.named_parameters()},
                   1e-5, f"reference run twice: {noise:.1e}")


def worst_name(name: str, errors: dict[str, float], tol: float, note: str = "") -> None:
    """Check the largest of named relative errors, and name the tensor it belongs to."""
    key = max(errors, key=errors.__getitem__)
    check(name, errors[key] <= tol, f"rel err {errors[key]:.2e} (tol {tol:.0e}, worst: {key}" + (f"; {note})" if note else ")"))


COMPILE_DTYPES = ((torch.float32, 1e-4), (torch.bfloat16, 2e-2))  # (dtype, tolerance against eager)


def compile_check(device: torch.device) -> None:
    """The layer under torch.compile against the same layer in eager mode, forward and backward."""
    torch.manual_seed(0)
    ref = ep_fsdp.MoE(ep_fsdp.MoEConfig(dim=64, hidden_dim=128, num_experts=8, top_k=2, aux_loss_coef=0.01))
    x = torch.randn(512, 64)  # [T, D]
    for dtype, tol in COMPILE_DTYPES:
        name = f"compiled layer {device.type} {str(dtype)[6:]}"
        eager = copy.deepcopy(ref).to(device=device, dtype=dtype)
        compiled = copy.deepcopy(eager)
        compiled.compile()
        want = forward_backward(eager, x.to(device, dtype))
        try:
            got = forward_backward(compiled, x.to(device, dtype))
        except Exception as e:  # noqa: BLE001 - reported as a failure
            check(f"{name}: forward+backward", False, f"{type(e).__name__}: {e}")
            continue
        worst_name(f"{name}: vs eager", {what: rel(a, b) for what, a, b in zip(RESULTS, got, want)}, tol)


def run_part(part: Callable[..., None], *args: object) -> None:
    """Run one part of the check; an exception is printed and counted, and the next part runs."""
    try:
        part(*args)
    except Exception as e:  # noqa: BLE001 - reported as a failure
        traceback.print_exc()
        check(f"{part.__name__} raised", False, f"{type(e).__name__}: {e}")


LARGE = ("--dim", "2048", "--hidden-dim", "768", "--experts", "128", "--top-k", "8", "--tokens", "8192")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", action=argparse.BooleanOptionalAction, default=True,
                   help="run the layer benchmark (part 8) after the checks")
    p.add_argument("--large", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                   help="with --bench, also the large shape (" + " ".join(LARGE) + "): eager and compiled "
                        "rows and a profile (default: on CUDA)")
    args = p.parse_args()
    # NOTE: cuBLAS is deterministic only with this workspace setting (read when a handle is made).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device check on {name}, torch {torch.__version__}", flush=True)
    for part in (layer_check, zero_token_check, idle_expert_check, determinism_check, parallel_checks, compile_check):
        run_part(part, device)
    if args.bench:
        here = Path(__file__).parent
        runs = [[str(here / "moe_layer.py"), "--repeats", "20" if device.type == "cuda" else "3",
                 "--dtypes", "float32", "bfloat16"] + ([] if device.type == "cuda" else ["--tokens", "1024"])]
        if args.large:  # the expert shape of Qwen3-30B-A3B: where a GPU is busy, not launch-bound
            runs += [[str(here / "moe_layer.py"), *LARGE, "--repeats", "10", "--no-compile"],
                     [str(here / "moe_layer.py"), *LARGE, "--repeats", "10", "--dtypes", "bfloat16", "--no-hf"],
                     [str(here / "profile_layer.py"), *LARGE, "--dtype", "bfloat16"]]
        for cmd in runs:
            run = subprocess.run([sys.executable, *cmd], check=False)
            if run.returncode != 0:
                FAILURES.append(f"{Path(cmd[0]).name} exited with {run.returncode}")
    print(f"{len(FAILURES)} failed: {FAILURES}" if FAILURES else "all device checks passed", flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
