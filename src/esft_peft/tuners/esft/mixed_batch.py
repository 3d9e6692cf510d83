"""Mixed-adapter batches: peft's ``adapter_names=`` forward/generate argument, one adapter per sample.

LoRA adds each sample's low-rank update to a shared base output. An ESFT delta instead changes the weights of the
experts a token is routed to, and inside an MoE block the tokens of all samples are flattened and regrouped by
expert, so which sample a row belongs to is lost below the block. Two designs:

- one call (``mixed_experts.py``), at MoE blocks where ESFT wraps only fused experts (transformers' experts
  interface): the block runs once on the whole batch, and its experts layer, told each sample's adapter, sends every
  (token, expert) pair to its own adapter's expert in the same grouped calls one adapter uses;
- per group, everywhere else: the batch is split where samples are still rows, at each MoE block that holds other
  ESFT layers (a trained router or shared expert, other experts layouts) and at each ESFT layer outside such blocks
  (attention projections, norms, dense MLPs, ...). There each group of samples that share an adapter runs once with
  that adapter (``"__base__"``: none), and the group outputs are put back in sample order.

Everything else (attention across the sequence, the unadapted layers) runs on the whole batch as usual, so every
sample computes what it computes in a batch of the samples that use its adapter (to the GEMM rounding of rows
grouped with other samples' rows: ``tests/test_mixed_adapters.py``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn

from ...moe.discovery import find_moe_layers
from ..mixed_batch_common import BASE_ADAPTER, beam_expanded
from ..mixed_batch_common import check_adapter_names as _check_names
from .layer import ESFTLayer
from .mixed_experts import groups_in_one_call, mixed_experts_forward


def _scopes(model: nn.Module) -> dict[nn.Module, list[ESFTLayer]]:
    """Module where the batch is split -> the ESFT layers that run inside it: the MoE blocks holding ESFT layers,
    and every ESFT layer outside them (its own scope)."""
    layers = {name: module for name, module in model.named_modules() if isinstance(module, ESFTLayer)}
    blocks = [layer.block_name for layer in find_moe_layers(model).values()]
    scopes: dict[nn.Module, list[ESFTLayer]] = {}
    for name, layer in layers.items():
        block = next((b for b in blocks if name == b or name.startswith(b + ".")), None)
        scope = model.get_submodule(block) if block is not None else layer
        scopes.setdefault(scope, []).append(layer)
    return scopes


def _take(value: Any, batch: int, index: torch.Tensor) -> Any:
    """The rows ``index`` of a per-sample tensor argument (leading dimension ``batch``); anything else unchanged."""
    return value[index] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch else value


def _combine(parts: list[Any], groups: list[torch.Tensor], batch: int, tokens: int, where: str) -> Any:
    """Reassemble the outputs of the sample groups in sample order. Tensors have one row per sample or one row per
    token (``tokens`` per sample, sample-major, as MoE blocks flatten them); tuples/lists are combined item-wise."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        out = None
        for part, index in zip(parts, groups):
            size = len(index)
            if part.dim() and part.shape[0] == size:
                out = part.new_empty((batch, *part.shape[1:])) if out is None else out
                out[index] = part
            elif part.dim() and part.shape[0] == size * tokens:
                out = part.new_empty((batch * tokens, *part.shape[1:])) if out is None else out
                out.view(batch, tokens, *part.shape[1:])[index] = part.view(size, tokens, *part.shape[1:])
            else:
                raise ValueError(
                    f"Cannot split a mixed-adapter batch at {where}: it returned a tensor of shape "
                    f"{tuple(part.shape)}, with neither one row per sample nor one per token. Run one adapter per batch."
                )
        return out
    if isinstance(first, (tuple, list)):
        items = [_combine([part[i] for part in parts], groups, batch, tokens, where) for i in range(len(first))]
        return type(first)(items)
    if all(part is None for part in parts):
        return None
    raise ValueError(
        f"Cannot split a mixed-adapter batch at {where}: it returned {type(first).__name__}. Run one adapter per batch."
    )


def _batch_names(
    scope: nn.Module, names_by_batch: dict[int, list[str]], args: tuple, kwargs: dict
) -> tuple[list[str], torch.Tensor]:
    """The adapter names of the samples ``scope`` is called with, and its first tensor argument (the hidden states)."""
    hidden = next((value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)), None)
    batch = None if hidden is None or not hidden.dim() else hidden.shape[0]
    names = names_by_batch.get(batch)
    if names is None:
        lengths = " or ".join(str(length) for length in names_by_batch)
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{lengths} and {batch} respectively (at {type(scope).__name__})."
        )
    return names, hidden


