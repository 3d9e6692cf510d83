"""Low-rank expert deltas (``ESFTConfig.delta_rank``): each selected expert's matrix gets ``s * B @ A``.

With a rank ``r`` a selected expert's per-expert matrix ``W[e]`` of shape ``(d0, d1)`` (the storage orientation of
the experts' tensors) is updated by ``s * B[e] @ A[e]``, ``A[e]`` of shape ``(r, d1)``, ``B[e]`` of shape ``(d0, r)``
and ``s = delta_alpha / delta_rank`` (peft's LoRA scaling). The factors are initialised as peft's LoRA initialises
``lora_A``/``lora_B``: ``A`` kaiming-uniform (``a = sqrt(5)``, per expert), ``B`` zero, so a fresh adapter reproduces
the base exactly. ``init_weights=False`` (tests) also draws ``B`` kaiming-uniform, so that the update is not zero.

The update is formed only where ``W + delta`` is formed today (:func:`~esft_peft.tuners.esft.compute.with_delta`
receives a :class:`LowRankDelta` and forms ``s * B @ A`` in the factors' dtype), so the forward, the backward's
re-forming, merging and the official-format export all use the same weights.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch import nn

LORA_A = "esft_lora_A"  # container of the A factors: ``esft_lora_A[adapter][param]`` (k, r, d1) or (r, d1)
LORA_B = "esft_lora_B"  # container of the B factors: ``esft_lora_B[adapter][param]`` (k, d0, r) or (d0, r)
LOW_RANK_CONTAINERS = (LORA_A, LORA_B)


def scale_of(rank: int, alpha: float) -> float:
    """peft's LoRA scaling ``alpha / rank``."""
    return alpha / rank


class LowRankDelta:
    """``scale * B @ A`` for one parameter: ``A`` (k, r, d1) and ``B`` (k, d0, r) for k experts (or 2-D, one matrix).

    Stands where a dense delta stands in the compute (``Deltas``); :meth:`dense` forms the update when the weights are
    formed, so no dense delta is kept between forward and backward.
    """

    __slots__ = ("A", "B", "scale")

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        self.A, self.B, self.scale = A, B, scale

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.B.shape[:-1], self.A.shape[-1]))

    def dense(self) -> torch.Tensor:
        """``scale * B @ A`` in the factors' dtype."""
        product = torch.matmul(self.B, self.A)
        return product if self.scale == 1.0 else product * self.scale

    def __getitem__(self, index: Any) -> "LowRankDelta":
        """The rows ``index`` of the expert dimension (3-D factors)."""
        return LowRankDelta(self.A[index], self.B[index], self.scale)

    def factors(self) -> Iterator[torch.Tensor]:
        yield self.A
        yield self.B


def dense(delta: Any) -> torch.Tensor:
    """A delta as a dense tensor (a :class:`LowRankDelta` formed, a tensor as it is)."""
    return delta.dense() if isinstance(delta, LowRankDelta) else delta


def delta_tensors(delta: Any) -> Iterator[torch.Tensor]:
    """The trainable tensors behind a delta (the factors of a :class:`LowRankDelta`, else the tensor itself)."""
    if isinstance(delta, LowRankDelta):
        yield from delta.factors()
    else:
        yield delta


def new_factors(
    shape: tuple[int, ...], rank: int, like: torch.Tensor, init_weights: bool
) -> tuple[nn.Parameter, nn.Parameter]:
    """``(A, B)`` for a delta of ``shape`` (``(k, d0, d1)`` or ``(d0, d1)``) at ``rank``, on ``like``'s device and in its
    dtype: ``A`` kaiming-uniform per matrix as peft's LoRA does, ``B`` zero (``init_weights=True``) or
    kaiming-uniform too (``init_weights=False``, for tests)."""
    *lead, d0, d1 = shape
    A = torch.empty((*lead, rank, d1), dtype=like.dtype, device=like.device)
    B = torch.zeros((*lead, d0, rank), dtype=like.dtype, device=like.device)
    for a, b in zip(A.view(-1, rank, d1), B.view(-1, d0, rank)):
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if not init_weights:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    return nn.Parameter(A), nn.Parameter(B)
