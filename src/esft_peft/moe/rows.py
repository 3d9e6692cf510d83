"""Row moves along the first dimension that both tuners' route-split computes use: selected expert rows, and
permutations whose backward is the inverse gather (not the accumulating scatter advanced indexing uses, slow on CPU).
"""

from __future__ import annotations

import functools
from typing import Any

import torch


@functools.lru_cache(maxsize=1024)
def ids_tensor(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The selected expert ids as a long tensor on ``device``, made once (no host-to-device copy per forward).
    Shared: never modify it in place."""
    return torch.tensor(ids, dtype=torch.long, device=device)


def expert_rows(weight: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """``weight[ids]`` along the expert dimension: a view when the ids are consecutive (all experts, a range), a copy of
    just those experts otherwise."""
    first = ids[0]
    if ids == list(range(first, first + len(ids))):
        return weight[first : first + len(ids)]
    return weight[ids_tensor(tuple(ids), weight.device)]


class _PermuteRows(torch.autograd.Function):
    """``x.index_select(0, order)`` for a permutation ``order``; its backward is the inverse gather."""

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
