"""A few AdamW steps of an ESFT model under DDP and FSDP2, launched by ``tests/test_distributed_training.py``:

    accelerate launch --multi_gpu --num_processes 2 tests/distributed_train.py --family qwen3_moe --out DIR

On CPU, accelerate sets up gloo processes but enables FSDP only on accelerators, so FSDP2 is applied here with
accelerate's own ``fsdp2_prepare_model`` (what ``accelerator.prepare`` runs on GPUs): decoder layers sharded by
``_no_split_modules``, and rank 0's weights loaded into every rank (``cpu_ram_efficient_loading``; the other ranks
build their model from another seed, so a missed load shows).
DDP is ``accelerator.prepare`` with its default ``find_unused_parameters=False``. Gradient checkpointing is on. Each process trains on its slice
of one fixed global batch; losses (mean over processes) and the gathered, saved adapter go to ``DIR/<strategy>``.
``train(..., strategy="single")`` is the one-process reference on the whole batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).parent))

import esft_peft  # noqa: E402,F401  (registers ESFT)
from esft_helpers import VOCAB, selection  # noqa: E402
from esft_peft import ESFTConfig  # noqa: E402
from esft_peft.training import gather_adapter_state_dict  # noqa: E402
from tiny_families import make_model  # noqa: E402

GLOBAL_BATCH, LENGTH, STEPS, LR = 8, 16, 3, 1e-2


def global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(step))


def esft_model(family: str, dtype: torch.dtype, seed: int = 0):
    base = make_model(family, seed=seed, dtype=dtype)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, ESFTConfig(experts=selection(base)))
    return model.train()


def train(family: str, dtype: torch.dtype, strategy: str, out: Path, accelerator=None) -> list[float]:
    """Train ``STEPS`` steps; rank 0 writes the adapter to ``out``. Returns the per-step global losses."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    model = esft_model(family, dtype, seed=rank if strategy == "fsdp2" else 0)
    if strategy == "ddp":
        model = accelerator.prepare(model)
    elif strategy == "fsdp2":
        from accelerate import FullyShardedDataParallelPlugin
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=True,
            state_dict_type="FULL_STATE_DICT",
        )
        model = fsdp2_prepare_model(accelerator, model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for step in range(STEPS):
        ids = global_batch(step).chunk(world)[rank]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if accelerator:
            loss = accelerator.reduce(loss.detach(), reduction="mean")
        losses.append(loss.item())
    peft_model = accelerator.unwrap_model(model) if strategy == "ddp" else model
    adapter = gather_adapter_state_dict(peft_model)
    if rank == 0:
        peft_model.save_pretrained(out, state_dict=adapter)
        (out / "losses.json").write_text(json.dumps(losses))
    if accelerator:
        accelerator.wait_for_everyone()
    return losses


def main() -> None:
    from accelerate import Accelerator

    parser = argparse.ArgumentParser()
    parser.add_argument("--family", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2 and accelerator.distributed_type == "MULTI_CPU", accelerator.state
    for strategy in ("ddp", "fsdp2"):
        train(args.family, getattr(torch, args.dtype), strategy, args.out / strategy, accelerator)


if __name__ == "__main__":
    main()
