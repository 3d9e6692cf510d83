"""ESFT under transformers' native expert parallelism, one process of a ``torchrun`` launch (gloo on CPU), run by
``tests/test_expert_parallel.py``:

    torchrun --nproc-per-node 2 tests/ep_worker.py --models DIR --out DIR --families qwen3_moe deepseek_v2

For each family, the tiny model saved in ``--models/<family>`` is loaded with
``DistributedConfig(ep_size=WORLD_SIZE, fsdp_size=WORLD_SIZE)``, wrapped by ``get_peft_model`` and trained by a plain
loop (forward, ``loss.backward()``, ``optimizer.step()``) on this rank's slice of each global batch; every rank calls
``save_pretrained`` (rank 0 writes). The saved adapter is loaded onto a fresh EP base with
``PeftModel.from_pretrained`` and merged with ``merge_and_unload``; the logits of the three models go to
``--out/<family>/ep_logits.pt``. ``--score`` also scores the first family's base under EP, ``--errors`` records the
refusals, ``--pesc llama`` trains PESC on a dense model loaded with ``DistributedConfig(fsdp_size=WORLD_SIZE)``, and
``--fsdp qwen3_moe`` runs the ESFT steps above on a model loaded that way (experts FSDP2-sharded, not EP), into
``--out/fsdp``, ``--several deepseek_v2 qwen3_moe`` trains two active adapters together (:func:`several_adapters`)
into ``--out/several/<family>``, and ``--trainer qwen3_moe deepseek_v2`` trains the EP-loaded model with
``transformers.Trainer`` (gradient accumulation, clipping active) and saves it with ``trainer.save_model`` on every
rank, into ``--out/trainer/<family>``.
``train``, ``trainer_train``, ``logits`` and ``pesc_model`` are the same code the test runs in one process on the
whole batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from typing import Optional

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))

from esft_peft import ESFTConfig, find_moe_layers  # noqa: E402
from esft_peft.training import gather_adapter_state_dict  # noqa: E402
from tiny_families import COMMON  # noqa: E402

FAMILIES = ("qwen3_moe", "deepseek_v2", "mixtral", "olmoe", "qwen2_moe")
SHARED = {"deepseek_v2", "qwen2_moe"}  # families with shared experts: trained too (replicated deltas)
ROUTER = {"qwen3_moe"}  # the router trained too (a replicated delta)
# SGD, not Adam: Adam's update is invariant to the gradients' scale (a gradient off by the data-parallel factor would
# pass) and turns rounding noise in near-zero gradients into full-size steps.
GLOBAL_BATCH, LENGTH, STEPS, LR, MOMENTUM = 4, 8, 3, 10.0, 0.9
SCORING = dict(batch_size=2, token_budget=None, show_progress=False)


def global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(step))


def esft_config(family: str, model) -> ESFTConfig:
    """Two MoE layers: the first with experts all on EP rank 0 of 2 (rank 1 owns none), the second spread unevenly."""
    first, second = list(find_moe_layers(model))[:2]
    return ESFTConfig(
        experts={first: [0, 2], second: [6, 1, 5]}, train_shared_experts=family in SHARED,
        train_router=family in ROUTER,
    )


SEVERAL_FAMILIES = ("deepseek_v2", "qwen3_moe")
# The second adapter's random deltas make larger gradients; at LR, 3 steps would amplify rounding to 7e-6 (deepseek_v2)
SEVERAL_LR = 2.0


def several_adapters(family: str, base):
    """ESFT adapters ``default`` (:func:`esft_config`) and ``other`` (overlapping experts, random initial deltas drawn
    from seed 0; the shared experts or the router trained by both) on ``base``, both active and trainable: the forward
    applies the sum of their deltas."""
    model = get_peft_model(base, esft_config(family, base))
    first, second = list(find_moe_layers(base))[:2]
    torch.manual_seed(0)
    model.add_adapter("other", ESFTConfig(
        experts={first: [2, 3], second: [5, 7, 4]}, train_shared_experts=family in SHARED,
        train_router=family in ROUTER, init_weights=False,
    ))
    model.base_model.set_adapter(["default", "other"])
    return model.train()


def train(model, rank: int = 0, world: int = 1, lr: float = LR, grad_norms: Optional[list] = None) -> list[float]:
    """``STEPS`` SGD steps on this rank's slice of each global batch; the global mean losses. ``grad_norms`` collects
    the gradients' global norm at each step, as ``torch.nn.utils.clip_grad_norm_`` computes it (nothing clipped)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)
    losses = []
    for step in range(STEPS):
        ids = global_batch(step).chunk(world)[rank]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if grad_norms is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
            grad_norms.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return losses


# transformers.Trainer: 2 optimizer steps of 2 accumulated micro-batches of GLOBAL_BATCH sequences, plain SGD,
# activation checkpointing (esft_training_arguments' default), the gradients clipped (a max_grad_norm below each
# family's gradient norm, so that the clip factor depends on the norm: the test checks that it was active), the ESFT
# authors' weight decay of W + delta (ExpertWeightDecayCallback).
TRAINER_FAMILIES = ("qwen3_moe", "deepseek_v2")
TRAINER_LR, TRAINER_STEPS, ACCUMULATION, WEIGHT_DECAY = 50.0, 2, 2, 1e-3
MAX_GRAD_NORM = {"qwen3_moe": 0.003, "deepseek_v2": 0.04}


