"""Checks of a saved adapter's tensors where peft holds them, before any of them is copied into the model.

peft's load path (``PeftModel.load_adapter`` -> ``set_peft_model_state_dict``, and transformers' ``load_adapter``)
hands the checkpoint to the tuner class's ``_remap_adapter_state_dict_for_load`` before ``load_state_dict``.
:class:`SavedTensorChecks` overrides that hook for the ESFT and PESC tuners: the tensors must be floating point and
finite, and their names and shapes must be exactly the adapter parameters the injection created for this config.
A failed check removes the adapter that was being loaded when it came from a saved config, so the model is left as
it was, and raises with the tensor's name.

The file itself (safetensors only, header sound, size as the header says) is checked by the configs'
``from_pretrained``, which reads the header only: peft's loader would otherwise fail on it with safetensors' own
message, or unpickle a ``.bin`` file.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ..files import CorruptAdapterError

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
_WIDTH = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def check_base_model_type(recorded: Optional[str], model: nn.Module, method: str) -> None:
    """A saved adapter's ``base_model_type`` must be the model's ``model_type`` (checked at injection, first)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if recorded is not None and model_type is not None and recorded != model_type:
        raise ValueError(
            f"This {method} adapter was created for a '{recorded}' model, but the base model is '{model_type}'. Load "
            "it onto the base model it was trained on; no weights were loaded."
        )


def adapter_parameters(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """State-dict key -> tensor of every parameter the tuner layers of ``model`` hold for ``adapter_name`` (the
    containers named by each layer's ``adapter_layer_names``, peft's convention)."""
    found: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        registered = {id(child): child_name for child_name, child in module.named_children()}
        for container_name in module.adapter_layer_names:
            container = getattr(module, container_name, None)
            if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in container:
                continue
            item = container[adapter_name]
            # the name the container is registered under (PESC registers LoRA's lora_A as pesc_lora_A)
            prefix = f"{name}.{registered.get(id(container), container_name)}.{adapter_name}"
            if isinstance(item, nn.Module):
                found.update({f"{prefix}.{key}": value for key, value in item.state_dict(keep_vars=True).items()})
            else:
                found[prefix] = item
    return found


def _auxiliary_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Names of peft's auxiliary wrappers (``modules_to_save``), whose tensors a checkpoint may also hold."""
    return tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, AuxiliaryTrainingWrapper))


