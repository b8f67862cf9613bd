"""Experts modules of other libraries (the transformers v5 experts contract), expert-parallelized in place.

Legend: T tokens on this rank, D model dim, E experts (global), k experts per token, G local expert
slots on this rank, N rows given to this rank's experts.

The contract, checked by structure and never by class name: a module that

* is called as ``experts(hidden_states [T, D], top_k_index [T, k], top_k_weights [T, k]) -> [T, D]``
  (its ``forward`` takes exactly three positional inputs), and
* holds its weights as direct parameters with the experts leading: ``[E, ...]`` matrices
  (``gate_up_proj [E, 2I, D]``, ``down_proj [E, D, I]``, or GPT-OSS's transposed layout) and
  optional ``[E, ...]`` biases; if it has an ``int`` attribute ``num_experts``, it equals ``E``.

:func:`make_expert_parallel` changes such a module's class to a subclass whose forward sends the
tokens through a :class:`~ep_fsdp.dispatch.TokenDispatcher`, then runs the module's *own* forward
on this rank's shard (local weights, local expert ids ``0..G-1``, unit weights) and combines the
rows with the gate weights. Each family therefore keeps its activation, biases and weight layout,
and the parameter names (and so ``state_dict`` keys) stay the library's own.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from .balancing import RoutingCounters, in_backward
from .dispatch import TokenDispatcher, expert_counts
from .placement import ExpertPlacement

__all__ = ["find_expert_modules", "contract_num_experts", "make_expert_parallel", "ExpertParallelExperts",
           "expert_layers", "layer_num_experts", "original_class"]


def _positional_inputs(module: nn.Module) -> int | None:
    """How many positional inputs ``module.forward`` takes (``None``: ``*args``, any number)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = [p.kind for p in params]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return None
    return sum(k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds)


def _is_candidate(module: nn.Module) -> bool:
    """A module that looks like an experts module: at least two direct ``[E, a, b]`` parameters
    (stacks of matrices, e.g. ``gate_up_proj`` and ``down_proj``) with one ``E``, and a three-input
    forward. (One stacked parameter is not enough: e.g. a per-loop ``query [loops, 4, D]`` of a
    module whose forward also takes three inputs.)"""
    stacked = [p.shape[0] for p in module.parameters(recurse=False) if p.dim() >= 3]
    return len(stacked) >= 2 and len(set(stacked)) == 1 and _positional_inputs(module) == 3


def contract_num_experts(name: str, module: nn.Module) -> int:
    """``E`` of an experts module that fits the contract; a clear error naming what is missing."""
    where = f"experts module '{name}' ({type(module).__name__})"
    params = dict(module.named_parameters(recurse=False))
    if not params:
        kids = [n for n, _ in module.named_children()]
        raise ValueError(
            f"parallelize_moe: {where} does not fit the experts contract: it holds no expert-leading "
            f"weights [E, ...] as its own parameters (children: {kids[:4]}{'...' if len(kids) > 4 else ''}); "
            "transformers >= 5 stores experts as 3-D parameters (gate_up_proj [E, 2I, D], down_proj [E, D, I]). "
            "Upgrade transformers, or build the layer with ep_fsdp.MoE."
        )
    n_inputs = _positional_inputs(module)
    if n_inputs != 3:
        raise ValueError(
            f"parallelize_moe: {where} does not fit the experts contract: its forward takes "
            f"{'any number of' if n_inputs is None else n_inputs} positional inputs, the contract is "
            "experts(hidden_states, top_k_index, top_k_weights). Wrap it in a module with that call, or "
            "build the layer with ep_fsdp.MoE."
        )
    leading = {pname: tuple(p.shape) for pname, p in params.items()}
    sizes = {shape[0] for shape in leading.values() if len(shape) >= 2}
    flat = [pname for pname, shape in leading.items() if len(shape) < 2]
    if flat or len(sizes) != 1:
        raise ValueError(
            f"parallelize_moe: {where} does not fit the experts contract: every own parameter must be "
            f"[E, ...] with one E, got {leading}. Keep non-expert parameters in a child module (its "
            "parameters are then shared by all experts, like a dense layer's)."
        )
    E = sizes.pop()
    declared = getattr(module, "num_experts", None)
    if isinstance(declared, int) and declared != E:
        raise ValueError(
            f"parallelize_moe: {where} has num_experts={declared} but its weights hold {E} experts "
            f"({leading}); they must agree."
        )
    return E