def _one_call_forward(
    scope: nn.Module, forward: Callable, current: list, names_by_batch: dict[int, list[str]], *args: Any, **kwargs: Any
) -> Any:
    """Call the MoE block ``forward`` once for the whole batch, its experts layers reading the samples' names from
    ``current`` (``mixed_experts.py``)."""
    names, _ = _batch_names(scope, names_by_batch, args, kwargs)
    current.append(names)
    try:
        return forward(*args, **kwargs)
    finally:
        current.pop()


def _split_forward(
    scope: nn.Module,
    forward: Callable,
    layers: list[ESFTLayer],
    names_by_batch: dict[int, list[str]],
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Call ``forward`` once per group of samples sharing an adapter, with ``layers`` applying that adapter."""
    names, hidden = _batch_names(scope, names_by_batch, args, kwargs)
    batch = len(names)
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    parts, indices = [], []
    for name, rows in groups.items():
        for layer in layers:
            layer._forced_adapters = [] if name == BASE_ADAPTER else [name]
        try:
            if len(groups) == 1:
                return forward(*args, **kwargs)
            index = torch.tensor(rows, device=hidden.device)
            sub_args = [_take(value, batch, index) for value in args]
            sub_kwargs = {key: _take(value, batch, index) for key, value in kwargs.items()}
            parts.append(forward(*sub_args, **sub_kwargs))
            indices.append(index)
        finally:
            for layer in layers:
                layer._forced_adapters = None
    tokens = hidden.shape[1] if hidden.dim() > 2 else 1
    return _combine(parts, indices, batch, tokens, type(scope).__name__)


def _inject_adapter_names(names_by_batch: dict[int, list[str]]) -> Callable:
    """A pre-forward hook passing a modules_to_save wrapper the names for the batch it sees."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        batch = len(args[0]) if args else None
        return args, {**kwargs, "adapter_names": names_by_batch.get(batch, next(iter(names_by_batch.values())))}

    return hook


@contextmanager
def mixed_adapter_batch(
    tuner: nn.Module, adapter_names: Any, known: set[str], num_beams: Optional[int] = None
) -> Iterator[None]:
    """While active, the ESFT layers of ``tuner`` run sample ``i`` with adapter ``adapter_names[i]``.

    Refused in training mode and with merged adapters (peft's rules and wording). With beam search each name is
    repeated ``num_beams`` times, as the samples are; modules that see the unexpanded batch (an encoder) get the
    names as given. peft's ``modules_to_save`` wrappers receive the names and split the batch themselves.
    """
    if tuner.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    names = _check_names(adapter_names, known)
    layers = [module for module in tuner.modules() if isinstance(module, ESFTLayer)]
    if any(layer.merged for layer in layers):
        raise ValueError(
            "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
        )
    names_by_batch = {len(names): names}
    if isinstance(num_beams, int) and num_beams > 1:
        names_by_batch[len(names) * num_beams] = beam_expanded(names, num_beams)
    replaced: list[tuple[nn.Module, Optional[Callable]]] = []
    handles = []
    try:
        cache: dict = {}  # routing tables of the one-call experts layers, per layer and batch
        for scope, inner in _scopes(tuner.model).items():
            replaced.append((scope, vars(scope).get("forward")))
            if scope not in inner and groups_in_one_call(inner):
                current: list[list[str]] = []
                vars(scope)["forward"] = lambda *a, _s=scope, _f=scope.forward, _c=current, **kw: _one_call_forward(
                    _s, _f, _c, names_by_batch, *a, **kw
                )
                for layer in inner:
                    replaced.append((layer, vars(layer).get("forward")))
                    vars(layer)["forward"] = lambda *a, _l=layer, _c=current, **kw: mixed_experts_forward(
                        _l, _c[-1], cache, a, kw
                    )
                continue
            vars(scope)["forward"] = lambda *a, _s=scope, _f=scope.forward, _l=inner, **kw: _split_forward(
                _s, _f, _l, names_by_batch, *a, **kw
            )
        for module in tuner.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                hook = _inject_adapter_names(names_by_batch)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for scope, own in replaced:
            if own is None:
                vars(scope).pop("forward", None)
            else:
                vars(scope)["forward"] = own
