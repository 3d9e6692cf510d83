"""Interoperability with the adapter format of the ESFT authors (deepseek-ai/ESFT).

An official ESFT adapter directory holds:

- ``expert_cfg.json``: the official expert config (``{"experts": {"1": [8, 26]}, "shared_experts": false,
  "non_expert_modules": false}``);
- one or more ``*.safetensors`` files with the *full replacement weights* of the selected experts, keyed
  ``model.layers.{l}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight`` (older checkpoints omit ``model.``).

esft-peft stores additive deltas instead. Import computes ``delta = official - base`` per selected expert; export
writes ``base + delta``. Where each official weight lies within a factor of two of its base weight (the case for
fine-tuned experts) both directions are bit-exact in float32; elsewhere the difference is at the base weight's
rounding level, and the import logs how many values were not reproduced exactly.

Supported base layouts: transformers' fused experts with gate and up concatenated (``gate_up_proj`` rows
``[0:I]`` = gate, ``[I:2I]`` = up; transposed storage included, no biases), and ModuleList experts with
``gate_proj``/``up_proj``/``down_proj`` linears (the authors' remote-code DeepSeek model). Adapters that also train
shared experts or non-expert modules are refused: their weights are not expert weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from ..defaults import EXPERT_CONFIG_NAME, OFFICIAL_WEIGHTS_NAME
from ..files import atomic_directory_write
from ..moe.discovery import MoELayer, find_moe_layers
from ..moe.layouts.base import unwrap
from ..tuners.esft.compute import with_delta
from ..tuners.esft.config import ESFTConfig
from .official_mapping import PROJECTIONS, official_projections

logger = logging.getLogger(__name__)

OFFICIAL_KEY = re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
PathLike = Union[str, os.PathLike]


def official_key(layer: str, expert: int, projection: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"


def _expert_rows(model: nn.Module, layer: MoELayer, expert: int, adapter: Optional[str] = None) -> dict:
    """One expert's tensors keyed like its layout's parameters: the base weights, or ``adapter``'s delta rows."""
    if layer.expert_modules:
        rows = {}
        for child, module in model.get_submodule(layer.expert_modules[expert]).named_children():
            if hasattr(unwrap(module), "weight"):
                rows[child] = module.esft_delta[adapter]["weight"] if adapter else unwrap(module).weight
        return rows
    wrapped = model.get_submodule(layer.experts_name)
    if adapter is None:
        return {name: view[expert] for name, view in layer.layout.expert_views(unwrap(wrapped)).items()}
    row = wrapped.esft_expert_ids[adapter].index(expert)
    return {name: tensor[row] for name, tensor in wrapped.esft_delta[adapter].items()}


def _projections(model: nn.Module, layer: MoELayer, expert: int, adapter: Optional[str] = None) -> dict:
    """One expert's gate/up/down base weights (or delta rows) in official orientation, as views."""
    experts = unwrap(model.get_submodule(layer.experts_name))
    return official_projections(layer, experts, _expert_rows(model, layer, expert, adapter))


def _expert_projections(peft_model: PeftModel, config: ESFTConfig, layers: dict[str, MoELayer], adapter: str):
    """For every selected expert: ``(layer, expert, base projections, delta projections)``, official orientation."""
    model = peft_model.base_model.model
    for layer_key, ids in config.experts.items():
        for expert in ids:
            base = _projections(model, layers[layer_key], expert)
            yield layer_key, expert, base, _projections(model, layers[layer_key], expert, adapter)


def _check_official_config(config: ESFTConfig) -> None:
    if config.train_shared_experts or config.train_non_expert_modules or config.train_router or config.modules_to_save:
        raise ValueError(
            "The official ESFT format holds routed-expert weights only; this adapter also trains shared experts, "
            "non-expert modules, routers or modules_to_save, which cannot be converted."
        )


def read_official_adapter(
    directory: PathLike, expert_config: Optional[PathLike] = None
) -> tuple[Path, dict[tuple[str, int, str], torch.Tensor]]:
    """Read an official adapter: (its expert-config path, {(layer, expert, projection): weight}).

    ``expert_config`` is the expert config's path when the directory has no ``expert_cfg.json`` (the authors'
    ``train.py`` saves the weights only).
    """
    directory = Path(directory)
    config_path = Path(expert_config) if expert_config is not None else directory / EXPERT_CONFIG_NAME
    if not config_path.is_file():
        if expert_config is not None:
            raise FileNotFoundError(f"Expert config not found: {config_path}.")
        raise FileNotFoundError(
            f"{directory} has no {EXPERT_CONFIG_NAME}. Pass the expert config the adapter was trained with "
            "(expert_config=... / --expert-config FILE)."
        )
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no *.safetensors weights of the trained experts.")
    weights: dict[tuple[str, int, str], torch.Tensor] = {}
    for path in files:
        for key, tensor in load_file(str(path)).items():
            match = OFFICIAL_KEY.match(key)
            if match is None:
                raise ValueError(
                    f"{path.name}: unexpected key {key!r}; official ESFT weights are keyed "
                    "'model.layers.{l}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight'."
                )
            weights[(match.group(1), int(match.group(2)), match.group(3))] = tensor
    return config_path, weights


