"""Settings of the demo and the paper in miniature, read from the packaged ``config.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

CONFIG_RESOURCE = "config.json"
SIZES = ("full", "quick")


@dataclass
class DemoSettings:
    """One size ("full" or "quick") of the packaged config.

    Attributes:
        model_type, model: the transformers config of the fine-grained MoE (DeepSeek-V2-shaped).
        coarse_model: overrides that make the experts coarser with the same active and total expert parameters.
        domains: the domains of pre-training; ``target_domain`` is pre-trained on echoes of its text only, and its
            task is what fine-tuning teaches.
        demo_top_p: the demo's ESFT-Token selection threshold (the paper's is 0.2; see docs/paper_in_miniature.md for
            why the demo selects more).
        sequence_words: words (or digits) per prompt.
        learning_rates: the demo's fine-tuning learning rate per method family ("ESFT", "FFT"), chosen on the
            validation split (``examples/lr_sweep.py`` for ESFT, the paper in miniature's tuning for FFT; see
            docs/paper_in_miniature.md).
        learning_rate_grids: the learning rates the paper in miniature tunes each method family over.
    """

    model_type: str
    model: dict[str, Any]
    coarse_model: dict[str, Any]
    domains: list[str]
    target_domain: str
    demo_top_p: float
    sequence_words: int
    learning_rate_grids: dict[str, list[float]]
    pretrain_steps: int
    pretrain_lr: float
    pretrain_batch_size: int
    finetune_steps: int
    finetune_batch_size: int
    learning_rates: dict[str, float]
    score_examples: int
    eval_examples: int

    @property
    def other_domains(self) -> list[str]:
        """The domains whose accuracy after fine-tuning measures retention."""
        return [domain for domain in self.domains if domain != self.target_domain]


def load_settings(size: str = "full", **overrides: Any) -> DemoSettings:
    """Settings of the packaged demo for ``size``; keyword overrides replace single fields."""
    raw = json.loads(resources.files("esft_peft.demo").joinpath(CONFIG_RESOURCE).read_text(encoding="utf-8"))
    if size not in raw["sizes"]:
        raise ValueError(f"Unknown demo size {size!r}; choose one of {sorted(raw['sizes'])}.")
    sized = dict(raw["sizes"][size])
    model = {**raw["model"], **sized.pop("model")}
    coarse_model = {**raw["coarse_model"], **sized.pop("coarse_model", {})}
    shared = {key: value for key, value in raw.items() if key not in ("model", "coarse_model", "sizes")}
    settings = DemoSettings(model=model, coarse_model=coarse_model, **shared, **sized)
    for key, value in overrides.items():
        if not hasattr(settings, key):
            raise ValueError(f"Unknown demo setting {key!r}.")
        setattr(settings, key, value)
    if settings.target_domain not in settings.domains:
        raise ValueError(f"The target domain {settings.target_domain!r} must be one of the domains {settings.domains}.")
    return settings
