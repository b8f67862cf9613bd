"""transformers interop (the optional ``hf`` extra): load a hub-format MoE model straight into EP + FSDP2.

``import ep_fsdp`` never imports transformers; this package does. Parallelizing a transformers
model in place needs nothing from here: :func:`ep_fsdp.parallelize_moe` finds its experts modules by
structure. Checkpoints of such models go through :mod:`ep_fsdp.checkpoint` as usual, and
:func:`ep_fsdp.checkpoint.export_safetensors` writes them back in hub format.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ep_fsdp.hf needs transformers >= 5: pip install -e '.[hf]' (or pip install 'transformers>=5')."
    ) from e

from ..parallelize import parallelize_moe
from ._load import LoadStats, load_hub_weights
from ._model import build_on_meta, init_non_persistent_buffers

__all__ = ["from_pretrained", "load_hub_weights", "LoadStats"]


def from_pretrained(
    path: str | os.PathLike[str],
    mesh: DeviceMesh,
    *,
    torch_dtype: torch.dtype | None = None,
    **parallelize_options: Any,
) -> nn.Module:
    """Build a transformers MoE model from a hub-format directory, parallelized over ``mesh``.

    The model is built from ``path/config.json`` on the meta device, parallelized with
    :func:`ep_fsdp.parallelize_moe` (``parallelize_options`` are its keyword options), then only
    this rank's shards are allocated (``to_empty`` on the mesh's device) and filled from the
    directory's safetensors, reading only the slices this rank holds: the rows of its FSDP shard
    of dense tensors and, for experts, only its own experts, whether the files store them per
    expert (``...experts.{j}.gate_proj.weight``, as ``save_pretrained`` writes) or fused
    (``...experts.gate_up_proj``). Non-persistent buffers (rotary ``inv_freq``) are recomputed by
    transformers' initializer. ``model.ep_fsdp_load_stats`` tells what this rank read.

    Collective: every rank of ``mesh`` calls it with the same arguments. Local directories only.

    Args:
        path: a directory with ``config.json`` and ``*.safetensors`` (plus the index when sharded).
        mesh: the ``("dp_shard", "ep")`` mesh (:func:`ep_fsdp.build_mesh`).
        torch_dtype: parameter dtype; default the config's ``dtype``, else float32.

    Example::

        mesh = ep_fsdp.build_mesh(ep=4)
        model = ep_fsdp.hf.from_pretrained("Qwen3-30B-A3B", mesh, torch_dtype=torch.bfloat16)
        out = model(input_ids, labels=input_ids)
        (out.loss + ep_fsdp.moe_aux_loss(model)).backward()
    """
    from transformers import AutoConfig, GenerationConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"from_pretrained: {path} has no config.json; pass a local directory written by save_pretrained "
            "(download hub models first, e.g. with `hf download`)."
        )
    config = AutoConfig.from_pretrained(path)
    asked = None if torch_dtype == "auto" else torch_dtype  # "auto": the config's, as in transformers
    dtype = asked or getattr(config, "dtype", None) or torch.float32
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not (isinstance(resolved, torch.dtype) and resolved.is_floating_point):
        where = "torch_dtype" if asked is not None else f"{path}/config.json's dtype"
        raise ValueError(
            f"from_pretrained: {where} is {dtype!r}; pass a floating torch.dtype (e.g. torch.bfloat16), its "
            "name ('bfloat16'), or 'auto' for the config's dtype."
        )
    dtype = resolved
    model = build_on_meta(config, dtype)
    parallelize_moe(model, mesh, **parallelize_options)
    device = torch.device(mesh.device_type)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    model.to_empty(device=device)
    init_non_persistent_buffers(model)
    stats = load_hub_weights(model, path)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.ep_fsdp_load_stats = stats
    return model