def load_official_adapter(
    base_model: nn.Module, directory: PathLike, adapter_name: str = "default",
    expert_config: Optional[PathLike] = None, **config_kwargs
) -> PeftModel:
    """Wrap ``base_model`` with an ESFT adapter whose deltas reproduce the official adapter in ``directory``.

    ``expert_config`` gives the expert config's path when ``directory`` has no ``expert_cfg.json``. Layers listed
    with no experts (how the authors mark untrained layers) are dropped.

    Raises:
        ValueError: weights missing for a selected expert, shape mismatch, or an unsupported layout.
    """
    config_path, weights = read_official_adapter(directory, expert_config)
    config = ESFTConfig.from_expert_config(config_path, **config_kwargs)
    _check_official_config(config)
    layers = find_moe_layers(base_model)
    for key, ids in config.experts.items():
        if key in layers:
            _projections(base_model, layers[key], min(layers[key].expert_modules, default=0))  # refuses other layouts
    expected = {(layer, e, p) for layer, ids in config.experts.items() for e in ids for p in PROJECTIONS}
    missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or extra:
        problem = f"missing {missing[:3]}" if missing else f"unselected experts {extra[:3]}"
        raise ValueError(f"{directory}: the weights do not match {EXPERT_CONFIG_NAME} ({problem}, ...).")
    peft_model = get_peft_model(base_model, config, adapter_name=adapter_name)
    inexact = 0
    with torch.no_grad():
        for layer_key, expert, base, delta in _expert_projections(peft_model, config, layers, adapter_name):
            for projection in PROJECTIONS:
                official = weights[(layer_key, expert, projection)]
                if official.shape != base[projection].shape:
                    raise ValueError(
                        f"Layer {layer_key} expert {expert} {projection}: official weight has shape "
                        f"{tuple(official.shape)}, the base model {tuple(base[projection].shape)}."
                    )
                value = official.to(delta[projection].dtype) - base[projection].to(delta[projection].dtype)
                delta[projection].copy_(value)
                rebuilt = with_delta(base[projection], delta[projection]).to(official.dtype)
                inexact += int((rebuilt != official).sum())
    if inexact:
        logger.warning("%d official weight values are not reproduced bit-exactly by base + delta.", inexact)
    return peft_model


def official_state_dict(peft_model: PeftModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The selected experts' full weights (``base + delta``, in the base dtype) keyed in the official format."""
    config = peft_model.peft_config[adapter_name]
    if not isinstance(config, ESFTConfig):
        raise ValueError(f"Adapter {adapter_name!r} is not an ESFT adapter.")
    _check_official_config(config)
    if any(getattr(module, "merged", False) for module in peft_model.modules()):
        raise ValueError("Unmerge the adapter before exporting it (its base weights are currently modified).")
    layers = find_moe_layers(peft_model.base_model.model)
    state = {}
    with torch.no_grad():
        for layer_key, expert, base, delta in _expert_projections(peft_model, config, layers, adapter_name):
            for projection in PROJECTIONS:
                full = with_delta(base[projection], delta[projection])
                state[official_key(layer_key, expert, projection)] = full.contiguous()
    return state


def official_expert_config(peft_model: PeftModel, adapter_name: str = "default") -> dict:
    """The adapter's expert config in the authors' format, listing every MoE layer of the base (``[]`` for layers
    the adapter does not train): the authors' ``to_esft`` reads ``experts[str(layer)]`` for each MoE layer."""
    expert_config = peft_model.peft_config[adapter_name].to_expert_config()
    expert_config.pop("num_experts", None)
    trained = expert_config["experts"]
    layers = find_moe_layers(peft_model.base_model.model)
    expert_config["experts"] = {key: list(trained.get(key, [])) for key in layers}
    return expert_config


def save_official_adapter(
    peft_model: PeftModel, out_dir: PathLike, adapter_name: str = "default", overwrite: bool = False
) -> Path:
    """Write ``adapter_name`` of ``peft_model`` as an official ESFT adapter directory (atomic; an existing non-empty
    ``out_dir`` is refused unless ``overwrite``)."""
    state = official_state_dict(peft_model, adapter_name)
    expert_config = official_expert_config(peft_model, adapter_name)

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / OFFICIAL_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / EXPERT_CONFIG_NAME).write_text(json.dumps(expert_config, indent=1), encoding="utf-8")

    return atomic_directory_write(out_dir, write, overwrite=overwrite)


def convert_from_official(
    official_dir: PathLike, base_model: nn.Module, out_dir: PathLike, base_model_name_or_path: Optional[str] = None,
    expert_config: Optional[PathLike] = None, overwrite: bool = False,
) -> Path:
    """Official adapter directory -> esft-peft adapter directory (``adapter_config.json`` + safetensors deltas)."""
    kwargs = {"base_model_name_or_path": base_model_name_or_path} if base_model_name_or_path else {}
    peft_model = load_official_adapter(base_model, official_dir, expert_config=expert_config, **kwargs)
    return atomic_directory_write(out_dir, lambda tmp: peft_model.save_pretrained(str(tmp)), overwrite=overwrite)


def convert_to_official(adapter_dir: PathLike, base_model: nn.Module, out_dir: PathLike, overwrite: bool = False) -> Path:
    """esft-peft adapter (directory or Hub id) -> official adapter directory with full expert weights."""
    peft_model = PeftModel.from_pretrained(base_model, str(adapter_dir))
    return save_official_adapter(peft_model, out_dir, overwrite=overwrite)
