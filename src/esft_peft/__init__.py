"""esft-peft: expert-level parameter-efficient fine-tuning of Mixture-of-Experts LLMs as Hugging Face PEFT methods.

``import esft_peft`` registers ``"ESFT"`` and ``"PESC"`` with peft (now if peft is imported, else as soon as it is)
and is cheap: public names load on first use (see :mod:`esft_peft.imports`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .imports import register_with_peft

__version__ = "0.1.0"

# Public name -> the module that defines it (loaded on first access).
_EXPORTS = {
    "MoELayer": ".moe.discovery",
    "find_moe_layers": ".moe.discovery",
    "NotAnMoEModelError": ".moe.errors",
    "export_lora": ".interop.export_lora",
    "ExpertScores": ".scoring",
    "IncompatibleScoresError": ".scoring",
    "TaskComparison": ".scoring",
    "compare_tasks": ".scoring",
    "plot_comparison": ".scoring",
    "plot_scores": ".scoring",
    "score_experts": ".scoring",
    "ESFTConfig": ".tuners.esft",
    "ESFTLayer": ".tuners.esft",
    "ESFTModel": ".tuners.esft",
    "ExpertsDeltaLayer": ".tuners.esft",
    "ModuleDeltaLayer": ".tuners.esft",
    "register_esft": ".tuners.esft",
    "PESCConfig": ".tuners.pesc",
    "PESCLayer": ".tuners.pesc",
    "PESCModel": ".tuners.pesc",
    "load_balancing_loss": ".tuners.pesc",
    "load_official_pesc": ".tuners.pesc",
    "register_pesc": ".tuners.pesc",
    "router_aux_loss": ".tuners.pesc",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .moe.discovery import MoELayer, find_moe_layers
    from .interop.export_lora import export_lora
    from .moe.errors import NotAnMoEModelError
    from .scoring import (ExpertScores, IncompatibleScoresError, TaskComparison, compare_tasks, plot_comparison,
                          plot_scores, score_experts)
    from .tuners.esft import ESFTConfig, ESFTLayer, ESFTModel, ExpertsDeltaLayer, ModuleDeltaLayer, register_esft
    from .tuners.pesc import (PESCConfig, PESCLayer, PESCModel, load_balancing_loss, load_official_pesc,
                              register_pesc, router_aux_loss)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


register_with_peft()
