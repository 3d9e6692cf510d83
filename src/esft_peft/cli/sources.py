"""Where the command line's models, tokenizers and adapters come from: local directories or Hub repo ids, with
one-line errors that say which of the two failed."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional


class CLIError(Exception):
    """A user-facing failure reported as one line (exit code 1)."""


def load_model(name_or_path: str, dtype: str = "auto", device: Optional[str] = None, trust_remote_code: bool = False):
    """A causal LM from a Hub id or a local directory."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    name_or_path = model_reference(name_or_path)  # what adapters record as their base (peft reads name_or_path)
    with hub_or_local(name_or_path):
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code)
    if device:
        model = model.to(device)
    return model.eval()


def load_tokenizer(name_or_path: str, chat_template: Optional[str] = None):
    """The tokenizer of ``name_or_path``; ``chat_template`` (a Jinja file) replaces its chat template."""
    from transformers import AutoTokenizer

    with hub_or_local(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if chat_template:
        tokenizer.chat_template = read_file(chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_reference(name_or_path: str) -> str:
    """What an adapter records as its base: the absolute path of a local directory (so that the adapter loads from
    any working directory), a Hub repo id as given."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


def check_model_source(name_or_path: str) -> None:
    """A local directory that exists, or something that can be a Hub repo id; else a one-line error."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name_or_path).expanduser()
    if path.exists():
        return
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        looks_local = True
    if looks_local:
        raise CLIError(f"model or adapter directory not found: {name_or_path} (no such local path, and not a Hub "
                       "repo id of the form 'org/name'); check the path")


@contextlib.contextmanager
def hub_or_local(name_or_path: str) -> Iterator[None]:
    """Checks ``name_or_path`` up front, and turns a failed Hub lookup of a name that is not a local directory into
    one line that says both: no local directory of that name, and the Hub could not serve it as a repo id."""
    check_model_source(name_or_path)
    try:
        yield
    except OSError as error:
        if Path(name_or_path).expanduser().exists():
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CLIError(
            f"{name_or_path}: there is no local directory of that name (from {Path.cwd()}), and the Hub could not "
            f"provide it as a repo id (unreachable, offline, or no such repo: {reason}). Check the path, or the repo "
            "id and your connection"
        ) from error


def read_file(path: str) -> str:
    if not Path(path).is_file():
        raise CLIError(f"file not found: {path}")
    return Path(path).read_text(encoding="utf-8")
