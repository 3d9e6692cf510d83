"""ESFT's compute of transformers' ``@use_experts_implementation`` experts (the ``fused`` layout).

ESFT computes these experts through the module itself, so through transformers' experts interface
(``ALL_EXPERTS_FUNCTIONS``, whichever implementation ``set_experts_implementation`` chose: eager, batched_mm,
grouped_mm or one registered later). The (token, slot) pairs are split in calls of the module, each with one slot
per row (``top_k = 1``, routing weight 1), so the implementation returns one output per pair:

- the pairs routed to selected experts, with the module's per-expert tensors shadowed by the ``k`` selected rows,
  ``W[e] + delta[e]`` (the ids renumbered ``0..k-1``);
- the pairs routed to frozen experts, with the module as it is; on a 4-bit base (``quantized.py``), one call per group
  of experts that receives pairs, each shadowed by its group's rows alone (renumbered like the selected ones), so at
  most one group is dequantized at a time.

The pair outputs are put back in pair order, weighted and summed over the ``K`` slots as the implementations do
(``(out * w).view(T, K, H).sum(dim=1)``), so under grouped_mm and batched_mm a zero delta reproduces the base bit
for bit (on CPU, except where an elementwise step runs on a whole contiguous tensor: docs/concepts.md). The formed
``W + delta`` and dequantized rows are not kept for backward: they are formed again there (:class:`FormedWeights`).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional

import torch
from torch import nn

from ....moe.layouts.base import bind_arguments, call_arguments
from ....moe.partitioned import logical_shape
from ....moe.rows import expert_rows, ids_tensor, inverse_permutation, permute_rows
from ..low_rank import delta_tensors
from ..quantized import FrozenExperts4bit, frozen_store
from .base import Deltas, ExpertsCompute, call_shadowed, with_delta


class FormedWeights:
    """The selected experts' tensors for one call (``W[ids] + delta`` where a delta is trained, ``t[ids]`` for the
    other per-expert tensors), formed after the module's pre-forward hooks (so after a ZeRO-3 gather).

    While :meth:`saving` is active, autograd saves a reference to how a formed tensor was made instead of the
    tensor; backward forms it again (once per call, reused by every node that saved it). The sum is cheap next to
    the matmuls that use it, and the forward keeps no copy of selected experts' weights for backward.
    """

    def __init__(
        self,
        base: dict[str, torch.Tensor],
        ids: list[int],
        deltas: Deltas,
        rows: Optional[dict[str, Callable[[list[int]], torch.Tensor]]] = None,
        formed_again: Optional[Iterable[str]] = None,
    ) -> None:
        """``rows[name](ids)`` reads the base rows of ``name`` (default ``base[name][ids]``; a 4-bit store gives its
        kept or dequantized rows); ``formed_again`` names the tensors formed again in backward instead of saved
        (default: those with deltas)."""
        self.base, self.ids, self.deltas = base, ids, deltas
        self.rows = rows or {}
        self.formed_again = set(deltas if formed_again is None else formed_again)
        self._storages: dict[int, str] = {}
        self._again: dict[str, torch.Tensor] = {}

    def _form(self, name: str) -> torch.Tensor:
        read = self.rows.get(name)
        rows = read(self.ids) if read is not None else expert_rows(self.base[name], self.ids)
        return with_delta(rows, self.deltas[name]) if name in self.deltas else rows

    def form(self) -> dict[str, torch.Tensor]:
        """The tensors for the call (not kept here: only the call holds them)."""
        formed = {name: self._form(name) for name in self.base}
        self._storages = {t.untyped_storage().data_ptr(): n for n, t in formed.items() if n in self.formed_again}
        return formed

    def saving(self) -> torch.autograd.graph.saved_tensors_hooks:
        """Saved-tensor hooks for the call: formed tensors are saved as how to form them again; any other tensor
        goes to the hooks that were active around the call (activation checkpointing, offloading), if any."""
        outer = _active_saved_tensor_hooks()

        def pack(tensor: torch.Tensor) -> Any:
            name = self._storages.get(tensor.untyped_storage().data_ptr()) if tensor.numel() else None
            if name is not None:
                return _Recipe(self, name, tensor.size(), tensor.stride(), tensor.storage_offset())
            return _Outer(outer[0](tensor)) if outer else tensor.detach()

        def unpack(packed: Any) -> torch.Tensor:
            if isinstance(packed, _Recipe):
                return packed.tensor()
            return outer[1](packed.packed) if isinstance(packed, _Outer) else packed

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def again(self, name: str) -> torch.Tensor:
        """Formed tensor ``name`` formed again (once, in backward)."""
        if name not in self._again:
            with torch.no_grad():
                self._again[name] = self._form(name)
        return self._again[name]


class _Recipe(NamedTuple):
    formed: FormedWeights
    name: str
    size: torch.Size
    stride: tuple[int, ...]
    offset: int

    def tensor(self) -> torch.Tensor:
        return self.formed.again(self.name).as_strided(self.size, self.stride, self.offset)


class _Outer(NamedTuple):
    packed: Any


def _active_saved_tensor_hooks() -> Optional[tuple[Callable, Callable]]:
    """The saved-tensor hooks active now (torch lets only the innermost pair apply; this one passes tensors on)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


