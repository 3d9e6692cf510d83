"""The ESFT authors' weight decay, as an option.

AdamW decays the parameters it trains. esft-peft trains deltas, so by default weight decay pulls ``delta`` toward
zero, that is, each trained expert toward its pre-trained weights. The authors train the expert weights themselves,
so their AdamW pulls ``W + delta`` toward zero. :func:`decay_expert_weights` reproduces that: after every optimizer
step it also subtracts ``lr * weight_decay * W`` from each delta, so that ``W + delta`` follows the authors' update
``(W + delta) * (1 - lr * wd) - lr * adam_step`` exactly (up to float rounding).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import TrainerCallback

from ..tuners.data_parallel import local_tensor
from ..tuners.esft.layer import ESFTLayer


def decay_expert_weights(model: nn.Module, optimizer: torch.optim.Optimizer) -> RemovableHandle:
    """Make ``optimizer``'s decoupled weight decay act on the trained experts' weights ``W + delta`` (the ESFT
    authors' AdamW) instead of on the deltas. Returns the hook's handle (``.remove()`` restores the default).

    Works for every param group with a ``weight_decay``; a group with weight decay 0 is left alone.
    """
    owners: dict[int, tuple[ESFTLayer, str, str]] = {}
    factors: set[int] = set()
    for module in model.modules():
        if isinstance(module, ESFTLayer):
            for adapter, deltas in module.esft_delta.items():
                owners.update({id(delta): (module, adapter, name) for name, delta in deltas.items()})
            for container in (module.esft_lora_A, module.esft_lora_B):
                factors.update(id(p) for params in container.values() for p in params.values())
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    if any(id(p) in factors for group in inner.param_groups for p in group["params"]):
        raise ValueError(
            "The optimizer trains low-rank deltas (ESFTConfig.delta_rank): decaying W + s * B @ A toward zero has no "
            "exact form on the factors. Leave decay_expert_weights off; the optimizer's own weight decay then acts on "
            "A and B, as LoRA's does."
        )
    if not any(id(p) in owners for group in inner.param_groups for p in group["params"]):
        raise ValueError("The optimizer trains no ESFT delta of this model; pass the model whose deltas it trains.")

    @torch.no_grad()
    def decay(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in opt.param_groups:
            rate = float(group["lr"]) * float(group.get("weight_decay", 0.0))
            if rate == 0.0:
                continue
            for param in group["params"]:
                owner = owners.get(id(param))
                if owner is not None:
                    layer, adapter, name = owner
                    # a DTensor delta (model sharded by transformers): this rank's rows, under its base rows
                    local_tensor(param).sub_(layer.base_weights(adapter)[name].to(param.dtype), alpha=rate)

    return inner.register_step_post_hook(decay)


class ExpertWeightDecayCallback(TrainerCallback):
    """``transformers.Trainer`` callback applying :func:`decay_expert_weights` to the Trainer's optimizer."""

    def __init__(self) -> None:
        self.handle: RemovableHandle | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module = None,
                       optimizer: torch.optim.Optimizer = None, **kwargs: Any) -> None:
        self.handle = decay_expert_weights(model, optimizer)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
