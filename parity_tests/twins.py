"""Builds the same LoRA layer in torch, Linen and NNX, with weights copied (never re-drawn);
the torch twins, PEFT loading and bitsandbytes checks that several parity files share."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model

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


def torch_out(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """``model``'s output on ``x``, without gradients."""
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def peft_load(base: torch.nn.Module, directory, *, trainable: bool = False) -> PeftModel:
    """``PeftModel.from_pretrained``, which must not warn (a warning there means keys it
    ignored or a config it rewrote). ``trainable``: loaded with ``is_trainable=True`` and left
    in training mode (bitsandbytes' ``Linear4bit`` computes in bfloat16 in eval mode on CPUs
    with AVX-512 bf16); otherwise in eval mode."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(directory), is_trainable=trainable)
    assert not caught, [str(w.message) for w in caught]
    return model if trainable else model.eval()


def randomize_peft_lora(model: torch.nn.Module, scale: float, seed: int | None = 0) -> None:
    """Every ``lora_`` factor of the PEFT ``model`` set to ``scale`` · normal draws, after
    ``torch.manual_seed(seed)`` (``None``: the generator as it stands). PEFT's B starts at
    zero: nonzero values test the branch."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn_like(p))


# The gated MLP of tests/_gated_mlp.py (a Linen and an NNX module holding w_gate, w_up and
# w_down) as torch Linears named as transformers' MLPs, with each weight as (out, in).
GATED_PATH_MAP = {f"mlp.w_{w}": f"mlp.{w}_proj" for w in ("down", "gate", "up")}


class GatedMLPTwin(torch.nn.Module):
    def __init__(self, base: dict[str, np.ndarray]):
        super().__init__()
        d, f = base["w_gate"].shape
        self.gate_proj = torch.nn.Linear(d, f, bias=False)
        self.up_proj = torch.nn.Linear(d, f, bias=False)
        self.down_proj = torch.nn.Linear(f, d, bias=False)
        with torch.no_grad():
            for name in ("gate", "up", "down"):
                weight = torch.from_numpy(base[f"w_{name}"].T.copy())
                getattr(self, f"{name}_proj").weight.copy_(weight)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class GatedBlockTwin(torch.nn.Module):
    """The gated MLP (``mlp``) then a dense ``head`` of ``kernel`` (in, out) and ``bias``."""

    def __init__(self, base: dict[str, np.ndarray], kernel, bias):
        super().__init__()
        self.mlp = GatedMLPTwin(base)
        kernel = np.asarray(kernel)
        self.head = torch.nn.Linear(*kernel.shape)
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(kernel.T.copy()))
            self.head.bias.copy_(torch.from_numpy(np.array(bias)))

    def forward(self, x):
        return self.head(self.mlp(x))


def gated_peft_adapter(twin: GatedBlockTwin, config: LoraConfig, directory) -> PeftModel:
    """A PEFT adapter of ``config`` on ``twin``, every lora_B drawn from
    ``torch.manual_seed(0)``'s normal (PEFT's B starts at zero), saved to ``directory``."""
    peft_model = get_peft_model(twin, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    peft_model.save_pretrained(directory)
    return peft_model


def torch_mse_steps(model: torch.nn.Module, opt, xs, ys) -> np.ndarray:
    """One ``opt`` step per batch on the mean squared error of ``model(x)`` against ``y``;
    each step's loss (before its update)."""
    losses = []
    for x, y in zip(xs, ys, strict=True):
        loss = torch.mean((model(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses)


# bitsandbytes' 4-bit kinds that the QLoRA parity files check: (quant_type, double_quant).
FOUR_BIT_KINDS = pytest.mark.parametrize(
    ("quant_type", "double_quant"), [("nf4", False), ("fp4", False), ("nf4", True)]
)


def linear4bit(quant_type: str, double_quant: bool) -> Callable[..., torch.nn.Module]:
    """``linear(n_in, n_out, bias=True)``: bitsandbytes ``Linear4bit`` layers computing in
    float32, for a twin built from such a factory."""

    def linear(n_in: int, n_out: int, bias: bool = True) -> torch.nn.Module:
        return bnb.nn.Linear4bit(
            n_in,
            n_out,
            bias=bias,
            compute_dtype=torch.float32,
            quant_type=quant_type,
            compress_statistics=double_quant,
        )

    return linear


def bnb_twin(twin: torch.nn.Module, weights: dict[str, np.ndarray]) -> torch.nn.Module:
    """``twin`` (built of ``linear4bit`` layers) holding the float state dict ``weights``,
    moved to the CPU: ``Linear4bit`` quantizes there."""
    twin.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    return twin.to("cpu")


def assert_4bit_equals_bitsandbytes(q, weight: np.ndarray, held, quant_type, double_quant):
    """jaxlora's packed ``q`` equals ``quantize_4bit`` of ``weight`` (torch's (out, in)
    layout) and the bytes and scales the ``Linear4bit`` ``held`` holds, bit for bit."""
    w = torch.from_numpy(np.array(weight))
    packed, state = bnbf.quantize_4bit(
        w, quant_type=quant_type, blocksize=64, compress_statistics=double_quant
    )
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy())
    np.testing.assert_array_equal(np.asarray(q.packed), held.weight.data.numpy())
    if double_quant:  # the 8-bit codes of the scales; the offset to float32 rounding
        np.testing.assert_array_equal(np.asarray(q.absmax), state.absmax.numpy())
        np.testing.assert_allclose(float(q.offset), state.offset.item(), rtol=1e-6)
    else:
        np.testing.assert_array_equal(float_bits(q.absmax), float_bits(state.absmax))
        np.testing.assert_array_equal(
            float_bits(q.absmax), float_bits(held.weight.quant_state.absmax)
        )


def assert_int8_equals_bitsandbytes(q, weight: np.ndarray) -> None:
    """jaxlora's int8 ``q`` (blocksize 256) equals ``quantize_blockwise`` of ``weight``."""
    codes, state = bnbf.quantize_blockwise(torch.from_numpy(np.array(weight)), blocksize=256)
    np.testing.assert_array_equal(np.asarray(q.packed), codes.numpy())
    np.testing.assert_array_equal(float_bits(q.absmax), float_bits(state.absmax))


def linear4bit_peft_out(base: torch.nn.Module, directory, x: np.ndarray) -> np.ndarray:
    """PEFT's output on ``x`` with the adapter in ``directory`` loaded (trainable) onto the
    ``Linear4bit`` twin ``base``, checked to differ from ``base``'s own by more than 1e-2 (the
    adapter counts at this size)."""
    no_adapter = torch_out(base, x)
    want = torch_out(peft_load(base, directory, trainable=True), x)
    assert np.abs(no_adapter - want).max() > 1e-2  # the adapter counts at this size
    return want
