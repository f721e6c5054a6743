"""Every line of "What fleece guarantees" names tests, and every test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
REFERENCE = re.compile(r"`(tests/test_\w+\.py)::(test_\w+)`")


def guarantee_sections() -> list[tuple[Path, str]]:
    """The section in docs/guarantees.md, and in README.md once it is merged there."""
    found = []
    for doc in (ROOT / "docs" / "guarantees.md", ROOT / "README.md"):
        text = doc.read_text() if doc.exists() else ""
        start = text.find("## What fleece guarantees")
        if start >= 0:
            end = text.find("\n## ", start + 1)
            found.append((doc, text[start : end if end >= 0 else None]))
    return found


def test_each_guarantee_names_a_test_that_exists() -> None:
    sections = guarantee_sections()
    assert sections, "no 'What fleece guarantees' section"
    for doc, section in sections:
        bullets = re.split(r"\n- ", section)[1:]
        assert len(bullets) >= 10, doc
        for bullet in bullets:
            refs = REFERENCE.findall(bullet)
            assert refs, f"{doc}: a guarantee without a test: {bullet[:80]!r}"
            for path, name in refs:
                source = ROOT / path
                assert source.exists(), f"{doc} names {path}, which does not exist"
                assert re.search(rf"^def {name}\(", source.read_text(), re.M), (
                    f"{doc} names {path}::{name}, which does not exist")
