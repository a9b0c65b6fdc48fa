"""QLoRA on op-level weights against bitsandbytes and PEFT: a tiny NNX block of tunix-style
einsums (q 'BTD,DNH->BTNH', o 'BTNH,NHD->BTD') and a ``FlaxConv1D``-like ``x @ kernel.T``,
and its torch twin of ``nn.Linear`` modules holding each weight reshaped to (out, in):

    q_proj.weight (N·H, D) = w_q.reshape(D, N·H).T
    o_proj.weight (D, N·H) = w_o.reshape(N·H, D).T
    fc.weight (F, D)       = kernel (FlaxConv1D holds torch's layout already)

jaxlora's packed weights equal bitsandbytes' ``quantize_4bit`` / ``quantize_blockwise`` of
those matrices bit for bit (and the bytes ``Linear4bit`` holds); an adapter saved from the
quantized JAX model (op-level file writer, ``path_map``) loads with ``PeftModel`` onto the
``Linear4bit`` twin with the same outputs, a PEFT QLoRA adapter loads into the quantized JAX
model with PEFT's outputs, and 10 Adam steps give PEFT's losses and adapters. The Linen twin
(an einsum ``q_proj``, an ``nn.DenseGeneral`` ``o_proj`` over (N, H), a FlaxConv1D-like ``fc``)
holds the same bytes and its saved adapter gives PEFT's outputs on ``Linear4bit``.

Tolerance as parity_tests/test_qlora_peft.py: the same dequantized float32 weights on both
sides, summed in another order: 3e-6 of the output's largest magnitude (observed below
1e-6). ``Linear4bit`` is compared in training mode (``is_trainable=True``): on CPUs with
AVX-512 bf16 its eval mode computes in bfloat16 (README caveat).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import torch
from flax import linen as nn
from flax import nnx

import jaxlora
from jaxlora import nnx as jnnx
from jaxlora.quant import quantize_base
from parity_tests.twins import (
    FOUR_BIT_KINDS,
    assert_4bit_equals_bitsandbytes,
    assert_close,
    assert_int8_equals_bitsandbytes,
    bnb_twin,
    linear4bit,
    linear4bit_peft_out,
    randomize_peft_lora,
    torch_mse_steps,
    torch_out,
)
from tests._train import nnx_lora_step

B, T, D, N, H, F, R, ALPHA = 2, 3, 64, 2, 32, 48, 4, 8.0
TARGETS = ["q_einsum", "o_einsum", "fc"]
PATH_MAP = {"q_einsum": "q_proj", "o_einsum": "o_proj", "fc": "fc"}
TOL = 3e-6
X = np.random.default_rng(0).standard_normal((B, T, D)).astype("f4")


class Einsum(nnx.Module):
    def __init__(self, eqn: str, shape, rngs: nnx.Rngs):
        self.shape_eqn = eqn
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape) / np.sqrt(D))

    def __call__(self, x):
        return jnp.einsum(self.shape_eqn, x, self.w[...])


class Conv1DLike(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (F, D)) / np.sqrt(D))
        self.bias = nnx.Param(0.1 * jax.random.normal(rngs.params(), (F,)))

    def __call__(self, x):
        return x @ self.kernel[...].T + self.bias[...]


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q_einsum = Einsum("BTD,DNH->BTNH", (D, N, H), rngs)
        self.o_einsum = Einsum("BTNH,NHD->BTD", (N, H, D), rngs)
        self.fc = Conv1DLike(rngs)

    def __call__(self, x):
        return self.fc(jax.nn.gelu(self.o_einsum(self.q_einsum(x))))


class TorchBlock(torch.nn.Module):
    def __init__(self, linear=torch.nn.Linear):
        super().__init__()
        self.q_proj = linear(D, N * H, bias=False)
        self.o_proj = linear(N * H, D, bias=False)
        self.fc = linear(D, F)

    def forward(self, x):
        y = self.o_proj(self.q_proj(x))  # (b, t, N·H): the einsum's (N, H) flattened
        return self.fc(torch.nn.functional.gelu(y, approximate="tanh"))


def _torch_weights(model: Block) -> dict[str, np.ndarray]:
    """The twin's float weights: each JAX weight reshaped to (out, in), written out."""
    q, o = np.asarray(model.q_einsum.w[...]), np.asarray(model.o_einsum.w[...])
    return {
        "q_proj.weight": q.reshape(D, N * H).T,
        "o_proj.weight": o.reshape(N * H, D).T,
        "fc.weight": np.asarray(model.fc.kernel[...]),
        "fc.bias": np.asarray(model.fc.bias[...]),
    }


