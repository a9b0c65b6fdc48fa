"""jaxlora imports without torch; torchlora imports without jax; nothing heavy at import."""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {blocked!r} or name.startswith({blocked!r} + "."):
            raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, Block())
import {package}
{extra}
assert {blocked!r} not in sys.modules
print("ok")
"""


@pytest.mark.parametrize(
    "package,blocked,extra",
    [
        ("jaxlora", "torch", "import jaxlora.nnx"),
        ("torchlora", "jax", "import torchlora.layer"),
        ("torchlora", "flax", ""),
    ],
)
def test_imports_without_the_other_framework(package, blocked, extra):
    code = BLOCK.format(package=package, blocked=blocked, extra=extra)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
