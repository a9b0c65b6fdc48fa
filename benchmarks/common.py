"""Shared timing and reporting for the benchmarks (not collected by pytest).

Every contender of a question runs in the same process, after warm-up, timed with
``block_until_ready`` (JAX) or with no grad where fitting (torch); the reported number is the
median of repeated runs, so ratios between contenders are meaningful.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

OUT = Path(__file__).resolve().parent / "results"
SETTLE_S = 0.03  # pause after each timed call: see interleaved_medians


def machine() -> str:
    device = jax.devices()[0]
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"JAX {jax.__version__} on {device.platform} ({device.device_kind})"
    )


def median_time(
    fn: Callable[[], Any],
    *,
    repeats: int = 15,
    warmup: int = 3,
    sync: Callable[[Any], Any] = jax.block_until_ready,
) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(
    fns: dict[str, Callable[[], Any]],
    *,
    repeats: int = 15,
    warmup: int = 3,
    syncs: dict[str, Callable] | None = None,
    settle: float = SETTLE_S,
) -> dict[str, float]:
    """Medians for several contenders timed round-robin, so drift hits all of them alike.

    Each timed call is steady-state: it follows ``settle`` seconds of sleep and one untimed
    call of the same contender, so one engine's idle threads do not take the cores from the
    next one and each engine's own threads are awake. Measured here for a (2048, 1024) @
    (1024, 1024) GEMM (alone: XLA 21.8 ms, torch 23.8 ms): back to back, XLA after torch took
    25.4 ms (torch's OpenMP workers spin-wait after each op); after a 30 ms sleep, torch took
    30.7 ms (its workers had gone to sleep); with the sleep and the untimed call, 21.4 and
    24.7 ms.
    """
    syncs = syncs or {}
    for name, fn in fns.items():
        for _ in range(warmup):
            syncs.get(name, jax.block_until_ready)(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync = syncs.get(name, jax.block_until_ready)
            time.sleep(settle)
            sync(fn())
            start = time.perf_counter()
            sync(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def torch_sync(value: Any) -> Any:
    return value  # torch CPU ops are synchronous


def compiled_cost(fn: Callable, *args) -> dict[str, float]:
    """Compiled FLOPs and XLA's memory for ``jax.jit(fn)(*args)``: arguments, temp, outputs
    and their total (a train step's new params and optimizer state are outputs, not temp, so
    temp alone undercounts a full fine-tune)."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    return {
        "flops": float(cost.get("flops", 0.0)),
        "temp_bytes": float(getattr(memory, "temp_size_in_bytes", 0) or 0),
        "argument_bytes": float(getattr(memory, "argument_size_in_bytes", 0) or 0),
        "output_bytes": float(getattr(memory, "output_size_in_bytes", 0) or 0),
        "total_bytes": sum(
            float(getattr(memory, f"{k}_size_in_bytes", 0) or 0)
            for k in ("argument", "temp", "output")
        ),
    }


def nbytes(tree) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def write(name: str, rows: list[dict], header: str, columns: list[tuple[str, str]]) -> str:
    """Writes ``results/<name>.json`` and returns (and prints) a markdown table."""
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.json").write_text(
        json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n"
    )
    lines = [
        f"### {header}",
        "",
        f"Machine: {machine()}",
        "",
        "| " + " | ".join(title for _, title in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(key)) for key, _ in columns) + " |")
    table = "\n".join(lines) + "\n"
    (OUT / f"{name}.md").write_text(table)
    print(table)
    return table


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)
