"""Building a transformers model from a config on the meta device, and what a checkpoint records of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = ["build_on_meta", "init_non_persistent_buffers", "model_class_for"]


def model_class_for(config: Any) -> type:
    """``config.architectures[0]`` when transformers has it, else the causal-LM auto class's choice."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)]


def build_on_meta(config: Any, dtype: torch.dtype) -> nn.Module:
    """The model of ``config`` with every parameter and buffer on the meta device (nothing allocated)."""
    cls = model_class_for(config)
    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype)
    return model


def init_non_persistent_buffers(model: nn.Module) -> list[str]:
    """Recompute buffers that no checkpoint holds (rotary ``inv_freq`` and the like) after
    ``to_empty``, with transformers' own initializer of the modules that own them."""
    init = getattr(model, "_init_weights", None)
    done = []
    for mname, module in model.named_modules():
        own = [b for b in module._non_persistent_buffers_set if getattr(module, b, None) is not None]
        if own and init is not None:
            init(module)
            done += [f"{mname}.{b}" if mname else b for b in own]
    return done


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None
