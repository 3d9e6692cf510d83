"""The contract of an experts layout: everything esft-peft knows about one way of storing and calling experts.

A layout class answers, for the modules of its family:

- detection (:meth:`ExpertsLayout.detect`) and where the experts, block and wrapped modules are;
- per-expert views of the base weights (:meth:`ExpertsLayout.expert_views`);
- how to read the routing decision the experts receive (:meth:`ExpertsLayout.watch_routing`);
- the route-split compute with deltas (:meth:`ExpertsLayout.compute`): the (token, slot) pairs routed to selected
  experts are computed once with ``W[e] + delta[e]``, all other pairs with the frozen ``W``;
- the official ESFT projection names (:meth:`ExpertsLayout.official_projections`).

Layouts are stateless: one instance serves every module of its kind.
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import RoutingReadError, UnsupportedLayoutError
from ..partitioned import logical_shape

Deltas = dict[str, torch.Tensor]  # parameter name -> (k, *per-expert shape) rows, aligned with the selected ids
RecordRouting = Callable[[torch.Tensor, torch.Tensor], None]
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # the official ESFT format's per-expert projections


def with_delta(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``weight + delta`` under esft-peft's dtype policy: summed in the delta's dtype (fp32 master deltas by
    default), rounded once to the weight's dtype. Forward passes and merges both use it, so a merged model computes
    with exactly the weights the adapter model used."""
    return (weight.to(delta.dtype) + delta).to(weight.dtype)


