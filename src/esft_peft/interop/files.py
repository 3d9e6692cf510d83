"""Safe file handling: atomic writes and up-front checks of adapter weight files (safetensors only)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

PathLike = Union[str, os.PathLike]


class CorruptAdapterError(ValueError):
    """An adapter weights file is unreadable, truncated or not safetensors."""


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _temporary_directory_next_to(out_dir: PathLike) -> Path:
    """A new temporary directory in the parent of ``out_dir`` (same filesystem, so renames are atomic)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))


def publish_directory(tmp: Path, out_dir: PathLike) -> None:
    """Replace ``out_dir`` by the finished temporary directory ``tmp`` (atomic rename; an old ``out_dir`` is removed)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a directory.")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def atomic_directory_write(out_dir: PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` and move the result to ``out_dir`` atomically; nothing is left behind on failure."""
    tmp = _temporary_directory_next_to(out_dir)
    try:
        write(tmp)
        publish_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(out_dir)


def verify_safetensors(path: PathLike) -> dict[str, Any]:
    """Check a safetensors file's header and size without loading tensors; return its header.

    Raises:
        CorruptAdapterError: when the header is unreadable or the file is shorter/longer than its header says.
    """
    path = Path(path)
    size = path.stat().st_size
    advice = "Re-save the adapter or download it again."
    with open(path, "rb") as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            raise CorruptAdapterError(f"{path} is not a safetensors file (only {size} bytes). {advice}")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise CorruptAdapterError(f"{path} is truncated: its header claims {header_len} bytes. {advice}")
        try:
            header = json.loads(stream.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CorruptAdapterError(f"{path} has an unreadable safetensors header ({error}). {advice}") from None
    tensors = {key: value for key, value in header.items() if key != "__metadata__"}
    try:
        data_end = max((int(value["data_offsets"][1]) for value in tensors.values()), default=0)
    except (TypeError, KeyError, ValueError, IndexError):
        raise CorruptAdapterError(f"{path} has a malformed safetensors header. {advice}") from None
    expected = 8 + header_len + data_end
    if size != expected:
        raise CorruptAdapterError(
            f"{path} is corrupt or truncated: the header describes {expected} bytes but the file has {size}. {advice}"
        )
    return header


def check_adapter_weights(
    model_id: PathLike, subfolder: Optional[str] = None, method: str = "ESFT", **hub_kwargs: Any
) -> Optional[dict[str, Any]]:
    """Refuse pickle-only adapters and check the safetensors weights of a local or Hub adapter before loading.

    Returns the safetensors header, or None when there is no weights file (peft reports that itself).
    """
    local = Path(model_id, subfolder) if subfolder else Path(model_id)
    if local.is_dir():
        weights = local / SAFETENSORS_WEIGHTS_NAME
        if not weights.is_file():
            if (local / WEIGHTS_NAME).is_file():
                raise CorruptAdapterError(
                    f"{local} holds only {WEIGHTS_NAME} (a pickle). {method} adapters are loaded from safetensors "
                    f"only; convert it with a trusted tool to {SAFETENSORS_WEIGHTS_NAME}."
                )
            return None  # peft reports the missing file itself
        return verify_safetensors(weights)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        weights = hf_hub_download(str(model_id), SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs)
    except EntryNotFoundError:
        raise CorruptAdapterError(
            f"The Hub repo {model_id} has no {SAFETENSORS_WEIGHTS_NAME}; {method} adapters are loaded from safetensors "
            "only."
        ) from None
    return verify_safetensors(weights)
