"""PESC-crafted layers: a dense MLP wrapped by a PESC tuner layer, whose active adapter routes each token to
``top_k`` of its adapter experts (:mod:`esft_peft.tuners.pesc`).

The crafted layer is the experts container and the MoE block at once. Its router returns ``(logits, top_k_weights,
top_k_index)``, which is what scoring records. ESFT cannot wrap these experts: they are trained by the PESC adapter
itself.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import UnsupportedLayoutError
from .base import Deltas, ExpertsLayout, RecordRouting, crafts_experts

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

    def forward(self, target: nn.Module, ids: list[int], deltas: Deltas, args: tuple, kwargs: dict) -> Any:
        self.check_wrappable(target)

    def watch_routing(self, model: nn.Module, layer: Any, record: RecordRouting) -> RemovableHandle:
        router = active_router(model.get_submodule(layer.experts_name), f"Layer {layer.key}")

        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            _, weights, index = output
            record(index, weights)

        return router.register_forward_hook(hook)
