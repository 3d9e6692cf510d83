"""ESFT's compute of jetmoe's parallel linears (the ``parallel_linear`` layout).

The route-split forward of each parallel linear is jetmoe's own per-expert loop with ``W[e] + delta[e]`` for the
selected experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ....moe.rows import ids_tensor
from .base import Deltas, ExpertsCompute, with_delta


class ParallelLinearCompute(ExpertsCompute):
    kind = "parallel_linear"

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
