"""Find the MoE layers of a model and how their experts are stored, from the module structure alone."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Iterator

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .partitioned import logical_shape

# Layout kinds of a routed-experts container:
FUSED = "fused"  # transformers' @use_experts_implementation: 3-D gate_up_proj/up_proj + down_proj, routed call
DENSE_BMM = "dense_bmm"  # llama4: 3-D transposed weights, every expert sees every (pre-scaled) token
PARALLEL_LINEAR = "parallel_linear"  # jetmoe: per-expert linears fed with tokens sorted by expert
SPLIT_GLU = "split_glu"  # dbrx: 2-D (E*I, H) w1/v1/w2 on experts.mlp, routed call
MODULE_LIST = "module_list"  # ModuleList/ModuleDict of per-expert MLPs (remote-code DeepSeek, switch, nllb)

LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|blocks|block|h)\.(\d+)(?=\.|$)")
SHARED_NAME = re.compile(r"shared")
ROUTER_NAMES = ("gate", "router", "shared_expert_gate", "switch")
SEARCHED = (
    "an `experts` module with fused 3-D expert weights (transformers' use_experts_implementation), "
    "a ModuleList/ModuleDict of expert MLPs, llama4/dbrx-style experts, or jetmoe parallel experts"
)


class NotAnMoEModelError(ValueError):
    """The model has no mixture-of-experts layer that ESFT can adapt."""


@dataclass
class MoELayer:
    """One MoE layer: where its experts, shared experts and routers live."""

    key: str  # "1" (decoder layer 1) or "encoder.1"
    kind: str
    num_experts: int
    experts_name: str  # experts container (or MoE block for PARALLEL_LINEAR)
    block_name: str  # the MoE block holding experts and router
    decoder_layer_name: str
    expert_targets: list[str] = field(default_factory=list)  # modules that get the routed-expert deltas
    expert_modules: dict[int, str] = field(default_factory=dict)  # MODULE_LIST: expert id -> module name
    shared_names: list[str] = field(default_factory=list)
    router_names: list[str] = field(default_factory=list)


def unwrap(module: nn.Module) -> nn.Module:
    """The base module behind a peft tuner layer (or the module itself)."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def named_base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` with peft wrappers resolved to the module they wrap and adapter internals skipped."""
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in wrapped):
            continue
        if isinstance(module, BaseTunerLayer):
            wrapped.append(name + ".")
        yield name, unwrap(module)


