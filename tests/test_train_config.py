"""The recipe's TOML configs: every shipped config loads; overrides and errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
from train_config import from_dict, load_config  # noqa: E402

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "recipes" / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load_and_round_trip(path):
    cfg = load_config(path)
    assert from_dict(cfg.to_dict()) == cfg
    assert cfg.model.moe.num_experts % cfg.parallel.ep == 0


def test_overrides_are_typed():
    cfg = load_config(CONFIGS[0], ["train.lr=1e-4", "model.moe.top_k=1", "train.mixed_precision=bf16",
                                   "train.activation_checkpointing=true"])
    assert cfg.train.lr == 1e-4 and cfg.model.moe.top_k == 1
    assert cfg.train.mixed_precision == "bf16" and cfg.train.activation_checkpointing is True
    # every MoEConfig routing option is a [model.moe] key
    import dataclasses

    import ep_fsdp

    options = {f.name for f in dataclasses.fields(ep_fsdp.MoEConfig)} - {"dim"}
    assert options <= set(dataclasses.asdict(cfg.model.moe)), options - set(dataclasses.asdict(cfg.model.moe))
    assert load_config(CONFIGS[0], ["model.moe.temperature=2.0"]).model.moe.moe_config(64).temperature == 2.0


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=1", r"unknown key\(s\) \['lrr'\] in \[train\]; valid keys: \["),
        ("nope.x=1", r"unknown key\(s\) \['nope'\] in \[\]"),
        ("train.mixed_precision=fp8", "train.mixed_precision must be 'none' or 'bf16', got 'fp8'"),
        ("train.seq_len=100000", "train.seq_len=100000 exceeds model.max_seq_len"),
        ("train.steps", "--set expects table.key=value"),
        ("parallel.dispatch_chunks=0", r"parallel.dispatch_chunks must be >= 1, got 0"),
        ("parallel.dispatch_dtype=int8", r"parallel.dispatch_dtype must be one of \('', 'float32', 'bfloat16', "
                                          r"'float16'\), got 'int8'"),
        ("train.betas=[0.9]", r"train.betas must be two numbers in \[0, 1\) \(AdamW's\), got \[0.9\]"),
        ("train.lr=-1.0", r"train.lr must be > 0, got -1.0"),
        ("train.weight_decay=-1.0", r"train.weight_decay must be >= 0, got -1.0"),
        ("train.max_grad_norm=0", r"train.max_grad_norm must be > 0 \(the gradient clipping norm\), got 0.0"),
        ("train.min_lr_ratio=2.0", r"train.min_lr_ratio must be in \[0, 1\] \(a fraction of train.lr\), got 2.0"),
        ("data.max_bytes=-5", r"data.max_bytes must be >= 0 \(0: the whole corpus\), got -5"),
        ("data.val_fraction=0", r"data.val_fraction must be in \(0, 1\) \(the validation share\), got 0.0"),
        ("model.vocab_size=100", r"model.vocab_size must be >= 256 \(the corpus is bytes"),
    ],
)
def test_bad_config_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIGS[0], [override])


@pytest.mark.parametrize(
    "override,message",
    [
        ("checkpoint.async_save=maybe", r"checkpoint.async_save must be of type bool"),
        ("train.steps=1.5", r"train.steps must be of type int \(like 300\), got 1.5"),
        ("log.log_every=0", r"log.log_every must be >= 1, got 0"),
        ("checkpoint.keep_last=0", r"checkpoint.keep_last must be >= 1, got 0"),
    ],
)
def test_values_are_type_checked(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIGS[0], [override])


def test_python_style_booleans_are_understood():
    assert load_config(CONFIGS[0], ["checkpoint.async_save=False"]).checkpoint.async_save is False
    assert load_config(CONFIGS[0], ["checkpoint.async_save=True"]).checkpoint.async_save is True


def test_compile_with_activation_checkpointing_is_refused_up_front():
    with pytest.raises(ValueError, match="parallel.compile=true with train.activation_checkpointing=true: in torch 2.13"):
        load_config(CONFIGS[0], ["parallel.compile=true", "train.activation_checkpointing=true"])
