"""Every citation of the algorithms points at a section of docs/algorithms.md that exists (issue 27): docstrings, help
texts and docs cite "algorithms.md §x.y" (ranges "§a-b" and lists "§a, §b" included), never a file outside the
repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALGORITHMS = REPO / "docs" / "algorithms.md"
CITATION = re.compile(r"algorithms\.md §(\d+(?:\.\d+)*)((?:(?:, ?| and )§\d+(?:\.\d+)*|-\d+(?:\.\d+)*)*)")
NUMBER = re.compile(r"\d+(?:\.\d+)*")


def sections() -> set[str]:
    """The section numbers of docs/algorithms.md: headings ``#... §<number> <title>``."""
    return set(re.findall(r"^#+ §(\d+(?:\.\d+)*) ", ALGORITHMS.read_text(encoding="utf-8"), flags=re.M))


def tracked_texts() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.sh", "*.json"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    return [REPO / f for f in out if f != "docs/algorithms.md"]


def cited(text: str) -> list[str]:
    """Every section number a text cites (each number of a list or range)."""
    return [n for m in CITATION.finditer(text) for n in NUMBER.findall(m.group(0).split("§", 1)[1])]


def test_the_citation_reader_finds_lists_and_ranges():
    assert cited("see algorithms.md §19.2, §19.5 and algorithms.md §4.4-4.7 (algorithms.md §9.4 fix)") == [
        "19.2", "19.5", "4.4", "4.7", "9.4"]


def test_every_cited_section_exists():
    known = sections()
    assert {"4.6", "9.4", "13.3", "17.11.1", "19.6"} <= known and len(known) > 100
    missing = {}
    count = 0
    for path in tracked_texts():
        for number in cited(path.read_text(encoding="utf-8", errors="replace")):
            count += 1
            if number not in known:
                missing.setdefault(number, []).append(str(path.relative_to(REPO)))
    assert count > 300 and not missing, missing


def test_nothing_cites_the_spec_outside_the_repository():
    stale = [str(p.relative_to(REPO)) for p in tracked_texts()
             if re.search(r"\bSPEC \d|SPEC\.md", p.read_text(encoding="utf-8", errors="replace"))]
    assert stale == []
