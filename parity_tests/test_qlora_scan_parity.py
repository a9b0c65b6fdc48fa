"""A quantized ``nn.scan`` stack against PEFT on its bitsandbytes twin: the torch model unrolls
the layers (``layers_{i}.query`` …) as ``bnb.nn.Linear4bit`` modules loaded with the same float
weights; each layer's packed bytes and absmax are asserted equal to the scanned stack's slice,
so both sides dequantize to the same float32 kernels. An adapter trained on the scanned JAX
base is saved with per-layer keys and loaded by the real ``peft``; a PEFT adapter loads into
the scanned JAX model. Tolerance as ``parity_tests/test_qlora_peft.py``: 3e-6 of the output's
largest magnitude (float32 summation order only)."""

from __future__ import annotations

import bitsandbytes as bnb
import jax
import numpy as np
import peft
import torch

import jaxlora
from tests.test_qlora_scan import CONFIG, NAMES, D, H, L, N, Scanned, Unrolled, _twins, _x

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
        for i, block in enumerate(blocks):
            setattr(self, f"layers_{i}", block)

    def forward(self, x):
        for i in range(L):
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
