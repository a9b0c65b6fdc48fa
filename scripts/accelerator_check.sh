#!/usr/bin/env bash
# One command for a machine with a GPU or TPU: what JAX sees, the parity and sharding tests,
# and the benchmark suite. Parity tests pin jax_default_matmul_precision="highest" (see
# parity_tests/conftest.py), so TF32/bf16 default matmuls do not loosen the fp32 comparisons.
#   bash scripts/accelerator_check.sh        (after the README's test set-up command)
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import jax; print('JAX', jax.__version__, 'devices:', jax.devices())"
python -m pytest -q parity_tests tests/test_sharding.py tests/test_inject_linen.py
python benchmarks/run_all.py --quick
