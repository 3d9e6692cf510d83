"""The paper's settings and the official file names: the one table every module and the CLI read."""

from __future__ import annotations

# Selection (ESFT paper, section 2): per-layer cumulative score threshold p of each score function.
PAPER_TOP_P = {"token": 0.2, "gate": 0.1}
SCORE_FUNCTIONS = tuple(PAPER_TOP_P)

# Scoring sample: 32 sequences of 4096 tokens.
PAPER_SEQUENCE_LENGTH = 4096
PAPER_TOKEN_BUDGET = 32 * PAPER_SEQUENCE_LENGTH

# Training (paper, section 4): AdamW, constant schedule, 500 steps, lr 1e-5 for ESFT.
PAPER_TRAINING = {
    "max_steps": 500,
    "learning_rate": 1e-5,
    "lr_scheduler_type": "constant",
    "optim": "adamw_torch",
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "weight_decay": 0.1,
}

# The authors' adapter directories: the expert config next to the trained experts' weights.
EXPERT_CONFIG_NAME = "expert_cfg.json"
OFFICIAL_WEIGHTS_NAME = "model.safetensors"


def paper_top_p(score_function: str) -> float:
    """The paper's p for ``score_function`` ("token" or "gate")."""
    if score_function not in PAPER_TOP_P:
        raise ValueError(f"Unknown score function {score_function!r}; choose one of {SCORE_FUNCTIONS}.")
    return PAPER_TOP_P[score_function]
