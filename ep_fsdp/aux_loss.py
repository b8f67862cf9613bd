"""The load-balancing loss of transformers MoE models, over the global batch.

Legend: T tokens on this rank, E experts, k experts per token, L MoE layers.

transformers computes ``load_balancing_loss_func`` from the router logits of one forward, all
layers pooled: ``E * sum_e f_e * P_e`` where ``f_e`` is the fraction of top-k slots (of softmax
probabilities) that chose expert ``e`` and ``P_e`` its mean probability, both over the ``L * T``
rows of every layer. Under data parallelism each rank would compute it on its own tokens: a
different loss per rank, and not the loss of the batch the step trains on. Here the sums are
all-reduced over every rank first, so each rank gets the value for the global batch; the gradient
each rank backpropagates is that value's derivative with respect to its own tokens' probabilities
(times ``grad_factor``, which undoes FSDP's mean over ranks under ``grad_reduction="mean"``).

The pooling over layers couples them: the loss is only known after the last layer, so it is
returned live (with its graph) by :func:`ep_fsdp.moe_aux_loss`, to be added to the loss.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from .balancing import in_backward
from .dispatch._ops import expert_counts

__all__ = ["record_router_logits", "router_logits_loss", "has_router_logits", "router_modules"]

_ATTR = "_ep_fsdp_router_logits"
_MAX_PENDING_FORWARDS = 64


@dataclass
class _RouterLogits:
    coef: float
    top_k: int
    routers: int  # router modules hooked (L): one logits tensor each per forward
    stats_group: dist.ProcessGroup | None
    grad_factor: float
    logits: list[torch.Tensor] = field(default_factory=list)  # [T, E] per router per forward


def _router_class(model: nn.Module) -> tuple[type, int] | None:
    """The router class and output index that transformers records as ``router_logits``."""
    recorder = (getattr(model, "_can_record_outputs", None) or {}).get("router_logits")
    if recorder is None:
        return None
    if isinstance(recorder, type):
        return recorder, 0
    target = getattr(recorder, "target_class", None)
    return (target, int(getattr(recorder, "index", 0) or 0)) if isinstance(target, type) else None


def _recording_models(model: nn.Module) -> list[nn.Module]:
    """The outermost modules in ``model`` (itself included) that record ``router_logits``: the
    transformers models, also when they sit inside the user's own module (a wrapper, a value head)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if _router_class(module) is not None and not any(name.startswith(f"{n}.") or not n for n, _ in found):
            found.append((name, module))
    return [m for _, m in found]


def router_modules(model: nn.Module) -> list[nn.Module]:
    """The routers of the transformers models in ``model``: the modules whose output they record as
    ``router_logits``."""
    routers: list[nn.Module] = []
    for lm in _recording_models(model):
        cls = _router_class(lm)[0]  # type: ignore[index]
        routers += [m for m in lm.modules() if isinstance(m, cls) and m not in routers]
    return routers


def record_router_logits(model: nn.Module, *, stats_group: dist.ProcessGroup | None, grad_factor: float) -> bool:
    """Record every router's logits in training forwards of each transformers model in ``model``
    (itself, or inside the user's module) whose config asks for a balancing loss
    (``router_aux_loss_coef > 0``); returns whether any does. The state lives on ``model``, which
    :func:`ep_fsdp.moe_aux_loss` is called with."""
    states = [state for lm in _recording_models(model) if (state := _record(lm, stats_group, grad_factor))]
    if states:
        setattr(model, _ATTR, states)
    return bool(states)


