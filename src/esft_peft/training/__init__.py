"""Training helpers for Trainer, TRL and custom loops."""

from .helpers import esft_training_arguments, gather_adapter_state_dict, set_router_aux_loss
from .weight_decay import ExpertWeightDecayCallback, decay_expert_weights

__all__ = [
    "ExpertWeightDecayCallback",
    "decay_expert_weights",
    "esft_training_arguments",
    "gather_adapter_state_dict",
    "set_router_aux_loss",
]
