"""The repository's docs stand on their own and say what the code does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from router.cli import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]
STELLWERK = str(Path(sys.executable).parent / "stellwerk")
TEXT_FILES = sorted(
    p
    for pattern in ("*.md", "docs/*.md", "config/*", "scripts/**/*.sh", "Makefile", "**/*.py")
    for p in ROOT.glob(pattern)
    if p.is_file() and ".venv" not in p.parts and "fixtures" not in p.parts
)
OUTSIDE = re.compile(r"DESIGN(\.md)?\b|ANCHORS|\bissues? \d+|\.\./shared|/work/|\bthe brief\b")


def _reads_the_reference(path: Path, line: str) -> bool:
    """Tests may compare their protocol peers with the vendors' reference beside the checkout
    (skipping when it is absent); that is the one outside path they may name."""
    rel = path.relative_to(ROOT)
    return rel.parts[0] == "tests" and "../shared/reference" in line and "/work/" not in line


def test_nothing_refers_to_files_outside_the_repository() -> None:
    this = Path(__file__).resolve()
    found = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in TEXT_FILES
        if p.resolve() != this
        for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if OUTSIDE.search(line) and not _reads_the_reference(p, line)
    ]
    assert found == []


def test_every_doc_the_docs_name_exists_and_the_readme_points_at_the_architecture() -> None:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {m for p in docs for m in re.findall(r"\bdocs/[\w-]+\.md\b", p.read_text())}
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()
    assert {n for n in named if not (ROOT / n).is_file()} == set()


@pytest.mark.parametrize("args", [[], *([name] for name in SUBCOMMANDS)], ids=str)
def test_help_texts_have_no_docstring_markup(args: list[str]) -> None:
    result = subprocess.run(
        [STELLWERK, *args, "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "``" not in result.stdout


def test_the_docs_count_the_example_agents_right() -> None:
    routing = yaml.safe_load((ROOT / "config" / "routing.yaml").read_text())
    agents = len(routing["agents"])
    check = subprocess.run(
        [STELLWERK, "check", "config/routing.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    assert check in (ROOT / "docs" / "rules.md").read_text()
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    assert re.findall(r"(\d+) simulated agents", demo) == [str(agents)]
    readme = (ROOT / "README.md").read_text()
    assert set(re.findall(r"(\d+) simulated agents", readme)) == {str(agents)}
