"""esft-peft: expert-level parameter-efficient fine-tuning of Mixture-of-Experts LLMs as Hugging Face PEFT methods.

Importing the package registers ``"ESFT"`` and ``"PESC"`` with peft.
"""

from .known_noise import drop_known_noise

drop_known_noise()  # before peft imports bitsandbytes

from .moe.discovery import MoELayer, find_moe_layers  # noqa: E402
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
from .tuners.pesc import (
    PESCConfig,
    PESCLayer,
    PESCModel,
    load_balancing_loss,
    load_official_pesc,
    register_pesc,
    router_aux_loss,
)

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
    "PESCConfig",
    "PESCLayer",
    "PESCModel",
    "TaskComparison",
    "compare_tasks",
    "find_moe_layers",
    "load_balancing_loss",
    "load_official_pesc",
    "plot_comparison",
    "plot_scores",
    "register_esft",
    "register_pesc",
    "router_aux_loss",
    "score_experts",
]
