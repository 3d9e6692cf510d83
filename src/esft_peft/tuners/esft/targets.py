"""Which modules an ESFT config wraps, validated against the model's MoE structure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ...moe.discovery import MoELayer, find_moe_layers, named_base_modules, parameter_modules
from ...moe.layouts import ExpertsLayout
from ...moe.layouts.base import unwrap
from ..saved_checks import check_base_model_type
from .config import ESFTConfig
from .expert_parallel import check_distributed_model, expert_shard


@dataclass(frozen=True)
class Target:
    """How to wrap one module: with an experts-delta layer of ``layout`` for ``expert_ids``, or (no layout) with a
    module-delta layer."""

    layout: Optional[ExpertsLayout] = None
    expert_ids: tuple[int, ...] = field(default=())


def _layer_range(layers: dict[str, MoELayer]) -> str:
    keys = list(layers)
    return ", ".join(keys) if len(keys) <= 12 else f"{', '.join(keys[:6])}, ..., {', '.join(keys[-3:])}"


def validate_selection(experts: dict[str, list[int]], layers: dict[str, MoELayer]) -> None:
    """ValueError naming the layer, the bad ids and the valid range for any selection the model cannot take."""
    for key, ids in experts.items():
        if key not in layers:
            raise ValueError(
                f"Layer {key} is not an MoE layer of this model (selected experts {ids}). "
                f"MoE layers: {_layer_range(layers)}."
            )
        count = layers[key].num_experts
        bad = [i for i in ids if not 0 <= i < count]
        if bad:
            raise ValueError(f"Layer {key}: expert ids {bad} are out of range; valid ids are 0..{count - 1}.")


def base_layout(model: nn.Module, layers: dict[str, MoELayer], keys: list[str]) -> dict[str, dict]:
    """Layout kind, expert count and per-expert parameter shapes of the listed layers (the adapter's compatibility
    record)."""
    return {
        key: {
            "kind": layers[key].kind,
            "num_experts": layers[key].num_experts,
            "expert_shapes": layers[key].layout.expert_shapes(model, layers[key].experts_name),
        }
        for key in keys
    }


def check_model_identity(config: ESFTConfig, model: nn.Module, layers: dict[str, MoELayer]) -> None:
    """The config's record of the model it was made for must match ``model``.

    Runs before the expert ids are checked, so that a selection scored on another model (``scored_num_experts``) or
    an adapter for another base (``base_model_type``, ``base_layout``) says so, instead of "ids out of range".
    """
    for key, scored in (config.scored_num_experts or {}).items():
        if key in layers and scored != layers[key].num_experts:
            raise ValueError(
                f"Layer {key}: the experts were selected from scores of a model with {scored} experts in this layer, "
                f"but this model has {layers[key].num_experts}. The scores were computed on another model; score this "
                "model (`score_experts` / `esft-peft score`) and select again."
            )
    check_base_model_type(config.base_model_type, model, "ESFT")
    recorded = config.base_layout or {}
    actual = base_layout(model, layers, [key for key in recorded if key in layers])
    for key, found in actual.items():
        expected = recorded[key]
        if expected.get("kind") != found["kind"]:
            raise ValueError(
                f"Layer {key}: the adapter was trained on a base whose experts are stored as "
                f"{_LAYOUT_NAMES.get(expected.get('kind'), expected.get('kind'))}, but this base stores them as "
                f"{_LAYOUT_NAMES.get(found['kind'], found['kind'])}: the same checkpoint loaded another way (e.g. "
                "with or without trust_remote_code). Load the base the way the adapter was trained, or move the "
                "adapter across layouts through the official format (esft-peft convert --to-official, then "
                "--from-official on the other base). No weights were loaded."
            )
        if found != expected:
            raise ValueError(
                f"Layer {key}: the adapter expects {expected.get('num_experts')} experts with per-expert shapes "
                f"{expected.get('expert_shapes')}, but the base model has {found['num_experts']} experts with shapes "
                f"{found['expert_shapes']}. The adapter belongs to another base model; no weights were loaded."
            )


def record_base(config: ESFTConfig, model: nn.Module, layers: dict[str, MoELayer]) -> None:
    """Fill ``base_model_type`` and ``base_layout`` of a new config (a loaded adapter's record is kept)."""
    if config.base_model_type is None and config.base_layout is None:
        config.base_model_type = getattr(getattr(model, "config", None), "model_type", None)
        config.base_layout = base_layout(model, layers, list(config.experts))


_LAYOUT_NAMES = {
    "module_list": "a ModuleList of per-expert modules (e.g. the authors' remote-code model)",
    "fused": "fused 3-D expert tensors (transformers' native experts)",
}


def _dense_targets(model: nn.Module, roots: list[str]) -> dict[str, Target]:
    return {name: Target() for root in roots for name in parameter_modules(model, root)}


def _non_expert_targets(model: nn.Module, config: ESFTConfig, layers: dict[str, MoELayer]) -> dict[str, Target]:
    excluded = [layer.experts_name for layer in layers.values()]
    excluded += [name for layer in layers.values() for name in layer.shared_names + layer.router_names]
    is_excluded = lambda name: any(name == p or name.startswith(p + ".") for p in excluded)  # noqa: E731
    owners = [name for name in parameter_modules(model, "") if name and not is_excluded(name)]
    if config.train_non_expert_modules is True:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        modules = dict(named_base_modules(model))
        chosen = [n for n in owners if not isinstance(modules[n], nn.Embedding) and modules[n] is not output]
    else:
        suffixes = config.train_non_expert_modules
        chosen = [n for n in owners if any(n == s or n.endswith("." + s) for s in suffixes)]
        if not chosen:
            raise ValueError(
                f"train_non_expert_modules={suffixes} matched no non-expert module with parameters. "
                "Give module-name suffixes such as 'self_attn.q_proj' or 'input_layernorm'."
            )
    return {name: Target() for name in chosen}


def _check_not_nested(plan: dict[str, Target]) -> None:
    """A tuner layer replaces its module, so a module holding parameters of its own and a module inside it cannot
    both be wrapped (peft would no longer find the inner one)."""
    for name in plan:
        parts = name.split(".")
        outer = next((".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in plan), None)
        if outer is not None:
            raise ValueError(
                f"ESFT cannot train both {outer} (it holds parameters of its own) and {name} inside it: a tuner layer "
                "wraps a whole module. Leave one of them out, e.g. list the modules to train explicitly with "
                "train_non_expert_modules=[...] instead of True, or set train_router/train_shared_experts=False."
            )


def plan_targets(model: nn.Module, config: ESFTConfig) -> dict[str, Target]:
    """Module name -> what to wrap it with, for one adapter config. Validates before anything is touched: the model's
    identity first, then the selection."""
    layers = find_moe_layers(model)
    check_model_identity(config, model, layers)
    validate_selection(config.experts, layers)
    record_base(config, model, layers)
    plan: dict[str, Target] = {}
    for key, ids in config.experts.items():
        layer = layers[key]
        if layer.expert_modules:
            plan.update(_dense_targets(model, [layer.expert_modules[e] for e in ids]))
        for name in layer.delta_targets:
            layer.layout.check_wrappable(unwrap(model.get_submodule(name)))
            expert_shard(unwrap(model.get_submodule(name)))  # checks the expert-parallel sharding, if any
            plan[name] = Target(layer.layout, tuple(ids))
        if config.train_shared_experts:
            if not layer.shared_names:
                raise ValueError(
                    f"train_shared_experts=True, but MoE layer {key} has no shared experts "
                    "(looked for modules named like 'shared_expert(s)' / 'shared_mlp'). Set it to False."
                )
            plan.update(_dense_targets(model, layer.shared_names))
        if config.train_router:
            plan.update(_dense_targets(model, layer.router_names))
    if config.train_non_expert_modules:
        plan.update(_non_expert_targets(model, config, layers))
    _check_not_nested(plan)
    check_distributed_model(model)
    return plan
