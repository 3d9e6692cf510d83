"""Turn the data given to :func:`esft_peft.scoring.score.score_experts` into padded token batches.

Accepted inputs:

- a ``datasets.Dataset`` with an ``input_ids`` column (optional ``attention_mask``/``labels``), a messages column
  (chat conversations) or a text column;
- a list or iterable of texts, of conversations (lists of ``{"role", "content"}`` dicts), or of tokenized
  examples (dicts with 1-D ``input_ids`` and optional ``attention_mask``/``labels``);
- a ``DataLoader`` or iterable of tokenized batches (dicts with 2-D ``input_ids``, optional ``attention_mask``
  and ``labels``).

Examples given as a sized collection (Dataset or list) are shuffled with the seed, so that a token budget
samples them at random, and split round-robin across distributed ranks. Batch iterables keep their order;
under torch.distributed a ``DataLoader`` with a ``DistributedSampler`` is taken as this rank's shard, other batch
iterables are split round-robin by batch.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..conversations import IGNORE_INDEX, encode_conversation

logger = logging.getLogger(__name__)



@dataclass
class Example:
    """One tokenized sequence, already truncated."""

    input_ids: list[int]
    labels: Optional[list[int]] = None  # IGNORE_INDEX where the token is prompt
    attention_mask: Optional[list[int]] = None


@dataclass
class Batch:
    """A right-padded batch on the CPU."""

    input_ids: torch.Tensor  # [B, S] long
    attention_mask: torch.Tensor  # [B, S] long
    labels: Optional[torch.Tensor] = None  # [B, S] long


class EmptyDataError(ValueError):
    """The scoring data holds no sequence."""


class BatchStream:
    """Iterates :class:`Batch` objects from any accepted input; counts truncated sequences."""

    def __init__(
        self,
        data: Any,
        *,
        tokenizer: Any,
        batch_size: int,
        max_length: int,
        seed: int,
        text_column: str,
        messages_column: str,
        rank: int = 0,
        world_size: int = 1,
        pad_token_id: Optional[int] = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}.")
        self.data = data
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.seed = seed
        self.text_column = text_column
        self.messages_column = messages_column
        self.rank = rank
        self.world_size = world_size
        self.truncated = 0
        self.warned_template = False
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        self.model_pad_id = pad_token_id  # marks padding in batches that come without an attention_mask
        self.warned_padding = False

    # ------------------------------------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Batch]:
        data = self.data
        if isinstance(data, (str, bytes, dict)):
            raise TypeError("score_experts needs a collection of examples, not a single text or dict.")
        if _is_dataset(data):
            data = self._dataset_items(data)
        if not isinstance(data, (DataLoader, Sequence)):
            stream = iter(data)
            first = next(stream, None)
            if first is None:
                return
            data = itertools.chain([first], stream)
            is_batches = _is_batch(first)
        else:
            is_batches = isinstance(data, DataLoader) or (len(data) > 0 and _is_batch(data[0]))
        if is_batches:
            yield from self._batches(data)
            return
        if isinstance(data, Sequence):
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(self.seed)).tolist()
            items = (data[i] for i in order[self.rank :: self.world_size])
        else:
            items = itertools.islice(data, self.rank, None, self.world_size)
        chunk: list[Example] = []
        for item in items:
            example = self._encode(item)
            if not example.input_ids:
                continue
            chunk.append(example)
            if len(chunk) == self.batch_size:
                yield self._collate(chunk)
                chunk = []
        if chunk:
            yield self._collate(chunk)

    def _dataset_items(self, dataset: Any) -> Sequence:
        columns = list(dataset.column_names)
        if "input_ids" in columns:
            tokenized = [c for c in ("input_ids", "attention_mask", "labels") if c in columns]
            return _DatasetView(dataset.select_columns(tokenized))
        for column in (self.messages_column, self.text_column):
            if column in columns:
                return _DatasetView(dataset.select_columns([column]), column)
        raise ValueError(
            f"The dataset has columns {columns}; score_experts needs 'input_ids', a messages column "
            f"({self.messages_column!r}) or a text column ({self.text_column!r}); "
            "pass messages_column= or text_column=."
        )

    def _batches(self, batches: Iterable[Any]) -> Iterator[Batch]:
        sharded = isinstance(batches, DataLoader) and isinstance(batches.sampler, DistributedSampler)
        step = 1 if sharded else self.world_size
        for batch in itertools.islice(iter(batches), 0 if sharded else self.rank, None, step):
            yield self._batch_from_dict(batch)

    # ------------------------------------------------------------------------------------------------ encoding

    def _encode(self, item: Any) -> Example:
        if isinstance(item, str):
            return self._truncate(Example(self._tokenize(item)))
        if isinstance(item, dict) and "input_ids" in item:
            return self._truncate(
                Example(_ints(item["input_ids"]), _ints(item.get("labels")), _ints(item.get("attention_mask")))
            )
        if isinstance(item, (list, tuple)) and item and all(isinstance(m, dict) and "content" in m for m in item):
            return self._truncate(self._encode_messages(list(item)))
        raise TypeError(
            "Cannot score an item of type "
            f"{type(item).__name__}: expected a text, a conversation (list of {{'role', 'content'}} dicts) "
            "or a tokenized example with 'input_ids'."
        )

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("Scoring texts or conversations needs tokenizer=...; or pass tokenized input_ids.")
        return self.tokenizer

    def _tokenize(self, text: str, special_tokens: bool = True) -> list[int]:
        return list(self._require_tokenizer()(text, add_special_tokens=special_tokens)["input_ids"])

    def _encode_messages(self, messages: list[dict]) -> Example:
        """A conversation with the chat template; without one, ``role: content`` lines. Prompt turns get labels -100."""
        tokenizer = self._require_tokenizer()
        if getattr(tokenizer, "chat_template", None):
            return Example(*encode_conversation(tokenizer, messages))
        if not self.warned_template:
            logger.warning("The tokenizer has no chat template; conversations are scored as 'role: content' lines.")
            self.warned_template = True
        ids, labels = [], []
        for index, message in enumerate(messages):
            piece = self._tokenize(f"{message.get('role', 'user')}: {message['content']}\n", special_tokens=index == 0)
            ids += piece
            labels += piece if message.get("role") == "assistant" else [IGNORE_INDEX] * len(piece)
        return Example(ids, labels)

    def _truncate(self, example: Example) -> Example:
        if len(example.input_ids) > self.max_length:
            self.truncated += 1
            cut = self.max_length
            example = Example(
                example.input_ids[:cut],
                None if example.labels is None else example.labels[:cut],
                None if example.attention_mask is None else example.attention_mask[:cut],
            )
        return example

    def _collate(self, examples: list[Example]) -> Batch:
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        with_labels = any(e.labels is not None for e in examples)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long) if with_labels else None
        for row, example in enumerate(examples):
            n = len(example.input_ids)
            ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
            mask[row, :n] = torch.tensor(example.attention_mask or [1] * n, dtype=torch.long)
            if labels is not None:
                labels[row, :n] = torch.tensor(example.labels if example.labels is not None else example.input_ids)
        return Batch(ids, mask, labels)

    def _batch_from_dict(self, batch: Any) -> Batch:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise TypeError(f"A batch must be a dict with 'input_ids'; got {type(batch).__name__}.")
        ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
        if ids.dim() != 2:
            raise ValueError(f"Batch input_ids must be 2-D [batch, sequence], got shape {tuple(ids.shape)}.")
        mask = batch.get("attention_mask")
        mask = self._mask_without_attention_mask(ids) if mask is None else torch.as_tensor(mask, dtype=torch.long)
        labels = batch.get("labels")
        labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if ids.shape[1] > self.max_length:
            self.truncated += int((mask[:, self.max_length :].sum(1) > 0).sum())
            ids, mask = ids[:, : self.max_length], mask[:, : self.max_length]
            labels = None if labels is None else labels[:, : self.max_length]
        return Batch(ids, mask, labels)


    def _mask_without_attention_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """All ones, except tokens equal to the model's ``pad_token_id`` (with a warning): padding is never counted."""
        if self.model_pad_id is None or not bool((ids == self.model_pad_id).any()):
            return torch.ones_like(ids)
        if not self.warned_padding:
            self.warned_padding = True
            logger.warning(
                "A batch has no attention_mask; tokens equal to the model's pad_token_id (%d) are treated as padding "
                "and not counted. Pass attention_mask to count them.", self.model_pad_id,
            )
        return (ids != self.model_pad_id).long()


