"""Write a tiny random transformers MoE model directory with ``save_pretrained`` (offline, seconds).

It is a hub-format directory (``config.json``, ``generation_config.json``, safetensors with the
per-expert keys transformers writes), the input of ``recipes/train.py --set model.hf_path=DIR``
and of ``ep_fsdp.hf.from_pretrained``. No tokenizer: the recipe feeds bytes (vocab >= 256).

Usage::

    python recipes/hf_tiny_model.py outputs/tiny-qwen3-moe --family qwen3_moe
    python recipes/hf_tiny_model.py DIR --family gpt_oss --layers 4 --experts 16 --hidden 128
"""

from __future__ import annotations

import argparse
from typing import Any

FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss")


def tiny_config(family: str, *, hidden: int = 32, layers: int = 2, experts: int = 8, top_k: int = 2,
                vocab: int = 320, **overrides: Any):
    """A small config of ``family`` (a transformers ``model_type``) with MoE in every layer
    (DeepSeek-V3: the first layer dense). Attention: 4 heads of ``hidden // 4``, 2 KV heads."""
    from transformers import AutoConfig

    heads, head_dim, inter = 4, hidden // 4, hidden // 2
    common: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        num_experts_per_tok=top_k,
    )
    per_family: dict[str, dict[str, Any]] = {
        "qwen3_moe": dict(moe_intermediate_size=inter, num_experts=experts, head_dim=head_dim, norm_topk_prob=True),
        "mixtral": dict(num_local_experts=experts, intermediate_size=inter),
        "qwen2_moe": dict(moe_intermediate_size=inter, shared_expert_intermediate_size=hidden, num_experts=experts),
        "deepseek_v3": dict(
            moe_intermediate_size=inter, n_routed_experts=experts, n_group=4, topk_group=2, first_k_dense_replace=1,
            n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=head_dim, v_head_dim=head_dim,
            qk_nope_head_dim=head_dim, num_key_value_heads=heads, rope_scaling=None, rope_parameters=None,
        ),
        "gpt_oss": dict(num_local_experts=experts, intermediate_size=inter, head_dim=head_dim, sliding_window=64),
    }
    if family not in per_family:
        raise ValueError(f"tiny_config: family must be one of {FAMILIES}, got {family!r}.")
    kwargs = {**common, **per_family[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--family", default="qwen3_moe", choices=FAMILIES)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    config = tiny_config(args.family, hidden=args.hidden, layers=args.layers, experts=args.experts, top_k=args.top_k)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(args.out_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {type(model).__name__} ({n / 1e6:.2f}M parameters) to {args.out_dir}")


if __name__ == "__main__":
    main()
