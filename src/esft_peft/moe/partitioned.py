"""Reading parameters that DeepSpeed ZeRO-3 partitions across processes (all no-ops for ordinary tensors)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import ContextManager, Iterable

import torch


def logical_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's whole shape, also while ZeRO-3 holds only a partition of it (``ds_shape``), bitsandbytes holds
    it in 4-bit (``quant_state.shape``) or ESFT holds it in a 4-bit store (``esft_shape``: tuners/esft/quantized.py)."""
    shape = getattr(param, "ds_shape", None)
    if shape is None:
        shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return shape if shape is not None else getattr(param, "esft_shape", param.shape)


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ZeRO-3 currently holds only a partition of ``param`` (outside a gather)."""
    return hasattr(param, "ds_id") and param.numel() != math.prod(logical_shape(param))


def gathered(params: Iterable[torch.Tensor]) -> ContextManager:
    """Gather the ZeRO-3-partitioned ``params`` whole for reading inside the block (a collective: every process of
    the group must enter it with the same parameters)."""
    partitioned = [param for param in params if hasattr(param, "ds_id")]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
