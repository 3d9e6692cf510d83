"""Which MLPs a PESC config upcycles and which linears get its LoRA part, found from the model's structure.

A decoder layer's MLP is its child module that holds linear layers and is called with one tensor (attention and
state-space mixers take masks, positions or caches). Everything is validated before the model is touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.tuners.lora import LoraLayer
from torch import nn

from ...moe.layer_keys import layer_key_of_module, sorted_layer_keys
from ...moe.layouts import detect_layout
from ...moe.layouts.base import call_arguments, crafts_experts, unwrap
from .config import ALL_LINEAR, PESCConfig

BASE_LAYER = ".base_layer"


class NoDenseMLPError(ValueError):
    """The model has no dense decoder MLP that PESC can upcycle."""


@dataclass(frozen=True)
class MLPTarget:
    """One MLP to upcycle: its layer key and the shapes recorded in (and checked against) the adapter config."""

    key: str
    hidden_size: int
    intermediate_size: int


@dataclass
class Plan:
    """Module name -> what to do, for one adapter: upcycle an MLP, or add LoRA to a linear (``lora`` maps the linear
    to the upcycled MLP that contains it, or None)."""

    mlps: dict[str, MLPTarget] = field(default_factory=dict)
    lora: dict[str, Optional[str]] = field(default_factory=dict)

    def lora_inside(self, mlp_name: str) -> list[str]:
        return [name for name, owner in self.lora.items() if owner == mlp_name]


def clean_name(name: str) -> str:
    """A module name without the ``.base_layer`` hops of tuner layers (the name in the base model)."""
    return name.replace(BASE_LAYER, "")


def _linears(module: nn.Module) -> list[nn.Module]:
    """The base model's linears inside ``module``, in order: a tuner layer counts as the layer it wraps, and its own
    modules (a LoRA layer's ``lora_A``/``lora_B``, a PESC layer's routers) are not the base model's."""
    base = unwrap(module)
    if isinstance(base, nn.Linear):
        return [base]
    return [linear for child in base.children() for linear in _linears(child)]


def _is_mlp(module: nn.Module) -> bool:
    base = unwrap(module)
    return bool(_linears(base)) and len(call_arguments(base)) == 1


def mlp_shapes(mlp: nn.Module) -> tuple[int, int]:
    """(hidden size, intermediate size) of a dense MLP: its output linear maps intermediate -> hidden."""
    linears = _linears(unwrap(mlp))
    return linears[-1].out_features, linears[-1].in_features


def _moe_part(name: str, mlp: nn.Module) -> Optional[str]:
    for sub_name, sub in unwrap(mlp).named_modules():
        full = f"{name}.{sub_name}" if sub_name else name
        if detect_layout(full, sub) is not None or sub_name.rpartition(".")[2] in ("experts", "router"):
            return full
    return None


def decoder_mlps(model: nn.Module) -> dict[str, list[str]]:
    """Layer key -> names of the decoder layer's MLP-like children (one for every usual architecture)."""
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        located = layer_key_of_module(name)
        if located is None or located[1] != name or located[0].startswith("encoder."):
            continue
        found[located[0]] = [f"{name}.{child}" for child, sub in module.named_children() if _is_mlp(sub)]
    return {key: found[key] for key in sorted_layer_keys(found) if found[key]}


