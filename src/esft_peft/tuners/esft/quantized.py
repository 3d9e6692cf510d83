"""ESFT on a 4-bit base: the frozen routed experts in 4-bit (bitsandbytes), the selected experts exact.

``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))`` quantizes ``nn.Linear`` layers
only: transformers' fused 3-D experts stay in the model's dtype, and they are most of an MoE's weights. When ESFT
wraps such experts (``ESFTConfig.quantize_frozen_experts``, on by default), :func:`quantize_frozen_experts` replaces
their per-expert weight tensors by a :class:`FrozenExperts4bit` store:

- the experts the adapter does not select: one 4-bit tensor per weight, quantized by bitsandbytes' own kernels with
  the base's settings (quant type, blocksize, double quant, storage dtype);
- the selected experts: their original rows, unquantized (so ``W + delta`` trains and merges exactly).

The module keeps a zero-byte placeholder per replaced weight whose ``esft_shape`` is the whole shape (discovery and
adapter records read it through :func:`~esft_peft.moe.partitioned.logical_shape`). The compute
(:mod:`esft_peft.tuners.esft.compute.fused`) calls the module once per group of experts that receives tokens
(:attr:`FrozenExperts4bit.groups`: the kept experts, then the unselected ones in runs of about 1/8 of the layer),
each call with only its group's rows: the kept rows, a run dequantized for that call (formed again in backward), or
the kept rows plus deltas (selected calls). At most one group's dequantized weights are alive at a time, never the
whole layer's.

Decisions (docs/training.md, "Quantized bases"): the kept experts are the first adapter's selection; a later adapter
may select only among them. ``merge_and_unload`` on the 4-bit base is refused (merge on the unquantized base).
Selected ModuleList experts (``Linear4bit`` quantized by transformers) are dequantized once into ``nn.Linear``
(:func:`dequantized_linear`); the rest stay as they are. An 8-bit base and experts another quantizer already holds
(FP8, MXFP4) are refused with the way out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ...moe.layouts import ExpertsLayout

logger = logging.getLogger(__name__)

STORE_NAME = "frozen_4bit"  # the store's name under the experts module (no "esft_": it is not adapter state)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A layer's unselected experts are computed in groups of consecutive experts, each dequantized only for its own call:
# about 1/FROZEN_GROUPS of the layer's experts per group (the bound on the transient bf16 copy), but at least
# MIN_GROUP_BYTES of dequantized weights per group (a small layer is computed in one call).
FROZEN_GROUPS = 8
MIN_GROUP_BYTES = 1 << 20


@dataclass(frozen=True)
class FourBitSettings:
    """The base's bitsandbytes 4-bit settings, applied to the frozen experts."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False
    quant_storage: torch.dtype = torch.uint8
    compute_dtype: Optional[torch.dtype] = None  # the Linear4bit layers' (the experts compute in their own dtype)


