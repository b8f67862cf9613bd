"""The training job's configuration: dataclasses (one source of truth, validated) read from TOML.

A TOML file has one table per dataclass below (``[model]``, ``[model.moe]``, ``[train]``,
``[parallel]``, ``[data]``, ``[log]``, ``[checkpoint]``); any key can be overridden on the command
line with ``--set table.key=value`` (the value is parsed as TOML: ``--set train.lr=1e-3``,
``--set train.mixed_precision='"bf16"'`` or ``--set train.mixed_precision=bf16``).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ep_fsdp.dispatch.base import WIRE_DTYPES


@dataclass
class MoEFields:
    """``[model.moe]``: the MoE feed-forward (its dim is the model's). TOML has no null: 0 means
    "off" for ``num_expert_groups`` / ``num_limited_groups`` and "dropless" for ``capacity_factor``."""

    hidden_dim: int = 128
    num_experts: int = 8
    top_k: int = 2
    score_func: str = "softmax"
    renormalize: bool = True
    route_scale: float = 1.0
    temperature: float = 1.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    jitter_eps: float = 0.0
    expert_bias: bool = False
    bias_update_rate: float = 0.0
    num_shared_experts: int = 0
    num_expert_groups: int = 0
    num_limited_groups: int = 0
    capacity_factor: float = 0.0
    expert_dropout: float = 0.0
    rebalance_every: int = 0  # recipe option: ep_fsdp.rebalance_experts every N steps (0: never)

    def moe_config(self, dim: int) -> Any:
        """The library's ``MoEConfig`` (validated there) for a model of width ``dim``."""
        import ep_fsdp

        if not isinstance(self.rebalance_every, int) or self.rebalance_every < 0:
            raise ValueError(f"model.moe.rebalance_every must be an int >= 0 (0: never), got {self.rebalance_every!r}.")
        options = dataclasses.asdict(self)
        options.pop("rebalance_every")
        for name in ("num_expert_groups", "num_limited_groups", "capacity_factor"):
            options[name] = options[name] or None
        return ep_fsdp.MoEConfig(dim=dim, **options)


@dataclass
class ModelFields:
    """``[model]``: the reference MoE transformer, or a transformers MoE model directory (``hf_path``:
    then the other fields here are not used; the directory's config.json says what the model is)."""

    hf_path: str = ""
    vocab_size: int = 256
    dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_seq_len: int = 256
    num_dense_layers: int = 1
    dense_hidden_dim: int = 256
    moe: MoEFields = field(default_factory=MoEFields)

    def __post_init__(self) -> None:
        if not self.hf_path and self.vocab_size < 256:
            raise ValueError(
                f"model.vocab_size must be >= 256 (the corpus is bytes: every byte value is a token), got "
                f"{self.vocab_size!r}; use 256."
            )


@dataclass
class TrainFields:
    """``[train]``: optimisation."""

    steps: int = 300
    global_batch_size: int = 16  # sequences per optimizer step, over all ranks and micro-batches
    seq_len: int = 128
    grad_accum_steps: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "none"  # "none" | "bf16"
    activation_checkpointing: bool = False
    max_nonfinite: int = 3  # consecutive steps with a non-finite gradient norm skipped before stopping

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("none", "bf16"):
            raise ValueError(f"train.mixed_precision must be 'none' or 'bf16', got {self.mixed_precision!r}.")
        for name in ("steps", "global_batch_size", "seq_len", "grad_accum_steps", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)!r}.")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps!r}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1] (a fraction of train.lr), got {self.min_lr_ratio!r}.")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr!r}; e.g. 3e-3.")
        if not self.weight_decay >= 0:
            raise ValueError(f"train.weight_decay must be >= 0, got {self.weight_decay!r}; 0 turns it off.")
        if not self.max_grad_norm > 0:
            raise ValueError(f"train.max_grad_norm must be > 0 (the gradient clipping norm), got {self.max_grad_norm!r}.")
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1) (AdamW's), got {list(self.betas)!r}; "
                             "e.g. [0.9, 0.95].")


# "" (the activations' dtype) or a dtype the exchange carries, by name
WIRE_DTYPE_NAMES = ("",) + tuple(str(d).removeprefix("torch.") for d in WIRE_DTYPES)


