"""What every esft-peft tuner shares for peft's ``adapter_names=`` argument (one adapter per sample): the name of
"no adapter" and the checks of the names, worded as peft's LoRA words them."""

from __future__ import annotations

from typing import Any, Optional, Sequence

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in adapter_names


def check_adapter_names(adapter_names: Any, known: set[str]) -> list[str]:
    """``adapter_names`` as a list, after checking it is a list of str naming known adapters or ``"__base__"``."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
    if not all(isinstance(name, str) for name in adapter_names):
        raise TypeError(f"Got adapter names {list(adapter_names)!r}, expected a list of str.")
    unexpected = {name for name in adapter_names if name != BASE_ADAPTER} - known
    if unexpected:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(map(str, unexpected)))}")
    return list(adapter_names)


def beam_expanded(adapter_names: list[str], num_beams: Optional[int]) -> list[str]:
    """The names for the batch that beam search runs: each sample (and so its name) repeated ``num_beams`` times."""
    if isinstance(num_beams, int) and num_beams > 1:
        return [name for name in adapter_names for _ in range(num_beams)]
    return adapter_names
