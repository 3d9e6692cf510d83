"""MoE layer keys: how layers are named in expert configs, scores and adapters, parsed and sorted in one place.

A key is the decoder-layer index as a string (``"1"``, the official ESFT expert-config keys) or ``"encoder.N"`` for
the encoder layers of encoder-decoder MoEs. Ints are accepted wherever a key is looked up.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Union

LayerKey = Union[int, str]

KEY_PATTERN = re.compile(r"^(?:encoder\.)?\d+$")
# The stack index inside a module path: "model.layers.3.mlp.experts" -> 3 (T5-style blocks nest a sub-layer index).
MODULE_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|blocks|block|h)\.(\d+)(?=\.|$)")
ENCODER_PREFIX = "encoder."


def normalize_layer_key(key: Any) -> str:
    """``1``, ``"1"``, ``numpy.int64(1)`` -> ``"1"``; ``"encoder.3"`` stays.

    Raises:
        ValueError: when ``key`` is not a layer index.
    """
    if isinstance(key, bool) or not (isinstance(key, str) or hasattr(key, "__index__")):
        raise ValueError(f"MoE layer keys are layer indices (int or str), got {key!r}.")
    text = str(key.__index__() if not isinstance(key, str) else key).strip()
    if not KEY_PATTERN.match(text):
        raise ValueError(
            f"MoE layer key {key!r} is not a layer index. Use the decoder-layer index (e.g. 1 or '1'), "
            "or 'encoder.N' for encoder layers of encoder-decoder models."
        )
    prefix, _, number = text.rpartition(".")
    return f"{prefix}.{int(number)}" if prefix else str(int(number))


def layer_sort_key(key: LayerKey) -> tuple[int, int]:
    """Model order: encoder layers first, then decoder layers, each by index ("2" before "10")."""
    text = normalize_layer_key(key)
    prefix, _, number = text.rpartition(".")
    return (0 if prefix else 1, int(number))


def sorted_layer_keys(keys: Any) -> list[str]:
    """``keys`` as normalised strings, in model order."""
    return sorted((normalize_layer_key(key) for key in keys), key=layer_sort_key)


def layer_key_of_module(name: str) -> Optional[tuple[str, str]]:
    """``(layer key, decoder-layer module name)`` of a module path, or None outside a layer stack."""
    match = MODULE_INDEX.search(name)
    if match is None:
        return None
    layer_name = name[: match.end()]
    in_encoder = f".{ENCODER_PREFIX}" in f".{layer_name}." and ".decoder." not in f".{layer_name}."
    index = match.group(1)
    return (f"{ENCODER_PREFIX}{index}" if in_encoder else index), layer_name


class LayerMap(dict):
    """A dict keyed by layer key strings that also accepts int keys on lookup (``scores.token_scores[1]``)."""

    def __getitem__(self, key: LayerKey):
        return super().__getitem__(_lookup(key))

    def __contains__(self, key: object) -> bool:
        return super().__contains__(_lookup(key))

    def get(self, key: LayerKey, default: Any = None):
        return super().get(_lookup(key), default)


def _lookup(key: Any) -> Any:
    try:
        return normalize_layer_key(key)
    except ValueError:
        return key