def _bnb_twin(weights, quant_type: str, double_quant: bool) -> TorchBlock:
    return bnb_twin(TorchBlock(linear4bit(quant_type, double_quant)), weights)


def _jax_model(seed: int = 3, **options) -> tuple[Block, dict]:
    """The JAX block, injected (nonzero A and B), its float weights kept, then quantized."""
    model = Block(nnx.Rngs(0))
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=TARGETS)
    jnnx.inject(model, config, nnx.Rngs(1), inputs=(jnp.asarray(X),))
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    for _, layer in nnx.iter_graph(model):
        if isinstance(layer, jnnx.OpAdapter):
            for factor in (layer.lora_a, layer.lora_b):
                factor[...] = 0.2 * jax.random.normal(next(keys), factor.shape)
    weights = _torch_weights(model)
    jnnx.quantize_base(model, config, **options)
    return model, weights


def _packed(model: Block) -> dict[str, object]:
    return {
        "q_proj": model.q_einsum.w.get_value(),
        "o_proj": model.o_einsum.w.get_value(),
        "fc": model.fc.kernel.get_value(),
    }


def _forward_gelu(model: Block, x) -> np.ndarray:
    # torch's gelu(approximate="tanh") is jax.nn.gelu's default: the same function.
    return np.asarray(model(jnp.asarray(x)))


def _close(got, want) -> None:
    assert_close(got, want, TOL)


@FOUR_BIT_KINDS
def test_packed_bytes_equal_bitsandbytes_of_the_torch_layout(quant_type, double_quant):
    model, weights = _jax_model(quant_type=quant_type, double_quant=double_quant)
    twin = _bnb_twin(weights, quant_type, double_quant)
    for name, q in _packed(model).items():
        weight, held = weights[f"{name}.weight"], getattr(twin, name)
        assert_4bit_equals_bitsandbytes(q, weight, held, quant_type, double_quant)


def test_int8_equals_quantize_blockwise_of_the_torch_layout():
    model, weights = _jax_model(quant_type="int8", blocksize=256)
    for name, q in _packed(model).items():
        assert_int8_equals_bitsandbytes(q, weights[f"{name}.weight"])


@FOUR_BIT_KINDS
def test_jax_adapter_on_the_quantized_base_loads_in_peft_on_linear4bit(
    tmp_path, quant_type, double_quant
):
    model, weights = _jax_model(quant_type=quant_type, double_quant=double_quant)
    jnnx.save_adapter(model, tmp_path, path_map=PATH_MAP)
    want = linear4bit_peft_out(_bnb_twin(weights, quant_type, double_quant), tmp_path, X)
    _close(_forward_gelu(model, X), want)
    _close(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(X)), want)


def test_peft_qlora_adapter_loads_into_the_quantized_jax_model(tmp_path):
    model, weights = _jax_model()
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(PATH_MAP.values()))
    theirs = peft.get_peft_model(_bnb_twin(weights, "nf4", False), config)
    randomize_peft_lora(theirs, 0.2)
    theirs.save_pretrained(tmp_path)
    packed = jax.tree.map(np.asarray, _packed(model))
    jnnx.load_adapter(model, tmp_path, path_map=PATH_MAP)
    for old, new in zip(jax.tree.leaves(packed), jax.tree.leaves(_packed(model)), strict=True):
        np.testing.assert_array_equal(np.asarray(new), old)  # the base is not touched
    _close(_forward_gelu(model, X), torch_out(theirs, X))


