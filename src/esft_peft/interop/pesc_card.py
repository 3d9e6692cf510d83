"""The model card of a PESC adapter: the method, its settings and the upcycled layers."""

from __future__ import annotations

from typing import Optional

from peft import PeftModel

from ..tuners.pesc.config import PESCConfig
from ..tuners.saved_checks import adapter_parameters
from .card_section import card_section

CARD_TAGS = ("pesc", "moe", "peft", "mixture-of-experts", "sparsity-crafting")


def pesc_adapter_parameters(peft_model: PeftModel, adapter_name: str = "default") -> int:
    """Number of values the adapter saves (routers, adapter experts and the LoRA part), counted on the tuner layers
    (no collective on a sharded model, where only the writing rank builds the card)."""
    return sum(tensor.numel() for tensor in adapter_parameters(peft_model, adapter_name).values())


def pesc_model_card_text(
    peft_model: PeftModel, repo_id: Optional[str] = None, adapter_name: str = "default",
    description: Optional[str] = None,
) -> str:
    """The model card (YAML metadata + Markdown) of a PESC adapter."""
    config = peft_model.peft_config[adapter_name]
    if not isinstance(config, PESCConfig):
        raise ValueError(f"Adapter {adapter_name!r} is not a PESC adapter.")
    base = config.base_model_name_or_path or "BASE_MODEL"
    layers = list(config.base_shapes or {})
    shapes = next(iter((config.base_shapes or {}).values()), {})
    adapter = pesc_adapter_parameters(peft_model, adapter_name)
    total = sum(p.numel() for p in peft_model.get_base_model().parameters())
    lora = (f"r={config.lora_r}, alpha={config.lora_alpha}, dropout={config.lora_dropout}, on "
            f"{config.lora_target_modules or 'every linear of the decoder layers'}") if config.uses_lora else "off"
    settings = [
        ("num_experts", config.num_experts), ("top_k", config.top_k), ("adapter_dim", config.adapter_dim),
        ("adapter_scaling", config.adapter_scaling), ("adapter_dropout", config.adapter_dropout),
        ("router_aux_loss_coef", config.router_aux_loss_coef), ("LoRA part", lora),
    ]
    table = "\n".join(["| setting | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in settings]])
    metadata = ["---", f"base_model: {base}", "library_name: peft", "tags:", *[f"- {tag}" for tag in CARD_TAGS]]
    metadata += ["pipeline_tag: text-generation", "---", ""]
    body = f"""# PESC adapter{f' {repo_id}' if repo_id else ''}

{description or 'A Parameter-Efficient Sparsity Crafting (PESC) adapter made with esft-peft.'}
PESC (arXiv 2401.02731) crafts a dense model into a mixture of experts: in every upcycled MLP, a router sends each
token to {config.top_k} of {config.num_experts} adapter experts that share the frozen dense weights,
`y = F(x) + sum_k w_k * s * U_k gelu(D_k F(x))`.

- Base model: `{base}` ({config.base_model_type or 'unknown'} architecture)
- Upcycled MLPs: {len(layers)} decoder layers ({', '.join(layers)}), hidden size {shapes.get('hidden_size', '?')}, \
intermediate size {shapes.get('intermediate_size', '?')}
- Adapter parameters: {adapter:,} ({100 * adapter / total:.2f}% of the model's {total:,})

## Settings

{table}

## Usage

```python
import esft_peft  # registers the PESC method with peft
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{repo_id or 'PATH_OR_REPO_ID'}")
```

Routing depends on each token, so the adapter cannot be merged into the dense weights; `model.merge_lora()` folds
only the LoRA part.
"""
    return "\n".join(metadata) + card_section(body)
