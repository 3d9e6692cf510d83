"""The PESC layer: a dense MLP crafted into a mixture of adapter experts (paper Eq. 7-9).

``y = F(x) + sum_k w_k * s * U_{e_k} gelu(D_{e_k} dropout(F(x)))`` where ``F`` is the frozen dense MLP (shared by
every expert, never copied), the router acts on the MLP input ``x`` with ``w = softmax(top_k(x W_r^T))``, and the
adapters of a layer are stored expert-leading: ``D`` (E, d, H), ``U`` (E, H, d). The routed (token, slot) pairs are
sorted by expert once and each projection runs as one grouped matmul over them.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...moe.errors import UnsupportedLayoutError
from ...moe.layouts.pesc import ROUTER_CONTAINER
from ...moe.rows import inverse_permutation, permute_rows
from ..mixed_batch_common import BASE_ADAPTER

logger = logging.getLogger(__name__)

try:  # private transformers API (its grouped-matmul dispatch and fallback); guarded so that import never fails
    from transformers.integrations.moe import _grouped_mm
except ImportError:  # pragma: no cover - depends on the installed transformers
    _grouped_mm = None

# The adapter parameters' containers; saved keys read ``<mlp>.pesc_router.weight``, ``<mlp>.pesc_down``,
# ``<mlp>.pesc_up`` once peft has removed the adapter name (releases before 0.3 wrote ``lora_pesc_*``).
ROUTER, DOWN, UP = ROUTER_CONTAINER, "pesc_down", "pesc_up"


def _fits_grouped_kernel(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch's grouped matmul needs 16-byte strides in the forward and in the backward (gradients are contiguous):
    the row size and both matrix sizes of every expert must be multiples of 16 bytes, as must the given strides."""
    size = rows.element_size()
    sizes = (rows.shape[-1], *weight.shape[-2:])
    strides = [s for t in (rows, weight) for s in t.stride() if s != 1]
    return all(n * size % 16 == 0 for n in (*sizes, *strides))


def _aligned_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a copy with the same strides on 16-byte aligned memory (weights memory-mapped from a file can
    start anywhere); the kernel, and so the rounding, then never depends on where a checkpoint was loaded from."""
    return tensor if tensor.data_ptr() % 16 == 0 else tensor.clone()


def require_grouped_mm() -> None:
    """Raise a clear error when the installed transformers lacks the grouped matmul PESC computes with."""
    if _grouped_mm is None:
        raise UnsupportedLayoutError(
            "PESC computes its adapter experts with transformers.integrations.moe._grouped_mm, which the installed "
            "transformers lacks. Install a transformers version esft-peft supports (see pyproject.toml)."
        )


def grouped_mm(rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``rows[group g] @ weight[g]`` for consecutive row groups ending at ``offsets`` (``weight``: (E, in, out)).

    torch's grouped matmul (through transformers' dispatch) where its 16-byte stride rule holds, transformers'
    per-expert fallback otherwise (e.g. an ``adapter_dim`` that is not a multiple of 4 in float32).
    """
    require_grouped_mm()
    if _fits_grouped_kernel(rows, weight):
        return _grouped_mm(_aligned_storage(rows), _aligned_storage(weight), offsets)
    return torch.ops.transformers.grouped_mm_fallback(rows, weight.contiguous(), offs=offsets)


