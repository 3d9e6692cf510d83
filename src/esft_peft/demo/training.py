"""Build, pre-train, fine-tune and score the demo MoE (a native transformers DeepSeek-V2 model, built from config)."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..scoring.scores import ExpertScores
from . import synthetic_tasks as st
from .settings import DemoSettings

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


def build_model(settings: DemoSettings, seed: int = 0, coarse: bool = False) -> nn.Module:
    """A randomly initialised demo MoE sized for the synthetic vocabulary; ``coarse`` applies
    ``settings.coarse_model`` (fewer, wider experts, the same active and total expert parameters)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = st.build_tokenizer()
    model = {**settings.model, **(settings.coarse_model if coarse else {})}
    config = AutoConfig.for_model(
        settings.model_type, vocab_size=len(st.vocabulary()), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **model,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def train_loop(
    model: nn.Module, batches: Iterator[Batch], steps: int, lr: float, weight_decay: float = 0.0,
    desc: str = "training", progress: bool = True,
) -> list[float]:
    """AdamW (betas 0.9/0.95, as in the paper), constant learning rate, gradient clipping at 1; returns the losses.

    With ``progress``, one tqdm bar (in a terminal only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc=desc, disable=None if progress else True, leave=False):  # None: terminals only
        loss = model(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def pretraining_stream(tokenizer, settings: DemoSettings, seed: int) -> Iterator[Batch]:
    """Batches of all domains' tasks, except the target domain, which contributes echoes of its text."""
    rng = random.Random(seed)
    while True:
        yield st.domain_mixture_batch(tokenizer, settings.domains, settings.pretrain_batch_size, rng,
                                      length=settings.sequence_words, echo=[settings.target_domain])


def finetuning_stream(tokenizer, settings: DemoSettings, seed: int) -> Iterator[Batch]:
    """Training-split batches of the target domain's task (seeded, so every method sees the same data)."""
    step = 0
    while True:
        yield st.encode_domain_examples(tokenizer, settings.target_domain, settings.finetune_batch_size,
                                        seed=1_000_003 * (seed + 1) + step, length=settings.sequence_words)
        step += 1


def pretrain_base(
    settings: DemoSettings, seed: int = 0, coarse: bool = False, progress: bool = True
) -> tuple[nn.Module, object]:
    """Build and pre-train the demo MoE on the domain mixture; returns (model in eval mode, tokenizer)."""
    tokenizer = st.build_tokenizer()
    model = build_model(settings, seed, coarse)
    losses = train_loop(model, pretraining_stream(tokenizer, settings, seed), settings.pretrain_steps,
                        settings.pretrain_lr, desc="pre-training", progress=progress)
    logger.info("pre-training done: final loss %.4f", sum(losses[-20:]) / len(losses[-20:]))
    return model, tokenizer


def scoring_batch(tokenizer, settings: DemoSettings, domain: str, seed: int = 0) -> Batch:
    """The training-split examples of ``domain`` that its experts are scored on."""
    return st.encode_domain_examples(tokenizer, domain, settings.score_examples, seed=seed + 500,
                                     length=settings.sequence_words)


def score_domain(model: nn.Module, tokenizer, settings: DemoSettings, domain: str, seed: int = 0) -> ExpertScores:
    """Expert relevance scores of ``domain``'s task on :func:`scoring_batch`, answer tokens only (prompt masked)."""
    from ..scoring.score import score_experts

    batch = scoring_batch(tokenizer, settings, domain, seed)
    examples = [{"input_ids": ids, "labels": labels} for ids, labels in zip(batch["input_ids"], batch["labels"])]
    return score_experts(model, examples, token_budget=None, batch_size=64, seed=seed, show_progress=False)


def count_parameters(model: nn.Module, trainable: bool = False) -> int:
    """Parameters of ``model`` (only those that require grad with ``trainable``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)
