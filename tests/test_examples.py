"""The examples run as a newcomer runs them, and print what they promise."""

from __future__ import annotations

import re

import pytest

from tests.doc_pages import PAGES, code_blocks, fenced_blocks, page_id
from tests.example_runner import run_example


def test_quickstart_runs_and_reports_agreement():
    out = run_example("quickstart.py")
    rows = re.findall(
        r"^(torch|flax linen|flax nnx)\s+\(4, 32, 1024\)\s+1,065,984\s+16,384",
        out.stdout,
        flags=re.M,
    )
    assert rows == ["torch", "flax linen", "flax nnx"], out.stdout
    diffs = [float(d) for d in re.findall(r"/ max\|torch\| = (\S+)", out.stdout)]
    assert len(diffs) == 2 and max(diffs) < 1e-5
    assert "base unchanged = True" in out.stdout


PAGES_WITH_CODE = [page for page in PAGES if code_blocks(page.read_text())]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=page_id)
def test_docs_python_blocks_run(page):
    """Every ```python block of the README and of the docs pages runs as written, each block
    on its own in a fresh namespace (every block imports what it uses)."""
    for number, block in enumerate(code_blocks(page.read_text()), 1):
        exec(compile(block, f"{page_id(page)}, python block {number}", "exec"), {})


def test_docs_python_blocks_are_found():
    """The blocks above are found: the README's quickstart and the guides' examples, and no
    Python block is fenced in a way that would be neither run nor refused (```py, ```pycon)."""
    pages = {page_id(page): len(code_blocks(page.read_text())) for page in PAGES_WITH_CODE}
    assert {"README.md", "docs/adapt.md", "docs/one-layer.md"} <= set(pages)
    assert sum(pages.values()) >= 12, pages
    for page in PAGES:
        infos = {info for info, _ in fenced_blocks(page.read_text())}
        python_like = {info for info in infos if info.split(" ")[0] in ("py", "python", "pycon")}
        assert python_like <= {"python", "python thirdparty"}, (page_id(page), python_like)


def test_task_switch_example(tmp_path):
    out = run_example("task_switch.py", "--steps", "150", "--out", str(tmp_path))
    rows = re.findall(
        r"^(task_[ab])\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", out.stdout, flags=re.M
    )
    assert [r[0] for r in rows] == ["task_a", "task_b"], out.stdout
    for _, base, own, switched, merged, torch_acc in rows:
        base, own, switched, merged, torch_acc = map(
            float, (base, own, switched, merged, torch_acc)
        )
        assert switched == own  # switching per batch gives each task its own adapter's result
        assert abs(merged - own) <= 0.005 and abs(torch_acc - own) <= 0.005
        assert own > base + 0.3  # the adapter really learned its task
    assert "switches in the batch stream: 0 recompilation(s)" in out.stdout
    assert re.search(r"one mixed batch of 96 rows .* each row matches: True$", out.stdout, re.M)
    for task in ("task_a", "task_b"):
        assert (tmp_path / task / "adapter_model.safetensors").exists()