def _record(model: nn.Module, stats_group: dist.ProcessGroup | None, grad_factor: float) -> _RouterLogits | None:
    """Hook the routers of one transformers model; its recording state, or ``None`` when it has no
    balancing loss: its config asks for none, or its family never computes one (its modeling module
    has no ``load_balancing_loss_func``, e.g. OpenAI's privacy filter, whose config still carries a
    ``router_aux_loss_coef``: adding one would change the objective the model is trained with)."""
    from .expert_modules import original_class

    config = getattr(model, "config", None)
    coef = getattr(config, "router_aux_loss_coef", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    found = _router_class(model)
    if not coef or not isinstance(top_k, int) or found is None:
        return None
    # NOTE: the classes up the model's MRO: a user's subclass lives in the user's module
    families = [sys.modules.get(c.__module__) for c in original_class(model).__mro__]
    if not any(hasattr(f, "load_balancing_loss_func") for f in families if f is not None):
        return None
    if getattr(config, "output_router_logits", False):
        warnings.warn(
            f"parallelize_moe: {type(model).__name__}.config.output_router_logits is True, so transformers adds "
            "its balancing loss of this rank's tokens to out.loss; set it to False and add "
            "ep_fsdp.moe_aux_loss(model) (the global-batch loss) instead, or the loss is counted twice.",
            stacklevel=4,
        )
    index = found[1]
    routers = [m for m in model.modules() if isinstance(m, found[0])]
    if not routers:
        return None
    state = _RouterLogits(float(coef), top_k, len(routers), stats_group, grad_factor)

    def hook(module: nn.Module, args: object, output: object) -> None:
        if module.training and torch.is_grad_enabled() and not in_backward():
            logits = output[index] if isinstance(output, (tuple, list)) else output
            if len(state.logits) >= _MAX_PENDING_FORWARDS * state.routers:
                warnings.warn(
                    f"moe_aux_loss: {_MAX_PENDING_FORWARDS} training forwards of {type(model).__name__} were not "
                    "followed by ep_fsdp.moe_aux_loss(model); their router logits (and graphs) are dropped. Call "
                    "it after each forward (its value is the balancing loss to add to your loss).",
                    stacklevel=2,
                )
                state.logits.clear()
            elif state.logits and state.logits[0].device != logits.device:
                # NOTE: the model moved since those forwards (their graphs hold the parameters' old
                # storage, which a backward could not reach any more): their logits are dropped
                warnings.warn(
                    f"moe_aux_loss: the router logits of {len(state.logits)} training forward(s) of "
                    f"{type(model).__name__} on {state.logits[0].device} were not followed by "
                    f"ep_fsdp.moe_aux_loss(model) before the model moved to {logits.device}; they are dropped. "
                    "Call it after each forward (its value is the balancing loss to add to your loss).",
                    stacklevel=2,
                )
                state.logits.clear()
            state.logits.append(logits)  # type: ignore[arg-type]

    for router in routers:
        router.register_forward_hook(hook)
    return state


def has_router_logits(model: nn.Module) -> bool:
    return bool(getattr(model, _ATTR, None))


def router_logits_loss(model: nn.Module) -> torch.Tensor | None:
    """``router_aux_loss_coef`` times the global-batch balancing loss, averaged over the forwards
    recorded since the last call (which it clears), summed over the transformers models in
    ``model``; ``None`` when nothing was recorded."""
    total = None
    for state in getattr(model, _ATTR, None) or []:
        if not state.logits:
            continue
        logits, state.logits = state.logits, []
        per_forward = state.routers if len(logits) % state.routers == 0 else len(logits)
        losses = [_global_loss(logits[i:i + per_forward], state) for i in range(0, len(logits), per_forward)]
        loss = torch.stack(losses).mean() * state.coef
        total = loss if total is None else total + loss
    return total


def _global_loss(layer_logits: list[torch.Tensor], state: _RouterLogits) -> torch.Tensor:
    E = layer_logits[0].shape[-1]
    device = layer_logits[0].device
    counts = torch.zeros(E, dtype=torch.float32, device=device)  # [E] top-k slots per expert
    prob_sum = torch.zeros(E, dtype=torch.float32, device=device)  # [E] summed probabilities
    rows = 0
    for logits in layer_logits:
        probs = torch.softmax(logits.reshape(-1, E), dim=-1)  # [T, E]
        chosen = torch.topk(probs, state.top_k, dim=-1).indices  # [T, k]
        counts = counts + expert_counts(chosen, E).float()  # (no host sync, unlike bincount on CUDA)
        prob_sum = prob_sum + probs.float().sum(0)
        rows += probs.shape[0]
    if state.stats_group is not None:
        packed = torch.cat([counts, prob_sum.detach(), counts.new_tensor([float(rows)])])  # [2E + 1]
        dist.all_reduce(packed, group=state.stats_group)
        counts, total_probs, total_rows = packed[:E], packed[E:2 * E], packed[2 * E]
        # NOTE: the value is the global sum; the gradient is grad_factor times this rank's part.
        prob_sum = prob_sum * state.grad_factor + (total_probs - prob_sum.detach() * state.grad_factor)
    else:
        total_rows = counts.new_tensor(float(rows))
    return E * torch.sum((counts / total_rows) * (prob_sum / total_rows))
