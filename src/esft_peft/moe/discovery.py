"""Find the MoE layers of a model from its module structure, through the family registry."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .errors import NotAnMoEModelError
from .layer_keys import layer_key_of_module, sorted_layer_keys
from .layouts import ExpertsLayout, detect_layout
from .layouts.base import named_base_modules, unwrap

SHARED_NAME = re.compile(r"shared")
ROUTER_NAMES = ("gate", "router", "shared_expert_gate", "switch")
SEARCHED = (
    "an `experts` module with fused 3-D expert weights (transformers' use_experts_implementation), "
    "a ModuleList/ModuleDict of expert MLPs, llama4/dbrx-style experts, or jetmoe parallel experts"
)


@dataclass
class MoELayer:
    """One MoE layer: its experts layout and where its experts, shared experts and routers live."""

    key: str  # "1" (decoder layer 1) or "encoder.1"
    layout: ExpertsLayout
    num_experts: int
    experts_name: str  # experts container (the MoE block for jetmoe)
    block_name: str  # the MoE block holding experts and router
    decoder_layer_name: str
    delta_targets: list[str] = field(default_factory=list)  # modules that get the routed-expert deltas
    expert_modules: dict[int, str] = field(default_factory=dict)  # experts as separate modules: id -> name
    shared_names: list[str] = field(default_factory=list)
    router_names: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.layout.kind


def _children_named(parent: nn.Module, parent_name: str, predicate) -> list[str]:
    names = []
    for child_name, child in parent.named_children():
        if predicate(child_name) and any(True for _ in unwrap(child).parameters()):
            names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


def _is_shared(name: str) -> bool:
    return bool(SHARED_NAME.search(name)) and not name.endswith("_gate")


def find_moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """All MoE layers of ``model`` keyed like ``ESFTConfig.experts`` ("1", "2", ... or "encoder.N"), in model order.

    Raises:
        NotAnMoEModelError: when no module matches a registered experts layout.
    """
    modules = dict(named_base_modules(model))
    layers: dict[str, MoELayer] = {}
    for name, module in modules.items():
        layout = detect_layout(name, module)
        if layout is None:
            continue
        block_name = layout.block_name(name)
        located = layer_key_of_module(name)
        if located is None or "attention" in block_name.rpartition(".")[2]:
            continue
        key, decoder_layer_name = located
        if key in layers:
            raise ValueError(f"Found two expert containers in layer {key}: {layers[key].experts_name} and {name}.")
        block, decoder_layer = modules[block_name], modules[decoder_layer_name]
        layer = MoELayer(
            key=key,
            layout=layout,
            num_experts=layout.num_experts(module),
            experts_name=name,
            block_name=block_name,
            decoder_layer_name=decoder_layer_name,
            delta_targets=layout.delta_targets(name),
            expert_modules=layout.expert_modules(name, module),
            router_names=_children_named(block, block_name, lambda n: n in ROUTER_NAMES or n.endswith("_gate")),
            shared_names=_children_named(block, block_name, _is_shared),
        )
        if decoder_layer is not block:
            layer.shared_names += _children_named(decoder_layer, decoder_layer_name, _is_shared)
        layers[key] = layer
    if not layers:
        raise NotAnMoEModelError(
            f"{type(model).__name__} has no mixture-of-experts layer ESFT can adapt. Searched every decoder layer "
            f"for {SEARCHED}. ESFT needs an MoE model (e.g. DeepSeek-V2, Qwen3-MoE, Mixtral, OLMoE)."
        )
    return {key: layers[key] for key in sorted_layer_keys(layers)}


def parameter_modules(model: nn.Module, root: str) -> list[str]:
    """Names of the modules under ``root`` (itself included) that own parameters directly."""
    prefix = f"{root}." if root else ""
    return [
        name
        for name, module in named_base_modules(model)
        if (name == root or name.startswith(prefix)) and any(True for _ in module.parameters(recurse=False))
    ]