def trainer_data() -> list[dict]:
    g = torch.Generator().manual_seed(11)
    count = GLOBAL_BATCH * ACCUMULATION * TRAINER_STEPS
    return [{"input_ids": ids, "labels": ids.clone()}
            for ids in torch.randint(0, COMMON["vocab_size"], (count, LENGTH), generator=g)]


def trainer_train(model, family: str, out: Path, world: int = 1) -> list[dict]:
    """Train with ``transformers.Trainer`` (each of ``world`` processes gets its slice of each global batch from the
    Trainer's own data loader), save with ``trainer.save_model(out)`` (on every rank); the per-step log entries."""
    from transformers import Trainer

    from esft_peft.training import ExpertWeightDecayCallback, esft_training_arguments

    args = esft_training_arguments(  # the paper's settings, activation checkpointing on, SGD instead of AdamW
        str(out / "run"), per_device_train_batch_size=GLOBAL_BATCH // world, gradient_accumulation_steps=ACCUMULATION,
        max_steps=TRAINER_STEPS, learning_rate=TRAINER_LR, optim="sgd", max_grad_norm=MAX_GRAD_NORM[family],
        weight_decay=WEIGHT_DECAY, logging_steps=1, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=trainer_data(), callbacks=[ExpertWeightDecayCallback()])
    trainer.train()
    trainer.save_model(str(out))
    return [entry for entry in trainer.state.log_history if "grad_norm" in entry]


def run_trainer(family: str, models: Path, out: Path, rank: int, world: int) -> None:
    base = ep_base(models / family, world)
    model = get_peft_model(base, esft_config(family, base))
    history = trainer_train(model, family, out / "trainer" / family, world)
    # the Trainer's own synchronisation of plain trainable tensors must not have touched ESFT's DTensor deltas
    hooked = sum(getattr(p, "_replicated_grad_hook_registered", False) for p in model.parameters())
    if rank == 0:
        (out / "trainer" / family / "history.json").write_text(json.dumps({"history": history, "hooked": hooked}))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    """Logits of a fixed batch (the same batch on every rank)."""
    ids = global_batch(100)
    return model.eval()(input_ids=ids).logits.float()


def ep_base(path: Path, world: int, ep: bool = True):
    """The model at ``path`` sharded by transformers: experts over ``ep`` (and dense modules by FSDP2), or every
    module by FSDP2 alone (``ep=False``)."""
    from transformers.distributed import DistributedConfig

    config = DistributedConfig(ep_size=world, fsdp_size=world) if ep else DistributedConfig(fsdp_size=world)
    return AutoModelForCausalLM.from_pretrained(path, distributed_config=config, dtype=torch.float32)


def run_family(family: str, models: Path, out: Path, rank: int, world: int, ep: bool = True) -> None:
    out = out if ep else out / "fsdp"
    base = ep_base(models / family, world, ep)
    model = get_peft_model(base, esft_config(family, base)).train()
    grad_norms = []
    losses = train(model, rank, world, grad_norms=grad_norms)
    trained = logits(model)
    # peft gathers the whole state dict of a sharded model unless given the adapter's (docs/distributed.md)
    adapter = {"state_dict": gather_adapter_state_dict(model)} if family == "mixtral" else {}
    model.save_pretrained(out / family, is_main_process=rank == 0, **adapter)
    dist.barrier()
    loaded = PeftModel.from_pretrained(ep_base(models / family, world, ep), out / family)
    reloaded = logits(loaded)
    merged = logits(loaded.merge_and_unload())
    if rank == 0:
        (out / family / "losses.json").write_text(json.dumps(losses))
        (out / family / "grad_norms.json").write_text(json.dumps(grad_norms))
        torch.save({"trained": trained, "reloaded": reloaded, "merged": merged}, out / family / "ep_logits.pt")


def run_several(family: str, models: Path, out: Path, rank: int, world: int) -> None:
    """Two active ESFT adapters (:func:`several_adapters`) trained together under EP, saved (``other`` into
    ``other/``), reloaded onto a fresh EP base, both active again."""
    out = out / "several" / family
    model = several_adapters(family, ep_base(models / family, world))
    grad_norms = []
    losses = train(model, rank, world, lr=SEVERAL_LR, grad_norms=grad_norms)
    trained = logits(model)
    model.save_pretrained(out, is_main_process=rank == 0)
    dist.barrier()
    loaded = PeftModel.from_pretrained(ep_base(models / family, world), out)
    loaded.load_adapter(out / "other", adapter_name="other")
    loaded.base_model.set_adapter(["default", "other"], inference_mode=True)
    reloaded = logits(loaded)
    if rank == 0:
        (out / "losses.json").write_text(json.dumps(losses))
        (out / "grad_norms.json").write_text(json.dumps(grad_norms))
        torch.save({"trained": trained, "reloaded": reloaded}, out / "ep_logits.pt")


