"""The documentation's Markdown pages and the code blocks in them.

The pages are README.md, every page under docs/, and benchmarks/README.md (which the site's
Benchmarks page includes). A block fenced ```python runs in the main test suite
(tests/test_examples.py); one fenced ```python thirdparty runs in thirdparty_tests/ (it needs
tunix and transformers); any other fence, and an indented block, is not code to run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "benchmarks/README.md"]

# A fenced block: an opening fence at the start of a line with its info string, the body,
# and a closing fence of the same characters.
_FENCED = re.compile(r"^(`{3,}|~{3,})([^\n`]*)\n(.*?)^\1[ \t]*$", flags=re.S | re.M)


def page_id(page: Path) -> str:
    """The page's path from the repository root, as a readable test id."""
    return page.relative_to(ROOT).as_posix()


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """Each fenced block of a Markdown text as (info string, body), in order."""
    return [(m.group(2).strip(), m.group(3)) for m in _FENCED.finditer(text)]


def code_blocks(text: str, info: str = "python") -> list[str]:
    """The bodies of the blocks whose info string is exactly ``info``."""
    return [body for fence_info, body in fenced_blocks(text) if fence_info == info]


def without_code(text: str, *, spans: bool = True) -> str:
    """The text with fenced blocks, indented blocks and (with ``spans``) inline code spans
    blanked out, so that what is left is what Markdown renders as prose (links included)."""
    text = _FENCED.sub("", text)
    kept, previous_blank, in_indented = [], True, False
    for line in text.splitlines():
        in_indented = (previous_blank or in_indented) and line.startswith(("    ", "\t"))
        kept.append("" if in_indented else line)
        previous_blank = not line.strip()
    text = "\n".join(kept)
    return re.sub(r"(`+).+?\1", "", text) if spans else text
