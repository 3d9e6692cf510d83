"""jetmoe: the MoE block holds ``input_linear`` and ``output_linear``, parallel experts with weight (E, out, in),
each called as ``linear(inputs sorted by expert, expert_size)``; its router returns the expert-sorted decision
``(sorted_slots, batch_index, batch_gates, expert_size, logits)``.

The route-split forward of each parallel linear is jetmoe's own per-expert loop with ``W[e] + delta[e]`` for the
selected experts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..partitioned import logical_shape
from .base import Deltas, ExpertsLayout, RecordRouting, ids_tensor, router_of, unwrap, with_delta

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

    def forward(self, target: nn.Module, ids: list[int], deltas: Deltas, args: tuple, kwargs: dict) -> torch.Tensor:
        inputs = args[0] if args else kwargs["inputs"]
        expert_size = args[1] if len(args) > 1 else kwargs["expert_size"]
        chosen = ids_tensor(tuple(ids), inputs.device)
        selected = with_delta(target.weight[chosen], deltas["weight"])
        row = {expert: j for j, expert in enumerate(ids)}
        chunks = inputs.split(expert_size, dim=0)
        outputs = [
            F.linear(chunk, selected[row[expert]] if expert in row else target.weight[expert])
            for expert, chunk in enumerate(chunks)
        ]
        return torch.cat(outputs, dim=0)

    def watch_routing(self, model: nn.Module, layer: Any, record: RecordRouting) -> RemovableHandle:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            sorted_slots, _, batch_gates, expert_size, logits = output
            tokens = logits.shape[0]
            sizes = torch.as_tensor(expert_size, device=sorted_slots.device)
            experts = torch.repeat_interleave(torch.arange(len(sizes), device=sorted_slots.device), sizes)
            index = torch.empty_like(sorted_slots).index_copy_(0, sorted_slots, experts)
            weights = torch.empty_like(batch_gates).index_copy_(0, sorted_slots, batch_gates)
            record(index.view(tokens, -1), weights.view(tokens, -1))

        return router_of(model, layer).register_forward_hook(hook)
