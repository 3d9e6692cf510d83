"""Tuner layers: trainable additive deltas for selected experts, and for whole modules.

Both compute with ``W + delta`` formed by :func:`~esft_peft.tuners.esft.compute.with_delta` (summed in the delta's
dtype, rounded once to the weight's), which is also how merging writes the weights: a merged model computes with
exactly the weights the adapter model used.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...moe.layouts import ExpertsLayout
from ...moe.partitioned import is_partitioned, logical_shape
from . import expert_parallel
from .compute import call_shadowed, compute_for, with_delta
from .low_rank import LORA_A, LORA_B, LowRankDelta, dense, new_factors, scale_of
from .quantized import frozen_store, refuse_merge_on_4bit

logger = logging.getLogger(__name__)

# A merge into a low-precision base is reported when this fraction of the delta's norm is rounded away.
MERGE_LOSS_WARNING = 0.01


def _report_merge_loss(where: str, adapter: str, intended: torch.Tensor, applied: torch.Tensor) -> None:
    norm = intended.float().norm()
    if norm == 0:
        return
    lost = ((applied.float() - intended.float()).norm() / norm).item()
    if lost > MERGE_LOSS_WARNING:
        logger.warning(
            "Merging adapter %r into %s (%s) rounded away %.1f%% of the update's norm. Keep the adapter unmerged, "
            "or merge into a float32 copy of the base, to keep the full update.",
            adapter, where, str(applied.dtype).removeprefix("torch."), 100 * lost,
        )


def _call_with_deltas(module: nn.Module, deltas: dict[str, torch.Tensor], args: tuple, kwargs: dict):
    """Call ``module``, hooks included, with ``weight + delta`` in place of its parameters named in ``deltas``."""

    def form(mod: nn.Module) -> dict[str, torch.Tensor]:
        params = dict(mod.named_parameters(recurse=False))
        return {name: with_delta(params[name], delta) for name, delta in deltas.items()}

    return call_shadowed(module, form, args, kwargs)


def _scaled(weight: float, tensor: torch.Tensor) -> torch.Tensor:
    return tensor if weight == 1.0 else weight * tensor


# ``init_weights=False``: random deltas with std this multiple of the RMS of the weights they update (of the order of
# LoRA's ``init_lora_weights=False`` update, so that an untrained adapter visibly changes the outputs of a tiny
# model; a fixed std where those weights are zero or partitioned by ZeRO-3).
RANDOM_INIT_SCALE = 1.0
RANDOM_INIT_FALLBACK_STD = 0.02


def _new_delta(
    shape: tuple[int, ...], base: torch.Tensor, init_weights: bool, rows: Optional[list[int]] = None, **kwargs: Any
) -> nn.Parameter:
    """A delta for ``base`` (for its ``rows`` when given): zeros, the identity (peft's ``init_weights=True``), or
    random values (``init_weights=False``, for tests)."""
    delta = torch.zeros(shape, dtype=base.dtype, device=base.device)
    if not init_weights:
        updated = base if rows is None or is_partitioned(base) else base[torch.tensor(rows, device=base.device)]
        rms = 0.0 if is_partitioned(updated) else updated.detach().float().pow(2).mean().sqrt().item()
        delta.normal_(0.0, RANDOM_INIT_SCALE * rms if rms > 0 else RANDOM_INIT_FALLBACK_STD)
    return nn.Parameter(delta, **kwargs)


def _in_out_features(module: nn.Module) -> tuple[Optional[int], Optional[int]]:
    """``(in_features, out_features)`` as peft's tuner layers expose them; ``(None, None)`` where undefined."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return getattr(module, "in_features", None), getattr(module, "out_features", None)


DELTA_CONTAINER = "esft_delta"  # the dense deltas' container: their state-dict keys hold ".esft_delta."
ADAPTER_CONTAINERS = (DELTA_CONTAINER, LORA_A, LORA_B)  # every ESFT adapter tensor lives in one of these


class ESFTLayer(BaseTunerLayer):
    """Common state of ESFT tuner layers: ``esft_delta[adapter]`` holds the trainable dense deltas; with
    ``delta_rank`` the matrices' deltas are ``esft_scaling[adapter] * esft_lora_B[adapter][p] @
    esft_lora_A[adapter][p]`` instead (:mod:`~esft_peft.tuners.esft.low_rank`)."""

    adapter_layer_names = ADAPTER_CONTAINERS

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.in_features, self.out_features = _in_out_features(base_layer)
        self.esft_delta = nn.ModuleDict()
        self.esft_lora_A = nn.ModuleDict()
        self.esft_lora_B = nn.ModuleDict()
        self.esft_scaling: dict[str, float] = {}
        self._merge_backup: dict[str, dict[str, torch.Tensor]] = {}
        self._forced_adapters: Optional[list[str]] = None  # set while a mixed-adapter batch runs (mixed_batch.py)
        self._disable_adapters = False
        self.merged_adapters = []
        # set by ESFTModel on a data-parallel model sharded by transformers, whose deltas are DTensors
        # (expert_parallel.py): maps a delta to the plain tensor the forward uses, through its gradient synchronisation
        self.grad_sync: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def _local(self, param: torch.Tensor) -> torch.Tensor:
        return param if self.grad_sync is None else self.grad_sync(param)

    def _base_param(self) -> torch.Tensor:
        return next(self.get_base_layer().parameters())

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        target = device if device is not None else self._base_param().device
        for container in (self.esft_delta, self.esft_lora_A, self.esft_lora_B):
            if adapter_name in container:
                container[adapter_name] = container[adapter_name].to(target)

    def _add_deltas(self, adapter_name: str, specs: dict[str, tuple[tuple, Any]], lead: int, init_weights: bool,
                    rank: Optional[int], alpha: Optional[float], **new_kwargs: Any) -> None:
        """Create ``adapter_name``'s deltas for ``specs`` (name -> (delta shape, base tensor); ``lead`` leading
        dimensions count experts): dense deltas, or with a ``rank`` low-rank factors for the matrices (vectors such as
        biases are then not trained)."""
        dense_deltas, factors_A, factors_B = {}, {}, {}
        for name, (shape, base) in specs.items():
            if rank is None:
                dense_deltas[name] = _new_delta(shape, base, init_weights, **new_kwargs)
            elif len(shape) - lead == 2:
                factors_A[name], factors_B[name] = new_factors(shape, rank, base, init_weights)
        self.esft_delta[adapter_name] = nn.ParameterDict(dense_deltas)
        if rank is not None:
            self.esft_lora_A[adapter_name] = nn.ParameterDict(factors_A)
            self.esft_lora_B[adapter_name] = nn.ParameterDict(factors_B)
            self.esft_scaling[adapter_name] = scale_of(rank, rank if alpha is None else alpha)

    def delta_of(self, adapter: str) -> dict[str, Any]:
        """``adapter``'s deltas by parameter name: dense tensors, or :class:`LowRankDelta` factors (plain tensors:
        this rank's part of DTensor deltas, through their gradient synchronisation)."""
        deltas: dict[str, Any] = {name: self._local(delta) for name, delta in self.esft_delta[adapter].items()}
        if adapter in self.esft_lora_A:
            scale = self.esft_scaling[adapter]
            for name, A in self.esft_lora_A[adapter].items():
                deltas[name] = LowRankDelta(self._local(A), self._local(self.esft_lora_B[adapter][name]), scale)
        return deltas

    def _adapters_to_apply(self) -> list[str]:
        """The adapters whose deltas this forward applies: the active ones (or, in a mixed-adapter batch, the current
        sample group's); none when adapters are disabled (a merged one is unmerged first) or merged."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return []
        adapters = self.active_adapters if self._forced_adapters is None else self._forced_adapters
        return [] if self.merged else [name for name in adapters if name in self.esft_delta]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write ``W + delta`` (:func:`with_delta`, the weights the forward uses) into the base; the replaced
        weights are kept so that :meth:`unmerge` restores them bit for bit."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        refuse_merge_on_4bit(self.get_base_layer())
        with torch.no_grad():
            for adapter in adapter_names:
                if adapter not in self.esft_delta:
                    continue
                backup = {name: weight.detach().clone() for name, weight in self.base_weights(adapter).items()}
                deltas = {name: dense(delta) for name, delta in self.delta_of(adapter).items()}
                merged = {name: with_delta(backup[name], delta) for name, delta in deltas.items()}
                if safe_merge and not all(torch.isfinite(t).all() for t in merged.values()):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                for name, value in merged.items():
                    self._write_base_weights(adapter, name, value)
                    applied = value.float() - backup[name].float()
                    _report_merge_loss(self._describe(adapter, name), adapter, deltas[name], applied)
                self._merge_backup[adapter] = backup
                self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Restore the exact base weights saved at merge time (bit-identical round trip)."""
        if not self.merged:
            logger.warning("Already unmerged. Nothing to do.")
            return
        with torch.no_grad():
            while self.merged_adapters:
                adapter = self.merged_adapters.pop()
                for name, saved in self._merge_backup.pop(adapter).items():
                    self._write_base_weights(adapter, name, saved)


class ExpertsDeltaLayer(nn.Module, ESFTLayer):
    """Wraps an experts container; holds one delta row per *selected* expert (zeros unless ``init_weights=False``).

    ``esft_delta[adapter][param]`` has shape ``(len(ids), *per_expert_shape)``; row ``j`` belongs to expert
    ``esft_expert_ids[adapter][j]``. The layout kind's route-split compute (:mod:`.compute`) runs the pairs routed to
    selected experts once with ``W[e] + delta[e]`` and every other pair with the frozen ``W``, so cost and memory
    follow the selection.

    Under transformers' expert parallelism (``shard``, :mod:`.expert_parallel`) the layer holds the rows of the
    selected experts this rank owns (``esft_expert_ids``; the whole selection in ``ep_selected``), and its
    ``state_dict`` holds the whole adapter.
    """

    other_param_names = ("esft_expert_ids", "esft_scaling", "ep_selected")

    def __init__(
        self,
        base_layer: nn.Module,
        layout: ExpertsLayout,
        adapter_name: str,
        expert_ids: list[int],
        init_weights: bool = True,
        rank: Optional[int] = None,
        alpha: Optional[float] = None,
        shard: Optional[expert_parallel.ExpertShard] = None,
    ) -> None:
        super().__init__()
        ESFTLayer.__init__(self, base_layer)
        self.layout = layout
        self.experts_compute = compute_for(layout.kind)
        self.esft_expert_ids: dict[str, list[int]] = {}
        self.expert_shard = shard
        self.ep_selected: dict[str, list[int]] = {}
        self.update_layer(adapter_name, expert_ids, init_weights, rank, alpha)

    @staticmethod
    def delta_specs(base: nn.Module, layout: ExpertsLayout, expert_ids: list[int]) -> dict[str, tuple[tuple, Any]]:
        """Parameter name -> (delta shape, base tensor it follows) for ``expert_ids`` of the experts ``base``."""
        return {name: ((len(expert_ids), *logical_shape(view)[1:]), view)
                for name, view in layout.expert_views(base).items()}

    def update_layer(self, adapter_name: str, expert_ids: list[int], init_weights: bool = True,
                     rank: Optional[int] = None, alpha: Optional[float] = None) -> None:
        """Add ``adapter_name``'s deltas for ``expert_ids``: dense ``(k, *per-expert shape)`` rows, or with a ``rank``
        factors ``A`` (k, r, d1) and ``B`` (k, d0, r) for every per-expert matrix (biases then stay frozen)."""
        shard = self.expert_shard
        if shard is not None and rank is not None:
            raise ValueError(
                "Low-rank deltas (ESFTConfig.delta_rank) are not supported with expert parallelism yet. Train "
                "full-rank deltas under expert parallelism, or load the model without it to train at low rank."
            )
        rows = list(expert_ids) if shard is None else shard.owned(list(expert_ids))
        specs = self.delta_specs(self.get_base_layer(), self.layout, rows)
        store = frozen_store(self.get_base_layer())  # a 4-bit base: the kept rows (quantized.py)
        if shard is not None and not init_weights:  # the values one process would draw: drawn whole, rank 0's kept
            self.esft_delta[adapter_name] = nn.ParameterDict(
                {name: self._owned_random_delta(view, list(expert_ids)) for name, (_, view) in specs.items()}
            )
        elif store is not None:  # the selected experts' kept rows stand in for the 4-bit base's placeholders
            index = torch.tensor(rows, device=self._base_param().device)
            kept = {name: (shape, store.rows(name, rows) if name in store.shapes else view[index])
                    for name, (shape, view) in specs.items()}
            self._add_deltas(adapter_name, kept, 1, init_weights, rank, alpha)
        else:
            self._add_deltas(adapter_name, specs, 1, init_weights, rank, alpha, rows=rows)
        self.esft_expert_ids[adapter_name] = rows
        if shard is not None:
            self.ep_selected[adapter_name] = list(expert_ids)
        self.set_adapter(self.active_adapters)

    def _owned_random_delta(self, view: torch.Tensor, expert_ids: list[int]) -> nn.Parameter:
        full = expert_parallel.full_weight(view)
        whole = _new_delta((len(expert_ids), *full.shape[1:]), full, False, rows=expert_ids)
        expert_parallel.broadcast_replicated([whole])
        return nn.Parameter(expert_parallel.owned_rows(self.expert_shard, expert_ids, whole.data))

    def combined_deltas(
        self, adapters: list[str], weights: Optional[list[float]] = None
    ) -> tuple[list[int], dict[str, torch.Tensor]]:
        """Expert ids (first-appearance order) and dense delta rows of ``adapters`` (low-rank deltas formed); an expert
        trained by several adapters gets the (weighted) sum of their rows. Serves the forward of several active
        adapters, mixed-adapter batches and add_weighted_adapter.
        """
        weights = weights or [1.0] * len(adapters)
        if len(adapters) == 1 and weights[0] == 1.0:
            name = adapters[0]
            return self.esft_expert_ids[name], {param: dense(d) for param, d in self.delta_of(name).items()}
        ids = list(dict.fromkeys(e for name in adapters for e in self.esft_expert_ids[name]))
        deltas = {name: self.delta_of(name) for name in adapters}
        combined = {}
        for param, view in self.layout.expert_views(self.get_base_layer()).items():
            if not any(param in deltas[name] for name in adapters):
                continue
            rows = []
            for expert in ids:
                parts = [
                    _scaled(weight, dense(deltas[name][param][self.esft_expert_ids[name].index(expert)]))
                    for name, weight in zip(adapters, weights)
                    if expert in self.esft_expert_ids[name] and param in deltas[name]
                ]
                if not parts:  # only adapters that do not train this parameter (low rank: biases) train this expert
                    like = next(deltas[name][param] for name in adapters if param in deltas[name])
                    parts = [torch.zeros(logical_shape(view)[1:], dtype=like.dtype, device=view.device)]
                rows.append(torch.stack(parts).sum(0) if len(parts) > 1 else parts[0])
            # Under expert parallelism an adapter may own none of this rank's selected experts: its (empty) deltas
            # still enter the graph, as an exact zero, so that their gradients exist on every rank and collectives over
            # the gradients (clip_grad_norm_) match
            empty = [dense(deltas[name][param]) for name in adapters
                     if param in deltas[name] and not self.esft_expert_ids[name]]
            value = torch.stack(rows) if rows else torch.cat(empty)
            combined[param] = value + sum(d.sum() for d in empty) if rows and empty else value
        return ids, combined

    def _base_rows(self, adapter: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The tensors holding this rank's experts (local shards under expert parallelism) and the rows of
        ``adapter``'s experts in them."""
        views, ids = self.layout.expert_views(self.get_base_layer()), self.esft_expert_ids[adapter]
        if self.expert_shard is not None:
            views, ids = {n: v.to_local() for n, v in views.items()}, self.expert_shard.local(ids)
        else:  # experts FSDP2-sharded without expert parallelism: whole (a collective)
            views = {n: expert_parallel.full_weight(v) for n, v in views.items()}
        return views, torch.tensor(ids, dtype=torch.long, device=self._base_param().device)

    def base_weights(self, adapter: str) -> dict[str, torch.Tensor]:
        """The frozen weights under ``adapter``'s deltas (its selected experts' rows, aligned with the delta rows)."""
        views, index = self._base_rows(adapter)
        store = frozen_store(self.get_base_layer())  # a 4-bit base: the kept rows (quantized.py)
        ids = self.esft_expert_ids[adapter]
        return {name: store.rows(name, ids) if store is not None and name in store.shapes else views[name][index]
                for name in self.delta_of(adapter)}

    def forward(self, *args: Any, **kwargs: Any):
        active = self._adapters_to_apply()
        if not active:
            return self.base_layer(*args, **kwargs)
        if len(active) == 1:  # low-rank factors stay factors: formed where W + delta is
            ids, deltas = self.esft_expert_ids[active[0]], self.delta_of(active[0])
        else:
            ids, deltas = self.combined_deltas(active)
        if self.expert_shard is not None:
            selected = list(dict.fromkeys(e for name in active for e in self.ep_selected[name]))
            return expert_parallel.compute(
                self.get_base_layer(), self.expert_shard, selected, ids, deltas, args, kwargs
            )
        return self.experts_compute.compute(self.get_base_layer(), ids, deltas, args, kwargs)

    def _write_base_weights(self, adapter: str, name: str, value: torch.Tensor) -> None:
        views, index = self._base_rows(adapter)
        stored = self.layout.expert_views(self.get_base_layer())[name]
        if self.expert_shard is not None or views[name] is stored:  # the rows are (a view of) the stored tensor
            views[name][index] = value
        else:
            whole = views[name].clone()
            whole[index] = value
            expert_parallel.write_full_weight(stored, whole)

    def _describe(self, adapter: str, name: str) -> str:
        return f"experts {self.esft_expert_ids[adapter]} ({name})"

    def __repr__(self) -> str:
        selected = {name: ids for name, ids in self.esft_expert_ids.items()}
        return f"esft.{type(self).__name__}(kind={self.layout.kind}, experts={selected})\n  ({self.get_base_layer()!r})"


class ModuleDeltaLayer(nn.Module, ESFTLayer):
    """Wraps a module that owns parameters (a Linear of a ModuleList expert, a shared expert's projection, a norm,
    a router, ...); holds one delta per direct parameter (zeros unless ``init_weights=False``).

    The module runs with ``weight + delta`` in place of its weights (a Linear computes ``F.linear(x, W + delta)``;
    routers that subclass Linear but return tuples run their own forward). A zero delta reproduces the base exactly.
    """

    other_param_names = ("esft_scaling",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, init_weights: bool = True,
                 rank: Optional[int] = None, alpha: Optional[float] = None) -> None:
        super().__init__()
        ESFTLayer.__init__(self, base_layer)
        self.update_layer(adapter_name, init_weights=init_weights, rank=rank, alpha=alpha)

    @staticmethod
    def delta_specs(base: nn.Module) -> dict[str, tuple[tuple, Any]]:
        """Parameter name -> (delta shape, base parameter) for the direct parameters of ``base``."""
        return {name: (tuple(logical_shape(param)), param) for name, param in base.named_parameters(recurse=False)}

    def update_layer(self, adapter_name: str, expert_ids: Any = None, init_weights: bool = True,
                     rank: Optional[int] = None, alpha: Optional[float] = None) -> None:
        """Add ``adapter_name``'s deltas (``expert_ids`` is unused: this layer holds whole-module deltas); with a
        ``rank`` (routed ModuleList experts) the weight matrix gets factors ``A`` (r, in), ``B`` (out, r) and the
        module's vectors (biases) stay frozen."""
        self._add_deltas(adapter_name, self.delta_specs(self.get_base_layer()), 0, init_weights, rank, alpha,
                         requires_grad=False)
        self.set_adapter(self.active_adapters)

    def combined_deltas(self, adapters: list[str], weights: Optional[list[float]] = None) -> dict[str, torch.Tensor]:
        """Per parameter, the (weighted) sum of the deltas of ``adapters``."""
        weights = weights or [1.0] * len(adapters)
        total: dict[str, torch.Tensor] = {}
        for adapter, weight in zip(adapters, weights):
            for name, delta in self.delta_of(adapter).items():
                delta = _scaled(weight, dense(delta))
                total[name] = total[name] + delta if name in total else delta
        return total

    def base_weights(self, adapter: str) -> dict[str, torch.Tensor]:
        """The frozen parameters under ``adapter``'s deltas (whole, also where FSDP2 shards them)."""
        params = dict(self.get_base_layer().named_parameters(recurse=False))
        return {name: expert_parallel.full_weight(params[name]) for name in self.delta_of(adapter)}

    def forward(self, *args: Any, **kwargs: Any):
        active = self._adapters_to_apply()
        if not active:
            return self.base_layer(*args, **kwargs)
        return _call_with_deltas(self.get_base_layer(), self.combined_deltas(active), args, kwargs)

    def _write_base_weights(self, adapter: str, name: str, value: torch.Tensor) -> None:
        expert_parallel.write_full_weight(dict(self.get_base_layer().named_parameters(recurse=False))[name], value)

    def _describe(self, adapter: str, name: str) -> str:
        return name

    def __repr__(self) -> str:
        return f"esft.{type(self).__name__}(adapters={sorted(self.esft_delta)})\n  ({self.get_base_layer()!r})"