def per_expert_tensors(experts: nn.Module, num_experts: int) -> dict[str, torch.Tensor]:
    """The module's own parameters and buffers with one row per expert (weights, biases, scales)."""
    tensors = {**dict(experts.named_parameters(recurse=False)), **dict(experts.named_buffers(recurse=False))}
    return {name: t for name, t in tensors.items() if t.dim() and logical_shape(t)[0] == num_experts}


def _call_rows(
    experts: nn.Module, ids: list[int], deltas: Deltas, args: tuple,
    rows: Optional[dict[str, Callable[[list[int]], torch.Tensor]]] = None, formed_again: Optional[Iterable[str]] = None,
) -> torch.Tensor:
    """``experts(*args)`` (ids ``0..k-1``) computed by experts ``ids`` alone: the module is called (hooks included)
    with ``num_experts = k`` and its per-expert tensors shadowed by those experts' rows (:class:`FormedWeights`),
    plus their deltas."""
    base = per_expert_tensors(experts, experts.num_experts)
    formed = FormedWeights(base, ids, deltas, rows=rows, formed_again=formed_again)
    num_experts = experts.num_experts
    experts.num_experts = len(ids)
    try:
        with formed.saving(), _shadowed_call(frozen_store(experts)):
            return call_shadowed(experts, lambda module: formed.form(), args)
    finally:
        experts.num_experts = num_experts


def _call_selected(experts: nn.Module, ids: list[int], deltas: Deltas, args: tuple) -> torch.Tensor:
    """``experts(*args)`` (ids ``0..k-1``) computed by the selected experts, with their ``W + delta`` (on a 4-bit
    base, ``W`` is the store's kept original rows)."""
    store = frozen_store(experts)
    rows = None if store is None else {name: functools.partial(store.rows, name) for name in store.shapes}
    return _call_rows(experts, ids, deltas, args, rows=rows)


def _call_group(experts: nn.Module, store: FrozenExperts4bit, group: int, args: tuple) -> torch.Tensor:
    """``experts(*args)`` (ids ``0..n-1``) computed by the experts of the store's ``group`` alone, with their kept or
    dequantized rows, formed for this call and again in backward (not kept)."""
    rows = {name: lambda _ids, name=name: store.group_rows(name, group) for name in store.shapes}
    return _call_rows(experts, store.groups[group], {}, args, rows=rows, formed_again=store.shapes)


@contextmanager
def _shadowed_call(store: Optional[FrozenExperts4bit]) -> Iterator[None]:
    """While a call with shadowed weights runs, the 4-bit store's forward (:func:`hold_dequantized`) is the
    module's own."""
    if store is None:
        yield
        return
    store.shadowed_call = True
    try:
        yield
    finally:
        store.shadowed_call = False


def hold_dequantized(experts: nn.Module, store: FrozenExperts4bit) -> None:
    """Let ``experts`` compute from its 4-bit store: a plain call of the module (adapters disabled, a base sample,
    after ``unload()``) runs as the route-split compute with no selected expert, so each group of experts that
    receives pairs is computed by its own call, with its own rows (dequantized for that call and again in backward,
    not kept). The calls with shadowed weights run the module's forward as it was."""
    own_forward = experts.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if store.shadowed_call:
            return own_forward(*args, **kwargs)
        return FusedCompute().compute(experts, [], {}, args, kwargs)

    vars(experts)["forward"] = forward


class _PairRows(torch.autograd.Function):
    """``hidden[order // top_k]``: one row per (token, slot) pair, in ``order``. Its backward puts the pair gradients
    back in pair order (a gather) and sums each token's ``top_k`` slots, instead of an accumulating scatter."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(order)
        ctx.top_k = top_k
        return hidden.index_select(0, order // top_k)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (order,) = ctx.saved_tensors
        grad = grad.index_select(0, inverse_permutation(order))
        return grad.view(-1, ctx.top_k, grad.size(-1)).sum(dim=1), None, None


def _fed(pairs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``pairs`` (sorted by ``keys``, each group in the wanted order) arranged so that ``torch.sort`` of their keys,
    as an experts implementation sorts them, returns them in that order."""
    fed = torch.empty_like(pairs)
    fed[torch.sort(keys.index_select(0, pairs)).indices] = pairs
    return fed


