"""The contract of an experts layout: how one family stores its routed experts, and nothing else.

A layout class answers, for the modules of its family:

- detection (:meth:`ExpertsLayout.detect`) and where the experts, block and wrapped modules are;
- per-expert views of the base weights (:meth:`ExpertsLayout.expert_views`) and their shapes;
- whether the stored experts can get deltas (:meth:`ExpertsLayout.check_wrappable`).

What is done with a layout lives with whoever does it, keyed by :attr:`ExpertsLayout.kind`: ESFT's route-split
compute (:mod:`esft_peft.tuners.esft.compute`), scoring's routing capture (:mod:`esft_peft.scoring.routing_capture`)
and the official format's export mapping (:mod:`esft_peft.interop.official_mapping`).

Layouts are stateless: one instance serves every module of its kind.
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from ..errors import RoutingReadError, UnsupportedLayoutError
from ..partitioned import logical_shape


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

    supports_expert_parallel: ClassVar[bool] = False  # transformers' expert parallelism (fused experts only)

    def check_wrappable(self, target: nn.Module) -> None:
        """Raise a clear error when ``target`` cannot get deltas (tensor parallelism inside the experts, expert
        parallelism on a layout that has no compute for it, a missing private API)."""
        for name, param in target.named_parameters(recurse=False):
            inside = [p for p in getattr(param, "placements", ()) if getattr(p, "dim", 0) != 0]  # Shard-like
            if inside:
                raise UnsupportedLayoutError(
                    f"{type(target).__name__}.{name} is sharded inside each expert by tensor parallelism "
                    f"(placements {tuple(getattr(param, 'placements', ()))}): ESFT forms W[e] + delta[e] per whole "
                    "expert. Drop the experts' rules from `tp_plan` and shard the experts whole with expert "
                    "parallelism instead: DistributedConfig(ep_size=N, fsdp_size=N)."
                )
        if getattr(target, "_is_expert_parallel", False) and not self.supports_expert_parallel:
            raise UnsupportedLayoutError(
                f"{type(target).__name__} is sharded with expert parallelism (`_is_expert_parallel`), which ESFT "
                f"supports for fused experts only, not for {self.kind} experts. Load the model without expert "
                "parallelism (no `ep_size`) to train ESFT adapters."
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