@functools.lru_cache(maxsize=1024)
def ids_tensor(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The selected expert ids as a long tensor on ``device``, made once (no host-to-device copy per forward).
    Shared: never modify it in place."""
    return torch.tensor(ids, dtype=torch.long, device=device)


class _PermuteRows(torch.autograd.Function):
    """``x.index_select(0, order)`` for a permutation ``order``; its backward is the inverse gather, not the
    accumulating scatter advanced indexing uses (which is slow on CPU)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` in ``order`` (a permutation whose inverse is ``inverse``)."""
    return _PermuteRows.apply(x, order, inverse)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.size(0), device=order.device)
    return inverse


def expert_rows(weight: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """``weight[ids]`` along the expert dimension: a view when the ids are consecutive (all experts, a range), a copy of
    just those experts otherwise."""
    first = ids[0]
    if ids == list(range(first, first + len(ids))):
        return weight[first : first + len(ids)]
    return weight[ids_tensor(tuple(ids), weight.device)]


def unwrap(module: nn.Module) -> nn.Module:
    """The base module behind a peft tuner layer (or the module itself)."""
    get_base_layer = getattr(module, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) else module


def crafts_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a tuner layer that turns the dense module it wraps into a mixture of experts (PESC):
    discovery then sees the tuner layer itself, not the dense module behind it."""
    return bool(getattr(type(module), "crafts_experts", False))


def named_base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` with peft wrappers resolved to the module they wrap (except layers that craft experts) and
    adapter internals skipped."""
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in wrapped):
            continue
        if module is not unwrap(module):
            wrapped.append(name + ".")
        yield name, module if crafts_experts(module) else unwrap(module)


class ExpertsLayout(ABC):
    """One experts layout (see the module docstring). Subclasses register in :mod:`esft_peft.moe.layouts`."""

    kind: ClassVar[str]  # recorded in adapters (``base_layout``); never rename

    # ------------------------------------------------------------------------------------------------ discovery

    @abstractmethod
    def detect(self, name: str, module: nn.Module) -> bool:
        """Whether the module called ``name`` is an experts container of this layout."""

    def block_name(self, experts_name: str) -> str:
        """The MoE block holding the experts and the router."""
        return experts_name.rpartition(".")[0]

    @abstractmethod
    def num_experts(self, experts: nn.Module) -> int:
        """Number of routed experts."""

    def delta_targets(self, experts_name: str) -> list[str]:
        """Modules that get an experts-delta layer (empty when experts are separate modules)."""
        return [experts_name]

    def expert_modules(self, experts_name: str, experts: nn.Module) -> dict[int, str]:
        """Expert id -> module name, for layouts whose experts are separate modules."""
        return {}

    # ------------------------------------------------------------------------------------------------ weights

    def expert_views(self, target: nn.Module) -> dict[str, torch.Tensor]:
        """Parameter name -> tensor of shape (num_experts, ...) viewing ``target``'s base weights (shared storage)."""
        raise UnsupportedLayoutError(f"{type(self).__name__} experts are not wrapped as one module.")

    def expert_shapes(self, model: nn.Module, experts_name: str) -> dict[str, list[int]]:
        """Per-expert parameter shapes of a layer (an adapter's compatibility record)."""
        shapes = {}
        for target in self.delta_targets(experts_name):
            views = self.expert_views(unwrap(model.get_submodule(target)))
            suffix = target.removeprefix(experts_name).lstrip(".")
            shapes.update({f"{suffix}.{n}" if suffix else n: list(logical_shape(v)[1:]) for n, v in views.items()})
        return shapes

    def check_wrappable(self, target: nn.Module) -> None:
        """Raise a clear error when ``target`` cannot get deltas (expert parallelism, a missing private API)."""
        if getattr(target, "_is_expert_parallel", False):
            raise UnsupportedLayoutError(
                f"{type(target).__name__} is sharded with expert parallelism (`_is_expert_parallel`), which ESFT does "
                "not support yet: each process would hold only some experts. Load the model without expert "
                "parallelism (no `distributed_config`/`tp_plan` with experts) to train ESFT adapters."
            )

    # ------------------------------------------------------------------------------------------------ compute

    @abstractmethod
    def forward(self, target: nn.Module, ids: list[int], deltas: Deltas, args: tuple, kwargs: dict) -> Any:
        """The output of ``target(*args, **kwargs)`` computed with ``W[e] + delta`` for the selected experts ``ids``."""

    def compute(self, target: nn.Module, ids: list[int], deltas: Deltas, args: tuple, kwargs: dict) -> Any:
        """Call ``target`` with ``W[e] + delta`` for the selected experts ``ids``. Here (families outside
        transformers' experts interface) the module is called, so that hooks managing its weights run (DeepSpeed
        ZeRO-3's gather), with :meth:`forward` in place of its own forward for that call."""
        vars(target)["forward"] = lambda *a, **kw: self.forward(target, ids, deltas, a, kw)
        try:
            return target(*args, **kwargs)
        finally:
            vars(target).pop("forward", None)

    # ------------------------------------------------------------------------------------------------ routing

    @abstractmethod
    def watch_routing(self, model: nn.Module, layer: Any, record: RecordRouting) -> RemovableHandle:
        """Hook the layer so that every forward calls ``record(top_k_index[T, K], top_k_weights[T, K])``."""

    # ------------------------------------------------------------------------------------------------ interop

    def official_projections(
        self, layer: Any, experts: nn.Module, rows: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """One expert's gate/up/down weights in ``nn.Linear`` orientation (out, in), as views of ``rows`` (this
        expert's tensors keyed like :meth:`expert_views`: base rows or delta rows)."""
        raise UnsupportedLayoutError(
            f"Layer {layer.key}: {self.kind} experts cannot be mapped onto the official ESFT format (supported: "
            "fused gate_up_proj/down_proj experts without biases and ModuleList experts with gate/up/down_proj)."
        )


# ---------------------------------------------------------------------------------------------------- helpers


def is_experts_name(name: str) -> bool:
    """Whether a module path names an experts container (``...mlp.experts``, ``...block_sparse_moe.experts``)."""
    return name.rpartition(".")[2].endswith("experts")


def call_arguments(module: nn.Module) -> list[str]:
    """Names of the positional parameters of ``module.forward``."""
    return _positional_names(type(unwrap(module)).forward)


@functools.lru_cache(maxsize=None)
def _positional_names(function: Callable) -> list[str]:
    parameters = list(inspect.signature(function).parameters.values())[1:]  # without self
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def bind_arguments(names: list[str], args: tuple, kwargs: dict, wanted: int, where: str) -> list[Any]:
    """The first ``wanted`` call arguments, by position or by name."""
    values = dict(zip(names, args))
    values.update(kwargs)
    try:
        return [values[name] for name in names[:wanted]]
    except KeyError as missing:
        raise RoutingReadError(f"{where}: called without {missing}.") from None


def watch_experts_input(experts: nn.Module, key: str, record: RecordRouting) -> RemovableHandle:
    """A pre-hook reading ``experts(hidden, top_k_index, top_k_weights)`` calls (after all router post-processing)."""
    names = call_arguments(experts)
    if len(names) < 3:
        raise RoutingReadError(f"Layer {key}: experts forward takes {names}; expected (hidden, index, weights).")

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        _, index, weights = bind_arguments(names, args, kwargs, 3, f"Layer {key}: experts")
        record(index, weights)

    return experts.register_forward_pre_hook(hook, with_kwargs=True)


def router_of(model: nn.Module, layer: Any) -> nn.Module:
    """The router (``gate``/``router``) of an MoE layer."""
    names = [n for n in layer.router_names if n.rpartition(".")[2] in ("gate", "router")] or layer.router_names
    if not names:
        raise RoutingReadError(f"Layer {layer.key}: no router (`gate`/`router`) found next to {layer.experts_name}.")
    return model.get_submodule(names[0])
