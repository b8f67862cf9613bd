"""Model, training step and state capture shared by the checkpoint tests (workers and driver)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

import ep_fsdp
import ep_fsdp.checkpoint as ckpt
from dist_pool import worker_mesh
from ep_fsdp.models import MoETransformer, TransformerConfig
from parity_utils import full


def make_model(seed: int = 0, num_experts: int = 8, dim: int = 32) -> MoETransformer:
    torch.manual_seed(seed)
    moe = ep_fsdp.MoEConfig(dim=dim, hidden_dim=48, num_experts=num_experts, top_k=2, aux_loss_coef=0.01,
                            expert_bias=True)
    return MoETransformer(TransformerConfig(vocab_size=64, dim=dim, num_layers=2, num_heads=4, max_seq_len=16,
                                            num_dense_layers=1, moe=moe))


def make_parallel(dp_shard: int, ep: int, seed: int = 0, **kw) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model(seed, **kw)
    if dist.is_initialized():
        ep_fsdp.parallelize_moe(model, worker_mesh(dp_shard, ep))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> float:
    """One step on this rank's part of a global batch that depends on ``step`` only; returns the
    global mean loss (float64 bits preserved by the all-reduce of identical-order sums)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, 64, (8, 9), generator=g)
    per = 8 // world
    x, y = tokens[rank * per:(rank + 1) * per, :-1], tokens[rank * per:(rank + 1) * per, 1:]
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, 64), y.reshape(-1)) + ep_fsdp.moe_aux_loss(model)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    out = loss.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(out)
        out /= world
    return float(out)


def capture(model: torch.nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    """Global parameters and optimizer moments/steps, as plain CPU tensors keyed by name."""
    state = {f"param/{n}": full(p) for n, p in model.named_parameters()}
    state.update({f"buffer/{n}": full(b) for n, b in model.named_buffers() if "rope" not in n})
    if opt is not None:
        osd = get_optimizer_state_dict(model, opt)
        for fqn, s in osd["state"].items():
            for k, v in s.items():
                state[f"optim/{fqn}/{k}"] = full(v) if isinstance(v, torch.Tensor) else torch.tensor(v)
    return state


def bitwise_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ in any bit (or exist on one side only)."""

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).view(torch.uint8) if t.dtype.is_floating_point else t

    return [
        n for n in sorted(set(a) | set(b))
        if n not in a or n not in b or a[n].shape != b[n].shape or a[n].dtype != b[n].dtype
        or not torch.equal(bits(a[n]), bits(b[n]))
    ]


SOURCE_LAYOUT = (2, 2)


def save_source(root: str) -> None:
    """(2, 2): two steps, save after step 1 (async) and after step 2 (sync), then a third step."""
    model, opt = make_parallel(*SOURCE_LAYOUT)
    rank = dist.get_rank()
    losses = [train_step(model, opt, 1)]
    pending = ckpt.save(f"{root}/step_1", model, opt, step=1, extra={"rank": rank, "tag": "one"}, async_save=True)
    assert pending.wait() == Path(f"{root}/step_1")
    losses.append(train_step(model, opt, 2))
    ckpt.save(f"{root}/step_2", model, opt, step=2, extra={"rank": rank, "rng": torch.get_rng_state()})
    state = capture(model, opt)
    losses.append(train_step(model, opt, 3))
    if rank == 0:
        torch.save({"state": state, "losses": losses}, f"{root}/reference.pt")


