"""ESFT's compute of llama4 experts (the ``dense_bmm`` layout).

The route-split forward runs llama4's dense batched matmul for the frozen experts and then recomputes, for the
selected experts, only the rows of tokens routed to them, with ``W[e] + delta[e]``. Rows of tokens not routed to an
expert are zero in and zero out, whatever its weights. The dense base computation over all experts is llama4's own
design and is kept: skipping the selected experts in it would need a copy of the other experts' weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ....moe.rows import ids_tensor
from .base import Deltas, ExpertsCompute, with_delta


class DenseBmmCompute(ExpertsCompute):
    kind = "dense_bmm"

    def forward(self, target: nn.Module, ids: list[int], deltas: Deltas, args: tuple, kwargs: dict) -> torch.Tensor:
        hidden = args[0] if args else kwargs["hidden_states"]
        out = type(target).forward(target, hidden)  # llama4's dense computation: every expert, every token
        num_experts = self.layout.num_experts(target)
        per_expert = hidden.view(num_experts, -1, hidden.shape[-1])
        tokens = per_expert.shape[1]
        chosen = ids_tensor(tuple(ids), hidden.device)
        routed = (per_expert[chosen] != 0).any(-1)  # [k, T]: rows that reach the selected experts
        local, token = routed.nonzero(as_tuple=True)  # sorted by selected expert, then token
        offs = torch.cumsum(routed.sum(-1), 0, dtype=torch.int32)
        rows = chosen[local] * tokens + token
        x = hidden[rows]
        gate_up = _grouped(x, with_delta(target.gate_up_proj[chosen], deltas["gate_up_proj"]), offs)
        gate, up = gate_up.chunk(2, dim=-1)
        recomputed = _grouped(up * target.act_fn(gate), with_delta(target.down_proj[chosen], deltas["down_proj"]), offs)
        return out.index_copy(0, rows, recomputed.to(out.dtype))


def _grouped(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``x`` rows sorted into groups times the group's (in, out) weight; per-group matmuls."""
    out, start = [], 0
    for group, end in enumerate(offs.tolist()):
        out.append(x[start:end] @ weight[group])
        start = end
    return torch.cat(out) if out else x.new_zeros(0, weight.shape[-1])
