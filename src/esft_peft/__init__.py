"""esft-peft: expert-level parameter-efficient fine-tuning of Mixture-of-Experts LLMs as Hugging Face PEFT methods.

Importing the package registers ``"ESFT"`` with peft.
"""

from .moe.discovery import MoELayer, find_moe_layers
from .moe.errors import NotAnMoEModelError
from .scoring import (
    ExpertScores,
    IncompatibleScoresError,
    TaskComparison,
    compare_tasks,
    plot_comparison,
    plot_scores,
    score_experts,
)
from .tuners.esft import ESFTConfig, ESFTLayer, ESFTModel, ExpertsDeltaLayer, ModuleDeltaLayer, register_esft

__version__ = "0.1.0"

__all__ = [
    "ESFTConfig",
    "ESFTLayer",
    "ESFTModel",
    "ExpertScores",
    "ExpertsDeltaLayer",
    "IncompatibleScoresError",
    "ModuleDeltaLayer",
    "MoELayer",
    "NotAnMoEModelError",
    "TaskComparison",
    "compare_tasks",
    "find_moe_layers",
    "plot_comparison",
    "plot_scores",
    "register_esft",
    "score_experts",
]