def check_loaded_tensors(
    model: nn.Module, adapter_name: str, remapped: dict[str, torch.Tensor], checkpoint_key: Any
) -> None:
    """Compare a checkpoint (keys already mapped to model keys) with the parameters of ``adapter_name``.

    ``checkpoint_key`` turns a model key back into the key the file uses (for messages).

    Raises:
        CorruptAdapterError: a tensor that is not floating point, or NaN/inf values.
        ValueError: tensors the config does not list, listed tensors the file lacks, or a shape that differs.
    """
    bad = {key: tensor.dtype for key, tensor in remapped.items() if not tensor.is_floating_point()}
    if bad:
        key, dtype = next(iter(bad.items()))
        raise CorruptAdapterError(
            f"{len(bad)} tensor(s) of the adapter file are not floating point (e.g. {checkpoint_key(key)} is "
            f"{str(dtype).removeprefix('torch.')}); adapter weights are float tensors. The file is not an adapter of "
            "this kind, or was written wrongly; re-save it with save_pretrained."
        )
    counts = {key: int((~torch.isfinite(tensor)).sum()) for key, tensor in remapped.items()}
    counts = {key: count for key, count in counts.items() if count}
    if counts:
        key, count = next(iter(counts.items()))
        raise CorruptAdapterError(
            f"The adapter file holds {sum(counts.values())} NaN/inf value(s) in {len(counts)} tensor(s) (e.g. {count} "
            f"in {checkpoint_key(key)}). The adapter's training diverged or the file is damaged; loading it would give "
            "NaN outputs. Retrain (lower the learning rate) or use an earlier checkpoint."
        )
    expected = adapter_parameters(model, adapter_name)
    auxiliary = _auxiliary_prefixes(model)
    unlisted = [
        key for key in remapped
        if key not in expected and not (key.startswith(auxiliary) or f"{PEFT_PREFIX}{key}".startswith(auxiliary))
    ]
    if unlisted:
        raise ValueError(
            f"The adapter file holds {len(unlisted)} tensor(s) its config does not list (e.g. {unlisted[0]}). The "
            "weights do not belong to this adapter_config.json, or the config was edited; re-save the adapter."
        )
    missing = [key for key in expected if key not in remapped]
    if missing:
        raise ValueError(
            f"The adapter file lacks {len(missing)} tensor(s) its config lists (e.g. {checkpoint_key(missing[0])}); it "
            "is incomplete. Re-save the adapter."
        )
    cast = set()
    for key, param in expected.items():
        saved = remapped[key]
        if tuple(saved.shape) != tuple(param.shape):
            raise ValueError(
                f"{checkpoint_key(key)} has shape {tuple(saved.shape)} in the adapter file, but this base model and the "
                f"adapter config need {tuple(param.shape)}. The adapter belongs to another base model; no weights were "
                "loaded."
            )
        if saved.dtype != param.dtype:
            cast.add((saved.dtype, param.dtype))
    for saved_dtype, model_dtype in sorted(cast, key=str):
        exact = _WIDTH.get(model_dtype, 0) > _WIDTH.get(saved_dtype, 0)
        logger.warning(
            "The adapter's weights were saved in %s and are cast to the base model's %s on loading%s.",
            str(saved_dtype).removeprefix("torch."), str(model_dtype).removeprefix("torch."),
            " (exact)" if exact else " (rounded); load the base in the adapter's dtype to use them exactly",
        )


class SavedTensorChecks:
    """Mixin for a :class:`~peft.tuners.tuners_utils.BaseTuner`: checks every saved tensor in peft's load hook,
    before it is copied into the model.

    ``base_record_fields`` name the config fields that record the base model at injection; a config that has one
    before its injection came from a saved adapter, so its layers exist for a load, and a failed load removes them.
    """

    base_record_fields: tuple[str, ...] = ("base_model_type",)

    @property
    def adapters_from_saved_configs(self) -> set[str]:
        """Adapters injected from a saved adapter's config whose weights have not been loaded yet."""
        return self.__dict__.setdefault("_adapters_from_saved_configs", set())

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        config = self.peft_config[adapter_name]
        from_saved = any(getattr(config, name, None) is not None for name in self.base_record_fields)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if from_saved:
            self.adapters_from_saved_configs.add(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.adapters_from_saved_configs.discard(adapter_name)

    @classmethod
    def _shard_loaded(cls, model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
        """Turn whole saved tensors (checked) into what this process holds (DTensors on a model sharded by
        transformers), in place; before peft distributes DTensor values its own way."""

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        try:
            check_loaded_tensors(
                model, adapter_name, remapped, lambda key: cls._remove_adapter_name_from_key(key, adapter_name)
            )
        except ValueError:
            _drop_loaded_adapter(model, adapter_name)
            raise
        cls._shard_loaded(model, adapter_name, remapped)
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, SavedTensorChecks):
            tuner.adapters_from_saved_configs.discard(adapter_name)
        return remapped


def _drop_loaded_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove the adapter a failed load was filling, so that the model is as before the load.

    Only an adapter whose config came from a saved adapter (it recorded its base before injection, so its layers
    were created for this load) is removed; an adapter the user created keeps its weights. Outside a
    :class:`~peft.PeftModel` (transformers' integration) nothing is removed.
    """
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, SavedTensorChecks) or adapter_name not in tuner.adapters_from_saved_configs:
        return
    if set(tuner.peft_config) == {adapter_name}:
        tuner.unload()
    else:
        tuner.delete_adapter(adapter_name)
