"""Every ```python block of README.md and docs/*.md runs (blocks of one file share a namespace, in order).

A block preceded by ``<!-- not-tested: reason -->`` is skipped; the reason is mandatory.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?P<marker><!--\s*not-tested:(?P<reason>[^>]*)-->\s*\n)?^```python[ \t]*\n(?P<code>.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, code, skip reason or None) of each python block."""
    text = path.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, match.start("code")) + 1, match.group("code"),
         match.group("reason").strip() if match.group("marker") is not None else None)
        for match in BLOCK.finditer(text)
    ]


DOCUMENTS_WITH_CODE = [path for path in DOCUMENTS if path.is_file() and python_blocks(path)]


def test_block_parser_finds_blocks_and_markers(tmp_path):
    sample = tmp_path / "sample.md"
    sample.write_text("x\n```python\na = 1\n```\n<!-- not-tested: needs a GPU -->\n```python\nb = 2\n```\n```bash\nls\n```\n")
    assert python_blocks(sample) == [(3, "a = 1\n", None), (7, "b = 2\n", "needs a GPU")]


@pytest.mark.parametrize("path", DOCUMENTS_WITH_CODE, ids=lambda path: path.name)
def test_python_snippets_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets may write files (adapters, plots)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__docs__"}
    for line, code, reason in python_blocks(path):
        if reason is not None:
            assert reason, f"{path.name}:{line}: a not-tested marker needs a reason"
            continue
        exec(compile(code, f"{path.name}:{line}", "exec"), namespace)  # noqa: S102
