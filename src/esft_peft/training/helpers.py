"""Training helpers: the paper's hyper-parameters as ``TrainingArguments``, the router auxiliary loss switch, and
gathering a (possibly sharded) adapter for saving after multi-process training."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import TrainingArguments

from ..defaults import PAPER_TRAINING
from ..moe.partitioned import gathered
from ..tuners.esft.layer import ADAPTER_CONTAINERS

logger = logging.getLogger(__name__)

# transformers 5.24 renamed gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs); older 5.x lack the
# new names. Deprecated spellings in overrides are mapped to the names this transformers reads.
_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}
CHECKPOINTING, CHECKPOINTING_KWARGS = (
    ("activation_checkpointing", "activation_checkpointing_kwargs") if "activation_checkpointing" in _FIELDS
    else ("gradient_checkpointing", "gradient_checkpointing_kwargs")
)
_ALIASES = {"gradient_checkpointing": CHECKPOINTING, "gradient_checkpointing_kwargs": CHECKPOINTING_KWARGS,
            "activation_checkpointing": CHECKPOINTING, "activation_checkpointing_kwargs": CHECKPOINTING_KWARGS}

# State-dict keys that peft saves for an ESFT adapter: the deltas (dense or low-rank factors) and any
# `modules_to_save` copies.
ADAPTER_KEY_PARTS = (*(f".{container}." for container in ADAPTER_CONTAINERS), ".modules_to_save.")


def esft_training_arguments(output_dir: str, **overrides: Any) -> TrainingArguments:
    """``TrainingArguments`` with the paper's ESFT hyper-parameters; ``overrides`` win.

    AdamW (betas 0.9/0.95, weight decay 0.1), lr 1e-5, constant schedule, 500 steps, gradient checkpointing
    (non-reentrant) and bf16 where a GPU supports it. Only the deltas are trainable, so the weight decay of
    Trainer's optimizer never touches frozen experts. On a machine without an accelerator ``use_cpu`` is set, so
    that a multi-process launch (``accelerate launch``/``torchrun``) trains data-parallel on gloo instead of
    running independent processes. ``gradient_checkpointing`` and ``activation_checkpointing`` (transformers >= 5.24)
    are accepted for the same setting, so no deprecated argument reaches ``TrainingArguments``.
    """
    defaults: dict[str, Any] = dict(
        **PAPER_TRAINING, use_cpu=not torch.accelerator.is_available(), output_dir=output_dir,
        per_device_train_batch_size=8,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(), logging_steps=10, save_strategy="no",
        report_to=[],
    )
    defaults[CHECKPOINTING], defaults[CHECKPOINTING_KWARGS] = True, {"use_reentrant": False}
    overrides = {_ALIASES.get(key, key): value for key, value in overrides.items()}
    return TrainingArguments(**{**defaults, **overrides})


def set_router_aux_loss(model: nn.Module, enabled: bool, coef: Optional[float] = None) -> None:
    """Switch the model's load-balancing auxiliary loss on or off for training (and optionally set its weight).

    ESFT's default is off: with the router frozen, routing cannot rebalance, so the loss would only push gradients
    through the hidden states into other layers' deltas. Turn it on together with ``ESFTConfig(train_router=True)``.
    """
    config = model.config
    if not hasattr(config, "output_router_logits"):
        raise ValueError(
            f"{type(model).__name__} has no router auxiliary loss (its config lacks `output_router_logits`)."
        )
    config.output_router_logits = enabled
    if coef is not None:
        if not hasattr(config, "router_aux_loss_coef"):
            raise ValueError(f"{type(model).__name__}'s config has no `router_aux_loss_coef` to set.")
        config.router_aux_loss_coef = coef
        for module in model.modules():  # causal-LM heads copy the coefficient at construction
            if "router_aux_loss_coef" in vars(module):
                module.router_aux_loss_coef = coef
    logger.info("Router auxiliary loss %s (coef %s).", "on" if enabled else "off", getattr(config, "router_aux_loss_coef", None))


def gather_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (ESFT deltas, ``modules_to_save`` copies), whole and on CPU, keyed as in
    ``model.state_dict()``; pass them to ``model.save_pretrained(out, state_dict=...)``.

    Works on plain, DDP-wrapped, FSDP2-sharded and DeepSpeed (ZeRO-2/3) peft models. Under FSDP2 and ZeRO-3 it
    gathers the partitioned adapter tensors (and nothing of the frozen base), so every process must call it.
    """
    model = extract_model_from_parallel(model)
    adapter_params = [param for name, param in model.named_parameters() if _is_adapter_key(name)]
    with gathered(adapter_params):
        return {
            key: (value.full_tensor() if isinstance(value, DTensor) else value).detach().to("cpu", copy=True)
            for key, value in model.state_dict().items()
            if _is_adapter_key(key)
        }


def _is_adapter_key(key: str) -> bool:
    return any(part in key for part in ADAPTER_KEY_PARTS)
