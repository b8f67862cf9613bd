"""Materialize a model built on the meta device, one parameter shard at a time.

Build the model under ``torch.device("meta")`` (no memory), call :func:`ep_fsdp.parallelize_moe`,
then :func:`materialize`: each rank allocates only its own shards (``to_empty``) and fills them.
Each parameter is initialized from its own generator, seeded from ``seed`` and the parameter's
name, on the full (global) shape on the CPU, and only this rank's slice is kept. The init of a
parameter is the ``init_parameter`` of the outermost module on its path that defines one. So no rank ever
holds more than one full parameter at a time, and the values do not depend on the layout, the
number of ranks or the device: a model materialized on any layout equals the unparallelized model
materialized with the same seed.

NOTE: DTensor's own random initialization is not used. On CPU it draws the same numbers on every
rank, so every shard of a parameter would get the same values.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["materialize", "InitFn"]

InitFn = Callable[[str, torch.Tensor, torch.Generator], None]


def _owner_init(model: nn.Module, name: str) -> tuple[Callable[..., None], str] | None:
    """The ``init_parameter`` of the outermost module on ``name``'s path that defines one (the
    model's own scheme wins over a layer's default), with the name relative to that module."""
    parts = name.split(".")
    for i in range(len(parts)):
        module = model.get_submodule(".".join(parts[:i]))
        fn = getattr(module, "init_parameter", None)
        if callable(fn):
            return fn, ".".join(parts[i:])
    return None


def _param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one parameter (tied weights), the name ``named_parameters()`` gives first."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(model: nn.Module, tied: list[list[str]]) -> None:
    """Share each group's first parameter again where ``to_empty`` gave the others their own.

    NOTE: ``to_empty`` replaces a meta parameter by a new one per module that holds it, which
    unties tied weights of a plain model (FSDP2 keeps its own ties).
    """
    for first, *others in tied:
        param = model.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            if getattr(module, attr) is not param:
                setattr(module, attr, param)


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str, *, init_fn: InitFn | None = None, seed: int = 0) -> nn.Module:
    """Allocate ``model``'s parameters and buffers on ``device`` and initialize them shard by shard.

    ``model`` may be parallelized already (FSDP2/DTensor parameters) or not. Every parameter
    ``name`` is filled by ``init_fn(name, full_tensor, generator)`` on a CPU tensor of its global
    shape, then this rank's shard is copied in. Without ``init_fn``, the outermost module on the path that
    defines ``init_parameter(relative_name, tensor, generator)`` initializes it: the model's own
    scheme first (the reference transformer has one), else a layer's default (:class:`ep_fsdp.MoE`
    has one). Afterwards every module that defines
    ``reset_buffers()`` recomputes its buffers (``to_empty`` leaves them uninitialized), and a
    transformers model's ``_init_weights`` recomputes those of its other modules. Tied
    parameters stay tied and are initialized once, under the name ``named_parameters()`` gives. Load a
    checkpoint afterwards instead of relying on the init, if you have one.

    Example::

        with torch.device("meta"):
            model = MoETransformer(cfg)
        ep_fsdp.parallelize_moe(model, mesh)
        ep_fsdp.materialize(model, "cuda", seed=0)

    Returns ``model``.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"materialize: device={device!r} is not a device ({e}); pass e.g. 'cpu' or 'cuda'.") from None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"materialize: seed must be an int, got {seed!r}.")
    if init_fn is not None and not callable(init_fn):
        raise ValueError(f"materialize: init_fn must be callable (name, tensor, generator) or None, got {init_fn!r}.")
    inits: dict[str, tuple[Callable[..., None], str]] = {}
    for name, _ in model.named_parameters():
        if init_fn is not None:
            inits[name] = (init_fn, name)
            continue
        found = _owner_init(model, name)
        if found is None:
            raise ValueError(
                f"materialize: no init for parameter '{name}': neither it nor a module above it defines "
                "init_parameter(name, tensor, generator); pass init_fn=lambda name, t, g: "
                "torch.nn.init.normal_(t, std=0.02, generator=g) (or your own), or define init_parameter."
            )
        inits[name] = found
    tied = _tied_groups(model)
    model.to_empty(device=device)
    _retie(model, tied)
    generator = torch.Generator()
    for name, param in model.named_parameters():
        fn, rel = inits[name]
        full = torch.empty(param.shape, dtype=param.dtype)  # global shape, CPU
        generator.manual_seed(_param_seed(seed, name))
        fn(rel, full, generator)
        if isinstance(param, DTensor):
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full)
    _reset_buffers(model)
    return model


def _reset_buffers(model: nn.Module) -> None:
    """Recompute every buffer ``to_empty`` left uninitialized: through the module's
    ``reset_buffers()``, else through the ``_init_weights(module)`` of the transformers model it is
    in (rotary ``inv_freq``, DeepSeek-V3's ``e_score_correction_bias``), keeping the module's own
    parameters as initialized above. Warns naming buffers nothing recomputes."""
    initializers = [(name, m._init_weights) for name, m in model.named_modules()
                    if callable(getattr(m, "_init_weights", None))]
    left: list[str] = []
    for name, module in model.named_modules():
        if not any(True for _ in module.buffers(recurse=False)):
            continue
        reset = getattr(module, "reset_buffers", None)
        if callable(reset):
            reset()
            continue
        owners = [(p, init) for p, init in initializers if p == "" or name == p or name.startswith(p + ".")]
        if not owners:
            left += [f"{name}.{b}" if name else b for b, _ in module.named_buffers(recurse=False)]
            continue
        init = max(owners, key=lambda o: len(o[0]))[1]  # the innermost transformers model
        kept = [(p, p.detach().clone()) for p in module.parameters(recurse=False)]
        init(module)
        for p, value in kept:  # NOTE: its parameters keep the seeded init
            p.copy_(value)
    if left:
        warnings.warn(
            f"materialize: nothing recomputes buffers {left[:6]} (no reset_buffers() on their modules): they hold "
            "uninitialized memory until a checkpoint is loaded into them.", stacklevel=3,
        )
