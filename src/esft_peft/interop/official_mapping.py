"""The official ESFT format's export mapping: one expert's tensors, keyed like its layout's parameters, as the
official ``gate_proj``/``up_proj``/``down_proj`` weights in ``nn.Linear`` orientation (out, in)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..moe.discovery import MoELayer
from ..moe.errors import UnsupportedLayoutError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # the official ESFT format's per-expert projections
Rows = dict[str, torch.Tensor]


def _fused(layer: MoELayer, experts: nn.Module, rows: Rows) -> Rows:
    if not experts.has_gate or not experts.is_concatenated or experts.has_bias:
        raise UnsupportedLayoutError(
            f"Layer {layer.key}: {type(experts).__name__} stores experts with has_gate={experts.has_gate}, "
            f"is_concatenated={experts.is_concatenated}, has_bias={experts.has_bias}; the official format maps "
            "only concatenated gate_up_proj experts without biases (gate rows first, then up rows)."
        )
    gate_up, down = rows["gate_up_proj"], rows["down_proj"]
    if experts.is_transposed:  # (H, 2I) and (I, H)
        gate_up, down = gate_up.T, down.T
    half = gate_up.shape[0] // 2
    return {"gate_proj": gate_up[:half], "up_proj": gate_up[half:], "down_proj": down}


def _module_list(layer: MoELayer, experts: nn.Module, rows: Rows) -> Rows:
    if not set(PROJECTIONS) <= set(rows):
        raise UnsupportedLayoutError(
            f"Layer {layer.key}: ModuleList experts without gate_proj/up_proj/down_proj ({sorted(rows)})."
        )
    return {projection: rows[projection] for projection in PROJECTIONS}


MAPPINGS: dict[str, Callable[[MoELayer, nn.Module, Rows], Rows]] = {"fused": _fused, "module_list": _module_list}


def official_projections(layer: MoELayer, experts: nn.Module, rows: Rows) -> Rows:
    """One expert's gate/up/down weights in ``nn.Linear`` orientation (out, in), as views of ``rows`` (this
    expert's tensors keyed like its layout's :meth:`expert_views`: base rows or delta rows)."""
    mapping = MAPPINGS.get(layer.kind)
    if mapping is None:
        raise UnsupportedLayoutError(
            f"Layer {layer.key}: {layer.kind} experts cannot be mapped onto the official ESFT format (supported: "
            "fused gate_up_proj/down_proj experts without biases and ModuleList experts with gate/up/down_proj)."
        )
    return mapping(layer, experts, rows)
