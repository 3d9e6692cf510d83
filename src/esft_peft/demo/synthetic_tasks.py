"""Synthetic sequence tasks with task tags, a word-level tokenizer for them, and exact-match evaluation.

Every example reads ``<task> d1 d2 ... dn = a1 a2 ... am`` (space-separated tokens, digits 0-9). The answer
depends on the task tag, so a mixture-of-experts model trained on the mixture learns to route tasks to different
experts. Used by the built-in demo (``esft-peft demo``), the paper-in-miniature example and the tests.
"""

from __future__ import annotations

import random
from typing import Callable, Iterable, Optional

import torch
from torch import nn

DIGITS = [str(d) for d in range(10)]


def _copy(xs: list[int]) -> list[int]:
    return list(xs)


def _reverse(xs: list[int]) -> list[int]:
    return xs[::-1]


def _sort(xs: list[int]) -> list[int]:
    return sorted(xs)


def _increment(xs: list[int]) -> list[int]:
    return [(x + 1) % 10 for x in xs]


def _complement(xs: list[int]) -> list[int]:
    return [9 - x for x in xs]


def _double(xs: list[int]) -> list[int]:
    return [(2 * x) % 10 for x in xs]


def _add(xs: list[int]) -> list[int]:
    """Adds the two halves of the input as numbers written least-significant digit first (carry included)."""
    half = len(xs) // 2
    a, b = xs[:half], xs[half : 2 * half]
    out, carry = [], 0
    for x, y in zip(a, b):
        total = x + y + carry
        out.append(total % 10)
        carry = total // 10
    return out


def _modsum(xs: list[int]) -> list[int]:
    """Running sum of the digits modulo 10 (modular arithmetic)."""
    out, total = [], 0
    for x in xs:
        total = (total + x) % 10
        out.append(total)
    return out


TASKS: dict[str, Callable[[list[int]], list[int]]] = {
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "increment": _increment,
    "complement": _complement,
    "double": _double,
    "add": _add,
    "modsum": _modsum,
}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "="]


def task_tag(task: str) -> str:
    return f"<{task}>"


def vocabulary() -> list[str]:
    """All tokens: specials, digits, then one tag per task (fixed order, so ids are stable)."""
    return SPECIAL_TOKENS + DIGITS + [task_tag(task) for task in TASKS]


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary` (no download); adds ``<s>`` in front."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="right"
    )


def make_example(task: str, rng: random.Random, length: int = 6) -> tuple[str, str]:
    """One (prompt, answer) pair of ``task``; prompt ends with ``=``, answer ends with ``</s>``."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; known tasks: {', '.join(TASKS)}.")
    xs = [rng.randrange(10) for _ in range(length)]
    answer = TASKS[task](xs)
    prompt = " ".join([task_tag(task), *map(str, xs), "="])
    return prompt, " ".join([*map(str, answer), "</s>"])


def make_texts(task: str, count: int, seed: int = 0, length: int = 6) -> list[str]:
    """``count`` full examples of ``task`` as text (prompt and answer), e.g. for a JSONL ``text`` column."""
    rng = random.Random(f"{task}-{seed}")
    return [" ".join(make_example(task, rng, length)) for _ in range(count)]


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], mask_prompt: bool = True) -> dict[str, torch.Tensor]:
    """Tokenise (prompt, answer) pairs of equal token length into ``input_ids``, ``attention_mask``, ``labels``.

    With ``mask_prompt``, prompt tokens get label ``-100`` (loss and accuracy on the answer only).
    """
    encoded = tokenizer([f"{prompt} {answer}" for prompt, answer in pairs])["input_ids"]
    if len({len(row) for row in encoded}) != 1:
        raise ValueError("encode_pairs needs examples of one length (use one `length` per batch).")
    ids = torch.tensor(encoded)
    labels = ids.clone()
    if mask_prompt:
        prompt_lengths = [len(row) for row in tokenizer([prompt for prompt, _ in pairs])["input_ids"]]
        for row, prompt_len in enumerate(prompt_lengths):
            labels[row, :prompt_len] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def encode_examples(
    tokenizer, task: str, count: int, seed: int = 0, length: int = 6, mask_prompt: bool = True
) -> dict[str, torch.Tensor]:
    """Tokenised batch of ``count`` examples of ``task`` (see :func:`encode_pairs`)."""
    rng = random.Random(f"{task}-{seed}")
    return encode_pairs(tokenizer, [make_example(task, rng, length) for _ in range(count)], mask_prompt)


def mixture_batch(
    tokenizer, weights: dict[str, float], count: int, rng: random.Random, length: int = 6, mask_prompt: bool = True
) -> dict[str, torch.Tensor]:
    """A batch drawn from a weighted mixture of tasks (for pre-training)."""
    tasks = rng.choices(list(weights), weights=list(weights.values()), k=count)
    return encode_pairs(tokenizer, [make_example(task, rng, length) for task in tasks], mask_prompt)


@torch.no_grad()
def exact_match(model: nn.Module, batch: dict[str, torch.Tensor], batch_size: int = 256) -> float:
    """Fraction of examples whose whole answer is predicted right (teacher-forced argmax at every answer position,
    which equals greedy decoding being exactly right)."""
    was_training = model.training
    model.eval()
    correct = 0
    total = batch["input_ids"].shape[0]
    for start in range(0, total, batch_size):
        ids = batch["input_ids"][start : start + batch_size]
        labels = batch["labels"][start : start + batch_size]
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"][start : start + batch_size]).logits
        predicted = logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        ok = (predicted == target) | (target == -100)
        correct += int(ok.all(dim=1).sum())
    model.train(was_training)
    return correct / total


def evaluate_tasks(
    model: nn.Module, tokenizer, tasks: Iterable[str], count: int = 256, seed: int = 10_000, length: int = 6,
    cache: Optional[dict[str, dict[str, torch.Tensor]]] = None,
) -> dict[str, float]:
    """Exact-match accuracy per task on ``count`` held-out examples (seeds disjoint from training data)."""
    results = {}
    for task in tasks:
        if cache is not None and task in cache:
            batch = cache[task]
        else:
            batch = encode_examples(tokenizer, task, count, seed=seed, length=length)
            if cache is not None:
                cache[task] = batch
        results[task] = exact_match(model, batch)
    return results
