"""Safe file handling: atomic writes and up-front checks of adapter weight files (safetensors only, header)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union


PathLike = Union[str, os.PathLike]


class CorruptAdapterError(ValueError):
    """An adapter weights file is unreadable, truncated or not safetensors."""


class OutputPathError(ValueError):
    """An output path would replace user files or an input checkpoint."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_permissions(path: Path, directory: bool) -> None:
    """Give a temporary file/directory the permissions a plain ``open``/``mkdir`` would (0644/0755 by default)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _is_within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_output_path(
    out: PathLike, *, inputs: tuple[Optional[PathLike], ...] = (), overwrite: bool = False, directory: bool = True
) -> Path:
    """Refuse an output path that would lose data, before any work starts.

    ``out`` may not be, contain or lie inside a local input (a base checkpoint, an adapter, a data file). An
    existing non-empty directory (or, for a file output, an existing file) is only replaced with ``overwrite``.

    Raises:
        OutputPathError: naming the conflict and how to resolve it.
    """
    out = Path(out).expanduser()
    target = out.resolve()
    for source in inputs:
        if source is None or not Path(source).expanduser().exists():
            continue  # a Hub id, not a local path
        source_path = Path(source).expanduser().resolve()
        if _is_within(target, source_path) or _is_within(source_path, target):
            raise OutputPathError(
                f"the output {out} overlaps the input {source}: writing it would overwrite or delete the input. "
                "Choose an output path outside every input."
            )
    if directory:
        if out.exists() and not out.is_dir():
            raise OutputPathError(f"the output {out} is an existing file, not a directory. Choose a directory path.")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise OutputPathError(
                f"the output directory {out} already exists and is not empty. Choose a new directory, or pass "
                "--overwrite (overwrite=True) to replace it and everything in it."
            )
    else:
        if out.is_dir():
            raise OutputPathError(f"the output {out} is a directory; give a file path.")
        if out.exists() and not overwrite:
            raise OutputPathError(
                f"the output file {out} already exists. Choose a new path, or pass --overwrite (overwrite=True) to "
                "replace it."
            )
    return out


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        _normal_permissions(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _temporary_directory_next_to(out_dir: PathLike) -> Path:
    """A new temporary directory in the parent of ``out_dir`` (same filesystem, so renames are atomic)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    _normal_permissions(tmp, directory=True)
    return tmp


def publish_directory(tmp: Path, out_dir: PathLike) -> None:
    """Move the finished temporary directory ``tmp`` to ``out_dir`` (atomic rename; an old ``out_dir`` is removed).

    Callers check first (:func:`check_output_path`) that an existing ``out_dir`` may be replaced.
    """
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


def atomic_directory_write(out_dir: PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Run ``write(tmp_dir)`` and move the result to ``out_dir`` atomically; nothing is left behind on failure.

    An existing non-empty ``out_dir`` is refused (:class:`OutputPathError`) unless ``overwrite``, checked before
    ``write`` runs; with ``overwrite`` it is replaced as a whole once the new directory is complete.
    """
    check_output_path(out_dir, overwrite=overwrite)
    tmp = _temporary_directory_next_to(out_dir)
    try:
        write(tmp)
        for path in tmp.rglob("*"):  # some writers (safetensors) create 0600 files; a server must read them
            _normal_permissions(path, directory=path.is_dir())
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


def check_adapter_file(model_id: PathLike, subfolder: Optional[str] = None, method: str = "ESFT",
                       **hub_kwargs: Any) -> Optional[tuple[Path, dict[str, Any]]]:
    """Refuse what peft's loader cannot read safely: a pickle-only adapter, a truncated or unreadable safetensors file.

    Reads the safetensors header only (the tensors are checked where peft holds them, see
    ``esft_peft.tuners.saved_checks``). Returns ``(weights path, safetensors header)``, or None when the directory
    has no weights file (peft reports that itself).

    Raises:
        CorruptAdapterError: a pickle-only, truncated or unreadable file.
    """
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME  # here: this leaf module never imports peft itself

    local = Path(model_id, subfolder) if subfolder else Path(model_id)
    if local.is_dir():
        weights = local / SAFETENSORS_WEIGHTS_NAME
        if not weights.is_file():
            if (local / WEIGHTS_NAME).is_file():
                raise CorruptAdapterError(
                    f"{local} holds only {WEIGHTS_NAME} (a pickle). {method} adapters are loaded from safetensors "
                    f"only; convert it with a trusted tool to {SAFETENSORS_WEIGHTS_NAME}."
                )
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            weights = Path(hf_hub_download(str(model_id), SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs))
        except EntryNotFoundError:
            raise CorruptAdapterError(
                f"The Hub repo {model_id} has no {SAFETENSORS_WEIGHTS_NAME}; {method} adapters are loaded from safetensors "
                "only."
            ) from None
    return weights, verify_safetensors(weights)
