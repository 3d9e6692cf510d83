"""The load-balancing loss of PESC (paper section 3, Switch-Transformer style): ``alpha * E * sum_i f_i * P_i``.

``f_i`` is the fraction of routed (token, slot) pairs sent to expert ``i`` (no gradient, it counts decisions) and
``P_i`` the mean probability of expert ``i`` under the softmax over *all* ``E`` router logits, which carries the
gradient to the router. A perfectly balanced router gives ``E * sum_i (1/E)(1/E) = 1``. (The authors' code copied
transformers 4.36's Mixtral function, whose softmax over the top-k values made ``P_i`` the constant ``1/k``.)
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layer import PESCLayer

logger = logging.getLogger(__name__)

RECORD_ATTRIBUTE = "_pesc_routing_record"


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


class RoutingRecord:
    """The routing of one forward of a model: per adapter, (router logits (T, E), top-k index (T, k), whether the
    router trains) of each upcycled layer, in call order. Filled by forward hooks on the routers (as transformers
    records router logits) while the model's forward runs, cleared when it starts; nothing is kept on the layers."""

    def __init__(self) -> None:
        self.routing: dict[str, list[tuple[torch.Tensor, torch.Tensor, bool]]] = {}


_RECORDING: ContextVar[Optional[RoutingRecord]] = ContextVar("pesc_routing_record", default=None)


def _record_routing(adapter: str, router: nn.Module, args: tuple, output: tuple) -> None:
    record = _RECORDING.get()
    if record is not None:  # outside a model forward (e.g. recomputation for checkpointing in backward): skipped
        logits, _, index = output
        record.routing.setdefault(adapter, []).append((logits, index, router.weight.requires_grad))


def _start_recording(model: nn.Module, args: tuple, kwargs: dict) -> None:
    record = vars(model).get(RECORD_ATTRIBUTE)
    if record is not None:
        record.routing = {}
        _RECORDING.set(record)


def _watched(module: nn.Module, hook: Callable) -> bool:
    hooks = {**module._forward_pre_hooks, **module._forward_hooks}.values()
    return any(getattr(h, "func", h) is hook for h in hooks)


def routing_record(model: nn.Module) -> Optional[RoutingRecord]:
    """The routing record of ``model`` (a PeftModel, a PESCModel or a transformers model holding PESC layers)."""
    for module in model.modules():
        record = vars(module).get(RECORD_ATTRIBUTE)
        if record is not None:
            return record
    return None


def aux_loss_of_record(
    record: Optional[RoutingRecord],
    configs: dict[str, Any],
    adapter_names: Optional[list[str]] = None,
    attention_mask: Optional[torch.Tensor] = None,
    coefficients: Optional[dict[str, float]] = None,
) -> Optional[torch.Tensor]:
    """Per adapter, ``router_aux_loss_coef`` times the mean over upcycled layers of :func:`load_balancing_loss` on the
    recorded routing, summed over ``adapter_names`` (default: every adapter that routed). None when nothing counts."""
    if record is None:
        return None
    total = None
    warned = False
    for adapter, calls in record.routing.items():
        if adapter_names is not None and adapter not in adapter_names:
            continue
        if coefficients is not None and adapter in coefficients:
            alpha = coefficients[adapter]
        else:
            alpha = getattr(configs.get(adapter), "router_aux_loss_coef", 0.0)
        if alpha == 0 or not calls:
            continue
        losses = []
        for logits, index, trainable in calls:
            if torch.is_grad_enabled() and trainable and not logits.requires_grad and not warned:
                logger.warning(
                    "The PESC router logits carry no gradient (reentrant gradient checkpointing runs the forward "
                    "without autograd), so the load-balancing loss cannot train the routers. Use "
                    "gradient_checkpointing_kwargs={'use_reentrant': False} (transformers' default)."
                )
                warned = True
            losses.append(load_balancing_loss(logits, index, _mask(attention_mask, len(index))))
        term = alpha * torch.stack(losses).mean()
        total = term if total is None else total + term
    return total


def router_aux_loss(
    model: nn.Module, attention_mask: Optional[torch.Tensor] = None, coefficients: Optional[dict[str, float]] = None
) -> Optional[torch.Tensor]:
    """The load-balancing loss of the last forward pass of ``model`` (any model holding PESC layers: a PeftModel, a
    PESCModel, or a transformers model after ``load_adapter``): per adapter that routed, ``router_aux_loss_coef``
    times the mean over upcycled layers of :func:`load_balancing_loss`, summed over adapters.

    The same as ``PESCModel._get_router_aux_loss``. Add it to your loss in custom loops (``PeftModel`` forwards
    already add it to ``outputs.loss`` when labels are given). ``attention_mask`` (B, S) leaves padding out.
    ``coefficients`` (adapter -> alpha) overrides the configs'. Returns None when no routing was recorded (no PESC
    layer ran) or every coefficient is 0.
    """
    return aux_loss_of_record(
        routing_record(model), getattr(model, "peft_config", {}) or {}, attention_mask=attention_mask,
        coefficients=coefficients,
    )


def attach_routing_record(model: nn.Module, aux_loss: Callable[..., Optional[torch.Tensor]]) -> None:
    """Record the routing of every forward of ``model`` and add ``aux_loss(model, attention_mask=...)`` to
    ``outputs.loss`` whenever labels are passed (as keyword arguments, as Trainer and peft do), however ``model`` is
    called: through any PeftModel class or directly (after transformers' ``load_adapter``). Idempotent; routers
    added since the last call are watched too. The hooks are module-level functions, so a deep copy of the model
    records into its own copy of the record."""
    if RECORD_ATTRIBUTE not in vars(model):
        model.__dict__[RECORD_ATTRIBUTE] = RoutingRecord()
    if not _watched(model, _start_recording):
        model.register_forward_pre_hook(_start_recording, with_kwargs=True)
        model.register_forward_hook(partial(_add_aux_loss, aux_loss=aux_loss), with_kwargs=True)
    for module in model.modules():
        if isinstance(module, PESCLayer):
            for adapter, router in module.pesc_router.items():
                if not _watched(router, _record_routing):
                    router.register_forward_hook(partial(_record_routing, adapter))


def _add_aux_loss(model: nn.Module, args: tuple, kwargs: dict, output: Any, aux_loss: Callable) -> Any:
    _RECORDING.set(None)
    loss = getattr(output, "loss", None)
    if kwargs.get("labels") is None or loss is None:
        return None
    aux = aux_loss(model, attention_mask=kwargs.get("attention_mask"))
    if aux is not None:
        output.loss = loss + aux.to(loss.dtype)
    return output


def detach_routing_record(model: nn.Module) -> None:
    """Remove what :func:`attach_routing_record` added to ``model`` (the routers leave with their layers)."""
    vars(model).pop(RECORD_ATTRIBUTE, None)
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, h in hooks.items() if getattr(h, "func", h) in (_start_recording, _add_aux_loss)]:
            del hooks[key]
