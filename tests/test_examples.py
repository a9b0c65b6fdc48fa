"""The examples run as a newcomer runs them, and print what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_reports_agreement():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    rows = re.findall(
        r"^(torch|flax linen|flax nnx)\s+\(4, 32, 1024\)\s+1,065,984\s+16,384",
        out.stdout,
        flags=re.M,
    )
    assert rows == ["torch", "flax linen", "flax nnx"], out.stdout
    diffs = [float(d) for d in re.findall(r"/ max\|torch\| = (\S+)", out.stdout)]
    assert len(diffs) == 2 and max(diffs) < 1e-5
    assert "base unchanged = True" in out.stdout


def test_readme_code_blocks_run():
    """Every ```python block in the README runs as written."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
