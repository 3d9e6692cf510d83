"""``PESCConfig``: how a dense model is crafted into a mixture of adapter experts (PESC, arXiv 2401.02731)."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ..data_parallel import unsharded_auto_mapping

PEFT_TYPE_NAME = "PESC"
ALL_LINEAR = "all-linear"


def _layer_list(value: Union[int, list[int], None]) -> Optional[list[int]]:
    if value is None:
        return None
    values = [value] if not isinstance(value, (list, tuple)) else list(value)
    bad = [v for v in values if isinstance(v, bool) or not hasattr(v, "__index__") or operator.index(v) < 0]
    if bad or not values:
        raise ValueError(
            f"`layers_to_transform` must be a decoder-layer index or a non-empty list of them, got {value!r}."
        )
    return sorted({operator.index(v) for v in values})


def _module_names(value: Union[str, list[str], None], option: str) -> Union[str, list[str], None]:
    if value is None or isinstance(value, str):
        if value == "":
            raise ValueError(f"`{option}` must not be empty; leave it None for the default.")
        return value
    names = list(value)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"`{option}` must be a regex string or a non-empty list of module names, got {value!r}.")
    return names


@dataclass
class PESCConfig(PeftConfig):
    """Configuration of a Parameter-Efficient Sparsity Crafting (PESC) adapter.

    Every upcycled MLP ``F`` becomes ``y = F(x) + sum_k w_k * s * U_{e_k} gelu(D_{e_k} F(x))``: a router on the MLP
    input picks ``top_k`` of ``num_experts`` adapter experts per token (softmax over the kept logits), all sharing the
    frozen dense weights of ``F``. ``U`` starts at zero, so a fresh adapter reproduces the dense model exactly.

    Args:
        num_experts: Adapter experts per upcycled MLP (``E``).
        top_k: Experts each token is routed to (``k``, at most ``num_experts``).
        adapter_dim: Bottleneck size ``d`` of each adapter expert (``D``: d x H, ``U``: H x d).
        adapter_scaling: ``s``, multiplies every adapter output (the released Camelidae models use 0.25).
        adapter_dropout: Dropout on the adapters' input during training (the official code: 0.1).
        router_aux_loss_coef: ``alpha`` of the load-balancing loss ``alpha * E * sum_i f_i * P_i`` added to
            ``outputs.loss`` when labels are given (0 disables it).
        target_modules: The MLPs to upcycle: a list of module names (or name suffixes such as ``"mlp"``) or a regex
            matched against full names. ``None`` (default) upcycles the MLP of every decoder layer, found from the
            model's structure.
        layers_to_transform: Only upcycle the MLPs of these decoder-layer indices.
        lora_r: Rank of the paper's LoRA part on the dense linears (0, the default, turns it off).
        lora_alpha: LoRA scaling numerator (the paper: 16 with r=64).
        lora_dropout: LoRA dropout (the paper: 0.1).
        init_weights: True (default): the paper's initialisation, ``U = 0`` and LoRA's ``B = 0``, so that a fresh
            adapter reproduces the dense model exactly. False: ``U`` and ``B`` random too (peft's convention, for
            tests that need a fresh adapter to change the outputs).
        lora_target_modules: Linears that get LoRA: module-name suffixes, a regex, or ``"all-linear"`` (default:
            every linear of the decoder layers, attention and MLP, as in the paper).
        base_model_type: ``model_type`` of the base the adapter was created on (filled at injection).
        base_shapes: Per upcycled layer, the MLP's module name, hidden size and intermediate size (filled at
            injection, checked on load so that an adapter for another base fails before weights are touched).
    """

    num_experts: int = field(default=8, metadata={"help": "adapter experts per upcycled MLP"})
    top_k: int = field(default=2, metadata={"help": "experts per token"})
    adapter_dim: int = field(default=64, metadata={"help": "bottleneck size of each adapter expert"})
    adapter_scaling: float = field(default=1.0, metadata={"help": "scaling s of the adapter outputs"})
    adapter_dropout: float = field(default=0.1, metadata={"help": "dropout on the adapters' input"})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "alpha of the load-balancing loss"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "MLPs to upcycle (default: every decoder layer's MLP)"}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "decoder-layer indices to upcycle"}
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the dense linears; 0 = no LoRA"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout"})
    lora_target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "linears that get LoRA (default: all linears of the decoder layers)"}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: the paper's init, U = 0 (identity); False: random U and LoRA B (tests)"}
    )
    base_model_type: Optional[str] = field(default=None, metadata={"help": "filled at injection"})
    base_shapes: Optional[dict[str, Any]] = field(default=None, metadata={"help": "filled at injection"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType(PEFT_TYPE_NAME)
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"`init_weights` must be True (identity at creation) or False, got {self.init_weights!r}.")
        for name in ("num_experts", "top_k", "adapter_dim", "lora_r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"`{name}` must be an integer, got {value!r}.")
        if self.num_experts < 1:
            raise ValueError(f"`num_experts` must be >= 1, got {self.num_experts}.")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"`top_k` ({self.top_k}) must be between 1 and `num_experts` ({self.num_experts}): each token is "
                f"routed to top_k distinct experts. Lower top_k or raise num_experts."
            )
        if self.adapter_dim < 1:
            raise ValueError(
                f"`adapter_dim` must be >= 1, got {self.adapter_dim}. It is the bottleneck size of each adapter "
                "expert (the paper uses 64 to 512)."
            )
        for name in ("adapter_dropout", "lora_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {getattr(self, name)}.")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"`router_aux_loss_coef` must be >= 0, got {self.router_aux_loss_coef}.")
        if self.lora_r < 0:
            raise ValueError(f"`lora_r` must be >= 0 (0 turns the LoRA part off), got {self.lora_r}.")
        self.target_modules = _module_names(self.target_modules, "target_modules")
        self.lora_target_modules = _module_names(self.lora_target_modules, "lora_target_modules")
        if self.lora_target_modules is not None and self.lora_r == 0:
            raise ValueError("`lora_target_modules` is set but `lora_r` is 0; set lora_r > 0 to train the LoRA part.")
        self.layers_to_transform = _layer_list(self.layers_to_transform)

    @property
    def uses_lora(self) -> bool:
        return self.lora_r > 0

    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> None:
        """Write ``adapter_config.json``, recording the model class, not FSDP2's wrapper class of a sharded model."""
        if kwargs.get("auto_mapping_dict"):
            kwargs["auto_mapping_dict"] = unsharded_auto_mapping(kwargs["auto_mapping_dict"])
        super().save_pretrained(save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any):
        """Load ``adapter_config.json``; refuse a weights file peft's loader cannot read safely (pickle only,
        truncated, unreadable header) and tensor shapes the config contradicts (expert count, adapter size), from
        the safetensors header alone (no tensor is read; the tensors are checked where peft holds them, see
        :mod:`esft_peft.tuners.saved_checks`)."""
        from ...files import check_adapter_file
        from .weights import check_checkpoint_shapes

        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        hub_kwargs, _, _ = cls._split_kwargs(kwargs)
        found = check_adapter_file(pretrained_model_name_or_path, subfolder=subfolder, method="PESC", **hub_kwargs)
        if found is not None:
            check_checkpoint_shapes(config, found[1])
        return config
