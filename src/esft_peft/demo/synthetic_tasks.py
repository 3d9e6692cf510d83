"""Synthetic sequence tasks with task tags, a word-level tokenizer for them, and exact-match evaluation.

Every example reads ``<task> x1 x2 ... xn = a1 a2 ... am`` (space-separated tokens). Two families:

- digit tasks (``copy``, ``reverse``, ``double``, ...): every task uses the same tokens, the digits 0-9;
- domain tasks (``math``, ``code``, ``law``, ``translation``, ``medicine``): each domain has its own words (its own
  token distribution, like the text of math, code, law and translation differs) and shares the structure of all
  domains: digits, which every domain copies unchanged, the ``=`` separator and the position-by-position answer.
  Each word is rewritten by a fixed, domain-specific dictionary (a seeded permutation of the domain's words).

Domain tasks have disjoint train / validation / test splits (a hash of the prompt decides an example's split).
Used by the built-in demo (``esft-peft demo``), the paper in miniature and the tests.
"""

from __future__ import annotations

import random
import statistics
import zlib
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

DOMAIN_WORDS: dict[str, list[str]] = {
    "math": "plus minus times divide equals root power log sine cosine integral derivative sum product limit "
            "matrix".split(),
    "code": "def return if else for while import class try except lambda yield print list dict none".split(),
    "law": "court judge plaintiff defendant statute clause appeal verdict contract liable breach damages tort plea "
           "bail jury".split(),
    "translation": "le la les un une et est dans pour avec sur pas que qui ne se".split(),
    "medicine": "dose fever nerve tumor virus pulse lung liver heart blood vein cell scan pill rash wound".split(),
}
DOMAINS = list(DOMAIN_WORDS)
SPLITS = ("train", "validation", "test")
DIGIT_SHARE = 0.25  # share of a domain prompt's positions that hold a digit (structure shared by every domain)


def task_tag(task: str) -> str:
    return f"<{task}>"


def vocabulary() -> list[str]:
    """All tokens: specials, digits, then one tag per task (fixed order, so ids are stable)."""
    return (SPECIAL_TOKENS + DIGITS + [task_tag(task) for task in TASKS] + [task_tag(d) for d in DOMAINS]
            + [word for words in DOMAIN_WORDS.values() for word in words])


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


# ---------------------------------------------------------------------------------------------- domain tasks

def domain_dictionary(domain: str) -> dict[str, str]:
    """The fixed rewrite rule of ``domain``: a seeded permutation of its words (digits are copied unchanged)."""
    if domain not in DOMAIN_WORDS:
        raise ValueError(f"Unknown domain {domain!r}; known domains: {', '.join(DOMAINS)}.")
    words = DOMAIN_WORDS[domain]
    targets = list(words)
    random.Random(f"dictionary-{domain}").shuffle(targets)
    return dict(zip(words, targets))


def split_of(prompt: str) -> str:
    """The split a domain prompt belongs to: 80% train, 10% validation, 10% test, fixed by a hash of the prompt."""
    bucket = zlib.crc32(prompt.encode()) % 10
    return "test" if bucket == 9 else "validation" if bucket == 8 else "train"


def make_domain_example(
    domain: str, rng: random.Random, length: int = 6, split: str = "train", echo: bool = False
) -> tuple[str, str]:
    """One (prompt, answer) pair of ``domain`` from ``split``: words rewritten by the domain's dictionary, digits
    copied, e.g. ``<law> court 3 jury = tort 3 plea </s>``. With ``echo``, the answer repeats the prompt instead
    (a model trained on echoes can read and repeat the domain's text, but has never seen its task)."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    dictionary = {} if echo else domain_dictionary(domain)
    words = DOMAIN_WORDS[domain]
    while True:
        xs = [rng.choice(DIGITS) if rng.random() < DIGIT_SHARE else rng.choice(words) for _ in range(length)]
        prompt = " ".join([task_tag(domain), *xs, "="])
        if split_of(prompt) == split:
            return prompt, " ".join([*(dictionary.get(x, x) for x in xs), "</s>"])


def encode_domain_examples(
    tokenizer, domain: str, count: int, seed: int = 0, length: int = 6, split: str = "train", mask_prompt: bool = True
) -> dict[str, torch.Tensor]:
    """Tokenised batch of ``count`` examples of ``domain``'s task from ``split`` (see :func:`encode_pairs`)."""
    rng = random.Random(f"{domain}-{split}-{seed}")
    return encode_pairs(tokenizer, [make_domain_example(domain, rng, length, split) for _ in range(count)], mask_prompt)


def domain_mixture_batch(
    tokenizer, domains: list[str], count: int, rng: random.Random, length: int = 6, echo: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """A pre-training batch from the training split: domains drawn uniformly; the ``echo`` domains contribute
    echoes of their text rather than their task."""
    echo = set(echo)
    chosen = rng.choices(domains, k=count)
    return encode_pairs(tokenizer, [make_domain_example(d, rng, length, echo=d in echo) for d in chosen])


def retention(accuracy: dict[str, float], target: str) -> float:
    """Mean accuracy on every domain except ``target``: what fine-tuning on ``target`` kept of the others."""
    return statistics.mean(value for domain, value in accuracy.items() if domain != target)


def evaluate_domains(
    model: nn.Module, tokenizer, domains: Iterable[str], count: int = 256, split: str = "test", length: int = 6,
    cache: Optional[dict[tuple[str, str], dict[str, torch.Tensor]]] = None,
) -> dict[str, float]:
    """Exact-match accuracy on each domain's task, on ``count`` examples of ``split``."""
    results = {}
    for domain in domains:
        key = (domain, split)
        batch = cache.get(key) if cache is not None else None
        if batch is None:
            batch = encode_domain_examples(tokenizer, domain, count, seed=0, length=length, split=split)
            if cache is not None:
                cache[key] = batch
        results[domain] = exact_match(model, batch)
    return results
