"""PESC-crafted layers: a dense MLP wrapped by a PESC tuner layer, whose active adapter routes each token to
``top_k`` of its adapter experts (:mod:`esft_peft.tuners.pesc`).

The crafted layer is the experts container and the MoE block at once. Its router returns ``(logits, top_k_weights,
top_k_index)``. ESFT cannot wrap these experts: they are trained by the PESC adapter itself.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedLayoutError
from .base import ExpertsLayout, crafts_experts

ROUTER_CONTAINER = "pesc_router"  # the crafted layer's ModuleDict: adapter name -> router


def active_router(layer: nn.Module, where: str = "") -> nn.Module:
    """The router of the one active adapter of a crafted layer."""
    routers = getattr(layer, ROUTER_CONTAINER)
    active = [name for name in layer.active_adapters if name in routers]
    if len(active) != 1:
        raise UnsupportedLayoutError(
            f"{where or type(layer).__name__}: {len(active)} PESC adapters are active ({active}); routing is read "
            "from exactly one. Activate one adapter with set_adapter(name) first."
        )
    return routers[active[0]]


class PESCExperts(ExpertsLayout):
    kind = "pesc"

    def detect(self, name: str, module: nn.Module) -> bool:
        return crafts_experts(module) and isinstance(getattr(module, ROUTER_CONTAINER, None), nn.ModuleDict)

    def block_name(self, experts_name: str) -> str:
        return experts_name

    def num_experts(self, experts: nn.Module) -> int:
        return active_router(experts).out_features

    def check_wrappable(self, target: nn.Module) -> None:
        raise UnsupportedLayoutError(
            "This layer's experts are PESC adapter experts; they are trained by the PESC adapter itself and ESFT "
            "cannot wrap them. Train the PESC adapter further, or apply ESFT to an MoE base model."
        )

    def expert_views(self, target: nn.Module) -> dict:
        self.check_wrappable(target)
        return {}
