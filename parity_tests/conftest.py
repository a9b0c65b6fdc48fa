"""Parity tests compare against torch at full fp32 matmul precision.

On GPU/TPU JAX may use reduced-precision (TF32/bf16) matmuls for fp32 by default; the
tolerances below are for true fp32, so the precision is pinned here for every parity test.
``torch`` is imported unconditionally: without it, collection fails (never a skip).
"""

from __future__ import annotations

import jax
import torch

jax.config.update("jax_default_matmul_precision", "highest")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
