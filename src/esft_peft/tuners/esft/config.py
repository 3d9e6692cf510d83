"""``ESFTConfig``: which experts of which MoE layers an ESFT adapter trains."""

from __future__ import annotations

import json
import operator
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ...moe.layer_keys import normalize_layer_key, sorted_layer_keys

PEFT_TYPE_NAME = "ESFT"
EXPERT_CONFIG_KEYS = ("experts", "shared_experts", "non_expert_modules", "num_experts")
EXPERT_CONFIG_EXAMPLE = '{"experts": {"1": [8, 26]}, "shared_experts": false, "non_expert_modules": false}'
ExpertMap = dict[Union[int, str], list[int]]


def normalize_counts(counts: Any, source: str = "`scored_num_experts`") -> dict[str, int]:
    """Validate a layer -> expert count mapping (positive ints) and make the keys layer-key strings."""
    if not isinstance(counts, dict) or not all(
        hasattr(v, "__index__") and not isinstance(v, bool) and operator.index(v) > 0 for v in counts.values()
    ):
        raise ValueError(f"{source} must map layer -> expert count (positive integers), got {counts!r}.")
    return {normalize_layer_key(key): operator.index(value) for key, value in counts.items()}


def normalize_experts(experts: ExpertMap) -> dict[str, list[int]]:
    """Validate the per-layer expert lists (order kept) and make the keys JSON-friendly strings, in model order."""
    if not isinstance(experts, dict):
        raise ValueError(f"`experts` must map layer index -> list of expert ids, got {type(experts).__name__}.")
    normalized: dict[str, list[int]] = {}
    for key, ids in experts.items():
        layer = normalize_layer_key(key)
        if layer in normalized:
            raise ValueError(f"Layer {layer} appears twice in `experts` (keys {key!r} and another spelling).")
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise ValueError(f"Layer {layer}: expert ids must be a list of ints, got {ids!r}.")
        ids = list(ids)
        if not ids:
            raise ValueError(f"Layer {layer}: empty expert selection. Remove the layer or select at least one expert.")
        bad = [i for i in ids if isinstance(i, bool) or not hasattr(i, "__index__") or operator.index(i) < 0]
        if bad:
            raise ValueError(f"Layer {layer}: invalid expert ids {bad}; ids must be non-negative integers.")
        ids = [operator.index(i) for i in ids]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"Layer {layer}: duplicate expert ids {duplicates}.")
        normalized[layer] = ids
    return {layer: normalized[layer] for layer in sorted_layer_keys(normalized)}


