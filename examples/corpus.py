"""Text that ships with Python itself, as byte-level token streams (vocab 256).

The base domain is CPython's own documentation (``pydoc_data.topics``, the text behind
``help()``); the new domain is the standard library's source code. Nothing is downloaded.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

# Fine-tuning and held-out stdlib modules: disjoint, and present in every CPython 3.10+.
TRAIN_MODULES = (
    "textwrap",
    "string",
    "fnmatch",
    "shlex",
    "glob",
    "heapq",
    "bisect",
    "colorsys",
    "calendar",
    "difflib",
    "base64",
    "csv",
    "functools",
    "enum",
)
HELDOUT_MODULES = ("statistics", "fractions", "dataclasses")


def docs_text() -> str:
    """CPython's documentation topics (what ``help('for')`` shows), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def stdlib_text(modules: tuple[str, ...]) -> str:
    """The source of the given standard-library modules, concatenated."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((root / f"{name}.py").read_text(encoding="utf-8") for name in modules)


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(tokens) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def sample_batches(data: np.ndarray, steps: int, batch: int, seq: int, seed: int) -> np.ndarray:
    """(steps, batch, seq + 1) random windows of ``data``: the same batches for every framework."""
    starts = np.random.default_rng(seed).integers(0, len(data) - seq - 1, (steps, batch))
    return data[starts[..., None] + np.arange(seq + 1)]


def eval_windows(data: np.ndarray, seq: int, count: int) -> np.ndarray:
    """``count`` evenly spaced, non-overlapping windows: a fixed held-out set."""
    starts = np.linspace(0, len(data) - seq - 1, count).astype(int)
    return data[starts[:, None] + np.arange(seq + 1)]
