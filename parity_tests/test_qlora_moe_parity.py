"""QLoRA on MoE experts against bitsandbytes and PEFT: a tiny NNX model laid out as tunix's
Qwen3-MoE (``layers.0.mlp`` holding ``gate_proj``/``up_proj`` (E, D, F) and ``down_proj``
(E, F, D), each sliced per expert as tunix's ``MoELayer`` does on CPU; routing aside: expert
e takes the rows ``x[:, e]``), and its torch twin laid out as transformers' Qwen3-MoE
(``model.layers.0.mlp.experts.{e}.{gate,up,down}_proj``), every expert a bitsandbytes
``Linear4bit`` holding that expert's weight as (out, in):

    experts.{e}.gate_proj.weight (F, D) = gate_proj[e].T    (likewise up_proj, down_proj)

jaxlora quantizes each expert alone as that Linear, so its packed bytes and scales equal
``bitsandbytes.functional.quantize_4bit`` / ``quantize_blockwise`` of it bit for bit (and the
bytes ``Linear4bit`` holds); an adapter saved from the quantized JAX model with
``path_map="tunix.qwen3"`` (its expert template) loads with ``PeftModel`` onto the
``Linear4bit`` twin with the same outputs, and a PEFT QLoRA adapter trained there loads into
the quantized JAX model with PEFT's outputs. A Linen batched-experts twin ('bed,edf->bef')
does the same with an ``HFLinear(experts=...)`` map.

Tolerance as parity_tests/test_qlora_peft.py: the same dequantized float32 weights on both
sides, summed in another order: 3e-6 of the output's largest magnitude. ``Linear4bit`` is
compared in training mode (``is_trainable=True``): on CPUs with AVX-512 bf16 its eval mode
computes in bfloat16 (README caveat).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
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
    peft_load,
    randomize_peft_lora,
    torch_out,
)

E, D, F, R, ALPHA = 3, 40, 24, 2, 4.0
TOL = 3e-6
X = np.random.default_rng(0).standard_normal((2, E, D)).astype("f4")
WEIGHTS = ("gate_proj", "up_proj", "down_proj")
SHAPES = {"gate_proj": (E, D, F), "up_proj": (E, D, F), "down_proj": (E, F, D)}


class MoE(nnx.Module):
    def __init__(self):
        rng = np.random.default_rng(1)
        for name, shape in SHAPES.items():
            value = rng.standard_normal(shape) / np.sqrt(shape[1])
            setattr(self, name, nnx.Param(jnp.asarray(value, jnp.float32)))

    def __call__(self, x):
        ys = []
        for e in range(E):
            h = jax.nn.silu(x[:, e] @ self.gate_proj[e]) * (x[:, e] @ self.up_proj[e])
            ys.append(h @ self.down_proj[e])
        return jnp.stack(ys, axis=1)


class Layer(nnx.Module):
    def __init__(self):
        self.mlp = MoE()


class QwenLike(nnx.Module):
    def __init__(self):
        self.layers = nnx.List([Layer()])

    def __call__(self, x):
        return self.layers[0].mlp(x)


class TorchExpert(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.gate_proj = linear(D, F, bias=False)
        self.up_proj = linear(D, F, bias=False)
        self.down_proj = linear(F, D, bias=False)


class TorchMoE(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.experts = torch.nn.ModuleList(TorchExpert(linear) for _ in range(E))

    def forward(self, x):
        ys = []
        for e, expert in enumerate(self.experts):
            h = torch.nn.functional.silu(expert.gate_proj(x[:, e])) * expert.up_proj(x[:, e])
            ys.append(expert.down_proj(h))
        return torch.stack(ys, dim=1)


class TorchLayer(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.mlp = TorchMoE(linear)


class TorchInner(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.layers = torch.nn.ModuleList([TorchLayer(linear)])


class TorchQwenLike(torch.nn.Module):
    """transformers' Qwen3-MoE paths: ``model.layers.0.mlp.experts.{e}.gate_proj``."""

    def __init__(self, linear=torch.nn.Linear):
        super().__init__()
        self.model = TorchInner(linear)

    def forward(self, x):
        return self.model.layers[0].mlp(x)


def _torch_weights(floats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The twin's state dict: expert e's Linear weight is the JAX weight's slice e, (out, in)."""
    return {
        f"model.layers.0.mlp.experts.{e}.{name}.weight": np.ascontiguousarray(w[e].T)
        for name, w in floats.items()
        for e in range(E)
    }


def _bnb_twin(weights, quant_type: str = "nf4", double_quant: bool = False) -> TorchQwenLike:
    return bnb_twin(TorchQwenLike(linear4bit(quant_type, double_quant)), weights)


def _jax_model(**options) -> tuple[QwenLike, dict[str, np.ndarray]]:
    """The JAX model, injected (nonzero A and B), its float weights kept, then quantized."""
    model = QwenLike()
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["mlp"])
    jnnx.inject(model, config, nnx.Rngs(1), inputs=(jnp.asarray(X),))
    layer = model.layers[0].mlp
    keys = iter(jax.random.split(jax.random.key(3), 8))
    for name in WEIGHTS:
        for factor in layer.factors(name):
            factor[...] = 0.3 * jax.random.normal(next(keys), factor.shape)
    floats = {name: np.asarray(getattr(layer, name)[...]) for name in WEIGHTS}
    jnnx.quantize_base(model, config, **options)
    return model, floats


