"""Mixed-adapter batches in one experts call: every (token, expert) pair goes to its own sample's adapter.

In a mixed batch (peft's ``adapter_names=``) the pairs of a fused experts layer are computed as one adapter's are
(the route-split compute of ``compute/fused.py``), with *virtual experts* in place of one adapter's selected
experts: a pair routed to expert ``e`` by a sample whose adapter ``a`` trains ``e`` goes to the virtual expert
``W[e] + delta_a[e]``; every other pair (a ``"__base__"`` sample, an expert its adapter does not train, an adapter
that does not wrap this layer) goes to the frozen ``W[e]``. Only the virtual experts that receive a pair are formed.
So the whole batch costs one call of the experts module for the virtual experts and one for the frozen pairs, as
one adapter does (through transformers' experts interface, whichever implementation the user set), instead of one
MoE-block call per group of samples sharing an adapter (``mixed_batch.py``'s per-group design, which every other
case still uses).

Exactness: each pair is computed with its own adapter's weights, formed as the forward of that adapter forms them,
and weighted and summed as in that forward. A GEMM row's rounding can depend on which other rows share its
expert's group, and here a group holds the pairs of every sample routed there (the per-group design: those of its
adapter group), so a sample's outputs match the sample run alone to the same tolerance as the per-group design's.
One more host read per layer than one adapter's forward: which virtual experts receive pairs.
"""

from __future__ import annotations

import bisect
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch

from ...moe.layouts.base import bind_arguments, call_arguments
from ...moe.rows import expert_rows, ids_tensor
from ..mixed_batch_common import BASE_ADAPTER
from .layer import ESFTLayer, ExpertsDeltaLayer

GROUPED_KINDS = ("fused",)  # experts layouts whose compute takes per-pair rows (``pair_rows``)
_enabled = [True]


@contextmanager
def grouped_experts(enabled: bool = True) -> Iterator[None]:
    """Within the context, mixed-adapter batches use (``True``, the default) or do not use (``False``: one MoE-block
    call per adapter group everywhere) the one-call design for the fused experts layers; for comparisons."""
    previous = _enabled[0]
    _enabled[0] = enabled
    try:
        yield
    finally:
        _enabled[0] = previous


def groups_in_one_call(layers: list[ESFTLayer]) -> bool:
    """Whether a MoE block holding ``layers`` runs a mixed batch in one call: only fused experts are wrapped there
    (a trained router or shared expert is computed per sample group, so the block is split instead)."""
    return _enabled[0] and bool(layers) and all(
        isinstance(layer, ExpertsDeltaLayer) and layer.experts_compute.kind in GROUPED_KINDS for layer in layers
    )


class _Routing(NamedTuple):
    """The virtual experts of one experts layer for one batch: ``adapters`` (those of the batch this layer holds, in
    first-appearance order) own the virtual experts ``offsets[j]..offsets[j + 1] - 1`` (their ``esft_expert_ids``
    order); ``pair_table[pair_base[p] + e]`` is the virtual expert computing pair ``p`` routed to expert ``e``
    (``-1``: the frozen expert)."""

    adapters: list[str]
    offsets: list[int]
    pair_table: torch.Tensor
    pair_base: torch.Tensor


def _routing(layer: ExpertsDeltaLayer, names: list[str], pairs: int, device: torch.device) -> _Routing:
    """:class:`_Routing` for a batch whose sample ``i`` uses ``names[i]``, called with ``pairs`` (token, slot)
    pairs (the samples are rows and the tokens sample-major, as MoE blocks flatten them)."""
    adapters = [name for name in dict.fromkeys(names) if name != BASE_ADAPTER and name in layer.esft_delta]
    num_experts = layer.layout.num_experts(layer.get_base_layer())
    table = torch.full((len(adapters) + 1, num_experts), -1, device=device)  # the last slot: all frozen
    offsets = [0]
    for slot, name in enumerate(adapters):
        ids = layer.esft_expert_ids[name]
        table[slot, ids_tensor(tuple(ids), device)] = torch.arange(offsets[-1], offsets[-1] + len(ids), device=device)
        offsets.append(offsets[-1] + len(ids))
    slot_of = {name: slot for slot, name in enumerate(adapters)}
    slots = torch.tensor([slot_of.get(name, len(adapters)) * num_experts for name in names], device=device)
    return _Routing(adapters, offsets, table.view(-1), slots.repeat_interleave(pairs // len(names)))


def mixed_experts_forward(
    layer: ExpertsDeltaLayer, names: list[str], cache: dict, args: tuple, kwargs: dict
) -> torch.Tensor:
    """``layer``'s forward in a mixed batch whose sample ``i`` uses adapter ``names[i]``: one route-split compute
    over the virtual experts that receive pairs. ``cache`` keeps the :class:`_Routing` of each layer and batch."""
    target = layer.get_base_layer()
    if layer.disable_adapters:
        return layer.base_layer(*args, **kwargs)
    hidden, top_k_index, top_k_weights = bind_arguments(call_arguments(target), args, kwargs, 3, "experts")
    pairs, top_k = top_k_index.numel(), top_k_index.size(-1)
    if pairs % (len(names) * top_k):
        raise ValueError(
            f"Cannot run a mixed-adapter batch of {len(names)} samples through {type(target).__name__}: it was "
            f"called with {pairs // top_k} tokens, not a whole number per sample. Run one adapter per batch."
        )
    key = (id(layer), tuple(names), pairs)
    if key not in cache:
        cache[key] = _routing(layer, names, pairs, top_k_index.device)
    routing = cache[key]
    if not routing.adapters:
        return layer.base_layer(*args, **kwargs)
    virtual = routing.pair_table[routing.pair_base + top_k_index.reshape(-1)]
    used = torch.unique(virtual[virtual >= 0])  # the virtual experts that receive pairs (sorted; a host read)
    compact = torch.full((routing.offsets[-1] + 1,), -1, dtype=virtual.dtype, device=virtual.device)
    compact[used] = torch.arange(used.numel(), dtype=virtual.dtype, device=virtual.device)
    pair_rows = compact[virtual]  # the frozen pairs' -1 picks the spare last entry, -1
    rows_of: dict[int, list[int]] = {}  # adapter -> its rows that receive pairs
    for expert in used.tolist():
        slot = bisect.bisect_right(routing.offsets, expert) - 1
        rows_of.setdefault(slot, []).append(expert - routing.offsets[slot])
    ids: list[int] = []
    parts: dict[str, list[torch.Tensor]] = {}
    for slot, rows in rows_of.items():
        name = routing.adapters[slot]
        ids += [layer.esft_expert_ids[name][row] for row in rows]
        for param, delta in layer.combined_deltas([name])[1].items():
            parts.setdefault(param, []).append(expert_rows(delta, rows))  # a view when the rows are consecutive
    deltas = {param: torch.cat(rows) if len(rows) > 1 else rows[0] for param, rows in parts.items()}
    call = (hidden, top_k_index, top_k_weights)
    out = layer.experts_compute.compute(target, ids, deltas, call, {}, pair_rows=pair_rows)
    if torch.is_grad_enabled():  # every adapter of the batch gets gradients (zeros where no pair reached it)
        out = out + sum(d.sum() * 0 for name in routing.adapters for d in layer.combined_deltas([name])[1].values())
    return out
