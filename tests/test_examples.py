"""The examples run as a newcomer runs them, and print what they promise."""

from __future__ import annotations

import re

from tests.example_runner import ROOT, run_example


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


def test_readme_code_blocks_run():
    """Every ```python block in the README runs as written."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


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
