"""ESFT's route-split compute, one class per experts layout kind that gets an experts-delta layer (ModuleList
experts are trained through module deltas and need none)."""

from __future__ import annotations

from .base import Deltas, ExpertsCompute, call_shadowed, with_delta
from .dbrx import SplitGluCompute
from .fused import FusedCompute
from .jetmoe import ParallelLinearCompute
from .llama4 import DenseBmmCompute

COMPUTES: dict[str, ExpertsCompute] = {
    compute.kind: compute
    for compute in (FusedCompute(), SplitGluCompute(), DenseBmmCompute(), ParallelLinearCompute())
}


def compute_for(kind: str) -> ExpertsCompute:
    """The compute of experts stored as layout ``kind``."""
    try:
        return COMPUTES[kind]
    except KeyError:
        raise ValueError(f"ESFT has no experts-delta compute for {kind!r} experts; known: {sorted(COMPUTES)}.") from None


__all__ = ["COMPUTES", "Deltas", "ExpertsCompute", "call_shadowed", "compute_for", "with_delta"]
