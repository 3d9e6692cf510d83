"""Export an ESFT adapter as a peft LoRA adapter (``LoraConfig``), the format serving engines load.

- Fused experts (transformers' experts interface: ``gate_up_proj``/``down_proj`` 3-D tensors) are exported with
  ``target_parameters`` on the experts' fused tensors, in the layout of peft's ``ParamWrapper``: ``lora_A.weight``
  ``(E * r, in)`` expert-major, ``lora_B.weight`` ``(out, r * E)`` with column ``j * E + e`` for rank ``j`` of
  expert ``e``; the experts the adapter does not train get zero blocks. Several parameters of one experts module nest
  their wrappers: the parameter registered first is innermost (``experts.base_layer.lora_A.weight``), the last one
  outermost (``experts.lora_A.weight``), as peft writes them.
- ModuleList experts (remote-code DeepSeek) are exported as ordinary LoRA ``target_modules`` on the selected experts'
  projections.
- ``layout="per_expert"`` writes fused experts that way too: ``target_modules``
  ``{experts}.{e}.{gate_proj,up_proj,down_proj}`` (gate_up's rows split, gate first), the keys of per-expert
  checkpoints that serving engines' per-expert MoE LoRA reads (docs/serving.md); peft cannot load that onto fused
  transformers experts, so the default is the ``target_parameters`` layout.

From a low-rank ESFT adapter (``delta_rank``) the export is exact: the factors are copied, with
``lora_alpha = delta_alpha`` and ``r = delta_rank``. From a full-rank adapter each selected expert's delta is
truncated by SVD; the relative error ``||D - D_r||_F / ||D||_F`` of every (layer, expert, parameter) is returned and
logged. ``rank=None`` picks the smallest rank at which every error is at most ``max_error``.

Not exported (refused unless ``skip_non_expert=True``, which drops them with a warning): deltas of shared experts,
routers and non-expert modules, ``modules_to_save`` and non-zero expert bias deltas. Serving engines load LoRA on
expert projections and attention linears only and reject ``modules_to_save``; LoRA cannot represent a bias update.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import atomic_directory_write
from ..moe.discovery import MoELayer, find_moe_layers
from ..moe.layouts.base import unwrap
from ..tuners.esft.config import ESFTConfig
from ..tuners.esft.layer import DELTA_CONTAINER
from ..tuners.esft.low_rank import LORA_A, LORA_B, scale_of

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
PEFT_PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
DEFAULT_MAX_ERROR = 0.01  # rank=None: the smallest rank whose per-expert relative error is at most 1%
LAYOUTS = ("parameters", "per_expert")


@dataclass
class LoraExport:
    """What :func:`export_lora` wrote: the directory, the rank and alpha, whether it is exact, and per
    ``(layer, expert, parameter)`` the relative error of the truncation (0.0 where exact)."""

    path: Path
    rank: int
    alpha: float
    exact: bool
    errors: dict[tuple[str, int, str], float] = field(default_factory=dict)
    adapter_bytes: int = 0

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


@dataclass
class _Delta:
    """One trained matrix per selected expert: dense ``(k, d0, d1)`` or low-rank ``scale * B @ A``."""

    dense: Optional[torch.Tensor] = None
    A: Optional[torch.Tensor] = None  # (k, r, d1)
    B: Optional[torch.Tensor] = None  # (k, d0, r)
    scale: float = 1.0

    def full(self) -> torch.Tensor:
        if self.dense is not None:
            return self.dense.double()
        return torch.matmul(self.B.double(), self.A.double()) * self.scale


def _read_adapter(adapter_dir: Path) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Module path -> container (esft_delta / esft_lora_A / esft_lora_B) -> parameter -> tensor."""
    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no {WEIGHTS_NAME}; export_lora reads esft-peft adapter directories.")
    modules: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in load_file(str(path)).items():
        for container in (DELTA_CONTAINER, LORA_A, LORA_B):
            module, found, param = key.removeprefix(PEFT_PREFIX).partition(f".{container}.")
            if found:
                modules.setdefault(module, {}).setdefault(container, {})[param] = tensor
                break
        else:
            raise ValueError(
                f"{path}: tensor {key!r} is not an ESFT delta (modules_to_save?). Serving engines reject "
                "modules_to_save; export the adapter without them."
            )
    return modules


def _skeleton(config: ESFTConfig, base_model: Optional[Union[nn.Module, str]], trust_remote_code: bool) -> nn.Module:
    """The base model's modules (for names, expert counts and storage orientation): ``base_model`` itself, or the
    architecture of ``base_model`` / the adapter's ``base_model_name_or_path`` built on the meta device (no weights)."""
    if isinstance(base_model, nn.Module):
        return base_model
    source = base_model or config.base_model_name_or_path
    if not source:
        raise ValueError(
            "The adapter records no base_model_name_or_path; pass the base model (or its id/path) as base_model=."
        )
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)


