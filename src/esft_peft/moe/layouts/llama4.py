"""llama4: ``experts(x[E * T, H])`` where every expert sees every token, pre-scaled by the router's score (zero for
tokens not routed to it); weights transposed, ``gate_up_proj`` (E, H, 2I) and ``down_proj`` (E, I, H); the router
(an ``nn.Linear`` subclass) returns ``(scores[T, E], logits)``."""

from __future__ import annotations

import torch
from torch import nn

from ..partitioned import logical_shape
from .base import ExpertsLayout, call_arguments, is_experts_name

NAMES = ("gate_up_proj", "down_proj")


class Llama4Experts(ExpertsLayout):
    kind = "dense_bmm"

    def detect(self, name: str, module: nn.Module) -> bool:
        if not is_experts_name(name):
            return False
        params = dict(module.named_parameters(recurse=False))
        three_d = all(n in params and len(logical_shape(params[n])) == 3 for n in NAMES)
        return three_d and not hasattr(module, "has_gate") and len(call_arguments(module)) == 1

    def num_experts(self, experts: nn.Module) -> int:
        return int(logical_shape(experts.gate_up_proj)[0])

    def expert_views(self, target: nn.Module) -> dict[str, torch.Tensor]:
        return {name: getattr(target, name) for name in NAMES}
