"""Third-party log records that say nothing a user can act on, dropped at their logger (one filter per message).

- bitsandbytes >= 0.50 on a CPU with AVX512-BF16 logs, whenever peft imports it, that it could not fetch an
  optional kernel from the Hub package ``kernels``; it then uses its own CPU kernel, and 4-bit layers work.
"""

from __future__ import annotations

import logging

KNOWN_NOISE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def drop_known_noise() -> None:
    """Attach the filters (idempotent). Every other record of those loggers passes."""
    for name, prefix in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))