class FusedCompute(ExpertsCompute):
    kind = "fused"

    def compute(
        self, target: nn.Module, ids: list[int], deltas: Deltas, args: tuple, kwargs: dict,
        pair_rows: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``pair_rows`` (a mixed-adapter batch, ``tuners/esft/mixed_experts.py``): per (token, slot) pair, the row
        of ``ids``/``deltas`` computing it (``-1``: the frozen expert); by default the row of the pair's expert."""
        hidden, top_k_index, top_k_weights = bind_arguments(call_arguments(target), args, kwargs, 3, "experts")
        shape = hidden.shape
        hidden = hidden.reshape(-1, shape[-1])
        num_tokens, num_top_k = hidden.size(0), top_k_index.size(-1)
        device = hidden.device
        experts = top_k_index.reshape(-1)

        # Which call computes each pair (0: the selected experts; then the frozen experts, in one call, or on a 4-bit
        # base one call per group of experts) and its expert id in that call.
        store = frozen_store(target)
        if pair_rows is None:
            lookup = torch.full((self.layout.num_experts(target),), -1, dtype=experts.dtype, device=device)
            lookup[ids_tensor(tuple(ids), device)] = torch.arange(len(ids), dtype=experts.dtype, device=device)
            pair_rows = lookup[experts]  # selected expert j -> j, any other -> -1
        chosen = pair_rows >= 0
        if store is None:
            call, keys, calls = (~chosen).to(experts.dtype), torch.where(chosen, pair_rows, experts), 2
        else:
            call = torch.where(chosen, 0, ids_tensor(store.group_of, device)[experts] + 1)
            keys = torch.where(chosen, pair_rows, ids_tensor(store.key_of, device)[experts]).to(experts.dtype)
            calls = 1 + len(store.groups)

        # The order each call is fed its pairs in: grouped_mm sorts a call's pairs by expert (an unstable sort) and a
        # GEMM row's rounding depends on its position in its expert's group, so each call is fed its pairs such that
        # its own sort puts every expert's pairs in the base call's order (the unstable sort of one sequence is one
        # permutation: the fed keys are that sorted sequence, the rows placed where the sort takes them from).
        # Reading how many pairs each call gets is this forward's one host read; calls without pairs are skipped.
        base_order = torch.sort(experts).indices  # the base call's grouping
        rank = call * (len(ids) + self.layout.num_experts(target)) + keys  # by call, then by key (stable: base order)
        base_order = base_order[torch.sort(rank.index_select(0, base_order), stable=True).indices]
        counts = torch.bincount(call, minlength=calls).tolist()
        order = torch.cat([_fed(pairs, keys) for pairs in base_order.split(counts)])
        rows = _PairRows.apply(hidden, order, num_top_k)
        keys = keys.index_select(0, order).unsqueeze(-1)
        # Each call weighs its pairs by one; the routing weights are applied below, on the pair outputs as the call
        # returns them (its dtype: it rounds to the hidden dtype), with the base's own product and dtype promotion.
        ones = hidden.new_ones(order.numel(), 1)
        parts, start = [], 0
        for index, count in enumerate(counts):
            if count:
                args = (rows[start : start + count], keys[start : start + count], ones[start : start + count])
                if index == 0:
                    parts.append(_call_selected(target, ids, deltas, args))
                elif store is None:
                    parts.append(target(*args))
                else:
                    parts.append(_call_group(target, store, index - 1, args))
            start += count
        out = permute_rows(torch.cat(parts) if len(parts) > 1 else parts[0], inverse_permutation(order), order)
        out = out * top_k_weights.reshape(-1, 1)
        out = out.view(num_tokens, num_top_k, -1).sum(dim=1)  # as the implementations sum a token's slots
        if not counts[0] and deltas and torch.is_grad_enabled():  # no pair reached a selected expert: zero gradients
            out = out + sum(t.sum() * 0 for delta in deltas.values() for t in delta_tensors(delta))
        return out.to(hidden.dtype).view(*shape[:-1], -1)

    def forward(self, target: nn.Module, ids: list[int], deltas: Deltas, args: tuple, kwargs: dict) -> torch.Tensor:
        return self.compute(target, ids, deltas, args, kwargs)
