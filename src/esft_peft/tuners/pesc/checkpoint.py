"""PESC adapter files: the saved keys, their up-front shape check, and import of the authors' checkpoint layout.

esft-peft's ``adapter_model.safetensors`` holds, per upcycled MLP ``<mlp>`` (e.g.
``base_model.model.model.layers.3.mlp``): ``<mlp>.pesc_router.weight`` (E, H), ``<mlp>.pesc_down``
(E, d, H) and ``<mlp>.pesc_up`` (E, H, d); with the LoRA part also ``<linear>.pesc_lora_A.weight`` (r, in) /
``<linear>.pesc_lora_B.weight`` (out, r) (peft's LoRA layers, their containers registered under the prefix), where
the linears of an upcycled MLP read ``<mlp>.base_layer.<linear>``. Releases before the ``pesc_`` prefix wrote
``lora_pesc_*``, ``lora_A`` and ``lora_B``; those files still load (``PESCModel._remap_adapter_state_dict_for_load``).

The authors' code (wuhy68/Parameter-Efficient-MoE) saves ``moe_model.bin``, a pickle of
``...layers.{l}.mlp.moe_adapter.router.weight`` (E, H) and ``...moe_adapter.experts.expert_{j}.adapter_down.weight``
(d, H) / ``adapter_up.weight`` (H, d). :func:`load_official_pesc` reads it with ``torch.load(weights_only=True)``
(tensors only, no code) or from safetensors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Union

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from ...files import CorruptAdapterError
from ...moe.layer_keys import layer_key_of_module
from .config import PESCConfig
from .layer import PESCLayer
from .targets import plan_targets

PathLike = Union[str, os.PathLike]
OFFICIAL_KEY = re.compile(
    r"^(?:.*\.)?layers\.(\d+)\.mlp\.moe_adapter\.(?:router|experts\.expert_(\d+)\.adapter_(down|up))\.weight$"
)


def read_tensors(path: PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a PyTorch file read with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from ...files import verify_safetensors

        verify_safetensors(path)
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refused (code objects) or a broken file
        raise CorruptAdapterError(
            f"{path} cannot be read as tensors with torch.load(weights_only=True): {str(error).splitlines()[0]}. "
            "Only plain tensor checkpoints are accepted (no pickled code)."
        ) from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CorruptAdapterError(f"{path} does not hold a flat mapping of names to tensors.")
    return state


def parse_official(state: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Layer key -> ``{"router": (E, H), "down": {j: (d, H)}, "up": {j: (H, d)}}`` of an official checkpoint."""
    layers: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        match = OFFICIAL_KEY.match(key)
        if match is None:
            continue
        layer, expert, kind = match.groups()
        entry = layers.setdefault(layer, {"router": None, "down": {}, "up": {}})
        if expert is None:
            entry["router"] = tensor
        else:
            entry[kind][int(expert)] = tensor
    if not layers:
        raise ValueError(
            "No PESC weights in the official layout (keys like 'model.layers.0.mlp.moe_adapter.router.weight' and "
            "'...moe_adapter.experts.expert_0.adapter_down.weight') were found in the checkpoint."
        )
    for layer, entry in layers.items():
        if entry["router"] is None:
            raise ValueError(f"Layer {layer}: the official checkpoint has adapter experts but no router weight.")
        count = entry["router"].shape[0]
        for kind in ("down", "up"):
            if sorted(entry[kind]) != list(range(count)):
                raise ValueError(
                    f"Layer {layer}: the router has {count} experts but adapter_{kind} weights exist for experts "
                    f"{sorted(entry[kind])}; the checkpoint is incomplete."
                )
    return layers


def load_official_pesc(
    path: PathLike,
    model: nn.Module,
    *,
    top_k: int = 2,
    adapter_scaling: float = 1.0,
    adapter_name: str = "default",
    **config_kwargs: Any,
) -> PeftModel:
    """Wrap ``model`` (the dense base) in a PESC adapter holding the weights of an official PESC checkpoint.

    ``path`` is the authors' ``moe_model.bin`` (read with ``torch.load(weights_only=True)``) or a safetensors file
    with the same keys. Expert count, adapter size and layers come from the file; ``top_k`` and
    ``adapter_scaling`` are not stored there: pass the values the checkpoint was trained with (the released
    Camelidae models: top_k=2, adapter_scaling=0.25; the training script: adapter_scaling=1). The official LoRA
    folder, if any, is a plain peft LoRA adapter: merge it into the base first (``PeftModel.from_pretrained(base,
    lora_dir).merge_and_unload()``).
    """
    layers = parse_official(read_tensors(path))
    first = next(iter(layers.values()))
    num_experts, adapter_dim = first["router"].shape[0], first["down"][0].shape[0]
    for layer, entry in layers.items():
        if entry["router"].shape[0] != num_experts or entry["down"][0].shape[0] != adapter_dim:
            raise ValueError(f"Layer {layer}: expert count or adapter size differs from layer {next(iter(layers))}.")
    config = PESCConfig(
        num_experts=num_experts, top_k=top_k, adapter_dim=adapter_dim, adapter_scaling=adapter_scaling,
        layers_to_transform=sorted(int(k) for k in layers), **config_kwargs,
    )
    planned = {target.key: target for target in plan_targets(model, config).mlps.values()}  # nothing touched yet
    for layer, entry in layers.items():
        hidden = planned[layer].hidden_size
        shapes = [tuple(entry["router"].shape), tuple(entry["down"][0].shape), tuple(entry["up"][0].shape)]
        if shapes != [(num_experts, hidden), (adapter_dim, hidden), (hidden, adapter_dim)]:
            raise ValueError(
                f"Layer {layer}: the official router/adapter_down/adapter_up weights have shapes {shapes}, but this "
                f"base model's MLP has hidden size {hidden}. The checkpoint belongs to another base model."
            )
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    crafted = {
        layer_key_of_module(name)[0]: module
        for name, module in peft_model.named_modules() if isinstance(module, PESCLayer)
    }
    with torch.no_grad():
        for layer, entry in layers.items():
            module = crafted[layer]
            router, down, up = module.pesc_router[adapter_name].weight, module.pesc_down[adapter_name], \
                module.pesc_up[adapter_name]
            values = {
                "router": entry["router"],
                "down": torch.stack([entry["down"][j] for j in range(num_experts)]),
                "up": torch.stack([entry["up"][j] for j in range(num_experts)]),
            }
            for value, target in zip(values.values(), (router, down, up)):
                target.copy_(value.to(target.dtype))
    return peft_model
