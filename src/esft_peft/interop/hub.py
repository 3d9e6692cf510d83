"""Hugging Face Hub support for ESFT adapters: a generated model card and ``push_adapter``.

Loading needs nothing special: ``PeftModel.from_pretrained(base, "org/name")`` resolves the repo id through
huggingface_hub (cache, offline mode and revisions included) once ``esft_peft`` is imported.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

from peft import PeftModel

from ..tuners.esft.config import ESFTConfig
from ..tuners.esft.layer import ADAPTER_CONTAINERS
from ..tuners.pesc.config import PESCConfig
from ..files import atomic_write_text
from .card_section import card_section, refresh_card
from .pesc_card import pesc_model_card_text

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
CARD_TAGS = ("esft", "moe", "peft", "mixture-of-experts")


def adapter_statistics(peft_model: PeftModel, adapter_name: str = "default") -> dict[str, float]:
    """Parameter counts of ``adapter_name``: adapter parameters (dense deltas and low-rank factors), base parameters,
    the trainable fraction, and ``adapter_bytes``, the size of the adapter's tensors as saved (the safetensors file
    without its header); whole counts also while DeepSpeed ZeRO-3 holds only a partition of each parameter."""
    markers = tuple(f".{container}.{adapter_name}." for container in ADAPTER_CONTAINERS)
    numel = lambda param: getattr(param, "ds_numel", param.numel())  # noqa: E731
    adapter_params = [p for n, p in peft_model.named_parameters() if any(m in n for m in markers)]
    adapter = sum(numel(p) for p in adapter_params)
    base = sum(numel(p) for n, p in peft_model.named_parameters()
               if not any(f".{container}." in n for container in ADAPTER_CONTAINERS))
    return {"adapter_parameters": adapter, "base_parameters": base, "trainable_fraction": adapter / base if base else 0.0,
            "adapter_bytes": sum(numel(p) * p.element_size() for p in adapter_params)}


def readable_size(num_bytes: float) -> str:
    """Bytes in a readable unit (bytes, KiB, MiB, GiB)."""
    for unit in ("bytes", "KiB", "MiB"):
        if num_bytes < 1024:
            return f"{num_bytes:,.0f} {unit}" if unit == "bytes" else f"{num_bytes:,.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:,.2f} GiB"


def _delta_kind(config: ESFTConfig) -> str:
    if config.delta_rank is None:
        return "full rank (one dense delta per selected expert matrix)"
    return (f"low rank: rank {config.delta_rank}, alpha {config.delta_alpha:g} (scale "
            f"{config.delta_alpha / config.delta_rank:g}), `W + scale * B @ A` on each selected expert matrix")


def _expert_table(config: ESFTConfig, totals: dict[str, int]) -> str:
    rows = ["| layer | trained experts | of |", "| --- | --- | --- |"]
    for layer, ids in config.experts.items():
        rows.append(f"| {layer} | {', '.join(map(str, ids))} | {totals.get(layer, '?')} |")
    return "\n".join(rows)


def model_card_text(
    peft_model: PeftModel, repo_id: Optional[str] = None, adapter_name: str = "default",
    description: Optional[str] = None,
) -> str:
    """The model card (YAML metadata + Markdown) of an ESFT adapter (or of a PESC adapter, see
    :mod:`esft_peft.interop.pesc_card`)."""
    config = peft_model.peft_config[adapter_name]
    if isinstance(config, PESCConfig):
        return pesc_model_card_text(peft_model, repo_id, adapter_name, description)
    if not isinstance(config, ESFTConfig):
        raise ValueError(f"Adapter {adapter_name!r} is not an ESFT adapter.")
    base = config.base_model_name_or_path or "BASE_MODEL"
    totals = {key: layout["num_experts"] for key, layout in (config.base_layout or {}).items()}
    stats = adapter_statistics(peft_model, adapter_name)
    extras = [
        name for name, on in (
            ("shared experts", config.train_shared_experts),
            ("non-expert modules", bool(config.train_non_expert_modules)),
            ("routers", config.train_router),
        ) if on
    ]
    metadata = ["---", f"base_model: {base}", "library_name: peft", "tags:", *[f"- {tag}" for tag in CARD_TAGS]]
    metadata += ["pipeline_tag: text-generation", "---", ""]
    body = f"""# ESFT adapter{f' {repo_id}' if repo_id else ''}

