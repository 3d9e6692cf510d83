"""esft-peft's model card on peft's own path: ``save_pretrained`` and ``push_to_hub`` write it.

peft writes ``README.md`` in ``PeftModel.create_or_update_model_card`` (called by ``save_pretrained``): it keeps what
the file already holds and adds its tags and version. peft offers no hook for a method's own card, so
:func:`extend_peft_model_card` wraps that method, once, when esft-peft registers its methods: for an ESFT or PESC
adapter, a new card starts as esft-peft's (experts per layer or PESC settings, trained fraction, a loading snippet with
``import esft_peft``), peft then updates it as usual, and the generated section (between the markers of
:mod:`~esft_peft.interop.card_section`) and the method's tags are put back or refreshed; everything else a user wrote
in ``README.md`` stays as it was. Other methods' cards are untouched.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .card_section import read_tags, refresh_card

METHODS = ("ESFT", "PESC")
_WRAPPED = "_esft_peft_card"


def _method(peft_model: Any) -> str | None:
    config = peft_model.peft_config.get(peft_model.active_adapter)
    peft_type = getattr(config, "peft_type", None)
    value = getattr(peft_type, "value", peft_type)
    return value if value in METHODS else None


def _with_method_card(create_or_update: Callable[[Any, str], None]) -> Callable[[Any, str], None]:
    @functools.wraps(create_or_update)
    def create_or_update_model_card(self: Any, output_dir: str) -> None:
        if _method(self) is None:
            return create_or_update(self, output_dir)
        from ..files import atomic_write_text
        from .hub import model_card_text

        path = Path(output_dir) / "README.md"
        generated = model_card_text(self, adapter_name=self.active_adapter)
        if not path.exists():
            atomic_write_text(path, generated)
        kept_tags = read_tags(path)
        create_or_update(self, output_dir)
        refresh_card(path, generated, kept_tags)

    setattr(create_or_update_model_card, _WRAPPED, True)
    return create_or_update_model_card


def _push_with_method_card(push_to_hub: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(push_to_hub)
    def wrapped(self: Any, repo_id: str, commit_message: Optional[str] = None, commit_description: Optional[str] = None,
                private: Optional[bool] = None, token: Optional[Union[bool, str]] = None,
                revision: Optional[str] = None, create_pr: bool = False, tags: Optional[list[str]] = None,
                **kwargs: Any) -> Any:
        if _method(self) is None:
            return push_to_hub(self, repo_id, commit_message=commit_message, commit_description=commit_description,
                               private=private, token=token, revision=revision, create_pr=create_pr, tags=tags,
                               **kwargs)
        from .hub import push_adapter

        return push_adapter(self, repo_id, adapter_name=self.active_adapter, private=private, token=token,
                            revision=revision, commit_message=commit_message, create_pr=create_pr,
                            commit_description=commit_description, tags=tags)

    setattr(wrapped, _WRAPPED, True)
    return wrapped


def extend_peft_model_card() -> None:
    """Make ``PeftModel.save_pretrained``/``push_to_hub`` write esft-peft's card for its methods (idempotent).

    transformers' ``push_to_hub`` (which ``PeftModel`` inherits) replaces the saved card with the repo's card or a
    generic template after saving; for ESFT and PESC adapters it runs :func:`~esft_peft.interop.hub.push_adapter`
    instead, which keeps the repo's card text and refreshes the generated section."""
    from peft import PeftModel

    for name, wrap in (("create_or_update_model_card", _with_method_card), ("push_to_hub", _push_with_method_card)):
        current = getattr(PeftModel, name)
        if not getattr(current, _WRAPPED, False):
            setattr(PeftModel, name, wrap(current))
