"""PESC (Parameter-Efficient Sparsity Crafting) as a peft method: ``config.py``, ``layer.py``, ``model.py``."""

from peft.utils import PeftType

from ..registration import register_method
from .checkpoint import load_official_pesc
from .config import PEFT_TYPE_NAME, PESCConfig
from .layer import PESCLayer, PESCRouter
from .loss import load_balancing_loss, router_aux_loss
from .model import PESCModel


def register_pesc() -> PeftType:
    """Make ``"PESC"`` a peft method (idempotent). Returns the ``PeftType.PESC`` member."""
    return register_method(PEFT_TYPE_NAME, PESCConfig, PESCModel)


register_pesc()

__all__ = [
    "PESCConfig", "PESCLayer", "PESCModel", "PESCRouter", "load_balancing_loss", "load_official_pesc",
    "register_pesc", "router_aux_loss",
]
