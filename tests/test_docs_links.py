"""Every relative link of the README and the docs pages points to a file that exists, and
every #anchor to a heading of that page: moving or renaming a page or heading breaks a test,
not a reader's click. (The site's build, `mkdocs build --strict`, checks the docs pages'
links again as MkDocs resolves them; this test also covers the README, read on GitHub.)"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from tests.doc_pages import PAGES, fenced_blocks, page_id, without_code

# [text](target) and ![alt](target), with an optional "title" after the target.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(text: str) -> list[str]:
    """The link and image targets of a Markdown text's prose (code is not a link)."""
    return _LINK.findall(without_code(text))


def slug(heading: str) -> str:
    """A heading's anchor as Python-Markdown's toc extension (MkDocs) makes it; for the
    headings linked here GitHub makes the same one."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    """The anchors of a Markdown page's headings (outside code blocks)."""
    text = without_code(page.read_text(), spans=False)  # a heading's code is in its anchor
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M)}


def broken_links(page: Path) -> list[str]:
    """The page's relative links whose file or heading does not exist, with the reason."""
    broken = []
    for target in links(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not a local file
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_file():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_link_checker_finds_links_and_their_faults(tmp_path):
    """The checker reads prose links (not code), and reports a missing file and a missing
    heading: a check that found nothing would pass every page."""
    readme = next(page for page in PAGES if page_id(page) == "README.md")
    assert "docs/adapt.md" in links(readme.read_text())
    assert "docs/finetune_loss_curves.png" in links(readme.read_text())
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading, with: punctuation\n")
    page.write_text(
        "# Title\n\n[ok](other.md#a-code-heading-with-punctuation) [self](#title)\n"
        "[gone](missing.md) [bad anchor](other.md#nope) `[code](missing.md)`\n\n"
        "    [indented](missing.md)\n\n```text\n[fenced](missing.md)\n```\n"
    )
    assert fenced_blocks(page.read_text()) == [("text", "[fenced](missing.md)\n")]
    assert broken_links(page) == [
        f"missing.md: no file {tmp_path / 'missing.md'}",
        f"other.md#nope: no heading #nope in {tmp_path / 'other.md'}",
    ]
