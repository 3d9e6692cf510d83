"""``PESCModel``: the peft tuner that crafts a dense model into a mixture of adapter experts, with the paper's
optional LoRA part on the dense linears (peft's own LoRA layers, bitsandbytes included, through its dispatch)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator, Optional

from peft import LoraConfig
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.tuners_utils import BaseTuner, get_device_map
from peft.utils import AuxiliaryTrainingWrapper, _get_submodules
from torch import nn

from ..data_parallel import broadcast_replicated, check_supported_parallelism, data_parallel_size, replicated_sync
from ..mixed_batch_common import beam_expanded, check_adapter_names
from ..saved_checks import SavedTensorChecks, adapter_parameters
from .config import ALL_LINEAR, PESCConfig
from .layer import PESCLayer, require_grouped_mm
from .loss import attach_routing_record, aux_loss_of_record, detach_routing_record, routing_record
from .targets import MLPTarget, Plan, plan_targets

logger = logging.getLogger(__name__)

# saved key segment -> today's, for files of releases before the pesc_ prefix
LEGACY_SEGMENTS = {"lora_pesc_router": "pesc_router", "lora_pesc_down": "pesc_down", "lora_pesc_up": "pesc_up",
                   "lora_A": "pesc_lora_A", "lora_B": "pesc_lora_B"}
# the LoRA part's containers (peft's LoRA layers) -> their registered names under PESC's prefix
LORA_SEGMENTS = {"lora_A": "pesc_lora_A", "lora_B": "pesc_lora_B"}
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
        init_lora_weights=config.init_weights,
    )


def _renamed(key: str, segments: dict[str, str]) -> str:
    return ".".join(segments.get(part, part) for part in key.split("."))


def legacy_key(key: str) -> str:
    """A saved key of a release before the ``pesc_`` prefix (``<mlp>.lora_pesc_down``, ``<linear>.lora_A.weight``)
    in today's form."""
    return _renamed(key, LEGACY_SEGMENTS)


def own_lora_containers(layer: LoraLayer) -> None:
    """Register a LoRA layer's ``lora_A``/``lora_B`` under PESC's prefix (``pesc_lora_A``/``pesc_lora_B``): parameter
    names, saved keys and transformers' loading (which names weights by the method's prefix) then all read ``pesc_``.
    peft's LoRA code keeps reaching the same ModuleDicts as ``layer.lora_A``/``layer.lora_B`` (plain attributes)."""
    for name, own in LORA_SEGMENTS.items():
        if name in layer._modules:
            container = layer._modules.pop(name)
            layer._modules[own] = container
            layer.__dict__[name] = container


def _inject_names(module: nn.Module, args: tuple, kwargs: dict, names: list[str]) -> tuple[tuple, dict]:
    return args, {**kwargs, "adapter_names": names}