def quantization_config(model: nn.Module) -> Any:
    """The quantization config the model was loaded with (transformers' ``hf_quantizer``), or None."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    return config if config is not None else getattr(getattr(model, "config", None), "quantization_config", None)


def _field(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _method(config: Any) -> str:
    method = _field(config, "quant_method")
    return str(getattr(method, "value", method) or "").lower()


def _dtype(value: Any) -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype):
        return value
    return getattr(torch, str(value).removeprefix("torch."))


def four_bit_settings(model: nn.Module) -> Optional[FourBitSettings]:
    """The 4-bit settings of a model loaded with bitsandbytes ``load_in_4bit``; None for any other model."""
    config = quantization_config(model)
    if config is None or _method(config) != "bitsandbytes" or not _field(config, "load_in_4bit"):
        return None
    quantized = next((p for p in model.parameters() if getattr(p, "quant_state", None) is not None), None)
    return FourBitSettings(
        quant_type=_field(config, "bnb_4bit_quant_type") or "fp4",
        blocksize=int(getattr(quantized, "blocksize", None) or 64),
        double_quant=bool(_field(config, "bnb_4bit_use_double_quant")),
        quant_storage=_dtype(_field(config, "bnb_4bit_quant_storage")) or torch.uint8,
        compute_dtype=_dtype(_field(config, "bnb_4bit_compute_dtype")),
    )


def is_bnb_quantized(module: nn.Module) -> bool:
    """Whether ``module`` holds bitsandbytes-quantized weights (``Linear4bit``/``Linear8bitLt``)."""
    return any(type(p).__name__ in ("Params4bit", "Int8Params") for p in module.parameters(recurse=False))


class FrozenExperts4bit(nn.Module):
    """A fused experts module's weights: the unselected experts in 4-bit, the kept (selected) experts unquantized.

    Buffers (not saved in any state dict): ``packed_<name>`` (4-bit data), ``absmax_<name>`` (block scales; with
    double quant, their 8-bit form and ``absmax2_<name>``) and ``kept_<name>`` (original rows of the kept experts).
    The bitsandbytes quant states are rebuilt from them, so ``.to(device)`` moves everything.
    """

    def __init__(self, weights: dict[str, torch.Tensor], kept_ids: list[int], settings: FourBitSettings) -> None:
        import bitsandbytes.functional as bnb

        super().__init__()
        self.settings = settings
        self.num_experts = int(next(iter(weights.values())).shape[0])
        self.kept_ids = list(kept_ids)
        kept = set(kept_ids)
        self.frozen_ids = [e for e in range(self.num_experts) if e not in kept]
        self.shapes = {name: tuple(w.shape) for name, w in weights.items()}
        self.shadowed_call = False  # set while a call with shadowed weights runs (compute/fused.py)
        per_expert = sum(torch.Size(w.shape[1:]).numel() * w.element_size() for w in weights.values())
        self.spans = _spans(len(self.frozen_ids), _group_size(self.num_experts, per_expert))
        # group 0: the kept experts (their exact rows); group i >= 1: the frozen experts of spans[i - 1]
        self.groups = [self.kept_ids] + [self.frozen_ids[p : p + n] for p, n in self.spans]
        group_of, key_of = [0] * self.num_experts, [0] * self.num_experts
        for group, ids in enumerate(self.groups):
            for key, expert in enumerate(ids):
                group_of[expert], key_of[expert] = group, key
        self.group_of, self.key_of = tuple(group_of), tuple(key_of)  # expert -> its group, its row in the group
        self._states: dict[str, Any] = {}
        for name, weight in weights.items():
            kept_rows = weight.detach().index_select(0, _index(self.kept_ids, weight.device))
            self.register_buffer(f"kept_{name}", kept_rows, persistent=False)
            if not self.frozen_ids:
                continue
            frozen = weight.detach().index_select(0, _index(self.frozen_ids, weight.device))
            packed, state = bnb.quantize_4bit(
                frozen.contiguous(), blocksize=settings.blocksize, compress_statistics=settings.double_quant,
                quant_type=settings.quant_type, quant_storage=settings.quant_storage,
            )
            self.register_buffer(f"packed_{name}", packed, persistent=False)
            self.register_buffer(f"absmax_{name}", state.absmax, persistent=False)
            if state.nested:
                self.register_buffer(f"absmax2_{name}", state.state2.absmax, persistent=False)
                self.register_buffer(f"offset_{name}", state.offset.reshape(1), persistent=False)
            self._states[name] = state

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def _state(self, name: str) -> Any:
        """The bitsandbytes quant state of ``name``, on the buffers' current device."""
        import bitsandbytes.functional as bnb

        state, absmax = self._states[name], getattr(self, f"absmax_{name}")
        if state.absmax is absmax:
            return state
        device = absmax.device
        state2 = None
        if state.nested:
            state2 = bnb.QuantState(
                absmax=getattr(self, f"absmax2_{name}"), code=state.state2.code.to(device),
                blocksize=state.state2.blocksize, dtype=state.state2.dtype,
            )
        state = bnb.QuantState(
            absmax=absmax, shape=state.shape, code=state.code.to(device), blocksize=state.blocksize,
            quant_type=state.quant_type, dtype=state.dtype,
            offset=getattr(self, f"offset_{name}")[0] if state.nested else None, state2=state2,
        )
        self._states[name] = state
        return state

    def group_rows(self, name: str, group: int) -> torch.Tensor:
        """The ``(len(groups[group]), ...)`` rows of weight ``name`` for the experts of ``group``: the kept experts'
        original rows (group 0, no copy), or the unselected experts of a span as bitsandbytes dequantizes them, formed
        for this call (the transient copy is one span, never the whole layer)."""
        if group == 0:
            return getattr(self, f"kept_{name}")
        position, count = self.spans[group - 1]
        return self._frozen_rows(name, position, count)

    def _frozen_rows(self, name: str, position: int, count: int) -> torch.Tensor:
        """Frozen experts ``frozen_ids[position : position + count]``, dequantized: the blocks holding their values,
        with the same kernel and block scales as dequantizing the whole tensor (an expert's values may start or end
        inside a block: that block is dequantized and cut)."""
        import bitsandbytes.functional as bnb

        packed, state = getattr(self, f"packed_{name}"), self._state(name)
        shape = self.shapes[name][1:]
        per_expert = torch.Size(shape).numel()
        begin, end = position * per_expert, (position + count) * per_expert
        first, last = begin // state.blocksize, -(-end // state.blocksize)  # the blocks holding those values
        start, stop = first * state.blocksize, min(last * state.blocksize, state.shape.numel())
        piece = bnb.QuantState(
            absmax=_block_scales(state, first, last), shape=torch.Size((stop - start,)), code=state.code,
            blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype,
        )
        data = packed.reshape(-1).view(torch.uint8)[start // 2 : (stop + 1) // 2]  # two values per byte
        return _dequantize(data, piece)[begin - start : end - start].view(count, *shape)

    def rows(self, name: str, ids: list[int]) -> torch.Tensor:
        """The original rows of kept experts ``ids`` (in that order; a view when they are consecutive kept rows)."""
        missing = [e for e in ids if e not in self.kept_ids]
        if missing:
            raise ValueError(f"Experts {missing} are held in 4-bit here; only experts {self.kept_ids} are kept exact.")
        kept = getattr(self, f"kept_{name}")
        positions = [self.kept_ids.index(e) for e in ids]
        if positions == list(range(positions[0], positions[0] + len(positions))):
            return kept[positions[0] : positions[0] + len(positions)]
        return kept.index_select(0, _index(positions, kept.device))

    def nbytes(self, kept: bool = True) -> int:
        """Bytes held (the kept rows included unless ``kept=False``)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if kept or not n.startswith("kept_"))

    def extra_repr(self) -> str:
        s = self.settings
        return (f"{s.quant_type}, blocksize={s.blocksize}, double_quant={s.double_quant}, "
                f"kept={self.kept_ids}, frozen={len(self.frozen_ids)} experts in {len(self.spans)} groups")


def _dequantize(packed: torch.Tensor, state: Any) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit``, flat. Its CPU kernel (0.50) takes a tensor's blocks row by row,
    so it returns wrong values when the last dimension is not a multiple of the blocksize (e.g. a (..., 32) expert
    weight at blocksize 64), although quantization runs over the flat tensor; rows of exactly one block (or a single
    row) are read right on every backend."""
    import bitsandbytes.functional as bnb

    numel = state.shape.numel()
    rows = (numel // state.blocksize, state.blocksize) if numel % state.blocksize == 0 else (1, numel)
    flat = bnb.QuantState(absmax=state.absmax, shape=torch.Size(rows), code=state.code, blocksize=state.blocksize,
                          quant_type=state.quant_type, dtype=state.dtype, offset=state.offset, state2=state.state2)
    return bnb.dequantize_4bit(packed, flat).view(-1)


def _block_scales(state: Any, first: int, last: int) -> torch.Tensor:
    """The fp32 scales of blocks ``first..last-1`` (with double quant: dequantized from the 8-bit ones, only the
    nested blocks holding them, as bitsandbytes dequantizes the whole set)."""
    import bitsandbytes.functional as bnb

    if not state.nested:
        return state.absmax[first:last]
    size = state.state2.blocksize
    low, high = first // size, -(-last // size)
    nested = bnb.QuantState(absmax=state.state2.absmax[low:high], code=state.state2.code, blocksize=size,
                            dtype=state.state2.dtype)
    scales = bnb.dequantize_blockwise(state.absmax[low * size : high * size], nested) + state.offset
    return scales.float()[first - low * size : last - low * size]


def _group_size(num_experts: int, per_expert_bytes: int) -> int:
    """Experts per group: about 1/FROZEN_GROUPS of the layer, at least MIN_GROUP_BYTES of weights."""
    return max(1, -(-num_experts // FROZEN_GROUPS), -(-MIN_GROUP_BYTES // max(1, per_expert_bytes)))


def _spans(count: int, size: int) -> list[tuple[int, int]]:
    """``count`` positions cut into the fewest runs of at most ``size``, as even as possible: (first, length)."""
    runs = -(-count // size) if count else 0
    spans, first = [], 0
    for run in range(runs):
        length = count // runs + (run < count % runs)
        spans.append((first, length))
        first += length
    return spans


def _index(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)


def frozen_store(experts: nn.Module) -> Optional[FrozenExperts4bit]:
    """The 4-bit store of a fused experts module, or None when its weights are as loaded."""
    store = getattr(experts, "_modules", {}).get(STORE_NAME)
    return store if isinstance(store, FrozenExperts4bit) else None


def quantize_frozen_experts(
    experts: nn.Module, layout: ExpertsLayout, kept_ids: list[int], settings: FourBitSettings
) -> FrozenExperts4bit:
    """Move the per-expert weights of ``experts`` (3-D: biases stay) into a :class:`FrozenExperts4bit` store that
    keeps ``kept_ids`` exact; each weight parameter becomes a zero-byte placeholder carrying its whole shape."""
    views = layout.expert_views(experts)
    weights = {name: view for name, view in views.items() if view.dim() == 3}
    store = FrozenExperts4bit(weights, kept_ids, settings)
    for name, weight in weights.items():
        placeholder = nn.Parameter(weight.new_empty(0), requires_grad=False)
        placeholder.esft_shape = weight.shape
        setattr(experts, name, placeholder)
    experts.add_module(STORE_NAME, store)
    logger.info("ESFT: %s of %s held in 4-bit (%s), experts %s kept exact.", list(weights), type(experts).__name__,
                settings.quant_type, kept_ids)
    return store


def dequantized_linear(module: nn.Module) -> nn.Linear:
    """A bitsandbytes ``Linear4bit`` as the ``nn.Linear`` holding its dequantized weight (in the dtype it was loaded
    in): a selected ModuleList expert then trains as ``dequantized W + delta``, exactly."""
    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            f"Cannot train {type(module).__name__}: bitsandbytes repacked its weight for its CPU inference kernels "
            "(the model ran in eval mode without gradients on CPU before ESFT wrapped it). Create the adapter right "
            "after loading the model, before running it."
        )
    values = _dequantize(weight.data, weight.quant_state).view(weight.quant_state.shape)
    linear = nn.Linear(values.shape[1], values.shape[0], bias=module.bias is not None, device=values.device,
                       dtype=values.dtype)
    with torch.no_grad():
        linear.weight.copy_(values)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    linear.requires_grad_(False)
    linear.esft_dequantized_from = type(module).__name__
    return linear


def check_quantized_base(model: nn.Module, enabled: bool, targets: dict[str, Any]) -> Optional[FourBitSettings]:
    """Validate an adapter on a quantized base before anything is modified; return the 4-bit settings to apply to
    the frozen experts (None: leave the experts as they are).

    ``targets``: module name -> (layout or None, expert ids), as planned for the adapter.
    """
    config = quantization_config(model)
    method = _method(config) if config is not None else ""
    for name, (layout, ids) in targets.items():
        module = model.get_submodule(name)
        module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if layout is None:
            if any(type(p).__name__ == "Int8Params" for p in module.parameters(recurse=False)):
                raise ValueError(
                    f"ESFT cannot train {name}: it is an 8-bit bitsandbytes layer ({type(module).__name__}), whose "
                    "weights W + delta cannot be formed exactly. Load the base in 4-bit (its trained layers are then "
                    "dequantized once, exactly) or unquantized, or leave the module out of the adapter."
                )
            continue
        odd = {n: v.dtype for n, v in layout.expert_views(module).items() if v.dtype not in FLOAT_DTYPES}
        if odd:
            raise ValueError(
                f"ESFT cannot train the experts {name}: their weights {odd} are already quantized"
                f"{f' by {method}' if method else ''} (FP8/MXFP4 experts need a GPU kernel; ESFT computes in 16/32-bit "
                "floats). Load the model dequantized (e.g. Mxfp4Config(dequantize=True), or without the quantization "
                "config and with BitsAndBytesConfig(load_in_4bit=True) to hold the frozen experts in 4-bit instead)."
            )
        store = frozen_store(module)
        if store is not None:
            missing = [e for e in ids if e not in store.kept_ids]
            if missing:
                raise ValueError(
                    f"{name}: experts {missing} are held in 4-bit on this base (the first adapter kept experts "
                    f"{store.kept_ids} exact), so they cannot be trained exactly. Select among {store.kept_ids}, or "
                    "create this adapter first (on a freshly loaded base), or pass quantize_frozen_experts=False when "
                    "creating the first adapter."
                )
    if not enabled or config is None:
        return None
    if method == "bitsandbytes" and _field(config, "load_in_8bit"):
        raise ValueError(
            "This base was loaded in 8-bit (BitsAndBytesConfig(load_in_8bit=True)); ESFT holds frozen experts in "
            "4-bit only, with the settings of a 4-bit base. Load with BitsAndBytesConfig(load_in_4bit=True), or pass "
            "ESFTConfig(quantize_frozen_experts=False) to keep the routed experts in the dtype they were loaded in."
        )
    return four_bit_settings(model)


def refuse_merge_on_4bit(module: nn.Module) -> None:
    """Merging on a 4-bit base is refused: the model holds its frozen experts in 4-bit, not the base's weights, so
    a merged checkpoint would not be the base plus the update."""
    if frozen_store(module) is None and getattr(module, "esft_dequantized_from", None) is None:
        return
    raise ValueError(
        "Cannot merge an ESFT adapter on a 4-bit base: the frozen experts are held in 4-bit, so the merged model would "
        "not be the base's weights plus the update. Save the adapter, load the base unquantized (without "
        "quantization_config), load the adapter there (PeftModel.from_pretrained) and call merge_and_unload(): the "
        "selected experts get exactly W + delta, every other weight stays bit-identical."
    )