class PESCRouter(nn.Linear):
    """The router of one adapter: ``logits = x W_r^T`` (no bias), top-k, then a softmax over the kept logits.

    Returns ``(router_logits[T, E], top_k_weights[T, k], top_k_index[T, k])``; the layout reads the routing from
    this output (:mod:`esft_peft.moe.layouts.pesc`).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, **factory: Any) -> None:
        super().__init__(hidden_size, num_experts, bias=False, **factory)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        kept, index = logits.topk(self.top_k, dim=-1)
        weights = F.softmax(kept, dim=-1, dtype=torch.float32).to(logits.dtype)
        return logits, weights, index

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}"


class PESCLayer(nn.Module, BaseTunerLayer):
    """Wraps a dense MLP; holds per adapter a router and ``num_experts`` adapter experts.

    ``pesc_router[a]``: :class:`PESCRouter`; ``pesc_down[a]``: (E, d, H); ``pesc_up[a]``: (E, H, d),
    zero at creation (random with ``init_weights=False``). Several active adapters add their outputs. Like peft's
    layers it exposes ``in_features``/``out_features`` (both the MLP's hidden size) and accepts ``adapter_names=``
    (one adapter per sample; ``"__base__"``: none).
    """

    adapter_layer_names = (ROUTER, DOWN, UP)
    crafts_experts = True  # discovery (esft_peft.moe) sees this layer as an MoE layer
    other_param_names = ("pesc_dropout", "pesc_scaling")

    def __init__(self, base_layer: nn.Module, adapter_name: str, hidden_size: int, **settings: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.hidden_size = hidden_size
        self.in_features = self.out_features = hidden_size
        self.pesc_router = nn.ModuleDict()
        self.pesc_down = nn.ParameterDict()
        self.pesc_up = nn.ParameterDict()
        self.pesc_dropout = nn.ModuleDict()
        self.pesc_scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.update_layer(adapter_name, **settings)

    def _factory(self) -> dict[str, Any]:
        """Device and compute dtype of the base MLP (a quantised base's compute dtype, never its storage dtype)."""
        base = self.get_base_layer()
        params = [p for p in base.parameters()]
        floating = [p for p in params if p.is_floating_point()]
        if floating:
            return {"device": floating[0].device, "dtype": floating[0].dtype}
        compute = [getattr(m, "compute_dtype", None) for m in base.modules()]
        dtype = next((d for d in compute if d is not None), torch.get_default_dtype())
        return {"device": params[0].device if params else None, "dtype": dtype}

    def update_layer(
        self, adapter_name: str, num_experts: int, top_k: int, adapter_dim: int, adapter_scaling: float,
        adapter_dropout: float, init_weights: bool = True,
    ) -> None:
        factory = self._factory()
        hidden = self.hidden_size
        router = PESCRouter(hidden, num_experts, top_k, **factory)
        down = torch.empty(num_experts, adapter_dim, hidden, **factory)
        up = torch.zeros(num_experts, hidden, adapter_dim, **factory)
        # as train_moe.py: kaiming_uniform(a=sqrt(5)) per expert matrix, U = 0 (the identity); init_weights=False
        # (peft's convention for tests) draws U the same way, so that a fresh adapter changes the outputs
        for expert in range(num_experts):
            nn.init.kaiming_uniform_(down[expert], a=math.sqrt(5))
            if not init_weights:
                nn.init.kaiming_uniform_(up[expert], a=math.sqrt(5))
        self.pesc_router[adapter_name] = router
        self.pesc_down[adapter_name] = nn.Parameter(down)
        self.pesc_up[adapter_name] = nn.Parameter(up)
        self.pesc_dropout[adapter_name] = nn.Dropout(adapter_dropout) if adapter_dropout > 0 else nn.Identity()
        self.pesc_scaling[adapter_name] = adapter_scaling
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        target = device if device is not None else self._factory()["device"]
        for name in self.adapter_layer_names:
            container = getattr(self, name)
            if adapter_name in container and target is not None:
                container[adapter_name] = container[adapter_name].to(target)

    def num_experts(self, adapter_name: str) -> int:
        return self.pesc_router[adapter_name].out_features

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(
            "PESC adapters cannot be merged into the dense weights: each token is routed to its own adapter "
            "experts, so no single weight matrix reproduces the layer. Keep the adapter loaded; to fold only the "
            "LoRA part into the dense weights, use merge_lora()."
        )

    def unmerge(self) -> None:
        logger.warning("PESC adapters are never merged. Nothing to do.")

    def _active(self) -> list[str]:
        if self.disable_adapters:
            return []
        return [name for name in self.active_adapters if name in self.pesc_router]

    def forward(
        self, x: torch.Tensor, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any
    ) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if adapter_names is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, result, adapter_names)
        active = self._active()
        if not active:
            return result
        tokens, dense = x.reshape(-1, x.shape[-1]), result.reshape(-1, result.shape[-1])
        delta = None
        for adapter in active:
            out = self._adapter_output(adapter, tokens, dense)
            delta = out if delta is None else delta + out
        return result + delta.to(result.dtype).view_as(result)

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """Sample ``i`` gets adapter ``adapter_names[i]`` (``"__base__"`` or an adapter this layer lacks: none). The
        layer is token-wise (routing included), so the rows of one adapter's samples compute exactly what they
        compute in a batch of those samples alone."""
        if x.dim() < 2 or len(adapter_names) != x.shape[0]:
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {x.shape[0] if x.dim() else 0} respectively."
            )
        out = result.clone()
        for adapter in dict.fromkeys(adapter_names):
            if adapter == BASE_ADAPTER or adapter not in self.pesc_router:
                continue
            rows = torch.tensor([i for i, name in enumerate(adapter_names) if name == adapter], device=x.device)
            sub_x, sub_h = x[rows], result[rows]
            delta = self._adapter_output(adapter, sub_x.reshape(-1, x.shape[-1]), sub_h.reshape(-1, sub_h.shape[-1]))
            out[rows] = sub_h + delta.to(result.dtype).view_as(sub_h)
        return out

    def _adapter_output(self, adapter: str, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``sum_k w_k * s * U_{e_k} gelu(D_{e_k} dropout(h))`` for every token (rows of ``x``/``h``)."""
        router, down, up = self.pesc_router[adapter], self.pesc_down[adapter], self.pesc_up[adapter]
        dtype = down.dtype
        logits, weights, index = router(x.to(dtype))
        num_tokens, top_k = index.shape
        pairs = index.reshape(-1)
        order = torch.argsort(pairs, stable=True)  # (token, slot) pairs grouped by expert
        inverse = inverse_permutation(order)
        counts = torch.bincount(pairs, minlength=down.shape[0])
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        rows = h.to(dtype).unsqueeze(1).expand(num_tokens, top_k, h.shape[-1]).reshape(-1, h.shape[-1])
        rows = self.pesc_dropout[adapter](permute_rows(rows, order, inverse))
        # w_k * s scales the d-wide bottleneck rather than the H-wide output (U is linear): the same sum, less work
        gates = permute_rows(weights.reshape(-1) * self.pesc_scaling[adapter], order, inverse)
        hidden = F.gelu(grouped_mm(rows, down.transpose(-2, -1), offsets)) * gates.unsqueeze(-1)
        out = permute_rows(grouped_mm(hidden, up.transpose(-2, -1), offsets), inverse, order)
        return out.view(num_tokens, top_k, -1).sum(dim=1)

    def __repr__(self) -> str:
        experts = {name: self.num_experts(name) for name in self.pesc_router}
        return f"pesc.{type(self).__name__}(experts={experts})\n  ({self.get_base_layer()!r})"
