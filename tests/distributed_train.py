"""A few AdamW steps of an ESFT model under DDP and FSDP2, or DeepSpeed, launched by
``tests/test_distributed_training.py``:

    accelerate launch --multi_gpu --num_processes 2 tests/distributed_train.py --family qwen3_moe --out DIR
    accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml --num_processes 2 \
        tests/distributed_train.py --family qwen3_moe --out DIR

On CPU, accelerate sets up gloo processes but enables FSDP only on accelerators, so FSDP2 is applied here with
accelerate's own ``fsdp2_prepare_model`` (what ``accelerator.prepare`` runs on GPUs): decoder layers sharded by
``_no_split_modules``, and rank 0's weights loaded into every rank (``cpu_ram_efficient_loading``; the other ranks
build their model from another seed, so a missed load shows).
DDP is ``accelerator.prepare`` with its default ``find_unused_parameters=False``. DeepSpeed is
``accelerator.prepare`` with the launch's DeepSpeed config (gloo named explicitly: accelerate picks no backend for
DeepSpeed without accelerators; no gradient clipping, as in the reference; ZeRO-3 partitions even the tiny model's
tensors). Gradient checkpointing is on unless ``--no-gradient-checkpointing``. Each process trains on its slice
of one fixed global batch; losses (mean over processes) and the gathered, saved adapter go to ``DIR/<strategy>``.
``train(..., strategy="single")`` is the one-process reference on the whole batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))

import esft_peft  # noqa: E402,F401  (registers ESFT)
from esft_helpers import VOCAB, selection  # noqa: E402
from esft_peft import ESFTConfig  # noqa: E402
from esft_peft.interop.hub import model_card_text  # noqa: E402
from esft_peft.training import gather_adapter_state_dict  # noqa: E402
from tiny_families import make_model  # noqa: E402

GLOBAL_BATCH, LENGTH, STEPS, LR = 8, 16, 3, 1e-2


def global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(step))


def esft_model(
    family: str, dtype: torch.dtype, seed: int = 0, checkpointing: bool = True, variants: bool = False,
    pretrained: Path | None = None,
):
    """A tiny ESFT model, random or loaded from ``pretrained``; ``variants`` also trains the shared experts and the
    routers (the paper's Table 3)."""
    if pretrained is None:
        base = make_model(family, seed=seed, dtype=dtype)
    else:
        base = AutoModelForCausalLM.from_pretrained(pretrained, dtype=dtype)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = ESFTConfig(experts=selection(base), train_shared_experts=variants, train_router=variants)
    model = get_peft_model(base, config)
    return model.train()


def train(model, strategy: str, out: Path, accelerator=None) -> list[float]:
    """Train ``STEPS`` steps; rank 0 writes the adapter to ``out``. Returns the per-step global losses."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    card_before = model_card_text(model)
    if strategy == "ddp":
        model = accelerator.prepare(model)
    elif strategy == "fsdp2":
        from accelerate import FullyShardedDataParallelPlugin
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=True,
            state_dict_type="FULL_STATE_DICT",
        )
        model = fsdp2_prepare_model(accelerator, model)  # replaces the parameters by sharded ones
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    if strategy == "deepspeed":  # DeepSpeed wraps model and optimizer together
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        config.update(train_micro_batch_size_per_gpu=GLOBAL_BATCH // world, gradient_clipping=0.0)
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors
        model, optimizer = accelerator.prepare(model, optimizer)
    losses = []
    for step in range(STEPS):
        ids = global_batch(step).chunk(world)[rank]
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss) if accelerator else loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if accelerator:
            loss = accelerator.reduce(loss.detach(), reduction="mean")
        losses.append(loss.item())
    adapter = gather_adapter_state_dict(model)
    peft_model = accelerator.unwrap_model(model) if accelerator else model
    assert model_card_text(peft_model) == card_before  # whole counts, also from ZeRO-3 partitions
    if rank == 0:
        peft_model.save_pretrained(out, state_dict=adapter)
        (out / "losses.json").write_text(json.dumps(losses))
    if accelerator:
        accelerator.wait_for_everyone()
    return losses


def main() -> None:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    parser = argparse.ArgumentParser()
    parser.add_argument("--family", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--variants", action="store_true", help="also train shared experts and routers")
    parser.add_argument("--zero-init", type=Path, metavar="BASE_DIR", help="load the base from BASE_DIR after the "
                        "Accelerator exists, so that ZeRO-3 partitions it while loading (zero.Init)")
    args = parser.parse_args()
    dtype, rank = getattr(torch, args.dtype), int(os.environ["RANK"])
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    strategies = ["deepspeed"] if deepspeed else ["ddp", "fsdp2"]
    # Under ZeRO-3 an existing Accelerator makes transformers build models partitioned (zero.Init): models are
    # built before it, unless --zero-init asks for exactly that.
    options = dict(checkpointing=not args.no_gradient_checkpointing, variants=args.variants, pretrained=args.zero_init)

    def build() -> dict:
        return {s: esft_model(args.family, dtype, rank if s == "fsdp2" else 0, **options) for s in strategies}

    models = {} if args.zero_init else build()
    if deepspeed:
        accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    else:
        accelerator = Accelerator(cpu=True)
    if args.zero_init:
        models = build()
        base = [p for n, p in models["deepspeed"].named_parameters() if ".esft_delta." not in n]
        assert all(hasattr(p, "ds_id") for p in base), "the model was not partitioned at construction"
    expected_type = "DEEPSPEED" if deepspeed else "MULTI_CPU"
    assert accelerator.num_processes == 2 and accelerator.distributed_type == expected_type, accelerator.state
    for strategy in strategies:
        train(models[strategy], strategy, args.out / strategy, accelerator)


if __name__ == "__main__":
    main()