@dataclass
class ESFTConfig(PeftConfig):
    """Configuration of an Expert-Specialized Fine-Tuning adapter.

    Args:
        experts: Decoder-layer index -> routed-expert ids to train (the official ESFT expert-config indices).
            Int or str keys are accepted; they are stored as strings. Order is kept (official configs list
            experts by descending relevance) and fixes the row order of the saved deltas.
        train_shared_experts: Also train the always-on shared experts of the listed layers (paper, Table 3).
        train_non_expert_modules: ``True`` also trains every non-expert module with parameters inside the
            decoder stack (attention, norms, dense MLPs) and the final norm; a list of module-name suffixes
            selects modules explicitly. Embeddings and the LM head are only trained when named explicitly.
        train_router: Also train the routers (gates) of the listed layers. Frozen by default, as in the paper.
        modules_to_save: peft's usual list of extra modules to train and save in full (e.g. a new head).
        base_model_type: ``model_type`` of the base the adapter was created on (filled at injection, checked on load).
        base_layout: Per listed layer, the expert count and per-expert parameter shapes of the base (filled at
            injection, checked on load so that an adapter for another base fails before weights are touched).
        scored_num_experts: Per listed layer, the expert count of the model the selection was scored on (filled from
            an ``ExpertSelection``, i.e. ``ExpertScores.select(...)``, or from the ``"num_experts"`` of an expert
            config written by ``esft-peft select``; ``None`` when unknown). Checked at injection before the expert
            ids, so that a selection scored on another model says so.
        target_modules: Not used by ESFT (modules follow from ``experts``); must stay ``None``.
        init_weights: peft's convention: ``True`` (default) starts every delta at zero, so the adapter model
            reproduces the base exactly; ``False`` draws random deltas (normal, with std equal to the RMS of the base
            weights they update), so that an untrained adapter changes the outputs. For tests and debugging only.
        delta_rank: ``None`` (default): full-rank deltas, one dense copy per selected expert matrix. An int ``r``:
            low-rank deltas, each selected expert's matrix ``W[e]`` (routed experts only, fused or ModuleList) is
            updated by ``s * B[e] @ A[e]`` with ``A`` (r, in) kaiming-uniform and ``B`` (out, r) zero at the start
            (peft's LoRA init, so a fresh adapter is exact). Expert biases are not trained under low rank; shared
            experts, routers and non-expert modules keep full-rank deltas.
        delta_alpha: the scale ``s = delta_alpha / delta_rank`` of low-rank deltas (peft's ``lora_alpha``); default
            ``delta_rank`` (``s = 1``). Only with ``delta_rank``.
        quantize_frozen_experts: On a base loaded with ``BitsAndBytesConfig(load_in_4bit=True)`` (whose fused
            experts transformers leaves unquantized), hold the routed experts the adapter does not select in 4-bit,
            with the base's bitsandbytes settings; the selected experts keep their original weights and train as
            ``W + delta``. The first adapter's selection is kept exact; later adapters select among it. ``False``
            keeps the experts as loaded. No effect on other bases; an 8-bit base needs ``False``
            (docs/training.md, "Quantized bases").
    """

    experts: dict[str, list[int]] = field(default_factory=dict, metadata={"help": "layer index -> expert ids"})
    train_shared_experts: bool = field(default=False, metadata={"help": "also train shared experts"})
    train_non_expert_modules: Union[bool, list[str]] = field(
        default=False, metadata={"help": "also train non-expert modules (True or module-name suffixes)"}
    )
    train_router: bool = field(default=False, metadata={"help": "also train the routers of the listed layers"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "extra modules trained in full"})
    base_model_type: Optional[str] = field(default=None, metadata={"help": "filled at injection"})
    base_layout: Optional[dict[str, Any]] = field(default=None, metadata={"help": "filled at injection"})
    scored_num_experts: Optional[dict[str, int]] = field(
        default=None, metadata={"help": "layer -> expert count of the model the selection was scored on"}
    )
    target_modules: Optional[list[str]] = field(default=None, metadata={"help": "unused by ESFT; keep None"})
    init_weights: bool = field(
        default=True, metadata={"help": "True: zero deltas (identity); False: random deltas, for tests"}
    )
    delta_rank: Optional[int] = field(
        default=None, metadata={"help": "None: full-rank deltas; r: low-rank deltas s * B @ A of the selected experts"}
    )
    delta_alpha: Optional[float] = field(
        default=None, metadata={"help": "scale numerator of low-rank deltas, s = delta_alpha / delta_rank (default r)"}
    )
    quantize_frozen_experts: bool = field(
        default=True, metadata={"help": "on a 4-bit (bitsandbytes) base, hold the unselected fused experts in 4-bit"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType(PEFT_TYPE_NAME)
        if self.scored_num_experts is None:  # an ExpertScores selection records its model's expert counts
            self.scored_num_experts = getattr(self.experts, "num_experts", None) or None
        if self.scored_num_experts is not None:
            self.scored_num_experts = normalize_counts(self.scored_num_experts)
        self.experts = normalize_experts(self.experts)
        if not self.experts:
            raise ValueError("ESFTConfig needs at least one layer in `experts`, e.g. ESFTConfig(experts={1: [0, 3]}).")
        if self.target_modules is not None:
            raise ValueError("ESFTConfig does not use `target_modules`; the wrapped modules follow from `experts`.")
        if not isinstance(self.train_non_expert_modules, bool):
            names = self.train_non_expert_modules
            if isinstance(names, str) or not all(isinstance(name, str) and name for name in names):
                raise ValueError("`train_non_expert_modules` must be a bool or a list of module-name suffixes.")
            self.train_non_expert_modules = list(names)
        if not isinstance(self.quantize_frozen_experts, bool):
            raise ValueError(f"`quantize_frozen_experts` must be True or False, got {self.quantize_frozen_experts!r}.")
        if not isinstance(self.init_weights, bool):
            raise ValueError(
                f"`init_weights` must be True (zero deltas) or False (random deltas, for tests), got {self.init_weights!r}."
            )
        self._check_low_rank()

    def _check_low_rank(self) -> None:
        """``delta_rank``: None or a positive int; ``delta_alpha``: a positive number, only with a rank (default: the
        rank)."""
        rank, alpha = self.delta_rank, self.delta_alpha
        if rank is not None and (isinstance(rank, bool) or not hasattr(rank, "__index__") or operator.index(rank) <= 0):
            raise ValueError(f"`delta_rank` must be None (full-rank deltas) or a positive integer, got {rank!r}.")
        if rank is None:
            if alpha is not None:
                raise ValueError(
                    f"`delta_alpha` ({alpha!r}) scales low-rank deltas; set `delta_rank` too, or leave both None."
                )
            return
        self.delta_rank = operator.index(rank)
        if alpha is None:
            self.delta_alpha = self.delta_rank
        elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"`delta_alpha` must be a positive number (scale = delta_alpha / delta_rank), got {alpha!r}.")

    @property
    def num_selected_experts(self) -> int:
        return sum(len(ids) for ids in self.experts.values())

    @classmethod
    def from_expert_config(cls, path_or_dict: Union[str, os.PathLike, dict], **kwargs: Any) -> "ESFTConfig":
        """Build a config from the official ESFT expert-config format.

        The format is ``{"experts": {"1": [8, 26], ...}, "shared_experts": false, "non_expert_modules": false}``
        (a path to such a JSON file or the dict itself). Layers with an empty list (how the authors' code marks
        untrained layers) are dropped. ``"num_experts"`` (written by ``esft-peft select``) records the expert
        counts of the model the selection was scored on (``scored_num_experts``, checked at injection). Extra
        keyword arguments go to ``ESFTConfig``.

        Raises:
            ValueError: naming the file, for unreadable JSON, a wrong structure or non-boolean flags.
        """
        source = "the expert config" if isinstance(path_or_dict, dict) else str(path_or_dict)
        if isinstance(path_or_dict, dict):
            data = path_or_dict
        else:
            try:
                data = json.loads(Path(path_or_dict).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(
                    f"{source} is not valid JSON ({error}). An ESFT expert config looks like {EXPERT_CONFIG_EXAMPLE}."
                ) from None
        if not isinstance(data, dict) or not isinstance(data.get("experts"), dict):
            raise ValueError(
                f"{source} is not an ESFT expert config: expected a JSON object with an 'experts' mapping "
                f"(e.g. {EXPERT_CONFIG_EXAMPLE})."
            )
        unknown = set(data) - set(EXPERT_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown keys {sorted(unknown)}; an ESFT expert config has {EXPERT_CONFIG_KEYS}.")
        experts = {layer: ids for layer, ids in data["experts"].items() if not _is_empty_list(ids)}
        if not experts:
            raise ValueError(f"{source} selects no experts in any layer; select at least one expert.")
        counts = data.get("num_experts")
        if counts is not None:
            kwargs.setdefault("scored_num_experts", normalize_counts(counts, f"{source}: 'num_experts'"))
        try:
            config = cls(
                experts=experts,
                train_shared_experts=_strict_bool(data.get("shared_experts", False), "shared_experts", source),
                train_non_expert_modules=_strict_bool(data.get("non_expert_modules", False), "non_expert_modules",
                                                      source),
                **kwargs,
            )
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
        return config

    def to_expert_config(self) -> dict[str, Any]:
        """Return the selection in the official ESFT expert-config format (plus the scored model's expert counts,
        when the selection came from expert scores)."""
        if not isinstance(self.train_non_expert_modules, bool):
            raise ValueError("The official format only records non_expert_modules as a bool; this config lists modules.")
        data = {
            "experts": {layer: list(ids) for layer, ids in self.experts.items()},
            "shared_experts": self.train_shared_experts,
            "non_expert_modules": self.train_non_expert_modules,
        }
        if self.scored_num_experts:
            data["num_experts"] = dict(self.scored_num_experts)
        return data

    def save_expert_config(self, path: Union[str, os.PathLike]) -> None:
        """Write :meth:`to_expert_config` as JSON (atomically)."""
        from ...files import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_expert_config(), indent=2))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any):
        """Load ``adapter_config.json``; refuse a weights file peft's loader cannot read safely (pickle only,
        truncated, unreadable header: the header is read, no tensor is), and weights whose config has no base record.

        The tensors themselves are checked against the model where peft holds them, before they are copied
        (:mod:`esft_peft.tuners.saved_checks`).
        """
        from ...files import check_adapter_file

        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        hub_kwargs, _, _ = cls._split_kwargs(kwargs)
        found = check_adapter_file(pretrained_model_name_or_path, subfolder=subfolder, **hub_kwargs)
        if found is not None and not config.base_layout:
            raise ValueError(
                f"{pretrained_model_name_or_path}: adapter_config.json has no `base_layout`, so the adapter cannot be "
                "checked against a base model. It was not written by esft-peft's save_pretrained (or the field was "
                "removed): re-save it with esft-peft, or import an official ESFT adapter with "
                "`esft-peft convert --from-official`."
            )
        return config

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs: Any) -> None:
        """Write ``adapter_config.json``; warn when the weights beside it were saved as a pickle (unloadable)."""
        from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

        from ..data_parallel import unsharded_auto_mapping

        if kwargs.get("auto_mapping_dict"):  # the model class, not FSDP2's wrapper class of a sharded model
            kwargs["auto_mapping_dict"] = unsharded_auto_mapping(kwargs["auto_mapping_dict"])
        super().save_pretrained(save_directory, **kwargs)
        directory = Path(save_directory)
        if (directory / WEIGHTS_NAME).is_file() and not (directory / SAFETENSORS_WEIGHTS_NAME).is_file():
            warnings.warn(
                f"The ESFT adapter in {directory} was saved with safe_serialization=False ({WEIGHTS_NAME}, a pickle). "
                "esft-peft loads adapters from safetensors only, so it cannot be loaded back; save with "
                "safe_serialization=True (the default).",
                stacklevel=3,
            )


def _is_empty_list(ids: Any) -> bool:
    return isinstance(ids, (list, tuple)) and not ids


def _strict_bool(value: Any, key: str, source: str) -> bool:
    """JSON ``true``/``false`` (or the strings "true"/"false"); anything else is an error, never truthiness."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"'{key}' must be true or false, got {value!r}.")
