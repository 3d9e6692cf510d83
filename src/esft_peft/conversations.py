"""Chat conversations as token ids and labels: only assistant turns are labelled, the rest gets ``-100``.

Training (the CLI) and scoring (prompt-token masking) share this one definition of "prompt" and "answer".
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100


def template_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """The chat template's token ids for ``messages`` (``[]`` for no message)."""
    if not messages:
        return []
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def encode_conversation(tokenizer: Any, messages: list[dict], train_on_prompt: bool = False) -> tuple[list, list]:
    """``(input_ids, labels)`` of a conversation rendered by the tokenizer's chat template. Labels copy the ids of
    assistant turns (the span each turn adds after the generation prompt) and are ``-100`` elsewhere, unless
    ``train_on_prompt``."""
    ids = template_ids(tokenizer, messages)
    if train_on_prompt:
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for index, message in enumerate(messages):
        if message.get("role") == "assistant":
            start = len(template_ids(tokenizer, messages[:index], add_generation_prompt=True))
            end = len(template_ids(tokenizer, messages[: index + 1]))
            labels[start:end] = ids[start:end]
    return ids, labels
