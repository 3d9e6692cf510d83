"""The contract of ESFT's route-split compute for one experts layout: the (token, slot) pairs routed to selected
experts are computed once with ``W[e] + delta[e]``, every other pair with the frozen ``W``; cost and memory follow
the selection."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Union

import torch
from torch import nn

from ....moe.layouts import ExpertsLayout, layout_of_kind
from ..low_rank import LowRankDelta, dense

# parameter name -> (k, *per-expert shape) rows aligned with the selected ids: dense, or low-rank factors
Deltas = dict[str, Union[torch.Tensor, LowRankDelta]]


def with_delta(weight: torch.Tensor, delta: Union[torch.Tensor, LowRankDelta]) -> torch.Tensor:
    """``weight + delta`` under esft-peft's dtype policy: summed in the delta's dtype (fp32 master deltas by
    default), rounded once to the weight's dtype. Forward passes and merges both use it, so a merged model computes
    with exactly the weights the adapter model used. A low-rank delta is formed here (``s * B @ A``, in the factors'
    dtype), so every compute forms it where it forms ``W + delta``."""
    delta = dense(delta)
    return (weight.to(delta.dtype) + delta).to(weight.dtype)


def call_shadowed(module: nn.Module, form: Callable[[nn.Module], dict[str, torch.Tensor]], args: tuple,
                  kwargs: Union[dict, None] = None) -> Any:
    """Call ``module``, hooks included, with the tensors ``form(module)`` returns in place of its attributes of those
    names, for this call only.

    They are formed in a pre-forward hook registered last, so after any hook that materialises the weights (DeepSpeed
    ZeRO-3's gather, FSDP2's unshard); instance attributes then shadow ``_parameters`` for ``self.<name>`` reads,
    leaving the registered parameters in place for the hooks that manage them.
    """
    shadowed: list[str] = []

    def shadow(mod: nn.Module, _args: tuple) -> None:
        tensors = form(mod)
        shadowed.extend(tensors)
        vars(mod).update(tensors)

    handle = module.register_forward_pre_hook(shadow)
    try:
        return module(*args, **(kwargs or {}))
    finally:
        handle.remove()
        for name in shadowed:
            vars(module).pop(name, None)


class ExpertsCompute(ABC):
    """The route-split compute of the experts of one layout :attr:`kind` (stateless: one instance serves every
    module of that kind)."""

    kind: ClassVar[str]  # the layout kind (:attr:`ExpertsLayout.kind`) it computes

    @property
    def layout(self) -> ExpertsLayout:
        return layout_of_kind(self.kind)

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
