"""Builds the same LoRA layer in torch, Linen and NNX, with weights copied (never re-drawn)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import jaxlora
import torchlora
from jaxlora.nnx import LoRALinear


def torch_layer(
    n_in: int,
    n_out: int,
    r: int,
    *,
    alpha: float | None = None,
    bias: bool = True,
    use_rslora: bool = False,
    dropout: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torchlora.Linear:
    """A torchlora.Linear with a non-zero B, so the LoRA branch is really exercised."""
    torch.manual_seed(seed)
    layer = torchlora.Linear(
        n_in, n_out, bias, r, alpha, dropout=dropout, use_rslora=use_rslora, dtype=dtype
    )
    with torch.no_grad():
        layer.lora_b.normal_(0.0, 0.5)
        if bias:
            layer.bias.normal_(0.0, 0.5)
    return layer


def flax_params(layer: torchlora.Linear) -> dict[str, jax.Array]:
    state = {k: v for k, v in layer.state_dict().items() if k in ("weight", "bias")}
    state["lora_a"], state["lora_b"] = layer.lora_a, layer.lora_b
    return jaxlora.from_torch(state)


def linen_twin(layer: torchlora.Linear, *, dtype=None) -> tuple[jaxlora.LoRADense, dict]:
    module = jaxlora.LoRADense(
        layer.out_features,
        layer.r,
        layer.alpha,
        use_bias=layer.bias is not None,
        use_rslora=layer.use_rslora,
        dropout=_rate(layer),
        dtype=dtype,
        param_dtype=flax_params(layer)["kernel"].dtype,
    )
    return module, {"params": flax_params(layer)}


def nnx_twin(layer: torchlora.Linear) -> LoRALinear:
    params = flax_params(layer)
    model = LoRALinear(
        layer.in_features,
        layer.out_features,
        r=layer.r,
        alpha=layer.alpha,
        use_bias=layer.bias is not None,
        use_rslora=layer.use_rslora,
        dropout=_rate(layer),
        param_dtype=params["kernel"].dtype,
        rngs=nnx.Rngs(0),
    )
    for name, value in params.items():
        getattr(model, name)[...] = value
    return model


def to_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).numpy()
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def assert_close(got, want, tol: float, floor: float = 0.0) -> None:
    """Same shape, and ``|got - want| <= tol · max(max|want|, floor)`` everywhere (float64):
    a tolerance relative to the output's scale (``floor`` for outputs near zero)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(np.abs(want).max(), floor))


def float_bits(a) -> np.ndarray:
    """An array's float32 bit patterns (so -0.0 != 0.0 and NaNs compare by payload)."""
    return np.asarray(a, np.float32).view(np.uint32)


def rel_err(actual, expected, scale=None) -> float:
    """max |actual - expected| relative to ``scale`` (default: the max magnitude of
    ``expected``)."""
    a, e = to_np(actual), to_np(expected)
    assert a.shape == e.shape, (a.shape, e.shape)
    scale = np.max(np.abs(e), initial=0.0) if scale is None else scale
    return float(np.max(np.abs(a - e), initial=0.0) / max(scale, 1e-30))


def reference_forward(layer: torchlora.Linear, x: np.ndarray) -> np.ndarray:
    """The LoRA formula in float64 numpy, from the layer's own (torch-layout) weights."""
    w, a, b = (to_np(t) for t in (layer.weight, layer.lora_a, layer.lora_b))
    y = x @ w.T + (x @ a.T @ b.T) * layer.scaling
    return y + to_np(layer.bias) if layer.bias is not None else y


def reference_magnitude(layer: torchlora.Linear, x: np.ndarray) -> float:
    """The largest ``|x| @ |W|ᵀ + |b| + scaling·(|x| @ |A|ᵀ) @ |B|ᵀ``: the size of the terms an
    output sums. Rounding error is bounded relative to it (about eps·sqrt(in)), not to the
    output, which cancellation can make arbitrarily small (e.g. a single output near 0)."""
    w, a, b = (np.abs(to_np(t)) for t in (layer.weight, layer.lora_a, layer.lora_b))
    x = np.abs(x)
    y = x @ w.T + (x @ a.T @ b.T) * abs(layer.scaling)
    y = y + np.abs(to_np(layer.bias)) if layer.bias is not None else y
    return float(np.max(y, initial=0.0))


def _rate(layer: torchlora.Linear) -> float:
    return getattr(layer.lora_dropout, "p", 0.0)
