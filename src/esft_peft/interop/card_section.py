"""esft-peft's generated section of a model card: the markers around it, and putting it into a card that may hold
a user's own text."""

from __future__ import annotations

import re
from pathlib import Path

SECTION_START = "<!-- esft-peft: generated section, rewritten on every save -->"
SECTION_END = "<!-- esft-peft: end of generated section -->"


def card_section(body: str) -> str:
    """``body`` between the section markers."""
    return f"{SECTION_START}\n{body.strip()}\n{SECTION_END}\n"


def read_tags(path: Path) -> set[str]:
    """The tags of the card at ``path`` (none if there is no card)."""
    from huggingface_hub import ModelCard

    return set(ModelCard.load(path).data.tags or []) if path.exists() else set()


def refresh_card(path: Path, generated: str, kept_tags: set[str] = frozenset()) -> None:
    """Put the generated section and tags of ``generated`` (a whole card) into the card at ``path`` (written as
    ``generated`` if there is none), with ``kept_tags`` (tags the card had before peft replaced them with its own)."""
    from huggingface_hub import ModelCard

    from ..files import atomic_write_text

    if not path.exists():
        atomic_write_text(path, generated)
    card, ours = ModelCard.load(path), ModelCard(generated)
    card.data.tags = sorted(set(card.data.tags or []) | set(ours.data.tags or []) | kept_tags)
    section = ours.text[ours.text.index(SECTION_START):ours.text.index(SECTION_END) + len(SECTION_END)]
    pattern = re.compile(re.escape(SECTION_START) + ".*?" + re.escape(SECTION_END), re.S)
    if pattern.search(card.text):
        card.text = pattern.sub(lambda _: section, card.text, count=1)
    else:
        card.text = f"{section}\n\n{card.text.lstrip()}"
    atomic_write_text(path, str(card))
