"""The fine-tuning methods the paper compares, each as a trainable copy of a base model.

Names follow the paper: FFT (full fine-tuning), LoRA, ESFT-Token and ESFT-Gate (experts selected by token-selection
ratio at p = 0.2, or by average gate score at p = 0.1), ESFT with random experts at the same per-layer budget
(Table 4), ESFT-Token that also trains the shared experts, the non-expert modules, or both (Table 3), and
ESFT-Token with a larger budget (p = 0.4, the demo's), and ESFT-Token with low-rank deltas (rank 8 and 32, alpha
twice the rank as the LoRA row's).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..defaults import PAPER_TOP_P
from ..scoring.scores import ExpertScores


@dataclass(frozen=True)
class Method:
    """One row of the paper's tables."""

    name: str
    family: str  # the learning-rate family: "FFT", "LoRA" or "ESFT"
    score_function: Optional[str] = None  # ESFT only: "token" or "gate"
    random_experts: bool = False
    shared_experts: bool = False
    non_expert_modules: bool = False
    top_p: Optional[float] = None  # ESFT only: None for the paper's p of the score function
    delta_rank: Optional[int] = None  # ESFT only: low-rank deltas of this rank (alpha = 2 * rank, as LoRA's row)


METHODS = {
    method.name: method
    for method in (
        Method("FFT", "FFT"),
        Method("LoRA", "LoRA"),
        Method("ESFT-Token", "ESFT", "token"),
        Method("ESFT-Gate", "ESFT", "gate"),
        Method("ESFT-Token p=0.4", "ESFT", "token", top_p=0.4),
        Method("ESFT-Token random", "ESFT", "token", random_experts=True),
        Method("ESFT-Gate random", "ESFT", "gate", random_experts=True),
        Method("ESFT-Token +shared", "ESFT", "token", shared_experts=True),
        Method("ESFT-Token +non-expert", "ESFT", "token", non_expert_modules=True),
        Method("ESFT-Token +both", "ESFT", "token", shared_experts=True, non_expert_modules=True),
        Method("ESFT-Token r=8", "ESFT", "token", delta_rank=8),
        Method("ESFT-Token r=32", "ESFT", "token", delta_rank=32),
    )
}
LORA_RANK = 8


def demo_method(top_p: float) -> Method:
    """The demo's ESFT: token scores selected at ``top_p`` (``DemoSettings.demo_top_p``; "ESFT-Token p=0.4" above)."""
    return Method(f"ESFT-Token p={top_p:g}", "ESFT", "token", top_p=top_p)


def select_experts(method: Method, scores: ExpertScores, seed: int = 0) -> dict[str, list[int]]:
    """The experts ``method`` trains: the top-p rule on its score function (the paper's p unless the method sets
    one; random draws at the same per-layer counts for the random control)."""
    top_p = PAPER_TOP_P[method.score_function] if method.top_p is None else method.top_p
    return scores.select(method.score_function, top_p=top_p, randomize=method.random_experts, seed=seed)


def prepare(method: Method, base: nn.Module, scores: Optional[ExpertScores] = None, seed: int = 0) -> nn.Module:
    """A trainable copy of ``base`` for ``method`` (``scores`` of the target task are needed for ESFT)."""
    from peft import LoraConfig, get_peft_model

    from ..tuners.esft.config import ESFTConfig

    model = copy.deepcopy(base)
    if method.family == "FFT":
        return model.requires_grad_(True)
    if method.family == "LoRA":
        return get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules="all-linear"))
    if scores is None:
        raise ValueError(f"{method.name} selects experts from the target task's scores; pass `scores`.")
    low_rank = {} if method.delta_rank is None else dict(delta_rank=method.delta_rank,
                                                         delta_alpha=2 * method.delta_rank)
    config = ESFTConfig(experts=select_experts(method, scores, seed), train_shared_experts=method.shared_experts,
                        train_non_expert_modules=method.non_expert_modules, **low_rank)
    return get_peft_model(model, config)
