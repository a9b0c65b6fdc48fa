"""A quantized ``nn.scan`` stack against PEFT on its bitsandbytes twin: the torch model unrolls
the layers (``layers_{i}.query`` …) as ``bnb.nn.Linear4bit`` modules loaded with the same float
weights; each layer's packed bytes and absmax are asserted equal to the scanned stack's slice,
so both sides dequantize to the same float32 kernels. An adapter trained on the scanned JAX
base is saved with per-layer keys and loaded by the real ``peft``; a PEFT adapter loads into
the scanned JAX model. The same for op-level adapters (einsum q/o, a FlaxConv1D) in a scan
whose params are on axis 1. Tolerance as ``parity_tests/test_qlora_peft.py``: 3e-6 of the output's
largest magnitude (float32 summation order only)."""

from __future__ import annotations

import bitsandbytes as bnb
import jax
import jax.numpy as jnp
import numpy as np
import peft
import torch
from flax import linen as nn

import jaxlora
from jaxlora.quant import quantize_base
from tests.test_oplevel_linen import FlaxConv1D
from tests.test_oplevel_scan import Einsum
from tests.test_qlora_scan import CONFIG, NAMES, D, H, L, N, Scanned, Unrolled, _twins, _x
from tests.test_scan_axis import _random_b

TARGETS = ["query", "out", "fc"]


class Block(torch.nn.Module):
    def __init__(self, linears):
        super().__init__()
        for name, linear in linears.items():
            setattr(self, name, linear)

    def forward(self, x):
        q = torch.nn.functional.gelu(self.query(x), approximate="tanh")  # flax's gelu
        x = x + self.out(q)  # (N, H) flattened in C order: the Linear's in features
        return x + self.mlp(torch.relu(self.fc(x)))


