"""ep_fsdp: expert parallelism composed with FSDP2 for PyTorch Mixture-of-Experts models."""

from .config import MoEConfig
from .expert_bias import update_expert_bias
from .grad import clip_grad_norm_
from .launch import init_distributed
from .materialize import materialize
from .mesh import build_mesh
from .moe import MoE, moe_aux_loss, moe_layers, set_aux_loss_scale
from .placement import ExpertPlacement
from .metrics import routing_stats
from .migration import expert_placement, last_rebalance, rebalance_experts
from .parallelize import parallelize_moe

__version__ = "0.1.0"

__all__ = [
    "MoEConfig",
    "MoE",
    "moe_aux_loss",
    "moe_layers",
    "set_aux_loss_scale",
    "update_expert_bias",
    "ExpertPlacement",
    "init_distributed",
    "build_mesh",
    "materialize",
    "parallelize_moe",
    "clip_grad_norm_",
    "routing_stats",
    "expert_placement",
    "rebalance_experts",
    "last_rebalance",
    "__version__",
]
