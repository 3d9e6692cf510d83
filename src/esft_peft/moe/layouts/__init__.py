"""The family registry: one :class:`~esft_peft.moe.layouts.base.ExpertsLayout` per way of storing experts.

Adding a family is one class in one file of this package, listed in :data:`LAYOUTS`. Detection tries the layouts
in order; the first match wins.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .base import ExpertsLayout
from .dbrx import DbrxExperts
from .fused import FusedExperts
from .jetmoe import JetMoeExperts
from .llama4 import Llama4Experts
from .module_list import ModuleListExperts
from .pesc import PESCExperts

LAYOUTS: tuple[ExpertsLayout, ...] = (
    PESCExperts(), FusedExperts(), DbrxExperts(), Llama4Experts(), JetMoeExperts(), ModuleListExperts()
)
BY_KIND: dict[str, ExpertsLayout] = {layout.kind: layout for layout in LAYOUTS}


def detect_layout(name: str, module: nn.Module) -> Optional[ExpertsLayout]:
    """The layout of the experts container ``module`` (called ``name``), or None when it is not one."""
    return next((layout for layout in LAYOUTS if layout.detect(name, module)), None)


def layout_of_kind(kind: str) -> ExpertsLayout:
    """The layout recorded as ``kind`` (in an adapter's ``base_layout``)."""
    try:
        return BY_KIND[kind]
    except KeyError:
        raise ValueError(f"Unknown experts layout {kind!r}; known: {sorted(BY_KIND)}.") from None


__all__ = ["LAYOUTS", "ExpertsLayout", "detect_layout", "layout_of_kind"]