class TorchTwin(torch.nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.length = len(blocks)
        for i, block in enumerate(blocks):
            setattr(self, f"layers_{i}", block)

    def forward(self, x):
        for i in range(self.length):
            x = getattr(self, f"layers_{i}")(x)
        return x


def _bnb_twin(float_params, biases):
    """The Linear4bit (NF4, no double quantization) twin of the unrolled float params."""
    blocks = []
    for i in range(L):
        linears = {}
        for name, n_in in (("query", 1), ("out", 2), ("fc", 1), ("mlp", 1)):
            kernel = np.asarray(float_params[f"layers_{i}"][name]["kernel"])
            weight = kernel.reshape(int(np.prod(kernel.shape[:n_in])), -1).T
            layer = bnb.nn.Linear4bit(
                weight.shape[1],
                weight.shape[0],
                compute_dtype=torch.float32,
                quant_type="nf4",
                compress_statistics=False,  # bitsandbytes' default is double quantization
            )
            layer.load_state_dict(
                {
                    "weight": torch.from_numpy(np.ascontiguousarray(weight)),
                    "bias": torch.from_numpy(
                        np.array(biases[f"layers_{i}"][name]["bias"]).reshape(-1)
                    ),
                }
            )
            linears[name] = layer.to("cpu")
        blocks.append(Block(linears))
    return TorchTwin(blocks)


def _setup():
    q_unrolled, q_scanned, layouts = _twins(0)
    floats = Unrolled().init(jax.random.key(0), _x())["params"]  # _twins' float weights
    net = _bnb_twin(floats, q_unrolled["params"])
    for i in range(L):
        for name in ("query", "out", "fc", "mlp"):
            stored = getattr(getattr(net, f"layers_{i}"), name).weight
            q = jax.tree.map(lambda x, i=i: x[i], q_scanned["quant"]["layers"][name]["kernel"])
            np.testing.assert_array_equal(np.asarray(q.packed), stored.data.numpy())
            np.testing.assert_array_equal(
                np.asarray(q.absmax).view(np.uint32),
                stored.quant_state.absmax.numpy().view(np.uint32),
            )
    return q_scanned, layouts, floats, net


def _close(got, expected):
    np.testing.assert_allclose(got, expected, rtol=0, atol=3e-6 * np.abs(expected).max())


def test_scanned_qlora_adapter_loads_into_peft_on_the_linear4bit_twin(tmp_path):
    q_scanned, _, _, net = _setup()
    jaxlora.save_adapter(q_scanned, tmp_path, CONFIG, layer_names=NAMES)
    # is_trainable: the float32 path of Linear4bit (see parity_tests/test_qlora_peft.py)
    loaded = peft.PeftModel.from_pretrained(net, tmp_path, is_trainable=True)
    x = _x(4)
    with torch.no_grad():
        expected = loaded(torch.from_numpy(np.array(x))).numpy()
    with jaxlora.intercept(CONFIG):
        got = np.asarray(jax.jit(Scanned(0).apply)(q_scanned, x))
    _close(got, expected)


def test_peft_adapter_on_the_linear4bit_twin_loads_into_the_scanned_quantized_model(tmp_path):
    q_scanned, layouts, _, net = _setup()
    config = peft.LoraConfig(r=CONFIG.r, lora_alpha=CONFIG.alpha, target_modules=TARGETS)
    model = peft.get_peft_model(net, config)
    torch.manual_seed(0)
    with torch.no_grad():  # PEFT's B starts at zero: nonzero values test the branch
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    base = {"params": jaxlora.split(q_scanned["params"])[1], "quant": q_scanned["quant"]}
    loaded = jaxlora.load_adapter(base, tmp_path, layer_names=NAMES, layouts=layouts)
    assert loaded["quant"] is q_scanned["quant"]
    x = _x(5)
    with torch.no_grad():
        expected = model(torch.from_numpy(np.array(x))).numpy()
    with jaxlora.intercept(jaxlora.read_adapter_config(tmp_path)):
        got = np.asarray(Scanned(0).apply(loaded, x))
    _close(got, expected)
    assert (D, N, H) == (64, 2, 32)  # in features multiples of 64 (test_qlora_peft.py)


# ------------------------------------------- op-level (product) adapters in the scan


OP_L = 2
OP_CONFIG = jaxlora.LoRAConfig(r=4, alpha=8, targets=["q", "o", "c"])


class OpBlock(nn.Module):
    """Einsum q (D → N, H) and o (N, H → D) and a FlaxConv1D c: adapted at their products."""

    @nn.compact
    def __call__(self, x, _):
        q = Einsum("BTD,DNH->BTNH", (D, N, H), name="q")(x)
        x = x + Einsum("BTNH,NHD->BTD", (N, H, D), name="o")(jnp.tanh(q))
        return x + FlaxConv1D(D, name="c")(jnp.tanh(x)), None


class OpScanned(nn.Module):
    """MaxText's layout: params scanned on axis 1, 'quant' on axis 0."""

    @nn.compact
    def __call__(self, x):
        axes = {"params": 1, "quant": 0}
        stack = nn.scan(OpBlock, variable_axes=axes, split_rngs={"params": True}, length=OP_L)
        return stack(name="layers")(x, None)[0]


class TorchOpBlock(torch.nn.Module):
    def __init__(self, linears):
        super().__init__()
        for name, linear in linears.items():
            setattr(self, name, linear)

    def forward(self, x):
        x = x + self.o(torch.tanh(self.q(x)))  # (N, H) flattened in C order: o's in features
        return x + self.c(torch.tanh(x))


# Each layer's weight as its torch Linear (out, in), and whether it has a bias.
OP_TORCH = {
    "q": ("w", lambda w: w.reshape(D, N * H).T),
    "o": ("w", lambda w: w.reshape(N * H, D).T),
    "c": ("kernel", lambda w: w),  # FlaxConv1D holds (out, in)
}


def _op_setup():
    """(quantized scanned variables, its Linear4bit twin): bytes asserted equal per layer."""
    model, x = OpScanned(), _x()
    floats = model.init(jax.random.key(0), x)
    layouts = jaxlora.layouts(model, x)
    variables = _random_b(jaxlora.inject(floats, OP_CONFIG, jax.random.key(1), layouts=layouts))
    quantized = quantize_base(variables, OP_CONFIG, quant_type="nf4")
    blocks = []
    for i in range(OP_L):
        linears = {}
        for name, (weight, to_linear) in OP_TORCH.items():
            node = floats["params"]["layers"][name]
            linear = np.array(to_linear(np.take(np.asarray(node[weight]), i, axis=1)))
            bias = node.get("bias")
            layer = bnb.nn.Linear4bit(
                linear.shape[1],
                linear.shape[0],
                bias=bias is not None,
                compute_dtype=torch.float32,
                quant_type="nf4",
                compress_statistics=False,
            )
            state = {"weight": torch.from_numpy(linear)}
            if bias is not None:
                state["bias"] = torch.from_numpy(np.take(np.asarray(bias), i, axis=1).copy())
            layer.load_state_dict(state)
            stored = layer.to("cpu").weight
            q = jax.tree.map(lambda a, i=i: a[i], quantized["quant"]["layers"][name][weight])
            np.testing.assert_array_equal(np.asarray(q.packed), stored.data.numpy())
            np.testing.assert_array_equal(
                np.asarray(q.absmax).view(np.uint32),
                stored.quant_state.absmax.numpy().view(np.uint32),
            )
            linears[name] = layer
        blocks.append(TorchOpBlock(linears))
    return quantized, TorchTwin(blocks)


def test_scanned_quantized_product_adapter_loads_into_peft_on_the_linear4bit_twin(tmp_path):
    quantized, net = _op_setup()
    jaxlora.save_adapter(quantized, tmp_path, OP_CONFIG, layer_names=NAMES)
    loaded = peft.PeftModel.from_pretrained(net, tmp_path, is_trainable=True)
    x = _x(4)
    with torch.no_grad():
        expected = loaded(torch.from_numpy(np.array(x))).numpy()
    with jaxlora.intercept(OP_CONFIG):
        got = np.asarray(jax.jit(OpScanned().apply)(quantized, x))
    _close(got, expected)
    with torch.no_grad(), loaded.disable_adapter():  # the adapter matters
        plain = loaded(torch.from_numpy(np.array(x))).numpy()
    assert np.abs(plain - expected).max() > 1e-2 * np.abs(expected).max()