def find_expert_modules(model: nn.Module, skip: tuple[type, ...] = ()) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every experts module of ``model`` that fits the contract, in module order.

    Modules inside an instance of ``skip`` (``ep_fsdp.MoE``) are ignored. A module named ``experts``
    that does not fit (e.g. a ``ModuleList`` of per-expert MLPs, transformers < 5) is an error naming
    it, rather than being silently left unparallelized.
    """
    found: list[tuple[str, nn.Module]] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        if any(s == "" or name == s or name.startswith(s + ".") for s in skipped):
            continue
        if isinstance(module, skip):
            skipped.append(name)
            continue
        if isinstance(module, ExpertParallelExperts) or _is_candidate(module) or name.rpartition(".")[2] == "experts":
            contract_num_experts(name, module)
            found.append((name, module))
    return found


class ExpertParallelExperts(nn.Module):
    """Mixin put in front of an experts module's own class by :func:`make_expert_parallel`.

    Attributes set there: ``dispatcher`` (with the :class:`ExpertPlacement`), ``stats_group``,
    ``routing`` (:class:`~ep_fsdp.balancing.RoutingCounters`), ``ep_num_experts`` (``E``).
    """

    dispatcher: TokenDispatcher
    routing: RoutingCounters
    ep_num_experts: int
    _ep_base_class: type
    stats_group: dist.ProcessGroup | None

    @property
    def placement(self) -> ExpertPlacement:
        """Which ep rank and local slot hold each logical expert."""
        return self.dispatcher.placement

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states [T, D], top_k_index [T, k] logical ids, top_k_weights [T, k]
        placement = self.dispatcher.placement
        if placement.ep == 1 and placement.is_contiguous() and hidden_states.shape[0] > 0:
            # NOTE: every expert is here, in order: the module's own forward on all tokens is the
            # layer (and the fastest path; no regrouping around it).
            with _local_parameters(self):
                out = self._ep_base_forward(hidden_states, top_k_index, top_k_weights)
            if self.training:
                self._record_forward(top_k_index, expert_counts(top_k_index, self.ep_num_experts), 0)
            return out
        weights = top_k_weights.float()  # NOTE: the dispatcher combines in float32 and casts back
        out, moved = self.dispatcher.run(
            hidden_states, top_k_index, weights, lambda rows, counts, _: self._local_forward(rows, counts)
        )  # [T, D]
        if self.training:
            self._record_forward(top_k_index, moved.counts, moved.sent_bytes)
        return out

    @torch.compiler.disable
    def _record_forward(self, top_k_index: torch.Tensor, counts: torch.Tensor, sent_bytes: int) -> None:
        """Count one training forward (eagerly under ``torch.compile``, see ``MoE._record_forward``)."""
        if not in_backward():
            self.routing.add_forward(expert_counts(top_k_index, self.ep_num_experts), counts, sent_bytes)

    def _local_forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The module's own forward on this rank's experts: rows of local slot ``g`` go to expert ``g``."""
        G = counts.shape[0]
        empty = rows.shape[0] == 0
        if empty:
            # NOTE: one zero row through expert 0, then dropped: the weights stay in the graph, so
            # every rank reduces the same gradients (zeros here) and FSDP's reduce-scatter matches.
            rows = rows.new_zeros(1, rows.shape[-1]) + rows.sum(0, keepdim=True)
            counts = torch.zeros_like(counts)
            counts[0] = 1
        ids = torch.repeat_interleave(torch.arange(G, device=rows.device), counts, output_size=rows.shape[0])
        ones = rows.new_ones(rows.shape[0], 1)
        with _local_parameters(self):
            y = self._ep_base_forward(rows, ids[:, None], ones)  # [N, D]
        return y[:0] if empty else y

    def _ep_base_forward(self, *args: Any) -> torch.Tensor:
        return self._ep_base_class.forward(self, *args)  # the module's own class's forward


@contextmanager
def _local_parameters(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module``'s DTensor parameters read as their local shards (plain
    tensors, differentiable back to the DTensor)."""
    saved = dict(module._parameters)
    try:
        for name, p in saved.items():
            if isinstance(p, DTensor):
                module._parameters[name] = p.to_local()  # type: ignore[assignment]
        yield
    finally:
        module._parameters.update(saved)


_EP_CLASSES: dict[type, type] = {}


def make_expert_parallel(
    module: nn.Module, *, num_experts: int, dispatcher: TokenDispatcher, stats_group: dist.ProcessGroup | None
) -> None:
    """Turn a contract experts module into an expert-parallel one in place (class swap, like
    ``fully_shard``); its parameters must already be the ``Shard(0)`` DTensors over ``ep``."""
    cls = type(module)
    if not isinstance(module, ExpertParallelExperts):
        ep_cls = _EP_CLASSES.get(cls)
        if ep_cls is None:
            ep_cls = type(f"ExpertParallel{cls.__name__}", (ExpertParallelExperts, cls),
                          {"__module__": cls.__module__, "_ep_base_class": cls})
            _EP_CLASSES[cls] = ep_cls
        module.__class__ = ep_cls
    module.ep_num_experts = num_experts
    module.dispatcher = dispatcher
    module.stats_group = stats_group
    module.routing = RoutingCounters()
    if isinstance(getattr(module, "num_experts", None), int):
        # NOTE: the module's own forward sizes its per-expert bookkeeping (one_hot, histc) by
        # num_experts; it runs on the G local experts only.
        module.num_experts = num_experts // dispatcher.placement.ep


def expert_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every expert-parallel layer of ``model``: ``ep_fsdp.MoE`` layers and expert-parallelized
    contract modules, in module order (both have ``placement``, ``routing``, ``stats_group``)."""
    from .moe import MoE

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (MoE, ExpertParallelExperts))]


def original_class(module: nn.Module) -> type:
    """The module's own class under the classes ``fully_shard`` and :func:`make_expert_parallel`
    put in front of it."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, (FSDPModule, ExpertParallelExperts)))


def layer_num_experts(layer: nn.Module) -> int:
    """``E`` of an :func:`expert_layers` entry."""
    return layer.ep_num_experts if isinstance(layer, ExpertParallelExperts) else layer.config.num_experts
