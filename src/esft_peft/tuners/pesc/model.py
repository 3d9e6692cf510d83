"""``PESCModel``: the peft tuner that crafts a dense model into a mixture of adapter experts, with the paper's
optional LoRA part on the dense linears (peft's own LoRA layers, bitsandbytes included, through its dispatch)."""

from __future__ import annotations

import logging
from typing import Any, Optional

from peft import LoraConfig
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.tuners_utils import BaseTuner, get_device_map
from peft.utils import _get_submodules
from torch import nn

from ..saved_checks import SavedTensorChecks
from .config import ALL_LINEAR, PESCConfig
from .layer import PESCLayer, require_grouped_mm
from .loss import attach_aux_loss, detach_aux_loss, router_aux_loss
from .targets import MLPTarget, plan_targets

logger = logging.getLogger(__name__)

PLAN_ATTRIBUTE = "_pesc_plan"
NO_MERGE = (
    "A PESC adapter cannot be merged into the dense weights: every token is routed to its own adapter experts, so no "
    "single weight matrix reproduces the crafted layers. Keep the adapter loaded for inference; merge_lora() folds "
    "only the LoRA part into the dense weights and keeps the routers and adapter experts."
)


def lora_config_of(config: PESCConfig) -> LoraConfig:
    """The peft LoRA config of a PESC config's LoRA part (used to build and update peft's LoRA layers)."""
    return LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules or ALL_LINEAR, inference_mode=config.inference_mode,
    )


class PESCModel(SavedTensorChecks, BaseTuner):
    """Creates a PESC model: each upcycled MLP gets a router and adapter experts; optionally, LoRA on the dense
    linears. Use it through peft: ``get_peft_model(model, PESCConfig(num_experts=8, top_k=2, adapter_dim=64))``.
    """

    # One prefix for every container a PESC adapter saves (peft's lora_A/lora_B and lora_pesc_*): transformers'
    # load_adapter inserts the adapter name after key segments that start with the method's prefix, so the LoRA part
    # and the adapter experts must share it. peft's "lora_" is taken; "lora" is not.
    prefix: str = "lora"
    tuner_layer_cls = (PESCLayer, LoraLayer)  # set_adapter/delete_adapter reach both kinds of layers
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: PESCConfig, model_config: dict) -> PESCConfig:
        require_grouped_mm()
        setattr(peft_config, PLAN_ATTRIBUTE, plan_targets(self.model, peft_config))
        return peft_config

    def _check_target_module_exists(self, peft_config: PESCConfig, key: str) -> bool:
        plan = getattr(peft_config, PLAN_ATTRIBUTE)
        return key in plan.mlps or (key in plan.lora and plan.lora[key] is None)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **_) -> None:
        plan = getattr(peft_config, PLAN_ATTRIBUTE)
        if current_key not in plan.mlps:
            self._add_lora(peft_config, adapter_name, current_key)
            return
        for name in plan.lora_inside(current_key):  # before the MLP is wrapped, while their paths still hold
            self._add_lora(peft_config, adapter_name, name)
        self._add_pesc(peft_config, adapter_name, target, target_name, parent, plan.mlps[current_key])

    def _add_pesc(
        self, config: PESCConfig, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module,
        spec: MLPTarget,
    ) -> None:
        settings = dict(
            num_experts=config.num_experts, top_k=config.top_k, adapter_dim=config.adapter_dim,
            adapter_scaling=config.adapter_scaling, adapter_dropout=config.adapter_dropout,
        )
        if isinstance(target, PESCLayer):
            target.update_layer(adapter_name, **settings)
            return
        new_module = PESCLayer(target, adapter_name, spec.hidden_size, **settings)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        setattr(parent, target_name, new_module)

    def _add_lora(self, config: PESCConfig, adapter_name: str, key: str) -> None:
        lora_config = lora_config_of(config)
        parent, target, target_name = _get_submodules(self.model, key)
        if isinstance(target, LoraLayer):
            target.update_layer(adapter_name, config.lora_r, lora_alpha=config.lora_alpha, config=lora_config,
                                target_name=key)
            return
        kwargs = {
            "r": config.lora_r, "lora_alpha": config.lora_alpha, "target_name": key,
            "loaded_in_8bit": getattr(self.model, "is_loaded_in_8bit", False),
            "loaded_in_4bit": getattr(self.model, "is_loaded_in_4bit", False),
        }
        new_module = LoraModel._create_new_module(
            lora_config, adapter_name, target, device_map=get_device_map(self.model), **kwargs
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        setattr(parent, target_name, new_module)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # peft's version copies `child.weight` onto unwrapped modules; an MLP has none.
        setattr(parent, child_name, new_module)

    def _post_injection_hook(self, model: nn.Module, config: PESCConfig, adapter_name: str) -> None:
        attach_aux_loss(model)  # also reached by inject_adapter_in_model (transformers' load_adapter)

    def router_aux_loss(self, attention_mask: Optional[Any] = None):
        """The load-balancing loss of the last forward (see :func:`esft_peft.tuners.pesc.loss.router_aux_loss`)."""
        return router_aux_loss(self, attention_mask=attention_mask)

    # ------------------------------------------------------------------------------------------------ merging

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise ValueError(NO_MERGE)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(NO_MERGE)

    def merge_lora(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Fold the LoRA part of ``adapter_names`` (default: the active adapters) into the dense weights and remove
        the LoRA layers; routers and adapter experts stay. The adapters' configs then record ``lora_r=0``, so that
        ``save_pretrained`` writes a PESC-only adapter for the merged base (save that with ``unload()``)."""
        names = list(adapter_names or self.active_adapters)
        missing = [name for name in names if name not in self.peft_config]
        if missing:
            raise ValueError(f"Unknown adapters {missing}; available: {sorted(self.peft_config)}.")
        layers = [(name, m) for name, m in self.model.named_modules() if isinstance(m, LoraLayer)]
        held = {adapter for _, layer in layers for adapter in layer.lora_A}
        if not held & set(names):
            raise ValueError(f"Adapters {names} have no LoRA part to merge (lora_r=0).")
        others = sorted(held - set(names))
        if others:
            raise ValueError(
                f"The LoRA layers also hold adapters {others}; merging {names} would remove their LoRA weights. "
                "Delete those adapters first (delete_adapter) or merge them too."
            )
        for name, layer in reversed(layers):
            layer.merge(safe_merge=safe_merge, adapter_names=names)
            parent, _, child_name = _get_submodules(self.model, name)
            setattr(parent, child_name, layer.get_base_layer())
        for name in names:
            self.peft_config[name].lora_r = 0
            self.peft_config[name].lora_target_modules = None

    def unload(self) -> nn.Module:
        """The dense base model without any PESC or LoRA layer (LoRA weights not merged)."""
        for kind in (LoraLayer, PESCLayer):
            layers = [name for name, m in self.model.named_modules() if isinstance(m, kind)]
            for name in reversed(layers):
                parent, layer, child_name = _get_submodules(self.model, name)
                setattr(parent, child_name, layer.get_base_layer())
        detach_aux_loss(self.model)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model
