"""esft-peft: Expert-Specialized Fine-Tuning (ESFT) for Mixture-of-Experts models as a Hugging Face PEFT method.

Importing the package registers ``"ESFT"`` with peft.
"""

from .config import ESFTConfig
from .layer import ESFTLayer, ExpertsDeltaLayer, ModuleDeltaLayer
from .model import ESFTModel
from .moe_structure import MoELayer, NotAnMoEModelError, find_moe_layers
from .registration import register_esft
from .scoring import ExpertScores, IncompatibleScoresError, compare_tasks, score_experts

__version__ = "0.1.0"

register_esft()

__all__ = [
    "ESFTConfig",
    "ESFTLayer",
    "ESFTModel",
    "ExpertScores",
    "IncompatibleScoresError",
    "ExpertsDeltaLayer",
    "ModuleDeltaLayer",
    "MoELayer",
    "NotAnMoEModelError",
    "compare_tasks",
    "find_moe_layers",
    "register_esft",
    "score_experts",
]
