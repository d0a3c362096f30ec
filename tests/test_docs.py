"""The README and docs/ point only at files the repository has (images and relative links)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def local_targets(page: Path) -> list[tuple[int, str]]:
    """``(line, target)`` of every link or image of ``page`` that is not a URL or an anchor."""
    found, fenced = [], False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        for target in LINK.findall(line):
            if not re.match(r"[a-z]+:|#", target):
                found.append((number, target.split("#")[0]))
    return found


def test_local_targets_finds_images_and_links_outside_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("![a](x.png) [b](docs/y.md#part) [c](https://e.org) [d](#top)\n```\n![e](z.png)\n```\n")
    assert local_targets(page) == [(1, "x.png"), (1, "docs/y.md")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_local_link_and_image_exists(page):
    missing = [f"{page.relative_to(ROOT)}:{line}: {target}" for line, target in local_targets(page) if not (page.parent / target).exists()]
    assert not missing, "links to files that do not exist:\n" + "\n".join(missing)
