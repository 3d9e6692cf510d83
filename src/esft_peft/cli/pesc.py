"""``esft-peft train --method pesc``: craft a dense model into a mixture of adapter experts and train it
(the PESC paper's recipe as defaults: lr 2e-4 constant with warm-up, max_grad_norm 0.3, LoRA r=64/alpha=16 on
every linear with --lora-r 64, QLoRA with --load-in-4bit)."""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

# The authors' train_moe.py (paged AdamW 32-bit on GPU; plain AdamW on CPU), 500 steps as the ESFT default.
PESC_TRAINING = {
    "max_steps": 500,
    "learning_rate": 2e-4,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 10,
    "max_grad_norm": 0.3,
    "weight_decay": 0.0,
}


# Option -> PESCConfig field. Options left out keep PESCConfig's defaults (the help texts quote them).
PESC_OPTIONS = {
    "--num-experts": "num_experts", "--top-k": "top_k", "--adapter-dim": "adapter_dim",
    "--adapter-scaling": "adapter_scaling", "--adapter-dropout": "adapter_dropout",
    "--router-aux-loss-coef": "router_aux_loss_coef", "--layers": "layers_to_transform", "--lora-r": "lora_r",
    "--lora-alpha": "lora_alpha", "--lora-dropout": "lora_dropout",
}


def add_pesc_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` options of ``--method pesc`` (refused with ``--method esft``)."""
    group = parser.add_argument_group("PESC (--method pesc)")
    group.add_argument("--num-experts", type=int, metavar="E", help="adapter experts per MLP (default: 8)")
    group.add_argument("--top-k", type=int, metavar="K", help="experts per token (default: 2)")
    group.add_argument("--adapter-dim", type=int, metavar="D", help="adapter bottleneck (default: 64)")
    group.add_argument("--adapter-scaling", type=float, metavar="S", help="adapter output scaling (default: 1.0)")
    group.add_argument("--adapter-dropout", type=float, metavar="P", help="adapter input dropout (default: 0.1)")
    group.add_argument("--router-aux-loss-coef", type=float, metavar="A",
                       help="weight of the load-balancing loss (default, the paper's: 0.01)")
    group.add_argument("--layers", type=int, nargs="+", metavar="L", dest="layers_to_transform",
                       help="only upcycle these decoder layers")
    group.add_argument("--lora-r", type=int, metavar="R",
                       help="rank of the LoRA part on every linear (the paper: 64; default 0 = no LoRA)")
    group.add_argument("--lora-alpha", type=int, metavar="A", help="LoRA alpha (default: 16)")
    group.add_argument("--lora-dropout", type=float, metavar="P", help="LoRA dropout (default: 0.1)")
    group.add_argument("--load-in-4bit", action="store_true",
                       help="QLoRA: load the base in bitsandbytes 4-bit nf4 (double quantisation); needs "
                       "esft-peft[qlora]")


def given_pesc_options(args: argparse.Namespace) -> list[str]:
    """The PESC options set on the command line (including ``--load-in-4bit``)."""
    given = [option for option, field in PESC_OPTIONS.items() if getattr(args, field) is not None]
    return given + (["--load-in-4bit"] if args.load_in_4bit else [])


def pesc_config(args: argparse.Namespace):
    from ..tuners.pesc.config import PESCConfig
    from .sources import model_reference

    settings = {field: getattr(args, field) for field in PESC_OPTIONS.values() if getattr(args, field) is not None}
    return PESCConfig(**settings, base_model_name_or_path=model_reference(args.model))


def _load_base(args: argparse.Namespace):
    from .sources import hub_or_local, load_model

    if not args.load_in_4bit:
        return load_model(args.model, args.dtype, args.device)
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch.bfloat16 if args.dtype in ("auto", "bfloat16") else getattr(torch, args.dtype)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=compute)
    with hub_or_local(args.model):
        return AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quantization).eval()


def refuse_moe_base(model: Any, args: argparse.Namespace) -> None:
    """PESC crafts dense MLPs into experts; a model that is already an MoE is ESFT's job (unless ``--layers`` picks
    its dense layers)."""
    from ..moe.discovery import find_moe_layers
    from ..moe.errors import NotAnMoEModelError
    from .sources import CLIError

    if args.layers_to_transform is not None:
        return
    try:
        layers = find_moe_layers(model)
    except NotAnMoEModelError:
        return
    raise CLIError(
        f"{args.model} is already a Mixture-of-Experts model ({len(layers)} MoE layers); PESC crafts dense MLPs into "
        "experts. Fine-tune its experts with ESFT instead: `esft-peft score --model MODEL --data DATA --out "
        "scores.json`, `esft-peft select --scores scores.json --out expert_cfg.json`, then `esft-peft train --model "
        "MODEL --data DATA --expert-config expert_cfg.json --out ADAPTER`; or pass --layers with its dense layers"
    )


def train_pesc(args: argparse.Namespace, tokenizer: Any, dataset: Any) -> None:
    """Craft, train (transformers Trainer) and save a PESC adapter with its model card to ``args.out``."""
    import torch
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from ..interop.pesc_card import pesc_adapter_parameters
    from ..training.helpers import CHECKPOINTING, CHECKPOINTING_KWARGS
    from .train_common import save_trained_adapter, training_overrides

    config = pesc_config(args)  # validated before the model is loaded
    base = _load_base(args)
    refuse_moe_base(base, args)
    model = get_peft_model(base, config)
    if int(os.environ.get("RANK", "0")) == 0:
        count = pesc_adapter_parameters(model)
        print(f"crafting {len(config.base_shapes)} MLPs into {config.num_experts} adapter experts (top-{config.top_k})"
              f": {count:,} adapter parameters")
    overrides = training_overrides(args)
    checkpointing = not args.no_gradient_checkpointing
    with tempfile.TemporaryDirectory(prefix="pesc-train-") as work:
        training_args = TrainingArguments(**{
            **PESC_TRAINING, "output_dir": work, "use_cpu": not torch.accelerator.is_available(),
            "per_device_train_batch_size": 8, CHECKPOINTING: checkpointing,
            CHECKPOINTING_KWARGS: {"use_reentrant": False}, "logging_steps": 10, "save_strategy": "no",
            "report_to": [], "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
            "optim": "paged_adamw_32bit" if args.load_in_4bit and torch.cuda.is_available() else "adamw_torch",
            **overrides,
        })
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator)
        trainer.train()

    save_trained_adapter(args, trainer, model, tokenizer)
