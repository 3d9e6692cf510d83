"""transformers' ``@use_experts_implementation`` experts: fused 3-D weights, called as
``experts(hidden[T, H], top_k_index[T, K], top_k_weights[T, K])`` (qwen2/3-moe, deepseek-v2/v3, mixtral, olmoe,
gpt-oss, granite-moe, jamba, phimoe, ernie, hunyuan and about 60 more families): ``gate_up_proj`` (or ``up_proj``
without a gate) and ``down_proj`` of shape (E, ...), optional per-expert biases.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedLayoutError
from ..partitioned import logical_shape
from .base import ExpertsLayout, is_experts_name


class FusedExperts(ExpertsLayout):
    kind = "fused"
    supports_expert_parallel = True

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
        # under expert parallelism num_experts is the rank's local count (checked against ep_size by the tuner)
        local = getattr(target, "_is_expert_parallel", False)
        if not local and getattr(target, "num_experts", None) != self.num_experts(target):
            family = getattr(getattr(target, "config", None), "model_type", None) or type(target).__name__
            raise UnsupportedLayoutError(
                f"ESFT cannot wrap the experts of this {family} model: {type(target).__name__}.num_experts is "
                f"{getattr(target, 'num_experts', None)!r}, not the {self.num_experts(target)} experts its weights "
                "hold; ESFT calls the module with the selected experts only and needs that attribute to match."
            )
