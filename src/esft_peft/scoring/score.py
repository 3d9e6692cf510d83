"""Expert relevance scoring (ESFT step 1): run the frozen model on task data and record its routing.

``score_experts`` returns :class:`~esft_peft.scoring.scores.ExpertScores` with, per MoE layer and routed expert,

- the token selection ratio  R(l, i) = mean over tokens of 1[i in topK(t)] / K   (ESFT-Token), and
- the average gate score     G(l, i) = mean over tokens of g(i, t)               (ESFT-Gate),

where the routing (indices and weights) is exactly what the experts receive, read by hooks
(:mod:`esft_peft.scoring.recorder`). ``average="tokens"`` pools all counted tokens (the official code, and the
default: every token weighs the same however the data is split into sequences); ``average="sequences"`` takes the
mean over each sequence first, then over sequences (the paper's formula).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import warnings
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..defaults import PAPER_SEQUENCE_LENGTH, PAPER_TOKEN_BUDGET
from ..moe.discovery import find_moe_layers
from ..moe.errors import RoutingReadError
from ..conversations import IGNORE_INDEX
from .data import BatchStream, EmptyDataError, sequence_digest
from .lockstep import forward_is_collective, in_lockstep
from .recorder import BatchMask, LayerTotals, RoutingRecorder
from .scores import AVERAGES, ExpertScores

logger = logging.getLogger(__name__)

__all__ = ["AllTokensMaskedError", "score_experts"]


class AllTokensMaskedError(ValueError):
    """The scoring data has sequences, but padding and prompt masking leave no token to count."""


def score_experts(
    model: nn.Module,
    data: Any,
    *,
    tokenizer: Any = None,
    token_budget: Optional[int] = PAPER_TOKEN_BUDGET,
    batch_size: int = 8,
    max_length: Optional[int] = None,
    seed: int = 0,
    mask_prompt: bool = True,
    average: str = "tokens",
    text_column: str = "text",
    messages_column: str = "messages",
    show_progress: bool = True,
) -> ExpertScores:
    """Score every routed expert of every MoE layer of ``model`` on ``data``.

    Args:
        model: a transformers MoE model (or a peft model around one); left in the state it was found in.
        data: a ``datasets.Dataset``, a list/iterable of texts, conversations or tokenized examples, or a
            ``DataLoader``/iterable of tokenized batches (see :mod:`esft_peft.scoring.data`).
        tokenizer: needed for texts and conversations (its chat template is applied to conversations).
        token_budget: stop after this many counted tokens (paper: 32 x 4096 = 131072); ``None`` scores all data.
            Under torch.distributed the budget is split evenly across ranks.
        batch_size: sequences per forward pass.
        max_length: longer sequences are truncated (with a warning); default 4096 capped by the model's
            ``max_position_embeddings``.
        seed: order in which a Dataset/list is sampled (the budget takes a random sample).
        mask_prompt: do not count tokens whose label is -100 (prompt turns of conversations, masked labels).
        average: "tokens" (pooled, default) or "sequences" (per-sequence mean first, as in the paper).
        text_column, messages_column: Dataset columns to read.
        show_progress: tqdm bar over counted tokens (rank 0 only).

    Raises:
        NotAnMoEModelError: the model has no MoE layer.
        ValueError: the model is an encoder-decoder (switch-transformers, nllb-moe): not supported.
        EmptyDataError: the data holds no sequence.
        AllTokensMaskedError: every token is padding or masked.
    """
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}.")
    if token_budget is not None and token_budget < 1:
        raise ValueError(f"token_budget must be >= 1 or None, got {token_budget}.")
    layers = find_moe_layers(model)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"score_experts runs decoder-only models; this {config.model_type} model is an encoder-decoder, whose "
            "decoder layers would need target sequences. Choose its experts by hand, e.g. "
            "ESFTConfig(experts={'encoder.0': [...], '0': [...]}), or score a decoder-only MoE."
        )
    if max_length is None:
        model_limit = getattr(config, "max_position_embeddings", None) or PAPER_SEQUENCE_LENGTH
        max_length = min(PAPER_SEQUENCE_LENGTH, model_limit)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    budget = None if token_budget is None else token_budget // world_size + (rank < token_budget % world_size)
    stream = BatchStream(
        data, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, seed=seed, text_column=text_column,
        messages_column=messages_column, rank=rank, world_size=world_size,
        pad_token_id=getattr(config, "pad_token_id", None),
    )
    vocab_size = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else None
    device = next(model.parameters()).device
    forward_kwargs = {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}
    modes = {module: module.training for module in model.modules()}
    counted_total, sequences_seen, sequences_counted, digests = 0, 0, 0, []
    progress = tqdm(total=budget, unit="tok", desc="scoring experts", disable=not show_progress or rank != 0)
    recorder = RoutingRecorder(model, layers, per_sequence=average == "sequences")
    try:
        model.eval()
        # a model sharded by transformers (expert parallelism, FSDP2) runs each forward on all ranks together
        collective = forward_is_collective(model)
        finished = lambda: budget is not None and counted_total >= budget  # noqa: E731
        with recorder, torch.no_grad():
            for batch in in_lockstep(stream, finished, device) if collective else stream:
                if batch is None:  # another rank still has a batch: run along, counting nothing
                    _idle_forward(model, recorder, device, forward_kwargs)
                    continue
                if finished():
                    break
                counted = batch.attention_mask.bool()
                if mask_prompt and batch.labels is not None:
                    counted &= batch.labels != IGNORE_INDEX
                if budget is not None:  # count only the first tokens that fit the budget
                    counted &= (counted.flatten().cumsum(0) <= budget - counted_total).view_as(counted)
                _check_token_ids(batch.input_ids, vocab_size)
                rows = counted.any(dim=1)
                sequences_seen += len(rows)
                if not rows.any():
                    if collective:
                        _idle_forward(model, recorder, device, forward_kwargs)
                    continue
                digests += [sequence_digest(batch.input_ids[r], batch.attention_mask[r]) for r in rows.nonzero()[:, 0]]
                recorder.mask = BatchMask(
                    counted=counted.flatten().to(device=device, dtype=torch.float64),
                    sequence=torch.arange(len(rows), device=device).repeat_interleave(counted.shape[1]),
                    num_sequences=len(rows),
                )
                model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                      **forward_kwargs)
                added = int(counted.sum())
                counted_total += added
                sequences_counted += int(rows.sum())
                progress.update(added)
            else:  # the data ended before the budget: the bar ends at 100% of what there was
                progress.total = progress.n
                progress.refresh()
    finally:
        model.train(modes[model])  # the model's own train() (transformers re-selects kernels on a mode change)
        for module, training in modes.items():  # then each module, as some may have been set apart by the user
            module.training = training
        progress.close()
    if stream.truncated:
        warnings.warn(
            f"{stream.truncated} sequence(s) longer than max_length={max_length} tokens were truncated for scoring.",
            stacklevel=2,
        )
    totals, truncated = recorder.totals, stream.truncated
    if world_size > 1:
        counters, digests = _all_reduce(
            totals, [counted_total, sequences_seen, sequences_counted, truncated], digests
        )
        counted_total, sequences_seen, sequences_counted, truncated = counters
    if sequences_seen == 0:
        raise EmptyDataError("The scoring data holds no sequence (empty dataset or iterable).")
    if counted_total == 0:
        raise AllTokensMaskedError(
            f"All tokens of the {sequences_seen} scored sequence(s) are padding or masked (labels == -100); "
            "nothing to count. Pass mask_prompt=False to count prompt tokens, or give labelled answers."
        )
    _check_every_token_routed(totals, counted_total)
    logger.info("Scored %d tokens of %d sequences over %d MoE layers (%s average).", counted_total,
                sequences_counted, len(totals), average)
    return _build_scores(
        totals, average, sequences_counted,
        metadata=_metadata(model, digests, counted_total, token_budget, max_length, batch_size, seed, mask_prompt,
                           world_size, truncated),
    )


def _idle_forward(model: nn.Module, recorder: RoutingRecorder, device: torch.device, forward_kwargs: dict) -> None:
    """A one-token forward whose routing is recorded as not counted (a rank keeping pace with the others)."""
    recorder.mask = BatchMask(
        counted=torch.zeros(1, dtype=torch.float64, device=device),
        sequence=torch.zeros(1, dtype=torch.long, device=device),
        num_sequences=1,
    )
    ids = torch.zeros((1, 1), dtype=torch.long, device=device)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), **forward_kwargs)


def _all_reduce(
    totals: dict[str, LayerTotals], counters: list[int], digests: list[bytes]
) -> tuple[list[int], list[bytes]]:
    """Sum (min, max) every rank's layer totals in place; return the summed counters and every rank's digests."""
    device = next(iter(totals.values())).counts.device
    sums, mins, maxs = [], [], []
    for layer in totals.values():
        sums += [layer.counts, layer.gates, layer.tokens.view(1), layer.weight_sum.view(1)]
        sums += [layer.seq_counts, layer.seq_gates] if layer.seq_counts is not None else []
        mins.append(layer.weight_min.view(1))
        maxs.append(torch.stack([layer.weight_max, *torch.tensor([layer.top_k, layer.calls], dtype=torch.float64,
                                                                 device=device)]))
    sums.append(torch.tensor(counters, dtype=torch.float64, device=device))
    flat_sum, flat_min, flat_max = torch.cat(sums), torch.cat(mins), torch.cat(maxs)
    dist.all_reduce(flat_sum, op=dist.ReduceOp.SUM)
    dist.all_reduce(flat_min, op=dist.ReduceOp.MIN)
    dist.all_reduce(flat_max, op=dist.ReduceOp.MAX)
    summed = iter(flat_sum.split([t.numel() for t in sums]))
    for layer, low, (high, top_k, calls) in zip(totals.values(), flat_min, flat_max.view(-1, 3)):
        layer.counts, layer.gates = next(summed), next(summed)
        layer.tokens, layer.weight_sum = next(summed)[0], next(summed)[0]
        if layer.seq_counts is not None:
            layer.seq_counts, layer.seq_gates = next(summed), next(summed)
        layer.weight_min, layer.weight_max, layer.top_k, layer.calls = low, high, int(top_k), int(calls)
    gathered: list[Optional[list[bytes]]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digests)
    return [int(v) for v in next(summed).tolist()], [d for part in gathered for d in part]


def _check_token_ids(input_ids: torch.Tensor, vocab_size: Optional[int]) -> None:
    if vocab_size is None or input_ids.numel() == 0:
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"The data holds token id {high if high >= vocab_size else low}, but the model's vocabulary has "
            f"{vocab_size} tokens (ids 0..{vocab_size - 1}). Tokenize the data with this model's tokenizer."
        )


def _check_every_token_routed(totals: dict[str, LayerTotals], counted: int) -> None:
    for key, layer in totals.items():
        seen = int(layer.tokens.item())
        if layer.calls == 0:
            raise RoutingReadError(f"Layer {key} was never routed during scoring; its MoE block was not called.")
        if seen != counted:
            raise RoutingReadError(
                f"Layer {key} routed {seen} counted tokens, expected {counted}: its routing hook fired more or less "
                "than once per token (is the MoE block called twice, e.g. by gradient checkpointing?)."
            )


def _build_scores(totals: dict[str, LayerTotals], average: str, num_sequences: int, metadata: dict) -> ExpertScores:
    token_scores, gate_scores, counts, tokens, weight_sums = {}, {}, {}, {}, {}
    constant_sum = True
    for key, layer in totals.items():
        n, k = layer.tokens.item(), layer.top_k
        if average == "tokens":
            token, gate = layer.counts / (n * k), layer.gates / n
        else:
            token, gate = layer.seq_counts / (num_sequences * k), layer.seq_gates / num_sequences
        token_scores[key], gate_scores[key] = token.tolist(), gate.tolist()
        counts[key] = [int(round(c)) for c in layer.counts.tolist()]
        tokens[key] = int(n)
        mean, low, high = layer.weight_sum.item() / n, layer.weight_min.item(), layer.weight_max.item()
        weight_sums[key] = {"mean": mean, "min": low, "max": high}
        eps = torch.finfo(layer.dtype).eps if layer.dtype is not None else torch.finfo(torch.float32).eps
        constant_sum &= high - low <= max(1e-5, 4 * eps * k) * max(1.0, abs(mean))
    top_ks = {layer.top_k for layer in totals.values()}
    scale = sum(w["mean"] for w in weight_sums.values()) / len(weight_sums)
    return ExpertScores(
        token_scores=token_scores,
        gate_scores=gate_scores,
        token_counts=tokens,
        expert_counts=counts,
        top_k=top_ks.pop() if len(top_ks) == 1 else None,
        average=average,
        num_sequences=num_sequences,
        weight_sums=weight_sums,
        renormalized=constant_sum,
        weight_scale=round(scale, 6) if constant_sum else None,
        metadata=metadata,
    )


@functools.lru_cache(maxsize=None)
def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _metadata(model: nn.Module, digests: list[bytes], tokens: int, token_budget: Optional[int], max_length: int,
              batch_size: int, seed: int, mask_prompt: bool, world_size: int, truncated: int) -> dict[str, Any]:
    config = getattr(model, "config", None)
    config_text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config)
    return {
        "model_name": getattr(config, "_name_or_path", "") or type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "config_fingerprint": hashlib.sha256(config_text.encode()).hexdigest()[:16],
        "data_fingerprint": hashlib.sha256(b"".join(sorted(digests))).hexdigest()[:16],
        "num_tokens": tokens,
        "token_budget": token_budget,
        "max_length": max_length,
        "batch_size": batch_size,
        "seed": seed,
        "mask_prompt": mask_prompt,
        "world_size": world_size,
        "truncated_sequences": truncated,
        "versions": {name: _package_version(name) for name in ("esft-peft", "torch", "transformers", "peft")},
    }
