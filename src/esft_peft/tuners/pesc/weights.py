"""The up-front check of a PESC adapter's weights file against its config, before any model is touched."""

from __future__ import annotations

from typing import Any

from ...moe.layer_keys import layer_key_of_module
from .layer import DOWN, ROUTER, UP


def _expected_shape(kind: str, config: Any, hidden: Any) -> tuple:
    experts, dim = config.num_experts, config.adapter_dim
    return {ROUTER: (experts, hidden), DOWN: (experts, dim, hidden), UP: (experts, hidden, dim)}[kind]


def check_checkpoint_shapes(config: Any, header: dict[str, Any]) -> None:
    """Compare the PESC tensors of a safetensors header with the config (expert count, adapter size, hidden size).

    Raises:
        ValueError: naming the tensor, its shape and the shape the config implies.
    """
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        kind = next((k for k in (ROUTER, DOWN, UP) if key.endswith((f".{k}", f".{k}.weight"))), None)
        if kind is None:
            continue
        shape = tuple(entry.get("shape", ()))
        layer = layer_key_of_module(key)
        recorded = (config.base_shapes or {}).get(layer[0] if layer else "", {})
        hidden = recorded.get("hidden_size", shape[-1] if kind != UP else (shape[1] if len(shape) == 3 else None))
        expected = _expected_shape(kind, config, hidden)
        if shape != expected:
            raise ValueError(
                f"The adapter weights do not match adapter_config.json: {key} has shape {list(shape)}, but "
                f"num_experts={config.num_experts}, adapter_dim={config.adapter_dim} and hidden size {hidden} give "
                f"{list(expected)}. The files come from different adapters; no weights were loaded."
            )