def test_ten_adam_steps_match_peft_on_linear4bit():
    # Same batches, Adam(1e-2), both sides training the adapter on the same quantized base.
    # Tolerance as parity_tests/test_qlora_peft.py: 1e-4 relative on the losses and factors.
    steps, lr = 10, 1e-2
    model, weights = _jax_model()
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((steps, B, T, D)).astype("f4")
    ys = rng.standard_normal((steps, B, T, F)).astype("f4")

    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(PATH_MAP.values()))
    theirs = peft.get_peft_model(_bnb_twin(weights, "nf4", False), config)
    mapping = {"q_proj": model.q_einsum, "o_proj": model.o_einsum, "fc": model.fc}
    with torch.no_grad():  # the JAX adapter in PEFT's layout: A (r, prod C), B (prod F, r)
        for name, layer in mapping.items():
            a = np.asarray(layer.lora_a[...]).reshape(-1, R).T
            b = np.asarray(layer.lora_b[...]).reshape(R, -1).T
            peft_layer = getattr(theirs.base_model.model, name)
            peft_layer.lora_A["default"].weight.copy_(torch.from_numpy(np.array(a)))
            peft_layer.lora_B["default"].weight.copy_(torch.from_numpy(np.array(b)))
    opt = torch.optim.Adam([p for n, p in theirs.named_parameters() if "lora_" in n], lr=lr)
    torch_losses = torch_mse_steps(theirs, opt, xs, ys)

    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.LoRAParam)
    steps = (nnx_lora_step(model, optimizer, x, y)[0] for x, y in zip(xs, ys, strict=True))
    jax_losses = [float(loss) for loss in steps]
    assert torch_losses[-1] < torch_losses[0]
    assert np.max(np.abs(np.array(jax_losses) - torch_losses) / torch_losses) <= 1e-4
    for name, layer in mapping.items():
        peft_layer = getattr(theirs.base_model.model, name)
        want = peft_layer.lora_B["default"].weight.detach().numpy()
        got = np.asarray(layer.lora_b[...]).reshape(R, -1).T
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


class LinenEinsum(nn.Module):
    eqn: str
    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        return jnp.einsum(self.eqn, x, self.param("w", nn.initializers.normal(0.125), self.shape))


class LinenConv1D(nn.Module):
    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.125), (F, D))
        return x @ kernel.T + self.param("bias", nn.initializers.normal(0.1), (F,))


class LinenBlock(nn.Module):
    """The Linen twin: an einsum q_proj (D, N, H), an nn.DenseGeneral o_proj over (N, H) and
    a FlaxConv1D-like fc, named as the torch modules."""

    @nn.compact
    def __call__(self, x):
        q = LinenEinsum("BTD,DNH->BTNH", (D, N, H), name="q_proj")(x)
        y = nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="o_proj")(q)
        return LinenConv1D(name="fc")(jax.nn.gelu(y))


@FOUR_BIT_KINDS
def test_linen_adapter_on_the_quantized_base_loads_in_peft_on_linear4bit(
    tmp_path, quant_type, double_quant
):
    model, x = LinenBlock(), jnp.asarray(X)
    variables = model.init(jax.random.key(0), x)
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=list(PATH_MAP.values()))
    lora = jaxlora.inject(variables, config, jax.random.key(1), layouts=jaxlora.layouts(model, x))
    keys = iter(jax.random.split(jax.random.key(3), 8))
    params = {
        name: {
            **node,
            "lora_a": 0.2 * jax.random.normal(next(keys), node["lora_a"].shape),
            "lora_b": 0.2 * jax.random.normal(next(keys), node["lora_b"].shape),
        }
        for name, node in lora["params"].items()
    }
    p = jax.tree.map(np.asarray, variables["params"])
    weights = {
        "q_proj.weight": p["q_proj"]["w"].reshape(D, N * H).T,
        "o_proj.weight": p["o_proj"]["kernel"].reshape(N * H, D).T,
        "fc.weight": p["fc"]["kernel"],
        "fc.bias": p["fc"]["bias"],
    }
    quantized = quantize_base(
        {"params": params}, config, quant_type=quant_type, double_quant=double_quant
    )
    base = _bnb_twin(weights, quant_type, double_quant)
    for name, weight in (("q_proj", "w"), ("o_proj", "kernel"), ("fc", "kernel")):
        packed = np.asarray(quantized["quant"][name][weight].packed)
        np.testing.assert_array_equal(packed, getattr(base, name).weight.data.numpy())
    jaxlora.save_adapter(quantized, tmp_path, config)
    want = linear4bit_peft_out(base, tmp_path, X)
    with jaxlora.intercept(config):
        _close(model.apply(quantized, x), want)
    # ... and the file reads back into a fresh quantized tree (adapters made at the product
    # included), which then gives PEFT's outputs again.
    fresh = jaxlora.inject(variables, config, jax.random.key(9), layouts=jaxlora.layouts(model, x))
    fresh = quantize_base(fresh, config, quant_type=quant_type, double_quant=double_quant)
    reloaded = jaxlora.load_adapter(fresh, tmp_path)
    for name in PATH_MAP.values():
        for leaf in ("lora_a", "lora_b"):
            np.testing.assert_array_equal(
                np.asarray(reloaded["params"][name][leaf]), np.asarray(params[name][leaf])
            )
    with jaxlora.intercept(config):
        _close(model.apply(reloaded, x), want)
