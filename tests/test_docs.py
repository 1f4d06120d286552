"""Texts in src/ cite only documents in the repository, and the sections they cite exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "src").rglob("*.py"))
CITATION = re.compile(r"docs/design\.md (§\d+(?:\.\d+)?(?:\s*(?:,|-|and)\s*§\d+(?:\.\d+)?)*)")


def _design_sections() -> set[str]:
    headings = re.findall(
        r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (ROOT / "docs/design.md").read_text(), re.M
    )
    return set(headings)


def test_no_source_text_cites_the_spec():
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in SOURCES
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if re.search(r"\bSPEC\b|SPEC\.md", line)
    ]
    assert not offenders, "cite docs/design.md instead:\n" + "\n".join(offenders)


def test_cited_design_sections_exist():
    sections = _design_sections()
    assert {"1", "3", "4.2", "15", "17"} <= sections
    cited = 0
    for path in SOURCES:
        for match in CITATION.finditer(path.read_text()):
            for number in re.findall(r"§(\d+(?:\.\d+)?)", match.group(1)):
                cited += 1
                assert number in sections, f"{path.relative_to(ROOT)} cites missing §{number}"
    assert cited > 20
