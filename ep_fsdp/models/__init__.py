"""Reference models built from ep_fsdp layers."""

from .transformer import MoETransformer, TransformerConfig

__all__ = ["MoETransformer", "TransformerConfig"]
