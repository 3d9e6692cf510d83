"""ESFT under transformers' native expert parallelism (``from_pretrained(..., distributed_config=
DistributedConfig(ep_size=N, fsdp_size=N))``) and its FSDP2 data parallelism.

transformers' engine shards each experts module over the ``ep`` mesh (``Shard(0)``: rank ``r`` holds the
``num_experts / N`` consecutive experts from ``r * num_experts / N``), replaces its forward by a dispatch
(``EPImplementation``: all-to-all of the (token, slot) pairs to the ranks owning their experts, the experts' own
function on local ids, all-to-all back) and FSDP2-shards the dense modules. ESFT plugs into it as follows:

- **Deltas follow the experts.** A rank holds delta rows only for the selected experts it owns
  (:class:`ExpertShard`). The experts module is called exactly as the MoE block calls it (global ids, through its
  hooks: FSDP2's unshard, the EP dispatch), twice: once with the pairs routed to frozen experts, once with the pairs
  routed to selected experts while the rank's local weights are shadowed by ``W[e] + delta[e]`` for the selected
  experts it owns. The routing weights are applied outside both calls, as in the one-process compute.
- **Gradients.** Every rank trains on its own slice of the global batch and its loss is the mean over that slice.
  An owned delta row receives, through the all-to-all's backward, the gradient of every rank's loss: it is divided
  by the data-parallel size (what FSDP2 does for the base experts, ``set_gradient_divide_factor``). A replicated
  trainable delta (shared experts, routers, non-expert modules; every delta when experts are not sharded) has its
  gradient averaged over the data-parallel group after each backward pass
  (:class:`~esft_peft.tuners.data_parallel.ReplicatedGradients`). Both enter the forward graph as identity functions
  (:meth:`ESFTLayer.delta_of`), so a plain loop and gradient accumulation need no extra call.
- **DTensors.** Every delta is a DTensor parameter (:func:`distribute_layer`): the owned rows ``Shard(0)`` on the
  ``ep`` mesh (each rank's rows of the whole ``(len(selection), ...)`` delta, grouped by owner; never gathered by
  DTensor itself, see below), replicated deltas ``Replicate()`` on the same mesh (:func:`delta_mesh`). That is the
  contract the ecosystem reads: ``transformers.Trainer`` broadcasts and all-reduces only the trainable parameters
  that are *not* DTensors (which would overwrite and mix the rank-local rows), and ``clip_grad_norm_`` (torch,
  accelerate, Trainer) sums the norms of ``Shard`` DTensors over their mesh, so clipping uses the one-process global
  norm.
- **Saving and loading.** The layer's ``state_dict`` holds the whole adapter as plain tensors: owned rows are
  all-gathered over the EP group into the selection's order (every rank must call ``state_dict``/
  ``save_pretrained``, as Trainer does: pass ``is_main_process=(rank == 0)`` so that one rank writes). Loading a
  whole adapter keeps the owned rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ...moe.errors import UnsupportedLayoutError
from ...moe.layouts.base import bind_arguments, call_arguments
from ...moe.partitioned import logical_shape
from ...moe.rows import ids_tensor, inverse_permutation, permute_rows
from ..data_parallel import (  # noqa: F401  (data_parallel_size, replicated_sync: for the tuner)
    broadcast_replicated,
    check_supported_parallelism,
    data_parallel_mesh,
    data_parallel_size,
    distributed_config,
    local_tensor,
    replicated_parameter,
    replicated_sync,
)
from .compute import call_shadowed, with_delta
from .compute.fused import FormedWeights, _PairRows


# ---------------------------------------------------------------------------------------------------- sharding


@dataclass(frozen=True)
class ExpertShard:
    """The experts of one MoE layer this rank holds under expert parallelism: ``count`` consecutive experts from
    ``first`` (ids ``0..num_experts-1`` are global), and the groups its gradients and saves use."""

    first: int
    count: int
    num_experts: int
    ep_rank: int
    ep_size: int
    ep_group: Any
    ep_mesh: Any
    dp_size: int

    def owner(self, expert: int) -> int:
        return expert // self.count

    def owned(self, ids: list[int]) -> list[int]:
        """The ids of ``ids`` this rank holds, in their order."""
        return [e for e in ids if self.owner(e) == self.ep_rank]

    def local(self, ids: list[int]) -> list[int]:
        """Local indices (rows of this rank's expert tensors) of owned global ids."""
        return [e - self.first for e in ids]


def _ep_mesh_of(experts: nn.Module) -> Any:
    for param in experts.parameters(recurse=False):
        if isinstance(param, DTensor) and "ep" in (param.device_mesh.mesh_dim_names or ()):
            return param.device_mesh
    return None


def expert_shard(experts: nn.Module) -> Optional[ExpertShard]:
    """This rank's :class:`ExpertShard` of an experts module sharded by transformers' expert parallelism, else None."""
    if not getattr(experts, "_is_expert_parallel", False):
        return None
    mesh = _ep_mesh_of(experts)
    config = distributed_config(experts)
    if mesh is None or config is None:
        raise UnsupportedLayoutError(
            f"{type(experts).__name__} is marked expert-parallel but holds no DTensor on an `ep` mesh, or its config "
            "has no `distributed_config`; load the model with from_pretrained(..., distributed_config="
            "DistributedConfig(ep_size=N, fsdp_size=N)), transformers' expert parallelism, to train ESFT on it."
        )
    count = int(experts.num_experts)
    ep_rank, ep_size = mesh.get_local_rank("ep"), mesh.size(mesh.mesh_dim_names.index("ep"))
    total = int(logical_shape(experts.down_proj)[0])
    if count * ep_size != total:
        raise UnsupportedLayoutError(
            f"{type(experts).__name__} holds {total} experts, which ep_size={ep_size} does not divide into whole "
            f"experts per rank ({count} local). Load the model with an ep_size that divides {total}."
        )
    return ExpertShard(
        first=ep_rank * count, count=count, num_experts=count * ep_size, ep_rank=ep_rank, ep_size=ep_size,
        ep_group=mesh.get_group("ep"), ep_mesh=mesh["ep"] if mesh.ndim > 1 else mesh, dp_size=int(config.dp_size),
    )


def check_distributed_model(model: nn.Module) -> None:
    """Refuse, before anything is wrapped, the transformers-native layouts ESFT does not train correctly.

    Supported: ``DistributedConfig(fsdp_size=N)`` and ``DistributedConfig(ep_size=N, fsdp_size=N)`` (each expert
    whole on one rank), with ``tp_size = pp_size = dp_replicate_size = 1``.
    """
    check_supported_parallelism(model, "ESFT")
    config = distributed_config(model)
    if config is None or not getattr(model, "is_distributed_loading_by_transformers", False):
        return
    if config.ep_size > 1 and config.efsdp_size != 1:
        raise ValueError(
            f"ESFT under expert parallelism needs every expert whole on one rank (ep_size == fsdp_size * tp_size); "
            f"this model was loaded with ep_size={config.ep_size}, fsdp_size={config.fsdp_size}, so each expert is "
            f"further FSDP-sharded over {config.efsdp_size} ranks. Load it with ep_size={config.fsdp_size}."
        )


# ---------------------------------------------------------------------------------------------------- gradients


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward divides the gradient by ``size``."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, size: int) -> torch.Tensor:
        ctx.size = size
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad / ctx.size, None


class ExpertRowGradients:
    """Gradients of sharded expert rows: their owner receives every rank's contribution through the all-to-all's
    backward; dividing by the data-parallel size gives the gradient of the mean loss (no collective)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, param: torch.Tensor) -> torch.Tensor:
        """``param`` (the owned rows, a ``Shard(0)`` DTensor) as the forward uses it: this rank's plain rows."""
        local = local_tensor(param)
        if not (torch.is_grad_enabled() and param.requires_grad):
            return local
        return _ScaleGrad.apply(local, self.size)


# ---------------------------------------------------------------------------------------------------- save / load


def gather_rows(shard: ExpertShard, selected: list[int], rows: torch.Tensor) -> torch.Tensor:
    """The whole ``(len(selected), ...)`` delta in selection order from each rank's owned ``rows`` (plain tensors; a
    collective over the EP group: every rank gets the result)."""
    owners = [shard.owner(e) for e in selected]
    counts = [owners.count(r) for r in range(shard.ep_size)]
    width = max(counts)
    padded = rows.new_zeros((width, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows.detach()
    parts = [torch.empty_like(padded) for _ in range(shard.ep_size)]
    dist.all_gather(parts, padded.contiguous(), group=shard.ep_group)
    whole = rows.new_empty((len(selected), *rows.shape[1:]))
    for rank in range(shard.ep_size):
        positions = [j for j, owner in enumerate(owners) if owner == rank]
        if positions:
            whole[torch.tensor(positions)] = parts[rank][: len(positions)]
    return whole


def owned_rows(shard: ExpertShard, selected: list[int], whole: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a whole ``(len(selected), ...)`` delta."""
    positions = [j for j, e in enumerate(selected) if shard.owner(e) == shard.ep_rank]
    return whole[torch.tensor(positions, dtype=torch.long, device=whole.device)]


def _adapter_parameters(layer: nn.Module, prefix: str) -> dict[str, tuple[str, nn.Parameter]]:
    """State-dict key -> (adapter, parameter) of every adapter tensor ``layer`` holds directly."""
    found = {}
    for container in layer.adapter_layer_names:
        for adapter, params in getattr(layer, container).items():
            for name, param in params.items():
                found[f"{prefix}{container}.{adapter}.{name}"] = (adapter, param)
    return found


def _owned_rows_parameter(shard: ExpertShard, whole_rows: int, rows: nn.Parameter) -> nn.Parameter:
    """This rank's ``rows`` of a whole ``(whole_rows, ...)`` delta as a ``Shard(0)`` DTensor parameter on the EP mesh.
    The ranks' rows are those they own, so the shards are uneven; DTensor only ever computes on them locally
    (elementwise optimizer steps, norms reduced over the mesh): the whole delta is gathered by :func:`gather_rows`."""
    shape = torch.Size((whole_rows, *rows.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    value = DTensor.from_local(rows.data, shard.ep_mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)
    return nn.Parameter(value, requires_grad=rows.requires_grad)


def _as_parameter_value(layer: nn.Module, adapter: str, param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A whole saved tensor as the DTensor ``param`` holds (this rank's rows, or the replicated value)."""
    if isinstance(value, DTensor) or tuple(value.shape) != tuple(param.shape):
        return value  # already distributed, or a shape load_state_dict reports
    shard = getattr(layer, "expert_shard", None)
    if shard is not None:
        value = owned_rows(shard, layer.ep_selected[adapter], value)
    return DTensor.from_local(value, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def delta_mesh(model: nn.Module) -> Any:
    """The device mesh of every DTensor delta of ``model``: the EP mesh of its expert-parallel experts (it spans the
    data-parallel ranks: ``ep_size == fsdp_size``), else the data-parallel (FSDP2) mesh. One mesh for all deltas, so
    that ``torch.nn.utils.clip_grad_norm_`` over them all works (it refuses DTensors on different meshes)."""
    for module in model.modules():
        if getattr(module, "_is_expert_parallel", False):
            shard = expert_shard(module)
            if shard is not None:
                return shard.ep_mesh
    return data_parallel_mesh(model)


def distribute_layer(layer: nn.Module, adapter: str, mesh: Any) -> None:
    """Make ``adapter``'s tensors of ``layer`` DTensor parameters: owned expert rows ``Shard(0)`` on the EP mesh,
    every other delta ``Replicate()`` on ``mesh`` (:func:`delta_mesh`; broadcast from rank 0 first, so that random
    initialisations agree); and make ``layer.state_dict()`` hold them whole and plain (a collective for owned rows)
    and ``layer.load_state_dict`` accept whole tensors."""
    shard = getattr(layer, "expert_shard", None)
    for container in layer.adapter_layer_names:
        if adapter not in getattr(layer, container):
            continue
        params = getattr(layer, container)[adapter]
        for name, param in list(params.items()):
            if isinstance(param, DTensor):
                continue
            if shard is not None:
                params[name] = _owned_rows_parameter(shard, len(layer.ep_selected[adapter]), param)
            else:
                broadcast_replicated([param])
                params[name] = replicated_parameter(param, mesh)
    if getattr(layer, "_dtensor_state_dict_hooks", False):
        return

    def whole(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        for key, (adapter, _) in _adapter_parameters(module, prefix).items():
            value = state_dict.get(key)
            if isinstance(value, DTensor):
                rows = value.to_local()
                if shard is not None:
                    rows = gather_rows(shard, module.ep_selected[adapter], rows)
                state_dict[key] = rows.detach()

    layer.register_state_dict_post_hook(whole)
    layer.register_load_state_dict_pre_hook(lambda module, state_dict, prefix, *_: distribute_loaded(
        module, state_dict, prefix))
    layer._dtensor_state_dict_hooks = True


def distribute_loaded(layer: nn.Module, state_dict: dict, prefix: str) -> None:
    """Replace, in ``state_dict``, whole tensors of ``layer``'s DTensor deltas by the DTensors this rank holds."""
    for key, (adapter, param) in _adapter_parameters(layer, prefix).items():
        if key in state_dict and isinstance(param, DTensor):
            state_dict[key] = _as_parameter_value(layer, adapter, param, state_dict[key])


# ---------------------------------------------------------------------------------------------------- dense weights


def full_weight(param: torch.Tensor) -> torch.Tensor:
    """A (possibly FSDP2-sharded) parameter's whole value (a collective for DTensors)."""
    return param.full_tensor() if isinstance(param, DTensor) else param


def write_full_weight(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write a whole value into a (possibly FSDP2-sharded) parameter: each rank copies its own shard."""
    if isinstance(param, DTensor):
        local = distribute_tensor(value.detach(), param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(value)


def reshard_all(model: nn.Module) -> None:
    """Register FSDP2's sharded parameters on every FSDP module (after a forward with ``reshard_after_forward=False``
    the unsharded ones stay registered, and writes to them would be lost)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# ---------------------------------------------------------------------------------------------------- compute


class _LocalFormed(FormedWeights):
    """A rank's local expert tensors with the owned selected rows replaced by ``W[e] + delta[e]`` (``ids`` are local
    rows), formed again in backward instead of being kept (see :class:`FormedWeights`)."""

    def _form(self, name: str) -> torch.Tensor:
        local = self.base[name]
        index = ids_tensor(tuple(self.ids), local.device)
        return local.index_put((index,), with_delta(local.index_select(0, index), self.deltas[name]))


def _call_owned(
    target: nn.Module, names: list[str], shard: ExpertShard, owned: list[int], deltas: dict[str, torch.Tensor],
    args: tuple,
) -> torch.Tensor:
    """``target(*args)`` (global ids, through its hooks and the EP dispatch) with this rank's local expert tensors
    shadowed by ``W[e] + delta[e]`` for the selected experts it owns."""
    if not owned:
        return target(*args)
    formed = _LocalFormed({}, shard.local(owned), deltas)

    def form(module: nn.Module) -> dict[str, torch.Tensor]:  # after FSDP2's unshard: the local shards
        for name in names:
            param = module._parameters[name]
            formed.base[name] = param.to_local() if isinstance(param, DTensor) else param
        return formed.form()

    with formed.saving():
        return call_shadowed(target, form, args)


def compute(
    target: nn.Module, shard: ExpertShard, selected: list[int], owned: list[int], deltas: dict[str, torch.Tensor],
    args: tuple, kwargs: dict,
) -> torch.Tensor:
    """The output of the expert-parallel experts module ``target(hidden, top_k_index, top_k_weights)`` with
    ``W[e] + delta[e]`` for the ``selected`` experts (global ids; ``deltas`` hold the rows of the ``owned`` ones).

    Every rank makes both calls, also with no pair to send (they are collectives), and every rank's calls have a
    backward (so that the all-to-alls' backward exchanges run everywhere, in the same order). The pairs are computed
    with one slot per row and routing weight 1; the routing weights are applied to the pair outputs here, as the
    one-process compute does, and a token's slots are summed as the experts implementations sum them.
    """
    hidden, top_k_index, top_k_weights = bind_arguments(call_arguments(target), args, kwargs, 3, "experts")
    shape = hidden.shape
    hidden = hidden.reshape(-1, shape[-1])
    num_tokens, num_top_k = hidden.size(0), top_k_index.size(-1)
    experts = top_k_index.reshape(-1)
    is_selected = torch.isin(experts, ids_tensor(tuple(selected), hidden.device))
    order = torch.sort((~is_selected).to(torch.uint8), stable=True).indices  # pairs of selected experts first
    count = int(is_selected.sum())
    rows = _PairRows.apply(hidden, order, num_top_k)
    trained = [delta for delta in deltas.values() if delta.requires_grad]
    if torch.is_grad_enabled() and trained:
        # The backward of the all-to-alls must run on every rank: a rank owning no selected expert of this layer
        # (its delta rows are empty) still connects its pairs to the graph, with an exact zero.
        rows = rows + sum(delta.sum() for delta in trained) * 0
    keys = experts.index_select(0, order).unsqueeze(-1)
    ones = hidden.new_ones(order.numel(), 1)
    names = list(deltas)
    chosen = _call_owned(target, names, shard, owned, deltas, (rows[:count], keys[:count], ones[:count]))
    frozen = target(rows[count:], keys[count:], ones[count:])
    out = permute_rows(torch.cat([chosen, frozen]), inverse_permutation(order), order)
    out = out * top_k_weights.reshape(-1, 1)
    out = out.view(num_tokens, num_top_k, -1).sum(dim=1)
    return out.to(hidden.dtype).view(*shape[:-1], -1)
