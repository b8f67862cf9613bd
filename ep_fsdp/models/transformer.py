"""A small decoder-only transformer with MoE feed-forward blocks (the recipes' reference model).

Legend: B batch, L sequence length, D model dim, Hq query heads, Hkv key/value heads, Dh head dim,
V vocabulary size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MoEConfig
from ..moe import MoE

__all__ = ["TransformerConfig", "MoETransformer", "TransformerBlock", "FeedForward", "Attention"]


@dataclass(frozen=True)
class TransformerConfig:
    """Shapes of :class:`MoETransformer`; validated on construction.

    ``moe`` holds the MoE feed-forward settings (its ``dim`` must equal ``dim``); the first
    ``num_dense_layers`` blocks use a dense SwiGLU of width ``dense_hidden_dim`` instead.
    """

    vocab_size: int = 256
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    num_dense_layers: int = 0
    dense_hidden_dim: int = 256
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(dim=64, hidden_dim=128, num_experts=4, top_k=2))

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "max_seq_len", "dense_hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}.")
        kv = self.num_kv_heads
        if kv is not None and (not isinstance(kv, int) or isinstance(kv, bool) or kv <= 0):
            raise ValueError(
                f"TransformerConfig.num_kv_heads must be None (as many as num_heads) or a positive int, got {kv!r}."
            )
        if not isinstance(self.num_dense_layers, int) or isinstance(self.num_dense_layers, bool):
            raise ValueError(f"TransformerConfig.num_dense_layers must be an int, got {self.num_dense_layers!r}.")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ValueError(
                    f"TransformerConfig.{name} must be a finite number > 0, got {value!r}; e.g. "
                    f"{name}={getattr(type(self), name)!r} (the default)."
                )
        if self.dim % self.num_heads != 0:
            raise ValueError(
                f"TransformerConfig.dim={self.dim} must be divisible by num_heads={self.num_heads}; "
                "pick num_heads from the divisors of dim."
            )
        kv = self.kv_heads
        if self.num_heads % kv != 0:
            raise ValueError(
                f"TransformerConfig.num_heads={self.num_heads} must be divisible by num_kv_heads={kv}."
            )
        if (self.dim // self.num_heads) % 2 != 0:
            raise ValueError(
                f"TransformerConfig head dim dim/num_heads={self.dim // self.num_heads} must be even for rotary embeddings."
            )
        if not 0 <= self.num_dense_layers <= self.num_layers:
            raise ValueError(
                f"TransformerConfig.num_dense_layers must be in 0..num_layers={self.num_layers}, "
                f"got {self.num_dense_layers}."
            )
        if self.moe.dim != self.dim:
            raise ValueError(
                f"TransformerConfig.moe.dim={self.moe.dim} must equal dim={self.dim}; build the MoEConfig with dim={self.dim}."
            )

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[max_seq_len, head_dim // 2]`` for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [Dh/2]
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # [Lmax, Dh/2]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[..., :Dh/2], x[..., Dh/2:])``; x: [B, H, L, Dh], cos/sin: [L, Dh/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)  # [B, H, L, Dh/2] each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head attention (grouped-query when num_kv_heads < num_heads) with rotary
    embeddings, computed by ``scaled_dot_product_attention``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.kv_heads
        self.head_dim = cfg.dim // cfg.num_heads
        self.wq = nn.Linear(cfg.dim, cfg.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # [B, Hq, L, Dh]
        k = self.wk(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, Dh]
        v = self.wv(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, Dh]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads
        )  # [B, Hq, L, Dh]
        return self.wo(out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))  # [B, L, D]


class FeedForward(nn.Module):
    """Dense SwiGLU feed-forward ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``h + ffn(norm(h))`` (ffn is MoE or dense)."""

    def __init__(self, cfg: TransformerConfig, layer_id: int) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward: nn.Module = (
            FeedForward(cfg.dim, cfg.dense_hidden_dim) if layer_id < cfg.num_dense_layers else MoE(cfg.moe)
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)  # [B, L, D]
        return h + self.feed_forward(self.ffn_norm(h))  # [B, L, D]


class MoETransformer(nn.Module):
    """Decoder-only language model: embeddings, ``num_layers`` blocks, final norm, output head.

    ``forward(tokens [B, L]) -> logits [B, L, V]`` (float32 logits for a stable loss).

    Example::

        model = MoETransformer(TransformerConfig(vocab_size=256, dim=64, num_layers=2))
        logits = model(torch.randint(0, 256, (2, 32)))   # [2, 32, 256]
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.dim // cfg.num_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if not self.rope_cos.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every parameter with :meth:`init_parameter` (global random state)."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                self.init_parameter(name, p)

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Small-normal init (std 0.02) for embeddings, router gates and input projections, dense
        and expert alike; output projections (attention ``wo``, SwiGLU ``w2``) scaled by depth;
        ones for norms. ``tensor`` is the full value of parameter ``name``
        (see :func:`ep_fsdp.materialize`)."""
        out_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        if name == "output.weight":
            nn.init.normal_(tensor, std=self.config.dim**-0.5, generator=generator)
        elif name.endswith(("norm.weight",)):
            nn.init.ones_(tensor)
        elif name.endswith(("wo.weight", "w2.weight", "experts.w2", "down_proj.weight")):
            nn.init.normal_(tensor, std=out_std, generator=generator)
        else:  # embeddings, wq/wk/wv, w1/w3 (dense, experts, shared experts), router gates
            nn.init.normal_(tensor, std=0.02, generator=generator)

    def reset_buffers(self) -> None:
        """Recompute the rotary tables (non-persistent buffers; after ``to_empty``)."""
        cfg = self.config
        cos, sin = rotary_tables(cfg.dim // cfg.num_heads, cfg.max_seq_len, cfg.rope_theta)
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, L = tokens.shape
        if L > self.config.max_seq_len:
            raise ValueError(
                f"MoETransformer: sequence length {L} exceeds max_seq_len={self.config.max_seq_len}; "
                "truncate the input or raise TransformerConfig.max_seq_len."
            )
        h = self.tok_embeddings(tokens)  # [B, L, D]
        cos, sin = self.rope_cos[:L], self.rope_sin[:L]  # [L, Dh/2]
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h)).float()  # [B, L, V]
