"""How ``import esft_peft`` stays fast and quiet while still registering the methods with peft.

- ``import esft_peft`` imports neither torch nor peft: public names load on first use (PEP 562), so the command line
  starts in well under a second.
- The methods are registered with peft as soon as peft is imported: at once if it already is, otherwise right after
  its import finishes (a one-shot import hook), so ``import esft_peft`` followed by ``PeftModel.from_pretrained``,
  ``AutoPeftModelForCausalLM`` or transformers' ``load_adapter`` finds ``"ESFT"`` and ``"PESC"`` whatever the order.
- peft (and accelerate) import optional back-ends (bitsandbytes, which may ask the Hub package ``kernels`` for a
  kernel) when they are imported. What is logged while peft or bitsandbytes is imported, with logging not configured
  by the application, goes to the ``esft_peft.imports`` logger at DEBUG level instead of logging's last-resort
  handler, and so do the Python warnings shown meanwhile. Applications that configure logging still receive every
  record as usual.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
import warnings
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Callable, Iterator, Optional, Sequence

logger = logging.getLogger(__name__)

# Loggers whose records always pass unchanged: the libraries esft-peft is built on, and esft-peft itself.
CORE_LOGGERS = ("peft", "transformers", "torch", "esft_peft")


class _RouteToDebug(logging.Handler):
    """Stands in for ``logging.lastResort``: optional packages' records go to :data:`logger` at DEBUG."""

    def __init__(self, last_resort: Optional[logging.Handler]) -> None:
        super().__init__(level=last_resort.level if last_resort is not None else logging.WARNING)
        self.last_resort = last_resort

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in CORE_LOGGERS:
            if self.last_resort is not None:
                self.last_resort.handle(record)
            return
        logger.debug("%s (%s, while importing peft's optional back-ends)", record.getMessage(), record.name)


def _warning_to_debug(message: Any, category: type, filename: str, lineno: int, *args: Any, **kwargs: Any) -> None:
    logger.debug("%s: %s (%s:%s, while importing peft's optional back-ends)", category.__name__, message, filename,
                 lineno)


@contextmanager
def quiet_optional_imports() -> Iterator[None]:
    """Inside the block, records of packages other than :data:`CORE_LOGGERS` that would be printed only because
    logging is not configured, and Python warnings, are logged at DEBUG on ``esft_peft.imports`` instead."""
    saved_last_resort, saved_showwarning = logging.lastResort, warnings.showwarning
    logging.lastResort = _RouteToDebug(saved_last_resort)
    warnings.showwarning = _warning_to_debug
    try:
        yield
    finally:
        logging.lastResort, warnings.showwarning = saved_last_resort, saved_showwarning


class _Loader(importlib.abc.Loader):
    """Runs the real loader of the module quietly, then the finder's ``after`` (once)."""

    def __init__(self, loader: importlib.abc.Loader, finder: "_AfterImport") -> None:
        self.loader = loader
        self.finder = finder

    def __getattr__(self, name: str) -> Any:  # is_package, get_code, resource readers, ...
        return getattr(self.loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with quiet_optional_imports():
            self.loader.exec_module(module)
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
            self.finder.after()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``name`` so that ``after`` runs once the module is imported. It stays in place until the
    import really happens: availability checks (``importlib.util.find_spec``) only look."""

    def __init__(self, name: str, after: Callable[[], Any]) -> None:
        self.name = name
        self.after = after

    def find_spec(
        self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader, self)
        return spec


def register_methods() -> None:
    """Register ``"ESFT"`` and ``"PESC"`` with peft: importing a tuner package registers its method (a package that
    is being imported right now, peft's import having been triggered from inside it, registers itself when it
    finishes); and let peft's ``save_pretrained``/``push_to_hub`` write the methods' model card."""
    for method in ("esft", "pesc"):
        name = f"{__package__}.tuners.{method}"
        if name not in sys.modules:
            with quiet_optional_imports():
                importlib.import_module(name)
    from .interop.model_card import extend_peft_model_card

    extend_peft_model_card()


# Optional back-ends whose import may log what a user cannot act on, whoever imports them (peft, accelerate, ...).
QUIET_IMPORTS = ("bitsandbytes",)


def register_with_peft() -> None:
    """Register now if peft is imported, else as soon as it is; and quiet the import of :data:`QUIET_IMPORTS` (called
    once, by ``import esft_peft``)."""
    installed = {finder.name for finder in sys.meta_path if isinstance(finder, _AfterImport)}
    for name in QUIET_IMPORTS:
        if name not in sys.modules and name not in installed:
            sys.meta_path.insert(0, _AfterImport(name, lambda: None))
    if "peft" in sys.modules:
        register_methods()
    elif "peft" not in installed:
        sys.meta_path.insert(0, _AfterImport("peft", register_methods))
