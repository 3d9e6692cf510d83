"""ESFT's compute of dbrx experts (the ``split_glu`` layout).

The route-split forward is dbrx's own expert loop, with the selected experts' weights replaced by
``W[e] + delta[e]``.
"""

from __future__ import annotations

import torch
from torch import nn

from ....moe.layouts.base import bind_arguments, call_arguments
from ....moe.layouts.dbrx import NAMES
from ....moe.rows import ids_tensor
from .base import Deltas, ExpertsCompute, with_delta


class SplitGluCompute(ExpertsCompute):
    kind = "split_glu"

    def forward(self, target: nn.Module, ids: list[int], deltas: Deltas, args: tuple, kwargs: dict) -> torch.Tensor:
        hidden, top_k_index, top_k_weights = bind_arguments(call_arguments(target), args, kwargs, 3, "experts")
        batch_size = hidden.shape[0]
        hidden = hidden.reshape(-1, target.hidden_size)
        views = self.layout.expert_views(target)
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