def base_named_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``named_parameters`` of the base weights only: adapter deltas skipped, ``base_layer.`` removed."""
    for name, param in module.named_parameters():
        if ".esft_delta." in f".{name}":
            continue
        yield name.replace("base_layer.", ""), param


def classify_experts(module: nn.Module) -> str | None:
    """The layout kind of an experts container, or None when it is not one."""
    params = dict(module.named_parameters(recurse=False))
    has_3d = lambda name: name in params and len(logical_shape(params[name])) == 3  # noqa: E731
    if hasattr(module, "has_gate") and hasattr(module, "is_transposed") and has_3d("down_proj"):
        if has_3d("gate_up_proj") or has_3d("up_proj"):
            return FUSED
    if has_3d("gate_up_proj") and has_3d("down_proj") and len(inspect.signature(module.forward).parameters) == 1:
        return DENSE_BMM
    mlp = getattr(module, "mlp", None)
    if mlp is not None and hasattr(module, "num_experts"):
        mlp_params = dict(mlp.named_parameters(recurse=False))
        names = ("w1", "v1", "w2")
        if set(names) <= set(mlp_params) and all(len(logical_shape(mlp_params[n])) == 2 for n in names):
            return SPLIT_GLU
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)) and len(module) > 1:
        children = list(module.children())
        same_type = len({type(unwrap(child)) for child in children}) == 1
        has_linear = any(isinstance(unwrap(m), nn.Linear) for m in children[0].modules())
        if same_type and has_linear:
            return MODULE_LIST
    return None


def _is_parallel_linear(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and len(logical_shape(weight)) == 3 and hasattr(module, "num_experts")


def _layer_key(name: str) -> tuple[str, str] | None:
    matches = list(LAYER_INDEX.finditer(name))
    if not matches:
        return None
    first = matches[0]  # the stack index (T5-style blocks nest a sub-layer index after it)
    decoder_layer_name = name[: first.end()]
    in_encoder = ".encoder." in f".{decoder_layer_name}." and ".decoder." not in f".{decoder_layer_name}."
    index = first.group(1)
    return (f"encoder.{index}" if in_encoder else index), decoder_layer_name


def _expert_id(child_name: str) -> int:
    digits = re.search(r"(\d+)$", child_name)
    if digits is None:
        raise ValueError(f"Cannot read an expert id from the experts entry named {child_name!r}.")
    return int(digits.group(1))


def _experts_count(module: nn.Module, kind: str) -> int:
    if kind == MODULE_LIST:
        return len(module)
    if kind == SPLIT_GLU:
        return int(module.num_experts)
    if kind == PARALLEL_LINEAR:
        return int(unwrap(module.input_linear).num_experts)
    return int(logical_shape(module.down_proj)[0])


def _children_named(parent: nn.Module, parent_name: str, predicate) -> list[str]:
    names = []
    for child_name, child in parent.named_children():
        child = unwrap(child)
        if predicate(child_name) and any(True for _ in child.parameters()):
            names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


def find_moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """All MoE layers of ``model`` keyed like ``ESFTConfig.experts`` ("1", "2", ... or "encoder.N").

    Raises:
        NotAnMoEModelError: when nothing matching an experts layout was found.
    """
    modules = dict(named_base_modules(model))
    layers: dict[str, MoELayer] = {}
    for name, module in modules.items():
        kind = classify_experts(module) if name.rpartition(".")[2].endswith("experts") else None
        block_name = name.rpartition(".")[0]
        if kind is None and _is_parallel_linear(unwrap(getattr(module, "input_linear", nn.Module()))):
            if _is_parallel_linear(unwrap(getattr(module, "output_linear", nn.Module()))) and "attention" not in name:
                kind, block_name = PARALLEL_LINEAR, name
        if kind is None or "attention" in block_name.rpartition(".")[2]:
            continue
        located = _layer_key(name)
        if located is None:
            continue
        key, decoder_layer_name = located
        if key in layers:
            raise ValueError(f"Found two expert containers in layer {key}: {layers[key].experts_name} and {name}.")
        layer = MoELayer(
            key=key,
            kind=kind,
            num_experts=_experts_count(module, kind),
            experts_name=name,
            block_name=block_name,
            decoder_layer_name=decoder_layer_name,
        )
        if kind == MODULE_LIST:
            layer.expert_modules = {_expert_id(child): f"{name}.{child}" for child, _ in module.named_children()}
        elif kind == PARALLEL_LINEAR:
            layer.expert_targets = [f"{name}.input_linear", f"{name}.output_linear"]
        else:
            layer.expert_targets = [name]
        block = modules[block_name]
        decoder_layer = modules[decoder_layer_name]
        layer.router_names = _children_named(block, block_name, lambda n: n in ROUTER_NAMES or n.endswith("_gate"))
        layer.shared_names = _children_named(
            block, block_name, lambda n: bool(SHARED_NAME.search(n)) and not n.endswith("_gate")
        )
        if decoder_layer is not block:
            layer.shared_names += _children_named(
                decoder_layer, decoder_layer_name, lambda n: bool(SHARED_NAME.search(n)) and not n.endswith("_gate")
            )
        layers[key] = layer
    if not layers:
        raise NotAnMoEModelError(
            f"{type(model).__name__} has no mixture-of-experts layer ESFT can adapt. Searched every decoder layer "
            f"for {SEARCHED}. ESFT needs an MoE model (e.g. DeepSeek-V2, Qwen3-MoE, Mixtral, OLMoE)."
        )
    return layers


def parameter_modules(model: nn.Module, root: str) -> list[str]:
    """Names of the modules under ``root`` (itself included) that own parameters directly."""
    prefix = f"{root}." if root else ""
    return [
        name
        for name, module in named_base_modules(model)
        if (name == root or name.startswith(prefix)) and any(True for _ in module.parameters(recurse=False))
    ]
