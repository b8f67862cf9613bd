"""A parallelized model's first forward may run under ``torch.inference_mode()``.

torch 2.13's FSDP2 creates each parameter's all-gather buffer and unsharded parameter at a unit's
first unshard and reuses them for the rest of the run. Created under ``inference_mode`` they are
inference tensors: on a process group of one rank the unshard itself fails ("Inference tensors do
not track version counter"; with ``ep`` the whole world, the experts' units are over a ``dp_shard``
of one), and on larger groups the next training step fails ("Inplace update to inference tensor
outside InferenceMode"). Evaluating or sampling right after loading a checkpoint, before any
training step, is exactly that order.

So :func:`allow_inference_mode_first` hooks the root's first forward: when it runs under
``inference_mode``, every unit is first gathered and released once outside it (one unit at a time:
the memory of one unit; the same all-gathers in the same order on every rank, as the forward
itself makes them), which creates those tensors as normal tensors. The hook removes itself after
the first forward, whatever its mode.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule

__all__ = ["allow_inference_mode_first"]


def allow_inference_mode_first(root: FSDPModule) -> None:
    """Let ``root``'s first forward run under ``torch.inference_mode()`` (see the module docstring).

    NOTE: registered with ``prepend=True`` after ``fully_shard``: it runs before FSDP's own
    pre-forward hook, whose lazy init and unshards would otherwise come first.
    """
    handles: list[Any] = []

    @torch.compiler.disable
    def first_forward(module: nn.Module, args: Any) -> None:
        for handle in handles:
            handle.remove()
        if not torch.is_inference_mode_enabled():
            return
        with torch.inference_mode(False), torch.no_grad():
            # NOTE: FSDP's root lazy init (the shared communication state) before any unit's unshard
            root._get_fsdp_state()._lazy_init()  # type: ignore[attr-defined]
            for unit in root.modules():  # type: ignore[attr-defined]
                if isinstance(unit, FSDPModule):
                    unit.unshard()
                    unit.reshard()

    handles.append(root.register_forward_pre_hook(first_forward, prepend=True))  # type: ignore[attr-defined]
