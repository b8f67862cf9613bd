"""Building a transformers model from a config on the meta device, and what a checkpoint records of it."""

from __future__ import annotations

import json
import re
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
    """The model of ``config`` with every parameter and buffer on the meta device (nothing allocated),
    in ``dtype`` except what transformers' ``from_pretrained`` keeps in float32 for that dtype."""
    cls = model_class_for(config)
    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype)
    _keep_in_float32(model, dtype)
    return model


def _keep_in_float32(model: nn.Module, dtype: torch.dtype) -> None:
    """Turn the parameters and buffers named by the model's dtype plan to float32, as ``from_pretrained``
    does: ``_keep_in_fp32_modules`` under float16 (GPT-OSS's norms), ``_keep_in_fp32_modules_strict``
    under float16 and bfloat16. A name matches a plan entry as transformers matches it (a regex
    search, ``*`` as ``.*``).

    NOTE: ``_from_config`` alone applies only what the modules create in float32 themselves; the
    float16 list was lost, and those norms were rounded to float16 (logits 5e-4 off transformers').
    """
    plan_of = getattr(model, "_get_dtype_plan", None)
    plan = plan_of(dtype) if callable(plan_of) else {}
    keep = [k for k, v in plan.items() if v == torch.float32]
    if not keep:
        return
    pattern = re.compile("|".join(f"(?:{k.replace('*', '.*')})" for k in keep))
    # NOTE: a tied parameter (an lm_head that is the embedding) stays tied and in the model's dtype,
    # as transformers re-ties it after its float32 list: a float32 copy would be untied and, since
    # tied keys are not loaded, never filled
    names: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        names[id(param)] = names.get(id(param), 0) + 1
    for mname, module in model.named_modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            full = f"{mname}.{pname}" if mname else pname
            if names[id(param)] > 1:
                continue
            if param.is_floating_point() and param.dtype != torch.float32 and pattern.search(full):
                module.register_parameter(pname, nn.Parameter(param.detach().float(), requires_grad=param.requires_grad))
        for bname, buf in list(module.named_buffers(recurse=False)):
            full = f"{mname}.{bname}" if mname else bname
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32 and pattern.search(full):
                module.register_buffer(bname, buf.float(), persistent=bname not in module._non_persistent_buffers_set)


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
