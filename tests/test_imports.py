"""``import esft_peft`` is cheap and quiet, and registers the methods with peft whatever the import order."""

import logging
import os
import subprocess
import sys
import time
import warnings

import pytest

from esft_peft.imports import quiet_optional_imports

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)


@pytest.mark.parametrize("order", ["import esft_peft, peft", "import peft, esft_peft"])
def test_importing_prints_nothing_and_registers_both_methods(order):
    done = _python(f"{order}\nfrom peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as M\n"
                   "print(sorted(k.value for k in M if k.value in ('ESFT', 'PESC')))")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "['ESFT', 'PESC']\n"
    if order.startswith("import esft_peft"):  # peft's own import, before esft_peft, is peft's business
        assert done.stderr == "", done.stderr


def test_import_esft_peft_loads_neither_torch_nor_peft_until_used():
    done = _python("import sys, esft_peft\nprint('torch' in sys.modules, 'peft' in sys.modules)\n"
                   "esft_peft.ESFTConfig\nprint('peft' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "True"]


def test_peft_loaded_by_transformers_load_adapter_path_registers_too():
    """Serving code: ``import esft_peft``, then whatever imports peft later (here transformers' helper)."""
    done = _python("import esft_peft\nfrom transformers.utils import is_peft_available\nimport importlib\n"
                   "importlib.import_module('peft.utils')\nfrom peft.utils import PeftType\nprint(PeftType('ESFT'))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "PeftType.ESFT"


class _Records(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_optional_packages_records_become_debug_records(monkeypatch):
    """With logging not configured, whatever an optional back-end logs or warns while peft imports it goes to
    ``esft_peft.imports`` at DEBUG; the libraries esft-peft is built on still reach the last-resort handler."""
    monkeypatch.setattr(logging.root, "handlers", [])  # an application that did not configure logging
    last_resort, debug = _Records(logging.WARNING), _Records(logging.DEBUG)
    monkeypatch.setattr(logging, "lastResort", last_resort)
    imports_logger = logging.getLogger("esft_peft.imports")
    monkeypatch.setattr(imports_logger, "level", logging.DEBUG)
    monkeypatch.setattr(imports_logger, "propagate", False)
    monkeypatch.setattr(imports_logger, "handlers", [debug])
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with quiet_optional_imports():
            logging.getLogger("some_optional_backend.ops").warning("could not fetch kernel %s", "x")
            logging.getLogger("peft.tuners").warning("a peft warning")
            warnings.warn("an import-time warning", UserWarning)
    assert logging.lastResort is last_resort
    assert [r.getMessage() for r in last_resort.records] == ["a peft warning"]
    messages = [r.getMessage() for r in debug.records]
    assert any("could not fetch kernel x" in m and "some_optional_backend.ops" in m for m in messages), messages
    assert any("an import-time warning" in m for m in messages), messages


def test_cli_version_and_help_are_fast():
    """No torch, transformers or peft for ``--version``/``--help``: well under a second on a quiet machine. Timed
    against the bare interpreter's start-up, so that a loaded machine does not make the test flaky."""
    def seconds(*args: str) -> float:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return time.perf_counter() - start

    bare = min(seconds("-c", "pass") for _ in range(3))
    for args in (["--version"], ["--help"], ["train", "--help"]):
        code = f"import sys; from esft_peft.cli import main; sys.argv[0] = 'esft-peft'; sys.exit(main({args!r}))"
        took = min(seconds("-c", code) for _ in range(2))
        assert took < bare + 0.8, (args, took, bare)
    done = subprocess.run([sys.executable, "-c", "import sys\nfrom esft_peft.cli import main\n"
                           "try: main(['--help'])\nexcept SystemExit: pass\n"
                           "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().endswith("[]"), done.stdout


@pytest.mark.parametrize("module", [
    "esft_peft.files", "esft_peft.moe.discovery", "esft_peft.tuners.esft.config", "esft_peft.tuners.pesc",
    "esft_peft.scoring", "esft_peft.interop.hub", "esft_peft.training", "esft_peft.cli.main",
])
def test_any_module_imported_first_leaves_both_methods_registered_once_peft_is_imported(module):
    """Registration runs inside peft's import when esft_peft imported first; whichever esft_peft module starts
    the chain, no module is caught half-initialised and both methods end up registered."""
    done = _python(f"import {module}\nimport peft\nfrom peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as M\n"
                   "print(sorted(k.value for k in M if k.value in ('ESFT', 'PESC')))")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "['ESFT', 'PESC']\n"
    assert done.stderr == "", done.stderr
