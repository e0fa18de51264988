"""The documentation cannot drift from the code.

- The configuration reference (docs/configuration.md) lists exactly the
  settings of :data:`otelkit.settings.SETTINGS`, in order, with their
  environment variables, defaults and descriptions.
- Every ```python block of README.md and docs/*.md runs, as a program of its
  own, in a fresh interpreter (```python no-run marks the few that cannot).
- Relative links between the docs, and to files of the repository, resolve,
  anchors included.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from otelkit.settings import SETTINGS, Setting

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC_FILES = sorted(DOCS.glob("*.md"))
CONFIGURATION = DOCS / "configuration.md"
TABLE_HEADER = "| Setting | Environment variable | Default | Meaning |"
NO_ENV = "—"

_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([^`]*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int  # of the opening fence, 1-based
    info: str  # what follows the opening fence: "python", "python no-run", "sh"...
    code: str

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _split(path: Path) -> tuple[list[Block], list[tuple[int, str]]]:
    """The fenced blocks of a Markdown file, and its other lines (numbered)."""
    blocks: list[Block] = []
    prose: list[tuple[int, str]] = []
    fence: str | None = None
    info = ""
    start = 0
    body: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if fence is None:
            match = _FENCE.match(line)
            if match:
                fence, info, start, body = match.group(1), match.group(2).strip(), number, []
            else:
                prose.append((number, line))
        elif line.strip() == fence:
            blocks.append(Block(path, start, info, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"{path.relative_to(ROOT)}:{start}: unclosed code block"
    return blocks, prose


# --- 1. the configuration reference ----------------------------------------


_RENDERERS: tuple[tuple[type, Callable[[Any], str]], ...] = (
    (type(None), lambda _: "unset"),
    (bool, lambda value: "true" if value else "false"),
    (float, lambda value: f"{value:g}"),
    (str, str),
    (frozenset, lambda value: ", ".join(sorted(value))),
    (tuple, lambda value: ", ".join(value) or "none"),
    (dict, lambda value: ", ".join(f"{k}={v}" for k, v in value.items()) or "empty"),
)


def render_default(setting: Setting) -> str:
    """A setting's default as the reference shows it (backticks aside)."""
    if setting.name == "log_level":
        return str(logging.getLevelName(setting.default))
    for kind, render in _RENDERERS:
        if isinstance(setting.default, kind):
            return render(setting.default)
    raise AssertionError(f"no rendering for the default of {setting.name}: {setting.default!r}")


def _settings_table() -> list[list[str]]:
    _, prose = _split(CONFIGURATION)
    lines = [line for _, line in prose]
    assert lines.count(TABLE_HEADER) == 1, f"one table headed {TABLE_HEADER!r} expected"
    index = lines.index(TABLE_HEADER)
    assert re.fullmatch(r"\|(\s*:?-+:?\s*\|){4}", lines[index + 1]), "separator row expected"
    rows = []
    for line in lines[index + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) >= 4, f"a row with fewer than four cells: {line}"
        rows.append([*cells[:3], "|".join(cells[3:])])
    return rows


def _code(cell: str) -> str:
    return cell.replace("`", "").strip()


def test_configuration_reference_lists_exactly_the_settings_in_order() -> None:
    documented = [(_code(row[0]), _code(row[1])) for row in _settings_table()]
    expected = [(s.name, s.env or NO_ENV) for s in SETTINGS]
    missing = [row for row in expected if row not in documented]
    unknown = [row for row in documented if row not in expected]
    assert not missing, f"settings missing from docs/configuration.md: {missing}"
    assert not unknown, f"documented settings that do not exist: {unknown}"
    assert documented == expected, "docs/configuration.md lists the settings out of order"


def test_configuration_reference_shows_each_default_and_description() -> None:
    rows = {_code(row[0]): row for row in _settings_table()}
    for setting in SETTINGS:
        _, _, default, meaning = rows[setting.name]
        assert _code(default) == render_default(setting), (
            f"{setting.name}: the docs say the default is {default!r}, "
            f"the code's is {render_default(setting)!r}"
        )
        assert setting.doc in meaning, (
            f"{setting.name}: the meaning must contain the setting's doc: {setting.doc!r}"
        )


def test_every_setting_default_can_be_rendered() -> None:
    for setting in SETTINGS:
        assert render_default(setting)


# --- 2. every python block runs ---------------------------------------------


def _python_blocks() -> list[Block]:
    blocks = []
    for path in [ROOT / "README.md", *DOC_FILES]:
        found, _ = _split(path)
        blocks.extend(block for block in found if block.language == "python")
    return blocks


PYTHON_BLOCKS = _python_blocks()


def _clean_env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OTEL_", "LOG_", "OTELKIT_")) and key != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(ROOT), os.environ.get("PYTHONPATH", "")) if part
    )
    return env


def test_the_docs_have_python_examples_and_few_that_cannot_run() -> None:
    assert len(PYTHON_BLOCKS) >= 10
    no_run = [block.name for block in PYTHON_BLOCKS if "no-run" in block.info.split()]
    assert len(no_run) <= 3, f"keep ```python no-run blocks few: {no_run}"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda block: block.name)
def test_python_block_runs(block: Block) -> None:
    if "no-run" in block.info.split():
        pytest.skip("marked ```python no-run")
    result = subprocess.run(
        [sys.executable, "-c", block.code],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, (
        f"{block.name} exited with {result.returncode}\n"
        f"--- stdout (end)\n{result.stdout[-3000:]}\n--- stderr (end)\n{result.stderr[-3000:]}"
    )


# --- 3. links resolve -------------------------------------------------------

_LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_INLINE_CODE = re.compile(r"`[^`]*`")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    _, prose = _split(path)
    anchors: set[str] = set()
    for _, line in prose:
        match = _HEADING.match(line)
        if match:
            slug = _slug(match.group(2))
            candidate, n = slug, 0
            while candidate in anchors:
                n += 1
                candidate = f"{slug}-{n}"
            anchors.add(candidate)
    return anchors


def _links(path: Path) -> list[tuple[int, str]]:
    _, prose = _split(path)
    return [
        (number, target)
        for number, line in prose
        for target in _LINK.findall(_INLINE_CODE.sub("", line))
    ]


def test_the_docs_exist() -> None:
    names = {path.name for path in DOC_FILES}
    assert {
        "index.md",
        "getting-started.md",
        "configuration.md",
        "logging.md",
        "metrics.md",
        "tracing.md",
        "deployment.md",
        "security.md",
        "migrating.md",
    } <= names


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda path: path.name)
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for number, target in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            broken.append(f"{path.name}:{number}: {target} (no such file)")
            continue
        if ROOT not in destination.parents and destination != ROOT:
            broken.append(f"{path.name}:{number}: {target} (outside the repository)")
            continue
        if anchor and destination.suffix == ".md" and anchor not in _anchors(destination):
            broken.append(f"{path.name}:{number}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