{description or 'An Expert-Specialized Fine-Tuning (ESFT) adapter made with esft-peft.'}
ESFT trains only the routed experts most relevant to the task, layer by layer; everything else stays frozen.

- Base model: `{base}` ({config.base_model_type or 'unknown'} architecture)
- Trained: {config.num_selected_experts} routed experts in {len(config.experts)} MoE layers\
{' plus ' + ', '.join(extras) if extras else ''}
- Deltas: {_delta_kind(config)}
- Adapter parameters: {stats['adapter_parameters']:,} ({100 * stats['trainable_fraction']:.2f}% of the base's \
{stats['base_parameters']:,}); adapter size {readable_size(stats['adapter_bytes'])}

## Usage

```python
import esft_peft  # registers the ESFT method with peft
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{repo_id or 'PATH_OR_REPO_ID'}")
merged = model.merge_and_unload()  # optional: a plain transformers model
```

## Trained experts

{_expert_table(config, totals)}

In the official ESFT expert-config format:

```json
{_official_json(config)}
```
"""
    return "\n".join(metadata) + card_section(body)


def _official_json(config: ESFTConfig) -> str:
    expert_config = {"experts": config.experts, "shared_experts": config.train_shared_experts,
                     "non_expert_modules": bool(config.train_non_expert_modules)}
    return json.dumps(expert_config)


def write_model_card(
    peft_model: PeftModel, directory: Union[str, os.PathLike], repo_id: Optional[str] = None,
    adapter_name: str = "default", description: Optional[str] = None,
) -> Path:
    """Write the adapter's model card to ``directory/README.md`` (atomically); returns its path."""
    path = Path(directory) / CARD_NAME
    atomic_write_text(path, model_card_text(peft_model, repo_id, adapter_name, description))
    return path


def push_adapter(
    peft_model: PeftModel,
    repo_id: str,
    adapter_name: str = "default",
    private: Optional[bool] = None,
    token: Optional[Union[str, bool]] = None,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    create_pr: bool = False,
    description: Optional[str] = None,
    commit_description: Optional[str] = None,
    tags: Optional[list[str]] = None,
):
    """Upload an ESFT or PESC adapter (weights, ``adapter_config.json``, model card) to the Hub in one commit.

    The card is the repo's own README.md when it has one (its text and tags kept) with esft-peft's generated section
    refreshed, else esft-peft's card. ``model.push_to_hub(repo_id)`` calls this for ESFT and PESC adapters.
    Returns huggingface_hub's ``CommitInfo``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / adapter_name if adapter_name != "default" else Path(tmp)
        source.mkdir(parents=True, exist_ok=True)
        try:
            remote = api.hf_hub_download(repo_id, CARD_NAME, revision=revision, local_dir=Path(tmp) / ".remote")
            (source / CARD_NAME).write_text(Path(remote).read_text(encoding="utf-8"), encoding="utf-8")
        except (EntryNotFoundError, RepositoryNotFoundError):
            pass
        peft_model.save_pretrained(tmp, selected_adapters=[adapter_name], save_embedding_layers=False)
        shutil.rmtree(Path(tmp) / ".remote", ignore_errors=True)
        card = model_card_text(peft_model, repo_id, adapter_name, description)
        if tags:
            card = card.replace("tags:\n", "tags:\n" + "".join(f"- {tag}\n" for tag in tags), 1)
        refresh_card(source / CARD_NAME, card)
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(source).as_posix(), path_or_fileobj=str(path))
            for path in sorted(source.rglob("*")) if path.is_file()
        ]
        logger.info("Uploading %d files to %s", len(operations), repo_id)
        return api.create_commit(
            repo_id, operations, revision=revision, create_pr=create_pr, commit_description=commit_description,
            commit_message=commit_message or f"Upload {peft_model.peft_config[adapter_name].peft_type.value} adapter",
        )
