"""dbrx: ``experts.mlp.{w1, v1, w2}`` stored 2-D as (E * I, H), called as ``experts(hidden, top_k_index,
top_k_weights)``; ``experts.mlp(x, w1, v1, w2)`` computes one expert with the weights it is given.

The route-split forward is dbrx's own expert loop, with the selected experts' weights replaced by
``W[e] + delta[e]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import UnsupportedLayoutError
from ..partitioned import is_partitioned, logical_shape
from .base import (
    Deltas,
    ExpertsLayout,
    RecordRouting,
    bind_arguments,
    call_arguments,
    ids_tensor,
    is_experts_name,
    watch_experts_input,
    with_delta,
)

NAMES = ("w1", "v1", "w2")


class DbrxExperts(ExpertsLayout):
    kind = "split_glu"

    def detect(self, name: str, module: nn.Module) -> bool:
        mlp = getattr(module, "mlp", None)
        if not is_experts_name(name) or mlp is None or not hasattr(module, "num_experts"):
            return False
        params = dict(mlp.named_parameters(recurse=False))
        return set(NAMES) <= set(params) and all(len(logical_shape(params[n])) == 2 for n in NAMES)

    def num_experts(self, experts: nn.Module) -> int:
        return int(experts.num_experts)

    def expert_views(self, target: nn.Module) -> dict[str, torch.Tensor]:
        mlp = target.mlp
        if any(is_partitioned(getattr(mlp, name)) for name in NAMES):
            raise UnsupportedLayoutError(
                "dbrx experts are partitioned by DeepSpeed ZeRO-3 (zero.Init), and their 2-D weights cannot be split "
                "per expert then. Load the model and call get_peft_model before creating the Accelerator or "
                "TrainingArguments with a ZeRO-3 config; ZeRO-3 then partitions the wrapped model when prepared."
            )
        return {name: getattr(mlp, name).view(target.num_experts, -1, mlp.hidden_size) for name in NAMES}

    def forward(self, target: nn.Module, ids: list[int], deltas: Deltas, args: tuple, kwargs: dict) -> torch.Tensor:
        hidden, top_k_index, top_k_weights = bind_arguments(call_arguments(target), args, kwargs, 3, "experts")
        batch_size = hidden.shape[0]
        hidden = hidden.reshape(-1, target.hidden_size)
        views = self.expert_views(target)
        chosen = ids_tensor(tuple(ids), hidden.device)
        selected = {name: with_delta(views[name][chosen], deltas[name]) for name in NAMES}
        row = {expert: j for j, expert in enumerate(ids)}
        next_states = torch.zeros_like(hidden)
        with torch.no_grad():
            expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=target.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        used = False
        for expert in expert_hit[:, 0].tolist():
            if expert == target.num_experts:
                continue
            with torch.no_grad():
                idx, token_idx = torch.where(expert_mask[expert])
            if expert in row:
                weights = [selected[name][row[expert]] for name in NAMES]
                used = True
            else:
                weights = [views[name][expert] for name in NAMES]
            states = target.mlp(hidden[token_idx], *weights)
            states = states.view(-1, target.hidden_size) * top_k_weights[token_idx, idx, None]
            next_states.index_add_(0, token_idx, states)
        if not used and torch.is_grad_enabled():  # keep the deltas in the graph (zero gradient) for DDP
            next_states = next_states + sum(t.sum() for t in selected.values()).to(next_states.dtype) * 0
        return next_states.view(batch_size, -1, target.hidden_size)

    def watch_routing(self, model: nn.Module, layer: Any, record: RecordRouting) -> RemovableHandle:
        return watch_experts_input(model.get_submodule(layer.experts_name), layer.key, record)
