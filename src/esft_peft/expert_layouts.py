"""Per-family expert math: how to read one expert's weights and how its output changes under a delta.

Every layout computes, for the tokens routed to a selected expert, ``f(x; W + delta) - f(x; W)`` with the delta
kept as a separate term (``x @ W + x @ delta``), and adds it to the unchanged base output. With a zero delta the
correction is exactly zero, so the base output is reproduced bit for bit, whatever experts implementation
(eager, grouped_mm, batched_mm) produced it; small bf16 deltas are not rounded away in the forward either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import _grouped_linear

from .moe_structure import DENSE_BMM, FUSED, PARALLEL_LINEAR, SPLIT_GLU
from .partitioned import is_partitioned

Deltas = dict[str, torch.Tensor]  # parameter name -> (k, *per-expert shape) rows, aligned with expert ids


def _linear(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return x @ weight if transposed else F.linear(x, weight)


class ExpertsLayout:
    """Base class: expert-indexed views of the base weights, merge support and the forward correction."""

    def expert_views(self, experts: nn.Module) -> dict[str, torch.Tensor]:
        """Parameter name -> tensor of shape (num_experts, ...) viewing the base weights (shares storage)."""
        raise NotImplementedError

    def correct(self, experts: nn.Module, out, ids: list[int], deltas: Deltas, args: tuple, kwargs: dict):
        """Return ``out`` (the base call's output) with the selected experts' delta contributions added."""
        raise NotImplementedError


def _routed_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[name] for name in names[len(args) :]]
    return values[0], values[1], values[2]


class RoutedLayout(ExpertsLayout):
    """Experts called as ``experts(hidden[T, H], top_k_index[T, K], top_k_weights[T, K])``."""

    def expert_diff(self, experts: nn.Module, x: torch.Tensor, expert: int, delta: Deltas) -> torch.Tensor:
        raise NotImplementedError

    def correct(self, experts, out, ids, deltas, args, kwargs):
        hidden, top_k_index, top_k_weights = _routed_inputs(args, kwargs)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        flat = out.reshape(-1, out.shape[-1])
        tokens, diffs = [], []
        for row, expert in enumerate(ids):
            token_idx, slot = torch.where(top_k_index == expert)
            if token_idx.numel() == 0:
                continue
            x = hidden[token_idx]
            delta = {name: tensor[row].to(x.dtype) for name, tensor in deltas.items()}
            diffs.append(self.expert_diff(experts, x, expert, delta) * top_k_weights[token_idx, slot, None])
            tokens.append(token_idx)
        if not tokens:
            return out
        return flat.index_add(0, torch.cat(tokens), torch.cat(diffs).to(flat.dtype)).view(out.shape)


class FusedLayout(ExpertsLayout):
    """transformers' ``@use_experts_implementation`` experts (all layout flags honoured, gpt_oss included)."""

    def __init__(self, experts: nn.Module):
        self.up = "gate_up_proj" if experts.has_gate else "up_proj"
        self.names = [self.up, "down_proj"]
        if experts.has_bias:
            self.names += [f"{self.up}_bias", "down_proj_bias"]

    def expert_views(self, experts):
        return {name: getattr(experts, name) for name in self.names}

    def correct(self, experts, out, ids, deltas, args, kwargs):
        """All selected experts at once: their routed (token, slot) pairs sorted by expert, grouped matmuls."""
        hidden, top_k_index, top_k_weights = _routed_inputs(args, kwargs)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        chosen = torch.tensor(ids, device=top_k_index.device)
        token_idx, slot, local = torch.nonzero(top_k_index.unsqueeze(-1) == chosen, as_tuple=True)
        if token_idx.numel() == 0:
            return out
        order = torch.argsort(local, stable=True)
        token_idx, slot, local = token_idx[order], slot[order], local[order]
        offs = torch.cumsum(torch.bincount(local, minlength=len(ids)), 0).to(torch.int32)
        x = hidden[token_idx]
        delta = {name: tensor.to(x.dtype) for name, tensor in deltas.items()}
        diff = self._grouped_diff(experts, x, chosen, local, offs, delta)
        diff = diff * top_k_weights[token_idx, slot, None]
        flat = out.reshape(-1, out.shape[-1])
        return flat.index_add(0, token_idx, diff.to(flat.dtype)).view(out.shape)

    def _grouped_diff(self, experts, x, chosen, local, offs, delta):
        transposed = experts.is_transposed
        linear = lambda inputs, weight: _grouped_linear(inputs, weight, offs, is_transposed=transposed)  # noqa: E731
        up_w, down_w = getattr(experts, self.up)[chosen], experts.down_proj[chosen]
        a0 = linear(x, up_w)
        a = a0 + linear(x, delta[self.up])
        if experts.has_bias:
            up_bias = getattr(experts, f"{self.up}_bias")[chosen][local]
            a0 = a0 + up_bias
            a = a + up_bias + delta[f"{self.up}_bias"][local]
        activate = experts._apply_gate if experts.has_gate else experts.act_fn
        h0, h = activate(a0), activate(a)
        diff = linear(h - h0, down_w) + linear(h, delta["down_proj"])
        if experts.has_bias:
            diff = diff + delta["down_proj_bias"][local]
        if experts.has_post_expert_norm:
            y0 = linear(h0, down_w)
            if experts.has_bias:
                y0 = y0 + experts.down_proj_bias[chosen][local]
            diff = experts.post_expert_norm(y0 + diff) - experts.post_expert_norm(y0)
        return diff


class SplitGluLayout(RoutedLayout):
    """dbrx: ``experts.mlp.{w1, v1, w2}`` of shape (E * I, H); out = (act(x w1^T) * x v1^T) w2."""

    names = ("w1", "v1", "w2")

    def expert_views(self, experts):
        mlp = experts.mlp
        if any(is_partitioned(getattr(mlp, name)) for name in self.names):
            raise ValueError(
                "dbrx experts are partitioned by DeepSpeed ZeRO-3 (zero.Init), and their 2-D weights cannot be split "
                "per expert then. Load the model and call get_peft_model before creating the Accelerator or "
                "TrainingArguments with a ZeRO-3 config; ZeRO-3 then partitions the wrapped model when prepared."
            )
        return {name: getattr(mlp, name).view(experts.num_experts, -1, mlp.hidden_size) for name in self.names}

    def expert_diff(self, experts, x, expert, delta):
        views = self.expert_views(experts)
        w1, v1, w2 = (views[name][expert] for name in self.names)
        act = experts.mlp.activation_fn
        g0, u0 = F.linear(x, w1), F.linear(x, v1)
        g, u = g0 + F.linear(x, delta["w1"]), u0 + F.linear(x, delta["v1"])
        h0, h = act(g0) * u0, act(g) * u
        return (h - h0) @ w2 + h @ delta["w2"]


class DenseBmmLayout(ExpertsLayout):
    """llama4: ``experts(x[E * T, H])`` with inputs pre-scaled by the router; weights transposed (E, H, 2I)."""

    names = ("gate_up_proj", "down_proj")

    def expert_views(self, experts):
        return {name: getattr(experts, name) for name in self.names}

    def correct(self, experts, out, ids, deltas, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        per_expert = hidden.view(experts.num_experts, -1, hidden.shape[-1])
        diffs = []
        for row, expert in enumerate(ids):
            x = per_expert[expert]
            gate_up_w, down_w = experts.gate_up_proj[expert], experts.down_proj[expert]
            a0 = x @ gate_up_w
            a = a0 + x @ deltas["gate_up_proj"][row].to(x.dtype)
            gate0, up0 = a0.chunk(2, dim=-1)
            gate, up = a.chunk(2, dim=-1)
            h0, h = up0 * experts.act_fn(gate0), up * experts.act_fn(gate)
            diffs.append((h - h0) @ down_w + h @ deltas["down_proj"][row].to(x.dtype))
        index = torch.tensor(ids, device=out.device)
        corrected = out.view(experts.num_experts, -1, out.shape[-1]).index_add(0, index, torch.stack(diffs).to(out.dtype))
        return corrected.view(out.shape)


class ParallelLinearLayout(ExpertsLayout):
    """jetmoe: ``linear(inputs sorted by expert, expert_size)`` with weight (E, out, in); purely linear."""

    names = ("weight",)

    def expert_views(self, experts):
        return {"weight": experts.weight}

    def correct(self, experts, out, ids, deltas, args, kwargs):
        inputs = args[0] if args else kwargs["inputs"]
        expert_size = args[1] if len(args) > 1 else kwargs["expert_size"]
        sizes = [int(size) for size in expert_size]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        rows, extras = [], []
        for row, expert in enumerate(ids):
            if sizes[expert] == 0:
                continue
            rows.append(torch.arange(starts[expert], starts[expert] + sizes[expert], device=out.device))
            extras.append(F.linear(inputs[rows[-1]], deltas["weight"][row].to(inputs.dtype)))
        if not rows:
            return out
        return out.index_add(0, torch.cat(rows), torch.cat(extras).to(out.dtype))


def layout_for(kind: str, experts: nn.Module) -> ExpertsLayout:
    if kind == FUSED:
        return FusedLayout(experts)
    if kind == SPLIT_GLU:
        return SplitGluLayout()
    if kind == DENSE_BMM:
        return DenseBmmLayout()
    if kind == PARALLEL_LINEAR:
        return ParallelLinearLayout()
    raise NotImplementedError(f"No fused-experts layout for kind {kind!r}.")
