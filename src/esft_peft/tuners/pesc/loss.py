"""The load-balancing loss of PESC (paper section 3, Switch-Transformer style): ``alpha * E * sum_i f_i * P_i``.

``f_i`` is the fraction of routed (token, slot) pairs sent to expert ``i`` (no gradient, it counts decisions) and
``P_i`` the mean probability of expert ``i`` under the softmax over *all* ``E`` router logits, which carries the
gradient to the router. A perfectly balanced router gives ``E * sum_i (1/E)(1/E) = 1``. (The authors' code copied
transformers 4.36's Mixtral function, whose softmax over the top-k values made ``P_i`` the constant ``1/k``.)
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layer import PESCLayer

logger = logging.getLogger(__name__)

HOOK_ATTRIBUTE = "_pesc_aux_loss_hook"


def load_balancing_loss(
    router_logits: torch.Tensor, top_k_index: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``E * sum_i f_i * P_i`` of one layer (without ``alpha``), over the tokens where ``mask`` is true.

    Args:
        router_logits: (T, E) logits of the router.
        top_k_index: (T, k) experts each token was routed to.
        mask: (T,) tokens to count (e.g. the flattened attention mask); all tokens when None.
    """
    num_experts = router_logits.shape[-1]
    probs = F.softmax(router_logits.float(), dim=-1)
    chosen = F.one_hot(top_k_index, num_experts).sum(dim=1).to(probs.dtype)  # (T, E): 1 where routed
    weight = torch.ones(probs.shape[0], dtype=probs.dtype, device=probs.device) if mask is None else mask.to(probs)
    tokens = weight.sum().clamp(min=1.0)
    fraction = (chosen * weight[:, None]).sum(0) / (tokens * top_k_index.shape[-1])
    probability = (probs * weight[:, None]).sum(0) / tokens
    return num_experts * (fraction * probability).sum()


def _mask(attention_mask: Optional[torch.Tensor], tokens: int) -> Optional[torch.Tensor]:
    if attention_mask is None:
        return None
    flat = attention_mask.reshape(-1)
    return flat if flat.shape[0] == tokens else None


def router_aux_loss(
    model: nn.Module, attention_mask: Optional[torch.Tensor] = None, coefficients: Optional[dict[str, float]] = None
) -> Optional[torch.Tensor]:
    """The load-balancing loss of the last forward pass of ``model`` (any model holding PESC layers: a PeftModel, a
    PESCModel, or a transformers model after ``load_adapter``): per active adapter, ``router_aux_loss_coef`` times
    the mean over upcycled layers of :func:`load_balancing_loss`, summed over adapters.

    Add it to your loss in custom loops (``PeftModel`` forwards already add it to ``outputs.loss`` when labels are
    given). ``attention_mask`` (B, S) leaves padding out. ``coefficients`` (adapter -> alpha) overrides the configs'.
    Returns None when no routing was recorded (no PESC layer ran) or every coefficient is 0.
    """
    configs = getattr(model, "peft_config", {}) or {}
    per_adapter: dict[str, list[torch.Tensor]] = {}
    warned = False
    for module in model.modules():
        if not isinstance(module, PESCLayer):
            continue
        for adapter in module._active():
            routing = module.lora_pesc_routing.get(adapter)
            if routing is None:
                continue
            logits, index = routing
            needs_grad = torch.is_grad_enabled() and module.lora_pesc_router[adapter].weight.requires_grad
            if needs_grad and not logits.requires_grad and not warned:
                logger.warning(
                    "The PESC router logits carry no gradient (reentrant gradient checkpointing runs the forward "
                    "without autograd), so the load-balancing loss cannot train the routers. Use "
                    "gradient_checkpointing_kwargs={'use_reentrant': False} (transformers' default)."
                )
                warned = True
            mask = _mask(attention_mask, len(index))
            per_adapter.setdefault(adapter, []).append(load_balancing_loss(logits, index, mask))
    total = None
    for adapter, losses in per_adapter.items():
        if coefficients is not None and adapter in coefficients:
            alpha = coefficients[adapter]
        else:
            alpha = getattr(configs.get(adapter), "router_aux_loss_coef", 0.0)
        if alpha == 0:
            continue
        term = alpha * torch.stack(losses).mean()
        total = term if total is None else total + term
    return total


def _add_aux_loss(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    loss = getattr(output, "loss", None)
    if kwargs.get("labels") is None or loss is None:
        return None
    aux = router_aux_loss(model, attention_mask=kwargs.get("attention_mask"))
    if aux is not None:
        output.loss = loss + aux.to(loss.dtype)
    return output


def attach_aux_loss(model: nn.Module) -> None:
    """Make ``model``'s forward add :func:`router_aux_loss` to ``outputs.loss`` whenever labels are passed (as keyword
    arguments, as Trainer and peft do), however it is called: through any PeftModel class or directly (after
    transformers' ``load_adapter``). Idempotent."""
    if getattr(model, HOOK_ATTRIBUTE, None) is None:
        setattr(model, HOOK_ATTRIBUTE, model.register_forward_hook(_add_aux_loss, with_kwargs=True))


def detach_aux_loss(model: nn.Module) -> None:
    handle = vars(model).pop(HOOK_ATTRIBUTE, None)
    if handle is not None:
        handle.remove()
