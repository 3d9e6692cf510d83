"""Adapter parameters on a model sharded by transformers at load time (``from_pretrained(...,
distributed_config=DistributedConfig(fsdp_size=N[, ep_size=N]))``).

FSDP2 shards the parameters that exist when the model is loaded; a tuner's parameters, added later, are plain
tensors that nothing keeps in sync: every rank would train its own copy on its own slice of the batch. Both tuners
therefore start such parameters from rank 0's values (:func:`broadcast_replicated`) and average their gradients
over the data-parallel group once per backward pass, after it ends (:class:`ReplicatedGradients`), so that a plain
loop (forward, ``loss.backward()``, ``optimizer.step()``) trains what one process trains on the whole batch.
ESFT also declares them as ``Replicate()`` DTensors on the data-parallel mesh (:func:`replicated_parameter`): the
ecosystem's mark of a tensor whose synchronisation its owner handles (``transformers.Trainer`` leaves DTensors alone,
``clip_grad_norm_`` reduces their norms per mesh).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate


def distributed_config(module: nn.Module) -> Any:
    """The ``DistributedConfig`` a model (or one of its modules holding the model config) was loaded with."""
    config = getattr(module, "config", None)
    return getattr(config, "distributed_config", None)


def data_parallel_size(model: nn.Module) -> int:
    """How many ranks train distinct slices of the batch on a model sharded by transformers at load time (1 else)."""
    config = distributed_config(model)
    if config is None or not getattr(model, "is_distributed_loading_by_transformers", False):
        return 1
    return int(config.dp_size)


def check_supported_parallelism(model: nn.Module, method: str) -> None:
    """Refuse the transformers-native layouts whose replicated parameters would need other gradient groups."""
    config = distributed_config(model)
    if config is None or not getattr(model, "is_distributed_loading_by_transformers", False):
        return
    unsupported = {name: getattr(config, name) for name in ("tp_size", "pp_size", "dp_replicate_size")}
    unsupported = {name: size for name, size in unsupported.items() if size and size > 1}
    if unsupported:
        sizes = ", ".join(f"{name}={size}" for name, size in unsupported.items())
        raise ValueError(
            f"{method} trains models loaded with DistributedConfig(fsdp_size=N) (and, for ESFT, ep_size=N); this "
            f"model was loaded with {sizes}, whose replicated adapter parameters would need gradient groups "
            f"{method} does not build. Load it with tp_size=pp_size=dp_replicate_size=1 (e.g. "
            "DistributedConfig(fsdp_size=WORLD_SIZE))."
        )


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (differentiable), a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class _AverageAfterBackward(torch.autograd.Function):
    """Identity forward; its backward asks ``sync`` to average the parameter's gradient once the whole backward pass
    has ended (collectives inside the pass could interleave differently on each rank with the EP all-to-alls)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, sync: "ReplicatedGradients") -> torch.Tensor:
        ctx.sync = sync
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.sync.schedule()
        return grad, None


class ReplicatedGradients:
    """Gradients of replicated parameters (the same values on every rank), averaged over the data-parallel group once
    per backward pass, after it (the autograd engine's end-of-backward callback, as DDP and FSDP use it), in an order
    that is the same on every rank: the order in which the forward first used them (:meth:`__call__`, ESFT) or in
    which they were registered (:meth:`watch`, PESC). Averaging after each pass is exact under gradient accumulation
    (the part accumulated before is already equal on every rank), and clipping after ``backward()`` sees the average.
    """

    def __init__(self, size: int, group: Any) -> None:
        self.size, self.group = size, group
        self._order: dict[int, int] = {}
        self._used: dict[int, torch.Tensor] = {}
        self._scheduled = False

    def _use(self, param: torch.Tensor) -> None:
        self._order.setdefault(id(param), len(self._order))
        self._used.setdefault(id(param), param)

    def __call__(self, param: torch.Tensor) -> torch.Tensor:
        """``param`` (a leaf parameter, plain or a ``Replicate()`` DTensor) as the forward uses it: this rank's
        plain tensor, whose gradient is averaged after the backward pass."""
        local = local_tensor(param)
        if not (torch.is_grad_enabled() and param.requires_grad):
            return local
        self._use(param)
        return _AverageAfterBackward.apply(local, self)

    def watch(self, params: Iterable[torch.Tensor]) -> None:
        """Average the gradients of ``params`` (trainable leaves) after every backward pass that reaches them."""

        def used(param: torch.Tensor) -> None:
            self._used.setdefault(id(param), param)
            self.schedule()

        for param in params:
            self._order.setdefault(id(param), len(self._order))
            param.register_post_accumulate_grad_hook(used)

    def schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            torch.autograd.Variable._execution_engine.queue_callback(self._average)

    def _average(self) -> None:
        used = sorted(self._used.values(), key=lambda param: self._order[id(param)])
        self._used, self._scheduled = {}, False
        for param in used:
            if param.grad is None:
                continue
            grad = local_tensor(param.grad)
            dist.all_reduce(grad, group=self.group)
            grad.div_(self.size)


def replicated_sync(model: nn.Module) -> Optional[ReplicatedGradients]:
    """The gradient averaging of replicated parameters on a data-parallel transformers-sharded model (else None)."""
    size = data_parallel_size(model)
    return ReplicatedGradients(size, dist.group.WORLD) if size > 1 else None


def broadcast_replicated(params: list[torch.Tensor]) -> None:
    """Make replicated parameters identical on every rank (rank 0's values), e.g. random initialisations."""
    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, src=0)


def data_parallel_mesh(model: nn.Module) -> Any:
    """The 1-D device mesh over the data-parallel ranks of a model sharded by transformers: the FSDP2 mesh its dense
    weights live on."""
    for param in model.parameters():
        if isinstance(param, DTensor) and "fsdp" in (param.device_mesh.mesh_dim_names or ()):
            mesh = param.device_mesh
            return mesh["fsdp"] if mesh.ndim > 1 else mesh
    raise RuntimeError(
        "This model is marked as sharded by transformers with data parallelism but holds no parameter on an `fsdp` "
        "device mesh; load it with from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N))."
    )


def replicated_parameter(param: torch.Tensor, mesh: Any) -> nn.Parameter:
    """``param`` (the same values on every rank) as a ``Replicate()`` DTensor parameter on ``mesh``."""
    value = DTensor.from_local(param.data, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return nn.Parameter(value, requires_grad=param.requires_grad)


def unsharded_auto_mapping(auto_mapping: dict) -> dict:
    """peft's ``auto_mapping`` record of the base model class with FSDP2's dynamic wrapper class (``FSDP<Name>`` in
    ``torch.distributed.fsdp``) replaced by the model class it wraps."""
    from torch.distributed.fsdp import FSDPModule

    name, library = auto_mapping.get("base_model_class"), auto_mapping.get("parent_library", "")
    if not library.startswith("torch.distributed.fsdp"):
        return auto_mapping
    for wrapper in FSDPModule.__subclasses__():
        if wrapper.__name__ == name:
            model_class = next(c for c in wrapper.__mro__[1:] if not issubclass(c, FSDPModule))
            return {**auto_mapping, "base_model_class": model_class.__name__, "parent_library": model_class.__module__}
    return auto_mapping