class PESCModel(SavedTensorChecks, BaseTuner):
    """Creates a PESC model: each upcycled MLP gets a router and adapter experts; optionally, LoRA on the dense
    linears. Use it through peft: ``get_peft_model(model, PESCConfig(num_experts=8, top_k=2, adapter_dim=64))``.
    """

    prefix: str = "pesc_"
    tuner_layer_cls = (PESCLayer, LoraLayer)  # set_adapter/delete_adapter reach both kinds of layers
    target_module_mapping: dict[str, list[str]] = {}

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Plan the adapter's targets (one plan per adapter, kept on the tuner; the config stays plain data), then
        let peft inject it."""
        require_grouped_mm()
        check_supported_parallelism(model, "PESC")
        plans: dict[str, Plan] = vars(self).setdefault("plans", {})  # set before BaseTuner.__init__ returns
        plans[adapter_name] = plan_targets(model, self.peft_config[adapter_name])
        self._injecting = adapter_name  # the adapter whose plan _check_target_module_exists reads
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            self._injecting = None
        if data_parallel_size(model) > 1:  # FSDP2 (transformers-native) leaves the adapter's tensors to the tuner
            params = list(adapter_parameters(model, adapter_name).values())
            broadcast_replicated(params)
            sync = vars(self).setdefault("_replicated_gradients", replicated_sync(model))
            sync.watch([param for param in params if param.requires_grad])
        # record routing for the aux loss (also on this path: inject_adapter_in_model, where no tuner outlives it)
        attach_routing_record(model, self._model_aux_loss)

    def _prepare_adapter_config(self, peft_config: PESCConfig, model_config: dict) -> PESCConfig:
        return peft_config  # targets come from the adapter's plan (inject_adapter), not from peft's mapping

    def _check_target_module_exists(self, peft_config: PESCConfig, key: str) -> bool:
        plan = self.plans[self._injecting]
        return key in plan.mlps or (key in plan.lora and plan.lora[key] is None)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **_) -> None:
        plan = self.plans[adapter_name]
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
            target.update_layer(adapter_name, init_weights=config.init_weights, **settings)
            return
        new_module = PESCLayer(target, adapter_name, spec.hidden_size, init_weights=config.init_weights, **settings)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        setattr(parent, target_name, new_module)

    def _add_lora(self, config: PESCConfig, adapter_name: str, key: str) -> None:
        lora_config = lora_config_of(config)
        parent, target, target_name = _get_submodules(self.model, key)
        if isinstance(target, LoraLayer):
            target.update_layer(adapter_name, config.lora_r, lora_alpha=config.lora_alpha, config=lora_config,
                                init_lora_weights=config.init_weights, target_name=key)
            return
        kwargs = {
            "r": config.lora_r, "lora_alpha": config.lora_alpha, "target_name": key,
            "loaded_in_8bit": getattr(self.model, "is_loaded_in_8bit", False),
            "loaded_in_4bit": getattr(self.model, "is_loaded_in_4bit", False),
        }
        new_module = LoraModel._create_new_module(
            lora_config, adapter_name, target, device_map=get_device_map(self.model), **kwargs
        )
        own_lora_containers(new_module)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        setattr(parent, target_name, new_module)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # peft's version copies `child.weight` onto unwrapped modules; an MLP has none.
        setattr(parent, child_name, new_module)

    @staticmethod
    def _model_aux_loss(model: nn.Module, attention_mask: Optional[Any] = None):
        """What the forward hook adds to ``outputs.loss``: :meth:`_get_router_aux_loss` of ``model``."""
        return aux_loss_of_record(routing_record(model), getattr(model, "peft_config", {}) or {},
                                  attention_mask=attention_mask)

    def _get_router_aux_loss(self, adapter_names: Optional[list[str]] = None, attention_mask: Optional[Any] = None):
        """The load-balancing loss ``sum_a alpha_a * mean_layers(E * sum_i f_i * P_i)`` of the last forward, over
        ``adapter_names`` (default: every adapter that routed), as LoRA exposes its extra losses (e.g.
        ``_get_kasa_loss``). The forward adds it to ``outputs.loss`` when labels are given; call it in custom loops.
        ``attention_mask`` (B, S) leaves padding out. None when nothing was routed or every coefficient is 0."""
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        return aux_loss_of_record(routing_record(self.model), self.peft_config, adapter_names, attention_mask)

    def router_aux_loss(self, attention_mask: Optional[Any] = None):
        """The load-balancing loss of the last forward: :meth:`_get_router_aux_loss` of every adapter that routed."""
        return self._get_router_aux_loss(attention_mask=attention_mask)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Adapters saved before PESC had its own prefix keep loading: ``lora_pesc_*`` keys read as ``pesc_*``."""
        state_dict = {legacy_key(key): value for key, value in state_dict.items()}
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.plans.pop(adapter_name, None)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """peft calls this around forward/generate: ``adapter_names=[...]`` runs sample ``i`` with adapter
        ``adapter_names[i]`` (``"__base__"``: none), as peft's LoRA does: every PESC layer, LoRA layer of the LoRA
        part and ``modules_to_save`` wrapper gets the names and splits its rows by sample."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        names = beam_expanded(check_adapter_names(adapter_names, set(self.peft_config)), kwargs.get("num_beams"))
        handles = []
        try:
            for module in self.modules():
                if isinstance(module, (PESCLayer, LoraLayer, AuxiliaryTrainingWrapper)):
                    handles.append(module.register_forward_pre_hook(partial(_inject_names, names=names),
                                                                    with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

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
        detach_routing_record(self.model)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model
