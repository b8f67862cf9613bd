"""The MoE layer: router + token dispatcher + grouped experts.

Legend: T tokens on this rank, D model dim, E experts, k experts per token, G local expert slots,
N rows given to this rank's experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .aux_loss import has_router_logits, router_logits_loss
from .balancing import RoutingCounters, accumulate, begin_balancing, finish_balancing, in_backward
from .config import MoEConfig
from .expert_modules import expert_layers
from .dispatch import LocalDispatcher, TokenDispatcher, expert_counts
from .dispatch._comm import token_offset
from .experts import GroupedExperts, SharedExperts
from .placement import ExpertPlacement
from .router import Router
from .selection import capacity, capacity_keep, random_salt

__all__ = ["MoE", "moe_aux_loss", "moe_layers", "set_aux_loss_scale"]


class MoE(nn.Module):
    """Token-choice top-k Mixture-of-Experts feed-forward layer with SwiGLU experts.

    Maps ``[..., D] -> [..., D]`` in the input's dtype. Unparallelized it runs every expert on
    this process; after :func:`ep_fsdp.parallelize_moe` each rank holds ``E / ep`` experts (which
    ones: :attr:`placement`) and tokens travel to them through :attr:`dispatcher`, with the same
    numerics as the single-process layer on the same global batch.

    The forward is one path for every layout::

        route = router(tokens)                                  # ids [T, k], weights [T, k] fp32
        out, moved = dispatcher.run(tokens, route.expert_ids, route.weights, experts)  # [T, D]
        # = combine(experts(dispatch(tokens)), ...), streamed in chunks when asked

    Balancing losses (``aux_loss_coef``, ``z_loss_coef``) are losses of the global batch, active in
    training mode when a gradient is needed, whose gradient is hooked onto the gate weights (see
    ``ep_fsdp/balancing.py``); read their value with
    :func:`ep_fsdp.moe_aux_loss`. :attr:`routing` counts routed slots, rows per local expert and
    all-to-all bytes over the training-mode forwards since :func:`ep_fsdp.routing_stats` last reset
    them (once per forward: activation-checkpoint recomputation is not counted again).

    Example::

        layer = MoE(MoEConfig(dim=64, hidden_dim=128, num_experts=8, top_k=2, aux_loss_coef=0.01))
        y = layer(torch.randn(4, 16, 64))      # [4, 16, 64]
        loss = y.square().mean() + ep_fsdp.moe_aux_loss(layer)
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.router = Router(config)
        self.experts = GroupedExperts(config)
        self.shared_experts = (
            SharedExperts(config.dim, config.num_shared_experts * config.hidden_dim) if config.num_shared_experts else None
        )
        self.dispatcher: TokenDispatcher = LocalDispatcher(ExpertPlacement.contiguous(config.num_experts, 1))
        # The group of all ranks that share one global batch (balancing statistics); set by
        # parallelize_moe together with the gradient factor of the balancing losses.
        self.stats_group: dist.ProcessGroup | None = None
        self.aux_grad_factor: float = 1.0
        self.aux_loss_scale: float = 1.0
        self.routing = RoutingCounters()
        self._balancing_to_replay = 0
        # Selected slots per logical expert since the last ep_fsdp.update_expert_bias (this rank's).
        self.bias_load: torch.Tensor | None = None
        # Global index of this rank's first token (expert dropout); None: the tokens of the ranks
        # before this one in stats_group (each rank feeds a contiguous slice of the global batch,
        # in rank order), 0 without a group. Set it when your data is split otherwise.
        self.token_offset: int | None = None

    @property
    def placement(self) -> ExpertPlacement:
        """Which ep rank and local slot hold each logical expert."""
        return self.dispatcher.placement

    def reset_parameters(self) -> None:
        """Re-initialise the router gate (``nn.Linear``'s default), the experts and shared experts."""
        self.router.gate.reset_parameters()
        self.experts.reset_parameters()
        if self.shared_experts is not None:
            for m in self.shared_experts.children():
                m.reset_parameters()

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Initialise the full (global) value of parameter ``name`` of this layer in place; the
        per-parameter hook used by :func:`ep_fsdp.materialize`. Same distributions as
        :meth:`reset_parameters`: uniform in ``+-1/sqrt(fan_in)`` for the gate, each expert and
        the shared experts."""
        names = ("router.gate.weight", "experts.w1", "experts.w3", "experts.w2", "shared_experts.gate_proj.weight",
                 "shared_experts.up_proj.weight", "shared_experts.down_proj.weight")
        if name not in names:
            raise ValueError(f"MoE.init_parameter: unknown parameter {name!r}; an MoE layer has {list(names)}.")
        bound = 1.0 / tensor.shape[-1] ** 0.5
        torch.nn.init.uniform_(tensor, -bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.shape[-1] != cfg.dim:
            raise ValueError(
                f"MoE input must end in dim={cfg.dim}, got shape {tuple(x.shape)}; "
                "reshape the input to [..., dim] or build the layer with the matching MoEConfig.dim."
            )
        tokens = x.reshape(-1, cfg.dim)  # [T, D]
        T = tokens.shape[0]
        token_index, salt = None, None
        if self.training and (cfg.expert_dropout > 0 or cfg.jitter_eps > 0):
            # NOTE: expert dropout's mask and the jitter noise hash the global token index with a
            # per-forward salt drawn from the default generator (seeded alike on every rank;
            # checkpoint recomputation restores it).
            offset = (token_offset(T, tokens.device, self.stats_group) if self.token_offset is None
                      else torch.tensor(self.token_offset, device=tokens.device))
            token_index = offset + torch.arange(T, device=tokens.device)  # [T] global token index
            salt = random_salt()
        route = self.router(tokens, token_index=token_index, dropout_salt=salt)  # weights/ids [T, k]
        slots = expert_counts(route.expert_ids, cfg.num_experts)  # [E] logical, selected
        keep = None
        if cfg.capacity_factor is not None:  # NOTE: decided here, before any exchange
            limit = capacity(cfg.capacity_factor, T, cfg.top_k, cfg.num_experts)
            keep = capacity_keep(route.expert_ids, route.slot_scores, cfg.num_experts, limit)  # [T, k]
        weights, pending = route.weights, None
        if self.training and (cfg.aux_loss_coef or cfg.z_loss_coef):  # NOTE: training mode only, like Megatron
            weights, pending = begin_balancing(
                route, slots, aux_loss_coef=cfg.aux_loss_coef, z_loss_coef=cfg.z_loss_coef, top_k=cfg.top_k,
                group=self.stats_group, in_recompute=self._replay_balancing(),
            )
        shared: list[torch.Tensor] = []
        in_flight = None
        if self.shared_experts is not None:  # NOTE: computed while the tokens are on the wire
            in_flight = lambda: shared.append(self.shared_experts(tokens))  # noqa: E731
        out, moved = self.dispatcher.run(
            x, route.expert_ids, weights, self.experts, keep=keep, in_flight=in_flight
        )  # [..., D] like x
        if shared:
            out = out + shared[0].view_as(out)
        if pending is not None:
            finish_balancing(pending, grad_scale=self.aux_grad_factor * self.aux_loss_scale, counters=self.routing)
        if self.training:
            self._record_forward(slots, moved.counts, route.expert_ids, keep, moved.counts_exact, moved.sent_bytes)
        return out

    @torch.compiler.disable
    def _record_forward(
        self, slots: torch.Tensor, counts: torch.Tensor, expert_ids: torch.Tensor, keep: torch.Tensor | None,
        counts_exact: bool, sent_bytes: int,
    ) -> None:
        """Add one training forward to :attr:`routing` and :attr:`bias_load`.

        NOTE: runs eagerly under ``torch.compile`` (a graph break at the end of the layer, without
        a host sync): the counters are Python state that grows every step, which a compiled graph
        would guard on and recompile for. Eager also sees a checkpoint's recomputation, which
        records nothing.
        """
        if in_backward():
            return
        dropped = 0 if keep is None else (~keep).sum()
        load = counts if keep is None or counts_exact else self._kept_load(expert_ids, keep)
        self.routing.add_forward(slots, load, sent_bytes, dropped)
        if self.config.bias_update_rate > 0:
            self.bias_load = accumulate(self.bias_load, slots.detach())

    def _kept_load(self, expert_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``[E]`` kept slots per storage row, for the local dispatcher (``ep == 1``: ``G == E``),
        which computes dropped slots with a zero weight, so its own counts include them."""
        E = self.config.num_experts
        physical = self.placement.to_physical(expert_ids).masked_fill(~keep, E)
        return expert_counts(physical, E + 1)[:E]

    def _replay_balancing(self) -> bool:
        """Whether this forward must hook the balancing gradient although it runs in the backward.

        NOTE: a *reentrant* checkpoint runs its first forward under ``no_grad`` and backpropagates
        the graph of the recomputation; a non-reentrant one (``parallelize_moe``'s) records the
        graph in its first forward and discards the recomputed one. So a training forward without
        grad outside the backward is remembered, and the next recomputation of this layer replays
        the balancing. A forward with grad clears the memory (a no-grad forward followed by one
        with grad was not a checkpoint's first pass).
        """
        if in_backward():
            if self._balancing_to_replay > 0:
                self._balancing_to_replay -= 1
                return True
            return False
        self._balancing_to_replay = self._balancing_to_replay + 1 if not torch.is_grad_enabled() else 0
        return False


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """``(qualified name, layer)`` of every :class:`MoE` in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def _require_layers(model: nn.Module, api: str) -> list[tuple[str, MoE]]:
    layers = moe_layers(model)
    if not layers:
        raise ValueError(
            f"{api} found no ep_fsdp.MoE layer in {type(model).__name__}; "
            "pass the model that contains the MoE layers."
        )
    return layers


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Coefficient-weighted balancing + z losses of all MoE layers, for the forwards since the last call.

    The value is the global-batch loss (all ranks), summed over layers and averaged over the
    forwards since the previous call, as a float32 scalar; the call resets it. Add it to the loss:

    * for ``ep_fsdp.MoE`` layers the value is detached and its gradient is already hooked into
      the layers' backward, so adding it gives the printed loss its true value and changes no
      gradient;
    * for transformers models parallelized by :func:`ep_fsdp.parallelize_moe` it is transformers'
      ``load_balancing_loss_func`` over the global batch times the config's
      ``router_aux_loss_coef``, returned *live*: its gradient reaches the routers only when it is
      added to the loss you backpropagate (see ``ep_fsdp/aux_loss.py``).

    Returns a float32 zero when no layer computed a balancing loss (coefficients 0, or no
    gradient needed).

    Example::

        loss = F.cross_entropy(logits, targets) + ep_fsdp.moe_aux_loss(model)
    """
    layers = moe_layers(model)
    contract = router_logits_loss(model)
    if not layers and contract is None and not has_router_logits(model) and not expert_layers(model):
        _require_layers(model, "moe_aux_loss")
    total: torch.Tensor | None = contract
    for _, m in layers:
        value = m.routing.take_aux()
        if value is not None:
            total = value if total is None else total + value
    if total is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), dtype=torch.float32, device=device)
    return total.float()


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Multiply the balancing-loss gradient of every MoE layer by ``scale`` from the next forward.

    The gradient is added inside the layers' backward as if ``moe_aux_loss(model)`` had been added
    to the loss with weight ``scale`` (default 1). So whenever the loss you backpropagate is scaled,
    set the same factor here:

    * gradient accumulation that divides each micro-batch loss by ``n``: ``1 / n``;
    * a weight ``c`` on the whole loss, or ``torch.amp.GradScaler`` (``scaler.scale(loss)``
      multiplies the loss by ``scaler.get_scale()``, which changes between steps): the same factor,
      set before each forward (e.g. ``scaler.get_scale() / n``);
    * ``0`` switches the balancing gradient off (the values are still computed and logged).

    Example::

        ep_fsdp.set_aux_loss_scale(model, 1 / accum_steps)
    """
    if not scale >= 0:
        raise ValueError(
            f"set_aux_loss_scale: scale must be >= 0, got {scale!r}; use the factor your loss is "
            "multiplied by (e.g. 1 / grad_accum_steps), or 0 to switch the balancing gradient off."
        )
    # NOTE: transformers models' balancing loss is returned live by moe_aux_loss: it is scaled
    # with the loss it is added to, so only ep_fsdp.MoE layers hold a scale.
    layers = moe_layers(model) if expert_layers(model) else _require_layers(model, "set_aux_loss_scale")
    for _, m in layers:
        m.aux_loss_scale = float(scale)