def sequence_digest(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bytes:
    """A digest of one sequence's attended tokens (order-independent data fingerprints are built from these)."""
    tokens = input_ids[attention_mask.bool()].to(torch.int64).numpy().tobytes()
    return hashlib.sha256(tokens).digest()


def _ints(values: Any) -> Optional[list[int]]:
    if values is None:
        return None
    return [int(v) for v in (values.tolist() if torch.is_tensor(values) else values)]


def _is_dataset(data: Any) -> bool:
    return hasattr(data, "column_names") and hasattr(data, "select_columns")


def _is_batch(item: Any) -> bool:
    """A dict with 2-D ``input_ids`` (a batch, not one example)."""
    if not isinstance(item, dict) or "input_ids" not in item:
        return False
    ids = item["input_ids"]
    if torch.is_tensor(ids):
        return ids.dim() == 2
    return isinstance(ids, (list, tuple)) and bool(ids) and isinstance(ids[0], (list, tuple))


class _DatasetView(Sequence):
    """Lazy rows of a ``datasets.Dataset``: whole rows, or one column's values."""

    def __init__(self, dataset: Any, column: Optional[str] = None) -> None:
        self.dataset = dataset
        self.column = column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        row = self.dataset[int(index)]
        return row if self.column is None else row[self.column]