@dataclass
class ParallelFields:
    """``[parallel]``: the ("dp_shard", "ep") mesh; dp_shard 0 means world // ep."""

    ep: int = 1
    dp_shard: int = 0
    timeout_s: float = 300.0  # collective timeout: a stuck rank makes the others fail after this long
    dispatch_chunks: int = 1  # parallelize_moe(dispatch_chunks=...): stream each layer's exchange
    dispatch_dtype: str = ""  # parallelize_moe(dispatch_dtype=...): "" (the activations'), "bfloat16", ...
    compile: bool = False  # torch.compile the model (model.compile(), after parallelizing)

    def __post_init__(self) -> None:
        if self.ep < 1 or self.dp_shard < 0:
            raise ValueError(f"parallel.ep must be >= 1 and parallel.dp_shard >= 0, got {self.ep}, {self.dp_shard}.")
        if not self.timeout_s > 0:
            raise ValueError(f"parallel.timeout_s must be > 0 seconds, got {self.timeout_s!r}; e.g. 300.")
        if self.dispatch_chunks < 1:
            raise ValueError(
                f"parallel.dispatch_chunks must be >= 1, got {self.dispatch_chunks}; 1 is one exchange per layer, "
                "2-4 stream it."
            )
        if self.dispatch_dtype not in WIRE_DTYPE_NAMES:
            raise ValueError(
                f"parallel.dispatch_dtype must be one of {WIRE_DTYPE_NAMES}, got {self.dispatch_dtype!r}; "
                "e.g. \"bfloat16\" to halve the exchange's bytes, or \"\" for the activations' dtype."
            )

    @property
    def wire_dtype(self) -> torch.dtype | None:
        """``dispatch_dtype`` as a torch dtype (None: the activations' own)."""
        return getattr(torch, self.dispatch_dtype) if self.dispatch_dtype else None


@dataclass
class DataFields:
    """``[data]``: the standard-library corpus."""

    max_bytes: int = 4_000_000
    val_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise ValueError(f"data.max_bytes must be >= 0 (0: the whole corpus), got {self.max_bytes!r}.")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1) (the validation share), got {self.val_fraction!r}; "
                             "e.g. 0.05.")


@dataclass
class LogFields:
    """``[log]``: what rank 0 prints and writes to metrics.jsonl (validation steps are logged too)."""

    log_every: int = 10
    val_every: int = 50
    val_batches: int = 4

    def __post_init__(self) -> None:
        for name in ("log_every", "val_every", "val_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"log.{name} must be >= 1, got {getattr(self, name)!r}.")


@dataclass
class CheckpointFields:
    """``[checkpoint]``: when to save under <output-dir>/checkpoints/."""

    every: int = 50
    keep_last: int = 3
    async_save: bool = False

    def __post_init__(self) -> None:
        for name in ("every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"checkpoint.{name} must be >= 1, got {getattr(self, name)!r}.")


@dataclass
class JobConfig:
    model: ModelFields = field(default_factory=ModelFields)
    train: TrainFields = field(default_factory=TrainFields)
    parallel: ParallelFields = field(default_factory=ParallelFields)
    data: DataFields = field(default_factory=DataFields)
    log: LogFields = field(default_factory=LogFields)
    checkpoint: CheckpointFields = field(default_factory=CheckpointFields)

    def __post_init__(self) -> None:
        if self.parallel.compile and self.train.activation_checkpointing:
            raise ValueError(
                "parallel.compile=true with train.activation_checkpointing=true: in torch 2.13 the backward of "
                "a compiled FSDP2 model with composable activation checkpointing fails (the recomputation's "
                "tensors differ from the saved ones); turn one of them off."
            )
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                "lower one or raise the other."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"config: unknown key(s) {unknown} in [{where}]; valid keys: {sorted(names)}.")
    kwargs = {}
    for key, value in values.items():
        f = names[key]
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if dataclasses.is_dataclass(nested):
            if not isinstance(value, dict):
                raise ValueError(f"config: [{where}.{key}] must be a table, got {value!r}.")
            kwargs[key] = _build(nested, value, f"{where}.{key}" if where else key)
        else:
            kwargs[key] = _typed(value, f.default, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _typed(value: Any, default: Any, name: str) -> Any:
    """Check ``value`` against the type of the field's default (bool, int, float, str, tuple)."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is tuple:
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ValueError(
            f"config: {name} must be of type {kind.__name__} (like {default!r}), got {value!r}; "
            "TOML writes booleans as true/false and strings in quotes."
        )
    return value


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"--set expects table.key=value, got {item!r}.")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: take it as a string
    return key.strip().split("."), value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    """Read a TOML config (or the defaults when ``path`` is None) and apply ``table.key=value``
    overrides; raises ``ValueError`` naming unknown keys and bad values."""
    data: dict[str, Any] = tomllib.loads(Path(path).read_text()) if path else {}
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return _build(JobConfig, data, "")


def from_dict(data: dict[str, Any]) -> JobConfig:
    """Rebuild a config saved with ``JobConfig.to_dict`` (e.g. from a checkpoint's metadata)."""
    return _build(JobConfig, data, "")
