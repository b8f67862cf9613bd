"""Configuration of one MoE layer.

``MoEConfig`` is the single source of truth for the shapes and routing behaviour of an
:class:`ep_fsdp.MoE` layer. It is validated when it is built, so a bad value fails at the line
that wrote it, with a message that names the field, shows the value and says the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MoEConfig", "SCORE_FUNCS"]

SCORE_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class MoEConfig:
    """Shapes and routing options of one MoE layer.

    Args:
        dim: model width ``D`` (input and output features of the layer).
        hidden_dim: expert hidden width ``H`` (SwiGLU intermediate size).
        num_experts: number of routed experts ``E``.
        top_k: experts per token ``k``, ``1 <= k <= E``.
        score_func: ``"softmax"`` or ``"sigmoid"``, applied to the router logits.
        renormalize: divide the ``k`` selected weights by their sum (Mixtral/Qwen style).
        route_scale: multiply the final routing weights by this factor.
        temperature: router logits are divided by this before scoring (``> 0``).
        jitter_eps: while training, the router input is multiplied by uniform noise in
            ``[1 - eps, 1 + eps]`` (Switch Transformer); 0 disables.
        aux_loss_coef: weight of the Switch/GShard load-balancing loss ``E * sum_i f_i * P_i``;
            0 disables it.
        z_loss_coef: weight of the router z-loss ``mean(logsumexp(logits) ** 2)``; 0 disables it.
        expert_bias: register a ``router.expert_bias`` buffer ``[E]`` (zeros) that is added to
            the scores for expert *selection only*, as in DeepSeek-V3's auxiliary-loss-free
            balancing; the gate weights come from the unbiased scores. The buffer is the user's to
            update (e.g. from ``last_global_tokens_per_expert``, identically on every rank); it is
            saved in checkpoints.

    Example::

        cfg = MoEConfig(dim=256, hidden_dim=512, num_experts=8, top_k=2, aux_loss_coef=1e-2)
    """

    dim: int
    hidden_dim: int
    num_experts: int
    top_k: int = 2
    score_func: str = "softmax"
    renormalize: bool = True
    route_scale: float = 1.0
    temperature: float = 1.0
    jitter_eps: float = 0.0
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    expert_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("dim", "hidden_dim", "num_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"MoEConfig.{name} must be a positive int, got {value!r}; "
                    f"pass a size such as {name}=256."
                )
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k must be in 1..num_experts={self.num_experts}, got {self.top_k!r}; "
                f"choose top_k between 1 and {self.num_experts} (or raise num_experts)."
            )
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(
                f"MoEConfig.score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}; "
                "use score_func='softmax' or score_func='sigmoid'."
            )
        if not self.temperature > 0:
            raise ValueError(
                f"MoEConfig.temperature must be > 0, got {self.temperature!r}; use 1.0 for plain logits."
            )
        if not self.route_scale > 0:
            raise ValueError(
                f"MoEConfig.route_scale must be > 0, got {self.route_scale!r}; use 1.0 for no scaling."
            )
        if not 0 <= self.jitter_eps < 1:
            raise ValueError(
                f"MoEConfig.jitter_eps must be in [0, 1), got {self.jitter_eps!r}; use 0 to disable jitter."
            )
        for name in ("aux_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(
                    f"MoEConfig.{name} must be >= 0, got {value!r}; use 0 to disable the loss."
                )
