"""Silence, for the demo and the miniature only, what their libraries print that is expected there."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

EXPECTED_WARNINGS = (
    ".*is_gradient_checkpointing.*",  # peft calls a transformers method deprecated in 5.x
    ".*_pattern keys did not match any targeted module.*",  # peft's LoRA defaults for MoE experts, unused here
)


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.fragments)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Inside the block: no transformers save/load progress bars, none of ``EXPECTED_WARNINGS``, and no DeepSpeed
    CPU notice (printed when saving a model imports DeepSpeed). Everything is restored on exit."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    deepspeed_logger = logging.getLogger("DeepSpeed")
    notice = _DropMessages("Setting accelerator to CPU")
    deepspeed_logger.addFilter(notice)
    try:
        with warnings.catch_warnings():
            for message in EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        deepspeed_logger.removeFilter(notice)
        if bars:
            hf_logging.enable_progress_bar()
