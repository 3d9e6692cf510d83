"""Forward passes in lockstep across ranks, for models whose forward is a collective.

A model loaded with transformers' ``distributed_config`` (expert parallelism's all-to-all, FSDP2's all-gathers)
runs each forward on every rank together. Scoring splits the data across ranks, so ranks can hold different numbers
of batches (or reach their share of the token budget at different times): a rank that has no batch left keeps
running an idle forward, whose tokens are not counted, while any other rank still has one.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def forward_is_collective(model: nn.Module) -> bool:
    """Whether ``model`` (or the model a peft model wraps) was sharded by transformers at load time with more than
    one rank per forward (its forward is then a collective)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return bool(getattr(model, "is_distributed_loading_by_transformers", False))


def in_lockstep(batches: Iterable[T], finished: Callable[[], bool], device: torch.device) -> Iterator[Optional[T]]:
    """This rank's batches (until ``finished()``), then ``None`` (run an idle forward) while another rank still has a
    batch; ends when no rank has one. One all-reduce per step."""
    iterator = iter(batches)
    exhausted = False
    while True:
        batch = None
        if not exhausted and not finished():
            batch = next(iterator, None)
            exhausted = batch is None
        pending = torch.tensor([batch is not None], dtype=torch.int64, device=device)
        dist.all_reduce(pending, op=dist.ReduceOp.MAX)
        if not pending.item():
            return
        yield batch
