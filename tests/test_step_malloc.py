"""jaxlora.host.keep_freed_memory: XLA:CPU's per-call temp buffer is reused, not
faulted in afresh on every call (issue #18, benchmarks/README.md "Fourth attempt").

Each case runs in a subprocess: the setting is process-wide and must not leak into the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlora.host import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]

# A jitted function whose temp buffer (two 20.25 MiB arrays) is above glibc's largest default
# mmap threshold (32 MiB); prints whether the setting applied (before XLA starts its threads,
# as the benchmarks call it), the temp size, and the fewest minor page faults of twelve calls
# after five warm-up calls (a call may still find its buffer in use by the last one's cleanup,
# more often on a loaded machine).
SCRIPT = """
import json, resource, sys
from jaxlora.host import keep_freed_memory

applied = keep_freed_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp

x = jnp.ones((2304, 2304))
step = jax.jit(lambda x: (jnp.exp(x)[::-1] * x.T).sum()).lower(x).compile()
for _ in range(5):
    step(x).block_until_ready()
counts = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
temp = step.memory_analysis().temp_size_in_bytes
print(json.dumps(dict(applied=applied, temp=temp, faults=min(counts))))
"""


def run(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,  # this checkout's jaxlora
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_temp_buffer_over_32_mib_is_faulted_in_on_every_call_by_default():
    res = run("default")
    assert res["temp"] > 32 * 2**20, res
    assert not res["applied"], res
    # every page of the temp buffer is new on every call: glibc maps it afresh
    assert res["faults"] >= 0.9 * res["temp"] // 4096, res


def test_keep_freed_memory_reuses_the_temp_buffer():
    res = run("keep")
    assert res["temp"] > 32 * 2**20, res
    assert res["applied"], res
    # the buffer comes back from the heap: at most a few dozen pages are new
    assert res["faults"] < 0.01 * res["temp"] // 4096, res


@pytest.mark.parametrize("limit", [0, -1, 2.5, True, "1g"])
def test_keep_freed_memory_refuses_a_bad_limit_before_touching_malloc(limit):
    with pytest.raises(ValueError, match=f"limit must be a positive int, got {limit!r}"):
        keep_freed_memory(limit)
