"""Configuration of one MoE layer.

``MoEConfig`` is the single source of truth for the shapes and routing behaviour of an
:class:`ep_fsdp.MoE` layer. It is validated when it is built, so a bad value fails at the line
that wrote it, with a message that names the field, shows the value and says the fix.
"""

from __future__ import annotations

import math
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
        renormalize: divide the ``k`` selected weights by their sum (Mixtral/Qwen style) when
            ``top_k > 1``. With ``top_k == 1`` the weight stays the chosen expert's score (Switch
            style: divided by itself it would be a constant 1, and the router would get no gradient
            from the task loss); transformers' Mixtral/Qwen give 1.0 there.
        route_scale: multiply the final routing weights by this factor.
        temperature: router logits are divided by this before scoring (``> 0``).
        jitter_eps: while training, the router input is multiplied by uniform noise in
            ``[1 - eps, 1 + eps]`` (Switch Transformer), a function of the global token index, the
            feature and the forward's salt (the same on every layout, like expert dropout; see
            ``ep_fsdp.selection.jitter_noise``); 0 disables.
        aux_loss_coef: weight of the Switch/GShard load-balancing loss ``E * sum_i f_i * P_i``;
            0 disables it.
        z_loss_coef: weight of the router z-loss ``mean(logsumexp(logits) ** 2)``; 0 disables it.
        expert_bias: register a ``router.expert_bias`` buffer ``[E]`` (zeros) that is added to
            the scores for expert *selection only*, as in DeepSeek-V3's auxiliary-loss-free
            balancing; the gate weights come from the unbiased scores. It is saved in checkpoints;
            :func:`ep_fsdp.update_expert_bias` moves it when ``bias_update_rate > 0``.
        num_shared_experts: shared experts applied to every token (DeepSeek-V3): one SwiGLU of
            width ``num_shared_experts * hidden_dim`` whose output is added to the routed output.
            A dense parameter; under expert parallelism it runs while the token exchange is in flight.
        num_expert_groups: split the experts into this many contiguous groups for group-limited
            (device-limited) routing; ``None`` disables it.
        num_limited_groups: each token keeps its best ``num_limited_groups`` groups (a group's
            score is the sum of its two best selection scores) and picks its ``top_k`` experts
            inside them. Required with ``num_expert_groups``.
        bias_update_rate: auxiliary-loss-free balancing: :func:`ep_fsdp.update_expert_bias`
            moves ``expert_bias`` by ``rate * sign(mean_load - load)`` from the global load since
            its last call; needs ``expert_bias=True``. 0 disables it.
        capacity_factor: each expert takes at most ``ceil(capacity_factor * T * k / E)`` routed
            slots of the ``T`` tokens of one forward call on one rank; the lowest-scored slots
            beyond it are dropped (they contribute zero; weights are not renormalized). ``None``
            is dropless.
        expert_dropout: while training, mask each (token, expert) selection score with this
            probability before top-k, so tokens explore other experts. The mask is a function of
            the global token index, so it is the same on every layout. 0 disables it.

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
    num_shared_experts: int = 0
    num_expert_groups: int | None = None
    num_limited_groups: int | None = None
    bias_update_rate: float = 0.0
    capacity_factor: float | None = None
    expert_dropout: float = 0.0

    def __post_init__(self) -> None:
        self._check_kinds()
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
        self._check_routing_extensions()

    def _check_kinds(self) -> None:
        """Every number is a real, finite number (an int where a count is meant, never a bool);
        the flags are bools: so the range checks below compare numbers, and say which field."""
        reals = ("route_scale", "temperature", "jitter_eps", "aux_loss_coef", "z_loss_coef", "bias_update_rate",
                 "expert_dropout", "capacity_factor")
        for name in reals:
            value = getattr(self, name)
            if value is None and name == "capacity_factor":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                fix = ("e.g. capacity_factor=1.25, or None (dropless, the default)" if name == "capacity_factor"
                       else f"e.g. {name}={getattr(type(self), name)!r} (the default)")
                raise ValueError(f"MoEConfig.{name} must be a finite number, got {value!r}; {fix}.")
        for name in ("top_k", "num_shared_experts", "num_expert_groups", "num_limited_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or (value is not None and not isinstance(value, int)):
                raise ValueError(f"MoEConfig.{name} must be an int, got {value!r}.")
        for name in ("renormalize", "expert_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MoEConfig.{name} must be True or False, got {getattr(self, name)!r}.")

    def _check_routing_extensions(self) -> None:
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ValueError(
                f"MoEConfig.num_shared_experts must be an int >= 0, got {self.num_shared_experts!r}; "
                "use 0 for no shared expert, 1 for DeepSeek-V3's one."
            )
        groups, limited, E = self.num_expert_groups, self.num_limited_groups, self.num_experts
        if (groups is None) != (limited is None):
            raise ValueError(
                f"MoEConfig.num_expert_groups={groups!r} and num_limited_groups={limited!r}: set both for "
                "group-limited routing, or neither."
            )
        if groups is not None:
            if not isinstance(groups, int) or groups < 1 or E % groups != 0:
                raise ValueError(
                    f"MoEConfig.num_expert_groups must be a positive divisor of num_experts={E}, got {groups!r}; "
                    f"choose one of {[d for d in range(1, E + 1) if E % d == 0]}."
                )
            if not isinstance(limited, int) or not 1 <= limited <= groups:
                raise ValueError(
                    f"MoEConfig.num_limited_groups must be in 1..num_expert_groups={groups}, got {limited!r}."
                )
            if self.top_k > limited * (E // groups):
                raise ValueError(
                    f"MoEConfig.top_k={self.top_k} > num_limited_groups * experts per group = {limited} * "
                    f"{E // groups}: a token could not find top_k experts in its groups; raise "
                    "num_limited_groups or lower top_k."
                )
        if not self.bias_update_rate >= 0:
            raise ValueError(
                f"MoEConfig.bias_update_rate must be >= 0, got {self.bias_update_rate!r}; use 0 to disable."
            )
        if self.bias_update_rate > 0 and not self.expert_bias:
            raise ValueError(
                f"MoEConfig.bias_update_rate={self.bias_update_rate} needs expert_bias=True (the buffer it "
                "updates); set expert_bias=True or bias_update_rate=0."
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(
                f"MoEConfig.capacity_factor must be > 0 or None (dropless), got {self.capacity_factor!r}; "
                "e.g. 1.25 keeps up to 1.25x the mean load per expert."
            )
        if not 0 <= self.expert_dropout < 1:
            raise ValueError(
                f"MoEConfig.expert_dropout must be in [0, 1), got {self.expert_dropout!r}; use 0 to disable."
            )
