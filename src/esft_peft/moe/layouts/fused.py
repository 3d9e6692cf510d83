"""transformers' ``@use_experts_implementation`` experts: fused 3-D weights, called as
``experts(hidden[T, H], top_k_index[T, K], top_k_weights[T, K])`` (qwen2/3-moe, deepseek-v2/v3, mixtral, olmoe,
gpt-oss, granite-moe, jamba, phimoe, ernie, hunyuan and about 60 more families).

The route-split forward follows transformers' ``grouped_mm_experts_forward`` step by step, with one change: the
(token, slot) pairs are sorted so that those routed to selected experts come first, and each projection runs as two
grouped matmuls over that one order, the selected groups with ``W[e] + delta[e]`` and the rest with the frozen
``W``. Layout flags (transposed, gate or not, biases, post-expert norm) and the module's own ``_apply_gate`` and
``act_fn`` are used as they are, so gpt-oss (interleaved, clamped, with biases) needs no special case.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import UnsupportedLayoutError
from ..partitioned import logical_shape
from .base import (
    Deltas,
    ExpertsLayout,
    RecordRouting,
    bind_arguments,
    call_arguments,
    expert_rows,
    ids_tensor,
    inverse_permutation,
    is_experts_name,
    permute_rows,
    watch_experts_input,
    with_delta,
)

try:  # private transformers API; guarded so that `import esft_peft` never fails on it
    from transformers.integrations.moe import _grouped_linear
except ImportError:  # pragma: no cover - depends on the installed transformers
    _grouped_linear = None


class FusedExperts(ExpertsLayout):
    kind = "fused"

    def detect(self, name: str, module: nn.Module) -> bool:
        if not is_experts_name(name):
            return False
        params = dict(module.named_parameters(recurse=False))
        three_d = lambda n: n in params and len(logical_shape(params[n])) == 3  # noqa: E731
        return (
            hasattr(module, "has_gate")
            and hasattr(module, "is_transposed")
            and three_d("down_proj")
            and (three_d("gate_up_proj") or three_d("up_proj"))
        )

    def num_experts(self, experts: nn.Module) -> int:
        return int(logical_shape(experts.down_proj)[0])

    def _names(self, experts: nn.Module) -> tuple[str, ...]:
        up = "gate_up_proj" if experts.has_gate else "up_proj"
        return (up, "down_proj", f"{up}_bias", "down_proj_bias") if experts.has_bias else (up, "down_proj")

    def expert_views(self, target: nn.Module) -> dict[str, torch.Tensor]:
        return {name: getattr(target, name) for name in self._names(target)}

    def check_wrappable(self, target: nn.Module) -> None:
        super().check_wrappable(target)
        family = getattr(getattr(target, "config", None), "model_type", None) or type(target).__name__
        missing = [name for name, ok in (
            ("transformers.integrations.moe._grouped_linear", _grouped_linear is not None),
            (f"{type(target).__name__}._apply_gate", not target.has_gate or hasattr(target, "_apply_gate")),
        ) if not ok]
        if missing:
            raise UnsupportedLayoutError(
                f"ESFT cannot wrap the experts of this {family} model: the installed transformers lacks "
                f"{', '.join(missing)}, which esft-peft uses to compute fused experts. Install a transformers "
                "version esft-peft supports (see pyproject.toml)."
            )

    def forward(self, target: nn.Module, ids: list[int], deltas: Deltas, args: tuple, kwargs: dict) -> torch.Tensor:
        hidden, top_k_index, top_k_weights = bind_arguments(call_arguments(target), args, kwargs, 3, "experts")
        shape = hidden.shape
        hidden = hidden.reshape(-1, shape[-1])
        num_experts, k = self.num_experts(target), len(ids)
        num_tokens, num_top_k = hidden.size(0), top_k_index.size(-1)
        device = hidden.device

        # transformers' order: (token, slot) pairs sorted by expert id. Every elementwise step runs on whole tensors
        # in that order, as in the base (CPU kernels round a tensor's tail elements differently), and the grouped
        # matmuls run on the rows of the selected experts and of the others, each group's rows in the base's order
        # (GEMM results depend on a row's position in its group): a zero delta reproduces the base bit for bit.
        experts_sorted, perm = torch.sort(top_k_index.reshape(-1))
        chosen = ids_tensor(tuple(ids), device)
        lookup = torch.full((num_experts,), k, dtype=torch.long, device=device)
        lookup.index_copy_(0, chosen, torch.arange(k, device=device))
        group = lookup[experts_sorted]  # selected expert j -> j, any other -> k
        histc_input = experts_sorted.float() if device.type in ("cpu", "mps") else experts_sorted.int()
        counts = torch.histc(histc_input, bins=num_experts, min=0, max=num_experts - 1)
        selected_counts = counts[chosen]
        other_counts = counts.index_fill(0, chosen, 0)
        selected_pairs = int(selected_counts.sum())  # the split point: the one host read this forward adds
        split = torch.sort(group, stable=True).indices  # selected pairs by j, then the others in base order
        offsets = tuple(torch.cumsum(c, 0, dtype=torch.int32) for c in (selected_counts, other_counts))
        row_experts = (group[split[:selected_pairs]], experts_sorted[split[selected_pairs:]])

        names = self._names(target)
        frozen = {name: getattr(target, name) for name in names}
        # The selected experts' weights: W[e] + delta[e], formed once per forward (k experts, nothing more).
        selected = {name: with_delta(expert_rows(frozen[name], ids), deltas[name]) for name in names}
        up, down = names[:2]
        sources = (selected, frozen)

        restore = inverse_permutation(split)  # position in (selected rows, other rows) -> position in base order
        sizes = [selected_pairs, split.size(0) - selected_pairs]

        def grouped(inputs: list[torch.Tensor], name: str) -> torch.Tensor:
            rows = []
            for part in range(2):
                bias = sources[part].get(f"{name}_bias")
                rows.append(_grouped_linear(
                    inputs[part], sources[part][name], offsets[part],
                    bias=None if bias is None else bias[row_experts[part]], is_transposed=target.is_transposed,
                ))
            return permute_rows(torch.cat(rows), restore, split)  # back to the base's order

        inverse = inverse_permutation(perm)
        out = grouped(hidden.index_select(0, (perm // num_top_k)[split]).split(sizes), up)
        out = target._apply_gate(out) if target.has_gate else target.act_fn(out)
        out = grouped(permute_rows(out, split, restore).split(sizes), down)
        if target.has_post_expert_norm:
            out = target.post_expert_norm(out)
        out = out * permute_rows(top_k_weights.reshape(-1), perm, inverse).unsqueeze(-1)
        out = permute_rows(out, inverse, perm).view(num_tokens, num_top_k, -1).sum(dim=1)
        return out.to(hidden.dtype).view(*shape[:-1], -1)

    def watch_routing(self, model: nn.Module, layer: Any, record: RecordRouting) -> RemovableHandle:
        return watch_experts_input(model.get_submodule(layer.experts_name), layer.key, record)

    def official_projections(
        self, layer: Any, experts: nn.Module, rows: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if not experts.has_gate or not experts.is_concatenated or experts.has_bias:
            raise UnsupportedLayoutError(
                f"Layer {layer.key}: {type(experts).__name__} stores experts with has_gate={experts.has_gate}, "
                f"is_concatenated={experts.is_concatenated}, has_bias={experts.has_bias}; the official format maps "
                "only concatenated gate_up_proj experts without biases (gate rows first, then up rows)."
            )
        gate_up, down = rows["gate_up_proj"], rows["down_proj"]
        if experts.is_transposed:  # (H, 2I) and (I, H)
            gate_up, down = gate_up.T, down.T
        half = gate_up.shape[0] // 2
        return {"gate_proj": gate_up[:half], "up_proj": gate_up[half:], "down_proj": down}
