"""``ESFTModel``: the peft tuner that injects ESFT delta layers."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from . import expert_parallel
from .config import ESFTConfig
from .layer import ESFTLayer, ExpertsDeltaLayer, ModuleDeltaLayer
from ..saved_checks import SavedTensorChecks
from .mixed_batch import mixed_adapter_batch
from .quantized import check_quantized_base, dequantized_linear, is_bnb_quantized, quantize_frozen_experts
from .compute.fused import hold_dequantized
from .targets import Target, plan_targets


class ESFTModel(SavedTensorChecks, BaseTuner):
    """Creates an ESFT model: the selected routed experts (and optional extra modules) get trainable deltas.

    Use it through peft: ``get_peft_model(model, ESFTConfig(experts={1: [8, 26]}))``. ``plans`` holds, per adapter,
    the modules its injection wraps; a loaded adapter's tensors are checked in peft's load hook
    (:class:`~esft_peft.tuners.saved_checks.SavedTensorChecks`).
    """

    prefix: str = "esft_"
    tuner_layer_cls = ESFTLayer
    target_module_mapping: dict[str, list[str]] = {}
    base_record_fields = ("base_model_type", "base_layout")

    @property
    def plans(self) -> dict[str, dict[str, Target]]:
        """Adapter name -> module name -> how the module is wrapped (validated against the model at injection)."""
        return self.__dict__.setdefault("_plans", {})

    def _prepare_adapter_config(self, peft_config: ESFTConfig, model_config: dict) -> ESFTConfig:
        plan = plan_targets(self.model, peft_config)
        self._four_bit = check_quantized_base(
            self.model, peft_config.quantize_frozen_experts, {name: (t.layout, t.expert_ids) for name, t in plan.items()}
        )
        self.plans[self._injecting] = plan
        return peft_config

    def _check_target_module_exists(self, peft_config: ESFTConfig, key: str) -> bool:
        return key in self.plans[self._injecting]

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key) -> None:
        spec = self.plans[adapter_name][current_key]
        # low-rank deltas (delta_rank) go to routed experts only: shared experts, routers, other modules stay full rank
        rank = dict(rank=peft_config.delta_rank, alpha=peft_config.delta_alpha) if spec.routed else {}
        if isinstance(target, ESFTLayer):
            target.update_layer(adapter_name, list(spec.expert_ids), init_weights=peft_config.init_weights, **rank)
            return
        if spec.layout is None:
            if is_bnb_quantized(target):  # a Linear4bit the module-delta layer trains: dequantized once, exactly
                target = dequantized_linear(target)
            new_module = ModuleDeltaLayer(target, adapter_name, init_weights=peft_config.init_weights, **rank)
        else:
            new_module = ExpertsDeltaLayer(
                target, spec.layout, adapter_name, list(spec.expert_ids), init_weights=peft_config.init_weights,
                shard=expert_parallel.expert_shard(target), **rank,
            )
            four_bit = getattr(self, "_four_bit", None)  # the base's 4-bit settings (quantized.py), or None
            if four_bit is not None and spec.layout.kind == "fused":
                store = quantize_frozen_experts(target, spec.layout, list(spec.expert_ids), four_bit)
                hold_dequantized(target, store)
        new_module.grad_sync = self._grad_sync(new_module)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # Needed: peft's version copies `child.weight` onto the unwrapped module in unload()/merge_and_unload(),
        # and experts containers have no `.weight` (AttributeError). Deltas are created on the base's device.
        setattr(parent, child_name, new_module)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        # peft's hooks receive the config, not the adapter name; one config object may serve several adapters.
        self._injecting = adapter_name
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:
            self.plans.pop(adapter_name, None)
            raise
        finally:
            del self._injecting
            self.__dict__.pop("_four_bit", None)
        if expert_parallel.data_parallel_size(model) > 1:  # the deltas become DTensors (expert_parallel.py)
            mesh = expert_parallel.delta_mesh(model)
            for module in model.modules():
                if isinstance(module, ESFTLayer):
                    expert_parallel.distribute_layer(module, adapter_name, mesh)

    def _grad_sync(self, layer: ESFTLayer) -> Any:
        """How ``layer``'s deltas join the backward on a data-parallel model sharded by transformers (None otherwise):
        sharded expert rows are scaled, replicated deltas averaged after each backward (one averaging per model)."""
        size = expert_parallel.data_parallel_size(self.model)
        if size == 1:
            return None
        if getattr(layer, "expert_shard", None) is not None:
            return expert_parallel.ExpertRowGradients(size)
        if "_replicated_gradients" not in self.__dict__:
            self.__dict__["_replicated_gradients"] = expert_parallel.replicated_sync(self.model)
        return self.__dict__["_replicated_gradients"]

    @classmethod
    def _shard_loaded(cls, model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
        """A whole saved adapter loaded onto a data-parallel sharded model: DTensors holding each rank's rows."""
        for name, module in model.named_modules():
            if isinstance(module, ESFTLayer):
                expert_parallel.distribute_loaded(module, state_dict, f"{name}.")

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        if expert_parallel.data_parallel_size(self.model) > 1:  # merges write FSDP2's sharded parameters
            expert_parallel.reshard_all(self.model)
        return super()._unload_and_optionally_merge(*args, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.plans.pop(adapter_name, None)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """peft calls this around forward/generate: ``adapter_names=[...]`` runs each sample with its own adapter
        (``"__base__"``: none), exactly as a batch of the samples that use that adapter (see ``mixed_batch.py``)."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        router_logits = kwargs.get("output_router_logits")
        if router_logits is None:
            router_logits = getattr(getattr(self.model, "config", None), "output_router_logits", False)
        if router_logits:
            raise ValueError(
                "Cannot pass `adapter_names` together with output_router_logits=True: the router runs once per group "
                "of samples sharing an adapter, so its logits would not be per sample. Run one adapter per batch "
                "to get router logits."
            )
        if expert_parallel.data_parallel_size(self.model) > 1:
            raise ValueError(
                "Cannot pass `adapter_names` on a model sharded by transformers (distributed_config): each group of "
                "samples sharing an adapter runs its own forward, and the ranks' forwards are collectives that "
                "must match. Run one adapter per batch (model.set_adapter)."
            )
        with mixed_adapter_batch(self, adapter_names, set(self.peft_config), kwargs.get("num_beams")):
            yield

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Combine ESFT adapters into a new one: per expert, the weighted sum of the deltas of the adapters that
        train it (with weight 1, disjoint expert sets give their exact union). The new adapter has full-rank deltas:
        a weighted sum of low-rank updates (``delta_rank``) is not of their rank in general, so low-rank adapters are
        combined exactly as the dense sum of their ``s * B @ A``.
        """
        if len(adapters) != len(weights) or not adapters:
            raise ValueError("Give one weight per adapter (at least one adapter).")
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists.")
        missing = [name for name in adapters if name not in self.peft_config]
        if missing:
            raise ValueError(f"Unknown adapters {missing}; available: {sorted(self.peft_config)}.")
        configs = [self.peft_config[name] for name in adapters]
        if not all(isinstance(config, ESFTConfig) for config in configs):
            raise ValueError("add_weighted_adapter combines ESFT adapters only.")
        experts: dict[str, list[int]] = {}
        for config in configs:
            for layer, ids in config.experts.items():
                experts.setdefault(layer, [])
                experts[layer] += [e for e in ids if e not in experts[layer]]
        non_expert = [config.train_non_expert_modules for config in configs]
        combined = ESFTConfig(
            experts=experts,
            train_shared_experts=any(config.train_shared_experts for config in configs),
            train_non_expert_modules=True
            if any(value is True for value in non_expert)
            else sorted({name for value in non_expert if value for name in value}) or False,
            train_router=any(config.train_router for config in configs),
            base_model_name_or_path=configs[0].base_model_name_or_path,
            inference_mode=configs[0].inference_mode,
        )
        self.peft_config[adapter_name] = combined
        self.inject_adapter(self.model, adapter_name)
        with torch.no_grad():
            for module in self.model.modules():
                if isinstance(module, ESFTLayer) and adapter_name in module.esft_delta:
                    _fill_weighted(module, adapters, weights, adapter_name)
        self.set_adapter(self.active_adapters)


def _fill_weighted(module: ESFTLayer, adapters: list[str], weights: list[float], target: str) -> None:
    sources = [(name, weight) for name, weight in zip(adapters, weights) if name in module.esft_delta]
    names, factors = [name for name, _ in sources], [weight for _, weight in sources]
    if isinstance(module, ExpertsDeltaLayer):
        ids, values = module.combined_deltas(names, factors)
        if ids != module.esft_expert_ids[target]:
            raise RuntimeError(f"Combined expert order {ids} differs from the new adapter's {module.esft_expert_ids[target]}.")
    else:
        values = module.combined_deltas(names, factors)
    for param, value in values.items():
        module.esft_delta[target][param] = nn.Parameter(value.detach().clone(), requires_grad=False)
