"""The one place that knows both layouts: torch (out, in) weights vs Flax (in, out) kernels.

| torch (torchlora) | Flax (jaxlora) |
|---|---|
| ``weight`` (out, in) | ``kernel`` (in, out) |
| ``bias`` (out,) | ``bias`` (out,) |
| ``lora_a`` (r, in) | ``lora_a`` (in, r) |
| ``lora_b`` (out, r) | ``lora_b`` (r, out) |

No torch import: tensors are read through ``.detach().cpu()``, and ``to_torch`` returns numpy
arrays (``torch.from_numpy`` takes them; bfloat16 comes back as ``ml_dtypes.bfloat16``, which
torch reads after ``.astype(np.float32)``, exactly).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_TO_FLAX = {
    "weight": "kernel",
    "bias": "bias",
    "lora_a": "lora_a",
    "lora_b": "lora_b",
    "lora_magnitude": "lora_magnitude",  # DoRA's m (out,): the same in both layouts
}
_TO_TORCH = {v: k for k, v in _TO_FLAX.items()}


def from_torch(state_dict: Mapping[str, Any]) -> dict[str, jax.Array]:
    """One layer's torch weights (``torchlora.Linear`` or ``nn.Linear`` state dict) in Flax layout.

    Examples:
        >>> import numpy as np
        >>> p = from_torch({"weight": np.zeros((3, 5)), "lora_a": np.zeros((2, 5)),
        ...                 "lora_b": np.zeros((3, 2))})
        >>> {k: v.shape for k, v in p.items()}
        {'kernel': (5, 3), 'lora_a': (5, 2), 'lora_b': (2, 3)}
    """
    unknown = sorted(set(state_dict) - set(_TO_FLAX))
    if unknown:
        raise ValueError(f"from_torch: unexpected keys {unknown}; expected {sorted(_TO_FLAX)}")
    if "weight" not in state_dict:
        raise ValueError(f"from_torch: no 'weight' among keys {sorted(state_dict)}")
    arrays = {k: as_numpy(v) for k, v in state_dict.items()}
    _check_torch_shapes(arrays)
    return {_TO_FLAX[k]: jnp.asarray(v.T if v.ndim == 2 else v) for k, v in arrays.items()}


def to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """One layer's Flax params in torch layout: writable numpy arrays, torchlora.Linear keys."""
    unknown = sorted(set(params) - set(_TO_TORCH))
    if unknown:
        raise ValueError(f"to_torch: unexpected keys {unknown}; expected {sorted(_TO_TORCH)}")
    if "kernel" not in params:
        raise ValueError(f"to_torch: no 'kernel' among keys {sorted(params)}")
    arrays = {_TO_TORCH[k]: np.array(v) for k, v in params.items()}  # writable copies
    arrays = {k: np.ascontiguousarray(v.T) if v.ndim == 2 else v for k, v in arrays.items()}
    _check_torch_shapes(arrays)
    return arrays


def as_numpy(value: Any) -> np.ndarray:
    """A torch tensor (read without importing torch; bf16 exactly) or array-like as numpy."""
    if hasattr(value, "detach"):  # a torch tensor, read without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            return value.float().numpy().astype(jnp.bfloat16)  # exact: bf16 ⊂ fp32
        return value.numpy()
    return np.asarray(value)


def _check_torch_shapes(arrays: Mapping[str, np.ndarray]) -> None:
    weight = arrays["weight"]
    if weight.ndim != 2:
        raise ValueError(f"'weight' must be 2-D (out, in), got shape {weight.shape}")
    n_out, n_in = weight.shape
    r = arrays["lora_a"].shape[0] if "lora_a" in arrays and arrays["lora_a"].ndim else None
    expected = {
        "bias": (n_out,),
        "lora_a": (r, n_in),
        "lora_b": (n_out, r),
        "lora_magnitude": (n_out,),
    }
    if ("lora_a" in arrays) != ("lora_b" in arrays):
        raise ValueError("'lora_a' and 'lora_b' must come together, got only one of them")
    if "lora_magnitude" in arrays and "lora_a" not in arrays:
        raise ValueError("'lora_magnitude' (DoRA) needs 'lora_a' and 'lora_b' beside it")
    for key, shape in expected.items():
        if key in arrays and arrays[key].shape != shape:
            raise ValueError(
                f"'{key}' has shape {arrays[key].shape}, expected {shape} "
                f"(torch layout, weight {weight.shape})"
            )
