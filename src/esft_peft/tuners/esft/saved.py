"""A saved ESFT adapter checked against the base model before any weight is loaded.

``ESFTConfig.from_pretrained`` checks the weights file on its own and records its safetensors header on the config;
:func:`check_saved_adapter` then compares the header with the deltas the injection is about to create, so a wrong
file gets an error naming the tensor instead of torch's "size mismatch" or a silent cast.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ...files import SAFETENSORS_FLOAT_DTYPES
from ...moe.layouts.base import unwrap
from .config import SAVED_HEADER_ATTRIBUTE, ESFTConfig
from .layer import DELTA_CONTAINER, ExpertsDeltaLayer, ModuleDeltaLayer
from .targets import Target

logger = logging.getLogger(__name__)

STATE_DICT_PREFIX = "base_model.model."
DELTA_MARKER = f".{DELTA_CONTAINER}."


def delta_specs(module: nn.Module, target: Target) -> dict[str, tuple[tuple, Any]]:
    """Parameter name -> (shape, base tensor) of the deltas an ESFT layer holds for ``module`` under ``target``."""
    base = unwrap(module)
    if target.layout is None:
        return ModuleDeltaLayer.delta_specs(base)
    return ExpertsDeltaLayer.delta_specs(base, target.layout, list(target.expert_ids))


def _dtype_name(param: Any) -> str:
    return str(param.dtype).removeprefix("torch.")


def check_saved_adapter(model: nn.Module, config: ESFTConfig, plan: dict[str, Target]) -> None:
    """Compare the saved tensors recorded on ``config`` with the deltas ``plan`` will create on ``model``.

    Does nothing for configs that were not loaded from a saved adapter. Unlisted tensors, missing tensors and shapes
    that disagree raise; a floating-point dtype that differs from the base's is logged (the load casts it).

    Raises:
        ValueError: naming the tensor, the saved and the expected shape.
    """
    header = getattr(config, SAVED_HEADER_ATTRIBUTE, None)
    if header is None:
        return
    expected: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, target in plan.items():
        for param, (shape, tensor) in delta_specs(model.get_submodule(name), target).items():
            expected[f"{STATE_DICT_PREFIX}{name}{DELTA_MARKER}{param}"] = (tuple(shape), _dtype_name(tensor))
    saved = {key: value for key, value in header.items() if key != "__metadata__" and DELTA_MARKER in key}
    others = [key for key in header if key != "__metadata__" and DELTA_MARKER not in key]
    save_names = config.modules_to_save or []
    unlisted = [key for key in saved if key not in expected]
    unlisted += [key for key in others if not any(f".{n}." in f".{key}" for n in save_names)]
    if unlisted:
        raise ValueError(
            f"The adapter file holds {len(unlisted)} tensor(s) its config does not list (e.g. {unlisted[0]}). The "
            "weights do not belong to this adapter_config.json, or the config was edited; re-save the adapter."
        )
    missing = [key for key in expected if key not in saved]
    if missing:
        raise ValueError(
            f"The adapter file lacks {len(missing)} tensor(s) its config lists (e.g. {missing[0]}); it is incomplete. "
            "Re-save the adapter."
        )
    cast = set()
    for key, value in saved.items():
        shape, dtype = expected[key]
        if tuple(value["shape"]) != shape:
            raise ValueError(
                f"{key} has shape {tuple(value['shape'])} in the adapter file, but this base model and the adapter "
                f"config need {shape}. The adapter belongs to another base model; no weights were loaded."
            )
        if SAFETENSORS_FLOAT_DTYPES[value["dtype"]] != dtype:
            cast.add((SAFETENSORS_FLOAT_DTYPES[value["dtype"]], dtype))
    for saved_dtype, base_dtype in sorted(cast):
        logger.warning(
            "The adapter's deltas were saved in %s and are cast to the base model's %s on loading%s.", saved_dtype,
            base_dtype, " (exact)" if _widens(saved_dtype, base_dtype) else " (rounded); load the base in the "
            "adapter's dtype to use them exactly",
        )


def _widens(source: str, target: str) -> bool:
    order = {"float16": 1, "bfloat16": 1, "float32": 2, "float64": 3}
    return order[target] > order[source]