def _matches(name: str, targets: Union[str, list[str]]) -> bool:
    name = clean_name(name)
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _select_mlps(model: nn.Module, config: PESCConfig) -> dict[str, str]:
    """MLP module name -> layer key."""
    modules = dict(model.named_modules())
    if config.target_modules is None:
        layers = decoder_mlps(model)
        if not layers:
            raise NoDenseMLPError(
                f"{type(model).__name__} has no decoder-layer MLP that PESC can upcycle (looked for a child of each "
                "decoder layer holding linear layers and called with one tensor). Name the MLPs with "
                "PESCConfig(target_modules=[...])."
            )
        ambiguous = {key: names for key, names in layers.items() if len(names) > 1}
        if ambiguous:
            key, names = next(iter(ambiguous.items()))
            raise ValueError(
                f"Decoder layer {key} has several MLP-like children ({', '.join(names)}); choose the ones to upcycle "
                "with PESCConfig(target_modules=[...])."
            )
        chosen = {names[0]: key for key, names in layers.items()}
    else:
        chosen = {}
        for name in modules:
            if name and BASE_LAYER not in name and ".pesc_" not in name and _matches(name, config.target_modules):
                located = layer_key_of_module(name)
                if located is None:
                    raise ValueError(f"target_modules matched {name}, which is not inside a decoder layer.")
                if not _is_mlp(modules[name]):
                    raise ValueError(
                        f"target_modules matched {name} ({type(unwrap(modules[name])).__name__}), which is not an MLP "
                        "(a module holding linear layers, called with one tensor). Name the decoder layers' MLPs."
                    )
                chosen[name] = located[0]
        if not chosen:
            raise NoDenseMLPError(f"target_modules={config.target_modules!r} matched no module of this model.")
    if config.layers_to_transform is not None:
        wanted = {str(i) for i in config.layers_to_transform}
        missing = sorted(wanted - set(chosen.values()), key=int)
        if missing:
            raise ValueError(
                f"layers_to_transform lists decoder layers {missing}, which have no MLP to upcycle; layers with one: "
                f"{sorted(set(chosen.values()), key=int)}."
            )
        chosen = {name: key for name, key in chosen.items() if key in wanted}
    for name, key in chosen.items():
        if crafts_experts(modules[name]):
            continue
        moe = _moe_part(name, modules[name])
        if moe is not None:
            layers = decoder_mlps(model)
            dense = [int(k) for k, names in layers.items() if _moe_part(names[0], modules[names[0]]) is None]
            raise ValueError(
                f"Layer {key}'s MLP {name} ({type(unwrap(modules[name])).__name__}) is already a mixture of experts "
                f"(found {moe}). PESC upcycles dense MLPs: use ESFTConfig to fine-tune an MoE model's experts, or "
                f"limit PESC to the dense layers with layers_to_transform={dense or '[...]'}."
            )
    return chosen


def _lora_candidates(model: nn.Module) -> list[str]:
    """Linears inside decoder layers that LoRA can wrap (a LoRA layer counts as its linear), adapter internals
    skipped."""
    opaque: list[str] = []
    names = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in opaque):
            continue
        if isinstance(module, LoraLayer):
            opaque.append(name + ".")
        elif crafts_experts(module):
            opaque.extend(f"{name}.{child}" for child, _ in module.named_children() if child != "base_layer")
            continue
        if layer_key_of_module(name) is not None and isinstance(unwrap(module), nn.Linear):
            names.append(name)
    return names


def _layer_of(name: str) -> str:
    return layer_key_of_module(name)[0]


def plan_targets(model: nn.Module, config: PESCConfig) -> Plan:
    """What to wrap for one adapter config; records the base's shapes in the config or checks them."""
    mlps = _select_mlps(model, config)
    modules = dict(model.named_modules())
    plan = Plan()
    for name, key in mlps.items():
        hidden, intermediate = mlp_shapes(modules[name])
        plan.mlps[name] = MLPTarget(key, hidden, intermediate)
    check_base_compatibility(config, model, plan)
    if config.uses_lora:
        targets = config.lora_target_modules or ALL_LINEAR
        layers = None if config.layers_to_transform is None else {str(i) for i in config.layers_to_transform}
        for name in _lora_candidates(model):
            if (targets == ALL_LINEAR or _matches(name, targets)) and (layers is None or _layer_of(name) in layers):
                plan.lora[name] = next((mlp for mlp in plan.mlps if name.startswith(mlp + ".")), None)
        if not plan.lora:
            raise ValueError(f"lora_target_modules={targets!r} matched no linear layer inside the decoder layers.")
    return plan


def base_shapes(plan: Plan) -> dict[str, dict]:
    """The adapter's compatibility record: per upcycled layer, the MLP's name and shapes."""
    return {
        target.key: {"module": clean_name(name), "hidden_size": target.hidden_size,
                     "intermediate_size": target.intermediate_size}
        for name, target in plan.mlps.items()
    }


def check_base_compatibility(config: PESCConfig, model: nn.Module, plan: Plan) -> None:
    """Record the base's identity in the config, or, when already recorded (a loaded adapter), check it matches."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    actual = base_shapes(plan)
    if config.base_model_type is None and config.base_shapes is None:
        config.base_model_type, config.base_shapes = model_type, actual
        return
    if config.base_model_type is not None and model_type is not None and config.base_model_type != model_type:
        raise ValueError(
            f"This PESC adapter was created for a '{config.base_model_type}' model, but the base model is "
            f"'{model_type}'. Load it onto the base model it was trained on; no weights were loaded."
        )
    if actual != config.base_shapes:
        expected = config.base_shapes or {}
        keys = sorted_layer_keys(set(expected) | set(actual))
        key = next(k for k in keys if expected.get(k) != actual.get(k))
        raise ValueError(
            f"Layer {key}: the PESC adapter expects the MLP {expected.get(key)}, but the base model has "
            f"{actual.get(key)}. The adapter belongs to another base model; no weights were loaded."
        )
