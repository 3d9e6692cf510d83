"""dbrx: ``experts.mlp.{w1, v1, w2}`` stored 2-D as (E * I, H), called as ``experts(hidden, top_k_index,
top_k_weights)``; ``experts.mlp(x, w1, v1, w2)`` computes one expert with the weights it is given."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedLayoutError
from ..partitioned import is_partitioned, logical_shape
from .base import ExpertsLayout, is_experts_name

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
