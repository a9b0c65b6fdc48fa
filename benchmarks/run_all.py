"""Runs the whole benchmark suite on whatever JAX sees (CPU, GPU or TPU) in one command.

    python benchmarks/run_all.py            # full suite: ~4 minutes on a 2-core CPU
    python benchmarks/run_all.py --quick    # ~1.5 minutes

Each script writes ``benchmarks/results/<name>.{json,md}`` (and ``scaling.png``); this one also
collects the markdown tables into ``results/summary.md``, labelled with the machine. On a GPU,
fp32 matmuls may run in TF32 by default; the suite pins ``jax_default_matmul_precision`` to
"highest" so the numbers compare like with like across machines.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("forward", "train_step", "scaling", "scan", "qlora", "multi_adapter", "dora", "oplevel")
TABLES = (
    "forward",
    "train_step",
    "train_step_floor",
    "scaling",
    "scan",
    "qlora_bytes",
    "qlora_memory",
    "qlora_time",
    "multi_adapter",
    "dora",
    "oplevel_einsum",
)
# Written only where tunix and qwix are installed (oplevel.py's part 2).
OPTIONAL_TABLES = ("oplevel_tunix_qwix",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    start = time.time()
    env_flag = ["--quick"] if args.quick else []
    for name in SCRIPTS:
        print(f"== {name} ({time.time() - start:.0f}s)", flush=True)
        code = (
            "import jax; jax.config.update('jax_default_matmul_precision', 'highest'); "
            f"import runpy, sys; sys.argv = ['{name}.py', *{env_flag!r}]; "
            f"runpy.run_path('{HERE / (name + '.py')}', run_name='__main__')"
        )
        subprocess.run([sys.executable, "-c", code], cwd=HERE, check=True)
    tables = [(HERE / "results" / f"{name}.md").read_text() for name in TABLES]
    tables += [
        path.read_text()
        for path in (HERE / "results" / f"{name}.md" for name in OPTIONAL_TABLES)
        if path.exists() and path.stat().st_mtime >= start  # not a stale table
    ]
    (HERE / "results" / "summary.md").write_text("\n".join(tables))
    print(f"done in {time.time() - start:.0f}s; tables in {HERE / 'results' / 'summary.md'}")


if __name__ == "__main__":
    main()