def _deltas_of(containers: dict[str, dict[str, torch.Tensor]], scale: float) -> tuple[dict[str, _Delta], dict]:
    """Matrix deltas (dense or low-rank) and vector deltas (biases) of one wrapped module."""
    matrices: dict[str, _Delta] = {}
    vectors: dict[str, torch.Tensor] = {}
    for param, tensor in containers.get(DELTA_CONTAINER, {}).items():
        if tensor.dim() >= 2 and not (tensor.dim() == 2 and param.endswith("bias")):
            matrices[param] = _Delta(dense=tensor)
        else:
            vectors[param] = tensor
    for param, A in containers.get(LORA_A, {}).items():
        matrices[param] = _Delta(A=A, B=containers[LORA_B][param], scale=scale)
    return matrices, vectors


def _truncate(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` factors of an SVD ``U diag(S) Vh`` of (k, d0, d1) matrices: ``U_r`` (k, d0, rank) scaled by
    the singular values and ``V_r`` (k, rank, d1), padded with zero directions where the matrices are smaller."""
    U_r, V_r = U[..., :rank] * S[..., None, :rank], Vh[..., :rank, :]
    pad = rank - U_r.shape[-1]
    if pad > 0:
        U_r = torch.cat([U_r, U_r.new_zeros((*U_r.shape[:-1], pad))], dim=-1)
        V_r = torch.cat([V_r, V_r.new_zeros((*V_r.shape[:-2], pad, V_r.shape[-1]))], dim=-2)
    return U_r, V_r


def _relative_errors(S: torch.Tensor, rank: int) -> torch.Tensor:
    """Relative Frobenius error of the rank-``rank`` truncation, per matrix, from its singular values."""
    total = S.pow(2).sum(-1)
    tail = S[..., rank:].pow(2).sum(-1)
    return torch.where(total > 0, (tail / total.clamp_min(1e-300)).sqrt(), torch.zeros_like(total))


def _smallest_rank(spectra: list[torch.Tensor], max_error: float) -> int:
    """The smallest rank at which every matrix's relative error is at most ``max_error``."""
    rank = 1
    for S in spectra:
        for r in range(rank, S.shape[-1] + 1):
            if bool((_relative_errors(S, r) <= max_error).all()):
                rank = r
                break
    return rank


def _fused_tensors(
    path: str, experts: nn.Module, ids: list[int], num_experts: int, factors: dict[str, tuple], rank: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """peft ``ParamWrapper`` tensors (keys and ``target_parameters``) for one fused experts module. ``factors``:
    parameter -> (U (k, d0, r), V (k, r, d1)) with ``delta[e] = scaling * U[e] @ V[e]`` in storage orientation."""
    transposed = bool(getattr(experts, "is_transposed", False))
    order = [name for name, _ in experts.named_parameters(recurse=False) if name in factors]
    tensors, targets = {}, []
    index = torch.tensor(ids)
    for depth, param in enumerate(order):
        U, V = factors[param]
        if transposed:  # peft: delta[e] = (B_e @ A_e).T, A_e (r, d0), B_e (d1, r)
            A_sel, B_sel = U.transpose(-1, -2), V.transpose(-1, -2)
        else:  # peft: delta[e] = B_e @ A_e, A_e (r, d1), B_e (d0, r)
            A_sel, B_sel = V, U
        A = A_sel.new_zeros((num_experts, rank, A_sel.shape[-1]))
        B = B_sel.new_zeros((num_experts, B_sel.shape[-2], rank))
        A[index], B[index] = A_sel, B_sel
        wrapper = f"{PEFT_PREFIX}{path}." + "base_layer." * (len(order) - 1 - depth)
        tensors[f"{wrapper}lora_A.weight"] = A.reshape(num_experts * rank, -1).contiguous()
        tensors[f"{wrapper}lora_B.weight"] = B.permute(1, 2, 0).reshape(B.shape[1], rank * num_experts).contiguous()
        targets.append(f"{path}.{param}")
    return tensors, targets


def _per_expert_tensors(
    path: str, experts: nn.Module, ids: list[int], factors: dict[str, tuple]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """LoRA tensors keyed per expert and projection (``{experts}.{e}.{gate_proj,up_proj,down_proj}``, the naming of
    per-expert checkpoints), from fused factors; gate_up's rows split into gate (first half) and up."""
    if getattr(experts, "has_bias", False) or (experts.has_gate and not getattr(experts, "is_concatenated", True)):
        raise ValueError(
            f"{path}: per-expert export needs gate and up concatenated (gate rows first) without biases; "
            f"{type(experts).__name__} stores them otherwise. Use layout='parameters'."
        )
    transposed = bool(getattr(experts, "is_transposed", False))
    tensors, targets = {}, []
    for param, (U, V) in factors.items():
        # nn.Linear orientation (out, in): delta = U @ V in storage; transposed storage holds its transpose
        B_lin, A_lin = (V.transpose(-1, -2), U.transpose(-1, -2)) if transposed else (U, V)
        if param == "gate_up_proj":
            half = B_lin.shape[-2] // 2
            parts = {"gate_proj": B_lin[..., :half, :], "up_proj": B_lin[..., half:, :]}
        else:
            parts = {param: B_lin}
        for row, expert in enumerate(ids):
            for projection, B in parts.items():
                module = f"{path}.{expert}.{projection}"
                tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A_lin[row].clone()  # gate and up share A
                tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = B[row].contiguous()
                targets.append(module)
    return tensors, targets


def _owner(path: str, config: ESFTConfig, layers: dict[str, MoELayer]) -> tuple[Optional[MoELayer], Optional[int]]:
    """The MoE layer whose routed experts ``path`` holds deltas for (and the expert id for ModuleList experts)."""
    for key in config.experts:
        layer = layers.get(key)
        if layer is None:
            continue
        if path in layer.delta_targets:
            return layer, None
        for expert in config.experts[key]:
            module = layer.expert_modules.get(expert)
            if module is not None and (path == module or path.startswith(module + ".")):
                return layer, expert
    return None, None


def _plan(
    adapter_dir: Path, config: ESFTConfig, layers: dict[str, MoELayer], skip_non_expert: bool
) -> list[tuple[str, MoELayer, Optional[int], dict[str, _Delta]]]:
    """(module path, MoE layer, ModuleList expert id or None, matrix deltas) of every routed-expert delta to export;
    refuses (or, with ``skip_non_expert``, warns about) what LoRA on the routed experts cannot hold."""
    scale = scale_of(config.delta_rank, config.delta_alpha) if config.delta_rank is not None else 1.0
    plan, dropped = [], []
    for path, containers in _read_adapter(adapter_dir).items():
        layer, expert = _owner(path, config, layers)
        matrices, vectors = _deltas_of(containers, scale)
        if layer is None:
            dropped.append(f"{path} (not a routed expert: shared expert, router or non-expert module)")
            continue
        if layer.kind not in ("fused", "module_list"):
            raise ValueError(
                f"Layer {layer.key}: {layer.kind} experts cannot be exported to peft LoRA (supported: fused experts "
                "through target_parameters, ModuleList experts through target_modules)."
            )
        dropped += [f"{path}.{name} (bias delta)" for name, tensor in vectors.items() if bool(tensor.ne(0).any())]
        plan.append((path, layer, expert, matrices))
    if dropped:
        message = (
            f"{len(dropped)} trained part(s) of the adapter cannot be held by LoRA on the routed experts: "
            + "; ".join(dropped[:4]) + ("; ..." if len(dropped) > 4 else "")
        )
        if not skip_non_expert:
            raise ValueError(
                message + ". Serving engines load LoRA on expert projections only and reject modules_to_save. Pass "
                "skip_non_expert=True (--skip-non-expert) to export the routed experts alone, or merge the adapter "
                "(esft-peft merge) to serve it whole."
            )
        logger.warning("%s: left out of the LoRA export.", message)
    if not plan:
        raise ValueError(f"{adapter_dir}: no routed-expert delta to export.")
    return plan


def export_lora(
    adapter_dir: PathLike,
    out_dir: PathLike,
    rank: Optional[int] = None,
    *,
    max_error: float = DEFAULT_MAX_ERROR,
    base_model: Optional[Union[nn.Module, str]] = None,
    skip_non_expert: bool = False,
    layout: str = "parameters",
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> LoraExport:
    """Write the ESFT adapter in ``adapter_dir`` as a peft LoRA adapter in ``out_dir`` (see the module docstring).

    Args:
        rank: LoRA rank. ``None``: the adapter's ``delta_rank`` (exact) for a low-rank adapter, else the smallest rank
            at which every expert's relative truncation error is at most ``max_error``.
        max_error: the stated error bound for ``rank=None`` on full-rank adapters (relative Frobenius norm).
        base_model: the base model (its modules give names and the experts' storage orientation), or its id/path;
            default: the adapter's ``base_model_name_or_path``, built on the meta device (no weights are read).
        skip_non_expert: drop the deltas LoRA serving cannot hold (shared experts, routers, non-expert modules,
            bias deltas) with a warning instead of refusing.
        layout: fused experts as ``"parameters"`` (peft's ``target_parameters`` on the fused tensors, loadable by
            peft on the base) or ``"per_expert"`` (``target_modules`` ``{experts}.{e}.{gate_proj,up_proj,down_proj}``,
            the keys of per-expert checkpoints that serving engines' per-expert MoE LoRA reads; peft cannot load
            these onto fused transformers experts). ModuleList experts are per expert either way.

    Returns:
        :class:`LoraExport` with the rank, whether the export is exact and the per-expert relative errors.
    """
    adapter_dir = Path(adapter_dir)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    config = ESFTConfig.from_pretrained(str(adapter_dir))
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}.")
    if not 0 <= max_error < 1:
        raise ValueError(f"max_error must be in [0, 1), got {max_error!r}.")
    if config.modules_to_save:
        raise ValueError(
            f"{adapter_dir}: the adapter trains modules_to_save {config.modules_to_save}; serving engines reject "
            "modules_to_save in LoRA adapters, so it cannot be exported. Retrain without them."
        )
    model = _skeleton(config, base_model, trust_remote_code)
    plan = _plan(adapter_dir, config, find_moe_layers(model), skip_non_expert)
    exact = config.delta_rank is not None and rank in (None, config.delta_rank)
    decomposed = {} if exact else {
        (path, param): torch.linalg.svd(delta.full(), full_matrices=False)
        for path, _, _, matrices in plan for param, delta in matrices.items()
    }
    if exact:
        rank = config.delta_rank
    elif rank is None:
        rank = _smallest_rank([S for _, S, _ in decomposed.values()], max_error)
    alpha = config.delta_alpha if exact else rank
    tensors: dict[str, torch.Tensor] = {}
    target_parameters: list[str] = []
    target_modules: list[str] = []
    errors: dict[tuple[str, int, str], float] = {}
    for path, layer, expert, matrices in plan:
        ids = config.experts[layer.key] if expert is None else [expert]
        factors = {}
        for param, delta in matrices.items():
            dtype = (delta.dense if delta.dense is not None else delta.A).dtype
            if exact:
                U, V, errs = delta.B, delta.A, [0.0] * len(ids)
            else:
                U_, S, Vh = decomposed[(path, param)]
                U, V = _truncate(U_, S, Vh, rank)
                errs = _relative_errors(S, rank).reshape(-1).tolist()
            factors[param] = (U.to(dtype), V.to(dtype))
            name = param if expert is None else f"{path.rpartition('.')[2]}.{param}"
            errors.update({(layer.key, expert_id, name): err for expert_id, err in zip(ids, errs)})
        if expert is not None:  # a ModuleList expert's Linear: ordinary LoRA
            (U, V), = factors.values()
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = V.contiguous()
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = U.contiguous()
            target_modules.append(path)
        elif layout == "per_expert":
            part, targets = _per_expert_tensors(path, unwrap(model.get_submodule(path)), ids, factors)
            tensors.update(part)
            target_modules += targets
        else:
            experts = unwrap(model.get_submodule(path))
            part, targets = _fused_tensors(path, experts, ids, layer.num_experts, factors, rank)
            tensors.update(part)
            target_parameters += targets

    lora_config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_modules,
        target_parameters=target_parameters or None,
        base_model_name_or_path=config.base_model_name_or_path,
        bias="none",
        lora_dropout=0.0,
        inference_mode=True,
    )

    def write(tmp: Path) -> None:
        lora_config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})

    out = atomic_directory_write(out_dir, write, overwrite=overwrite)
    result = LoraExport(
        path=out, rank=rank, alpha=alpha, exact=exact or max(errors.values(), default=0.0) == 0.0,
        errors=errors, adapter_bytes=(out / WEIGHTS_NAME).stat().st_size,
    )
    logger.info(
        "Exported %s to peft LoRA %s: rank %d, alpha %s, %s, %d bytes.", adapter_dir, out, rank, alpha,
        "exact" if exact else f"max relative error {result.max_error:.2e}", result.adapter_bytes,
    )
    for (layer_key, expert_id, param), err in errors.items():
        logger.debug("layer %s expert %d %s: relative error %.3e", layer_key, expert_id, param, err)
    return result


def error_table(result: LoraExport) -> str:
    """The per-expert relative errors of an export as a Markdown table."""
    rows = ["| layer | expert | parameter | relative error |", "| --- | --- | --- | --- |"]
    rows += [f"| {layer} | {expert} | {param} | {err:.2e} |" for (layer, expert, param), err in result.errors.items()]
    return "\n".join(rows)
