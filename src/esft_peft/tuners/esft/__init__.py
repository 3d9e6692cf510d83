"""ESFT (Expert-Specialized Fine-Tuning) as a peft method: ``config.py``, ``layer.py``, ``model.py``."""

from peft.utils import PeftType

from ..registration import register_method
from .config import PEFT_TYPE_NAME, ESFTConfig
from .layer import ESFTLayer, ExpertsDeltaLayer, ModuleDeltaLayer
from .model import ESFTModel


def register_esft() -> PeftType:
    """Make ``"ESFT"`` a peft method (idempotent). Returns the ``PeftType.ESFT`` member."""
    return register_method(PEFT_TYPE_NAME, ESFTConfig, ESFTModel)


register_esft()

__all__ = ["ESFTConfig", "ESFTLayer", "ESFTModel", "ExpertsDeltaLayer", "ModuleDeltaLayer", "register_esft"]