def run_scoring(family: str, models: Path, out: Path, rank: int, world: int) -> None:
    from esft_peft.scoring import score_experts

    scores = score_experts(ep_base(models / family, world), scoring_data(), **SCORING)
    if rank == 0:
        scores.save(out / "scores.json")


def scoring_data() -> list[dict]:
    """Tokenized examples of several lengths, an odd count (the ranks get different numbers of batches)."""
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(4, 14, (7,), generator=g).tolist()
    return [{"input_ids": torch.randint(3, COMMON["vocab_size"], (n,), generator=g).tolist()} for n in lengths]


PESC_LR = 1.0  # PESC's adapters have larger gradients than ESFT's deltas


def pesc_model(base):
    """A PESC model with a LoRA part, random adapters drawn from seed 0 (the load-balancing loss off: it is computed
    from each rank's own routing statistics, as under DDP)."""
    from esft_peft import PESCConfig

    torch.manual_seed(0)
    config = PESCConfig(num_experts=4, top_k=2, adapter_dim=8, adapter_dropout=0.0, lora_r=4, lora_dropout=0.0,
                        router_aux_loss_coef=0.0)
    return get_peft_model(base, config).train()


def run_pesc(family: str, models: Path, out: Path, rank: int, world: int) -> None:
    """PESC on a dense model loaded with DistributedConfig(fsdp_size=WORLD_SIZE) (FSDP2, transformers-native)."""
    from transformers.distributed import DistributedConfig

    base = AutoModelForCausalLM.from_pretrained(
        models / family, distributed_config=DistributedConfig(fsdp_size=world), dtype=torch.float32
    )
    model = pesc_model(base)
    losses = train(model, rank, world, lr=PESC_LR)
    model.save_pretrained(out / f"pesc_{family}", is_main_process=rank == 0)
    if rank == 0:
        (out / f"pesc_{family}" / "losses.json").write_text(json.dumps(losses))


def run_errors(models: Path, out: Path, rank: int, world: int) -> None:
    """The messages of the refused setups, and how many ESFT layers each left in the model."""
    from transformers.distributed import DistributedConfig

    from esft_peft import ESFTLayer

    def wrapped(model) -> int:
        return sum(isinstance(module, ESFTLayer) for module in model.modules())

    errors = {}
    base = ep_base(models / "qwen3_moe", world)
    try:
        get_peft_model(base, ESFTConfig(experts={"0": [1], "1": [8]}))
    except ValueError as error:
        errors["out_of_range"] = str(error)
    errors["out_of_range_wrapped"] = wrapped(base)
    model = get_peft_model(base, ESFTConfig(experts={"0": [1]}))
    try:
        model(input_ids=global_batch(0)[:2], adapter_names=["default", "__base__"])
    except ValueError as error:
        errors["mixed_batch"] = str(error)
    try:
        ep_base(models / "three_experts", world)
    except ValueError as error:
        errors["indivisible"] = str(error)
    plan = {"model.layers.*.mlp.experts.gate_up_proj": "packed_colwise",
            "model.layers.*.mlp.experts.down_proj": "packed_rowwise", "model.layers.*.mlp.experts": "moe_tp_experts"}
    tp = AutoModelForCausalLM.from_pretrained(
        models / "qwen3_moe", distributed_config=DistributedConfig(tp_size=world, tp_plan=plan), dtype=torch.float32
    )
    try:
        get_peft_model(tp, ESFTConfig(experts={"0": [1]}))
    except ValueError as error:
        errors["tensor_parallel_experts"] = str(error)
    errors["tensor_parallel_experts_wrapped"] = wrapped(tp)
    if rank == 0:
        (out / "errors.json").write_text(json.dumps(errors, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--score", action="store_true")
    parser.add_argument("--errors", action="store_true")
    parser.add_argument("--pesc", nargs="*", default=[], help="dense families to train PESC on under FSDP2")
    parser.add_argument("--fsdp", nargs="*", default=[], help="MoE families to train ESFT on under FSDP2 alone")
    parser.add_argument("--several", nargs="*", default=[], help="MoE families to train two active adapters on")
    parser.add_argument("--trainer", nargs="*", default=[], help="MoE families to train with transformers.Trainer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    for family in args.families:
        run_family(family, args.models, args.out, rank, world)
    for family in args.several:
        run_several(family, args.models, args.out, rank, world)
    if args.score:
        run_scoring(args.families[0], args.models, args.out, rank, world)
    if args.errors:
        run_errors(args.models, args.out, rank, world)
    for family in args.pesc:
        run_pesc(family, args.models, args.out, rank, world)
    for family in args.fsdp:
        run_family(family, args.models, args.out, rank, world, ep=False)
    for family in args.trainer:
        run_trainer(family, args.models, args.out, rank, world)
    dist.barrier()


if __name__ == "__main__":
    main()
