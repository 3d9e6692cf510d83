"""llama4: ``experts(x[E * T, H])`` where every expert sees every token, pre-scaled by the router's score (zero for
tokens not routed to it); weights transposed, ``gate_up_proj`` (E, H, 2I) and ``down_proj`` (E, I, H); the router
(an ``nn.Linear`` subclass) returns ``(scores[T, E], logits)``.

The route-split forward runs llama4's dense batched matmul for the frozen experts and then recomputes, for the
selected experts, only the rows of tokens routed to them, with ``W[e] + delta[e]``. Rows of tokens not routed to an
expert are zero in and zero out, whatever its weights. The dense base computation over all experts is llama4's own
design and is kept: skipping the selected experts in it would need a copy of the other experts' weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..partitioned import logical_shape
from .base import (
    Deltas,
    ExpertsLayout,
    RecordRouting,
    call_arguments,
    ids_tensor,
    is_experts_name,
    router_of,
    unwrap,
    with_delta,
)

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

    def forward(self, target: nn.Module, ids: list[int], deltas: Deltas, args: tuple, kwargs: dict) -> torch.Tensor:
        hidden = args[0] if args else kwargs["hidden_states"]
        out = type(target).forward(target, hidden)  # llama4's dense computation: every expert, every token
        num_experts = self.num_experts(target)
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

    def watch_routing(self, model: nn.Module, layer: Any, record: RecordRouting) -> RemovableHandle:
        router = router_of(model, layer)
        top_k = int(unwrap(router).top_k)

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            scores, logits = output[0], output[1]
            index = torch.topk(logits, top_k, dim=1).indices  # the router's own top-K of its logits
            record(index, scores.gather(1, index))

        return router.register_forward_hook(hook)


def _grouped(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``x`` rows sorted into groups times the group's (in, out) weight; per-group matmuls."""
    out, start = [], 0
    for group, end in enumerate(offs.tolist()):
        out.append(x[start:end] @ weight[group])
        start = end
    return torch.cat(out) if out else x.new_zeros(0, weight.shape[-1])
