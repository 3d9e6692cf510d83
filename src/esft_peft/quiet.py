"""What other libraries print that a user cannot act on, kept out of esft-peft's command line and demo.

The command line prints its own output, its progress bars and its own warnings; ``esft-peft --verbose`` shows the
rest (other libraries' warnings and log records below ERROR).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

OWN_LOGGER = "esft_peft"


class _OwnOrSevere(logging.Filter):
    """Passes esft-peft's records, and other libraries' records from ERROR up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] == OWN_LOGGER or record.levelno >= logging.ERROR


# Loggers that print through handlers of their own (not the root logger's), e.g. DeepSpeed's "Setting accelerator to
# CPU" when saving a model imports it.
SELF_HANDLED_LOGGERS = ("DeepSpeed",)


@contextmanager
def quiet_libraries(progress_bars: bool = False) -> Iterator[None]:
    """Inside the block: other libraries' warnings are not shown, and their log records below ERROR are dropped
    (esft-peft's own warnings and records pass). ``progress_bars=False`` also hides transformers' loading/saving
    progress bars. Everything is restored on exit."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress_bars:
        hf_logging.disable_progress_bar()
    only_own = _OwnOrSevere()
    handlers = logging.root.handlers + [logging.lastResort] + [
        handler for name in SELF_HANDLED_LOGGERS for handler in logging.getLogger(name).handlers
    ]
    loggers = [logging.getLogger(name) for name in SELF_HANDLED_LOGGERS]
    for target in [*handlers, *loggers]:
        if target is not None:
            target.addFilter(only_own)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            warnings.filterwarnings("default", module=rf"{OWN_LOGGER}(\.|$)")
            yield
    finally:
        for target in [*handlers, *loggers]:
            if target is not None:
                target.removeFilter(only_own)
        if bars and not progress_bars:
            hf_logging.enable_progress_bar()