def _experts(model: QwenLike):
    """(torch module path, expert e's quantized arrays) for every expert Linear."""
    layer = model.layers[0].mlp
    for name in WEIGHTS:
        q = getattr(layer, name).get_value()
        for e in range(E):
            yield f"model.layers.0.mlp.experts.{e}.{name}", jax.tree.map(lambda t, e=e: t[e], q)


def _close(got, want) -> None:
    assert_close(got, want, TOL)


@FOUR_BIT_KINDS
def test_each_experts_bytes_equal_bitsandbytes_of_its_linear(quant_type, double_quant):
    model, floats = _jax_model(quant_type=quant_type, double_quant=double_quant)
    weights = _torch_weights(floats)
    twin = _bnb_twin(weights, quant_type, double_quant)
    held = dict(twin.named_modules())
    for path, q in _experts(model):
        weight = weights[f"{path}.weight"]
        assert_4bit_equals_bitsandbytes(q, weight, held[path], quant_type, double_quant)


def test_int8_experts_equal_quantize_blockwise_of_their_linears():
    model, floats = _jax_model(quant_type="int8", blocksize=256)
    weights = _torch_weights(floats)
    for path, q in _experts(model):
        assert_int8_equals_bitsandbytes(q, weights[f"{path}.weight"])


@pytest.mark.parametrize("double_quant", [False, True])
def test_jax_adapter_on_quantized_experts_loads_in_peft_on_linear4bit_experts(
    tmp_path, double_quant
):
    model, floats = _jax_model(double_quant=double_quant)
    jnnx.save_adapter(model, tmp_path, path_map="tunix.qwen3")
    want = linear4bit_peft_out(_bnb_twin(_torch_weights(floats), "nf4", double_quant), tmp_path, X)
    _close(model(jnp.asarray(X)), want)
    _close(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(X)), want)


def test_peft_qlora_adapter_on_linear4bit_experts_loads_into_the_quantized_jax_model(tmp_path):
    model, floats = _jax_model()
    targets = [f"experts.{e}.{name}" for e in range(E) for name in WEIGHTS]
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets)
    theirs = peft.get_peft_model(_bnb_twin(_torch_weights(floats)), config)
    randomize_peft_lora(theirs, 0.3)
    theirs.save_pretrained(tmp_path)
    packed = [jax.tree.map(np.asarray, q) for _, q in _experts(model)]
    jnnx.load_adapter(model, tmp_path, path_map="tunix.qwen3")
    for old, (_, new) in zip(packed, _experts(model), strict=True):
        jax.tree.map(np.testing.assert_array_equal, new, old)  # the base is not touched
    _close(model(jnp.asarray(X)), torch_out(theirs, X))


class LinenExperts(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.15), (E, D, F))
        return jnp.einsum("bed,edf->bef", x, w)


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return LinenExperts(name="moe")(x)


class TorchBatched(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.experts = torch.nn.ModuleList()
        for _ in range(E):
            expert = torch.nn.Module()
            expert.proj = linear(D, F, bias=False)
            self.experts.append(expert)

    def forward(self, x):
        return torch.stack([self.experts[e].proj(x[:, e]) for e in range(E)], dim=1)


class TorchLinenTwin(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.moe = TorchBatched(linear)

    def forward(self, x):
        return self.moe(x)


def test_linen_batched_experts_adapter_loads_in_peft_on_linear4bit_experts(tmp_path):
    model, x = LinenModel(), jnp.asarray(X)
    variables = model.init(jax.random.key(0), x)
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["moe"])
    lora = jaxlora.inject(variables, config, jax.random.key(1), layouts=jaxlora.layouts(model, x))
    node = dict(lora["params"]["moe"])
    node["lora_b"] = 0.3 * jax.random.normal(jax.random.key(3), node["lora_b"].shape)
    quantized = quantize_base({"params": {"moe": node}}, config)
    w = np.asarray(variables["params"]["moe"]["w"])
    weights = {f"moe.experts.{e}.proj.weight": w[e].T for e in range(E)}
    twin = bnb_twin(TorchLinenTwin(linear4bit("nf4", False)), weights)
    packed = np.asarray(quantized["quant"]["moe"]["w"].packed)
    for e in range(E):
        np.testing.assert_array_equal(packed[e], twin.moe.experts[e].proj.weight.data.numpy())
    path_map = {"moe": jaxlora.HFLinear("moe", experts="moe.experts.{}.proj")}
    jaxlora.save_adapter(quantized, tmp_path, config, path_map=path_map)
    want = torch_out(peft_load(twin, tmp_path, trainable=True), X)
    with jaxlora.intercept(config):
        _close(model.apply(quantized, x), want)
