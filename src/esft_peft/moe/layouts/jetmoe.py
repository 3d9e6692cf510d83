"""jetmoe: the MoE block holds ``input_linear`` and ``output_linear``, parallel experts with weight (E, out, in),
each called as ``linear(inputs sorted by expert, expert_size)``; its router returns the expert-sorted decision
``(sorted_slots, batch_index, batch_gates, expert_size, logits)``."""

from __future__ import annotations

import torch
from torch import nn

from ..partitioned import logical_shape
from .base import ExpertsLayout, unwrap

LINEARS = ("input_linear", "output_linear")


def _is_parallel_linear(module: nn.Module) -> bool:
    module = unwrap(module)
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and len(logical_shape(weight)) == 3 and hasattr(module, "num_experts")


class JetMoeExperts(ExpertsLayout):
    kind = "parallel_linear"

    def detect(self, name: str, module: nn.Module) -> bool:
        if "attention" in name:  # jetmoe's mixture of attention heads uses the same parallel linears
            return False
        return all(_is_parallel_linear(getattr(module, linear, nn.Module())) for linear in LINEARS)

    def block_name(self, experts_name: str) -> str:
        return experts_name  # the block itself holds the parallel linears and the router

    def num_experts(self, experts: nn.Module) -> int:
        return int(unwrap(experts.input_linear).num_experts)

    def delta_targets(self, experts_name: str) -> list[str]:
        return [f"{experts_name}.{linear}" for linear in LINEARS]

    def expert_views(self, target: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": target.weight}
