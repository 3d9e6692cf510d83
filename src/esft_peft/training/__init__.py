"""Training helpers for Trainer, TRL and custom loops."""

from .helpers import esft_training_arguments, gather_adapter_state_dict, set_router_aux_loss

__all__ = ["esft_training_arguments", "gather_adapter_state_dict", "set_router_aux_loss"]
