"""Many op-level adapters in one batch against PEFT's mixed-batch forward (``adapter_names=``).

Adapters made at einsum / ``x @ kernel.T`` products (different ranks, alphas, rsLoRA) are
written with ``save_adapter`` under the op-level ``hf_maps`` rule (each weight as its torch
``nn.Linear`` module(s); a fused k/v weight as two modules sharing its A), loaded under several
names into a ``PeftModel`` of the torch twin, and served by a jaxlora stack: NNX (``to_multi``
on the ``OpAdapter`` attention of ``test_oplevel_files``, stacked from the files) and Linen
(``intercept_stack`` on product adapters: ``FlaxConv1D`` and tunix-style einsums). One batch
mixing them and the base (PEFT's ``"__base__"``, our ``-1``) gives PEFT's outputs.

Tolerance: fp32, 1e-5 of the output's scale, as the other PEFT parity tests (the same sums in
another association: einsum over (N, H) vs a matmul over N·H).
"""

from __future__ import annotations

import copy
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from flax import nnx
from peft import PeftModel

import jaxlora
import jaxlora.nnx as jnnx
from parity_tests import test_oplevel_files as files
from parity_tests.test_oplevel_linen_parity import FlaxConv1D  # its D is files.D (16) too
from parity_tests.twins import rel_err

D, N, H, T = files.D, files.N, files.H, files.T
TOL = 1e-5
NAMES = ["a1", "__base__", "a0", "a2", "a1", "a0"]
INDEX = jnp.array([-1 if n == "__base__" else int(n[1:]) for n in NAMES])
X = np.random.default_rng(1).standard_normal((len(NAMES), T, D)).astype("f4")


def _configs(targets):
    return [
        jaxlora.LoRAConfig(r=4, alpha=8.0, targets=targets),
        jaxlora.LoRAConfig(r=2, alpha=2.0, targets=targets),
        jaxlora.LoRAConfig(r=3, alpha=6.0, targets=targets, use_rslora=True),
    ]


def _peft_mixed(twin: torch.nn.Module, dirs) -> np.ndarray:
    """PEFT's mixed batch on the twin, checked against each row with its own adapter alone
    (what ``adapter_names=`` promises) and against the base (the adapters count)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(copy.deepcopy(twin), str(dirs[0]), adapter_name="a0")
        for i, directory in enumerate(dirs[1:], start=1):
            model.load_adapter(str(directory), adapter_name=f"a{i}")
    assert not caught, [str(w.message) for w in caught]  # every key loaded
    model.eval()
    x = torch.from_numpy(X)
    with torch.no_grad():
        mixed = model(x, adapter_names=NAMES).numpy()
        alone = []
        for row, name in enumerate(NAMES):
            if name == "__base__":
                with model.disable_adapter():
                    alone.append(model(x[row : row + 1])[0].numpy())
            else:
                model.set_adapter(name)
                alone.append(model(x[row : row + 1])[0].numpy())
        with model.disable_adapter():
            base = model(x).numpy()
    assert rel_err(mixed, np.stack(alone)) <= TOL
    adapted = np.array([n != "__base__" for n in NAMES])
    for row in np.flatnonzero(adapted):
        assert rel_err(mixed[row], base[row]) > 1e-2
    np.testing.assert_array_equal(mixed[~adapted], base[~adapted])
    return mixed


# ---------------------------------------------------------------- NNX


@pytest.fixture(scope="module")
def nnx_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_oplevel_nnx")
    dirs = []
    for i, config in enumerate(_configs(files.TARGETS)):
        model = files.Model()
        jnnx.inject(model, config, nnx.Rngs(2), inputs=(jnp.asarray(X),))
        keys = iter(jax.random.split(jax.random.key(30 + i), 8))
        for _, layer in nnx.iter_graph(model):
            if isinstance(layer, jnnx.OpAdapter):
                for factor in (layer.lora_a, layer.lora_b):
                    factor[...] = 0.3 * jax.random.normal(next(keys), factor.shape)
        jnnx.save_adapter(model, root / f"a{i}", path_map=files.PATH_MAP)
        dirs.append(root / f"a{i}")
    return dirs


def test_nnx_stack_matches_peft_mixed_batch(nnx_files):
    mixed = _peft_mixed(files._torch_twin(files.Model()), nnx_files)
    sources = []
    for config, directory in zip(_configs(files.TARGETS), nnx_files, strict=True):
        source = files.Model()
        jnnx.inject(source, config, nnx.Rngs(9), inputs=(jnp.asarray(X),))
        jnnx.load_adapter(source, directory, path_map=files.PATH_MAP)
        sources.append(source)
    serving = jnnx.to_multi(nnx.clone(sources[0]), capacity=4, rank=4)
    for slot, source in enumerate(sources):
        jnnx.set_adapter(serving, slot, source)

    @nnx.jit
    def forward(model, x, index):
        with jnnx.adapter_index(index):
            return model(x)

    y = forward(serving, jnp.asarray(X), INDEX)
    assert rel_err(y, mixed) <= TOL


# ---------------------------------------------------------------- Linen


class Einsum(nn.Module):
    eqn: str
    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        return jnp.einsum(self.eqn, x, self.param("w", nn.initializers.normal(0.25), self.shape))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(FlaxConv1D(D, name="c_attn")(x))
        q = Einsum("BTD,DNH->BTNH", (D, N, H), name="q_proj")(h)
        return Einsum("BTNH,NHD->BTD", (N, H, D), name="o_proj")(q)


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = torch.nn.Linear(D, D)
        self.q_proj = torch.nn.Linear(D, N * H, bias=False)
        self.o_proj = torch.nn.Linear(N * H, D, bias=False)

    def forward(self, x):
        return self.o_proj(self.q_proj(torch.tanh(self.c_attn(x))))


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, np.float32, copy=True, order="C"))


def _torch_block(params) -> TorchBlock:
    """The twin of the Linen base: FlaxConv1D's kernel is torch's weight; an einsum weight
    is the Linear's weight with the contracted axes flattened as columns."""
    twin = TorchBlock()
    with torch.no_grad():
        twin.c_attn.weight.copy_(_t(params["c_attn"]["kernel"]))
        twin.c_attn.bias.copy_(_t(params["c_attn"]["bias"]))
        twin.q_proj.weight.copy_(_t(np.asarray(params["q_proj"]["w"]).reshape(D, N * H).T))
        twin.o_proj.weight.copy_(_t(np.asarray(params["o_proj"]["w"]).reshape(N * H, D).T))
    return twin.eval()


@pytest.fixture(scope="module")
def linen_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_oplevel_linen")
    model = Block()
    base = model.init(jax.random.key(0), X)["params"]
    layouts = jaxlora.layouts(model, X)
    adapters, dirs = [], []
    for i, config in enumerate(_configs(["c_attn", "q_proj", "o_proj"])):
        params = jaxlora.inject(base, config, jax.random.key(i), layouts=layouts)
        keys = iter(jax.random.split(jax.random.key(40 + i), 8))
        params = {
            name: {
                k: 0.3 * jax.random.normal(next(keys), v.shape) if k in ("lora_a", "lora_b") else v
                for k, v in node.items()
            }
            for name, node in params.items()
        }
        jaxlora.save_adapter(params, root / f"a{i}", config)
        adapters.append((params, config))
        dirs.append(root / f"a{i}")
    return model, base, adapters, dirs


def test_linen_stack_matches_peft_mixed_batch(linen_files):
    model, base, adapters, dirs = linen_files
    mixed = _peft_mixed(_torch_block(base), dirs)
    layouts = jaxlora.layouts(model, X)
    # The stack is read from the same files PEFT serves (into a tree injected with layouts).
    loaded = []
    for i, directory in enumerate(dirs):
        config = jaxlora.read_adapter_config(directory)
        fresh = jaxlora.inject(base, config, jax.random.key(100 + i), layouts=layouts)
        loaded.append((jaxlora.load_adapter(fresh, directory), config))
    for (got, _), (want, _) in zip(loaded, adapters, strict=True):
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), got, want))
    stack = jaxlora.stack_adapters(loaded, capacity=4)

    @jax.jit
    def forward(stack, params, x, index):
        with jaxlora.intercept_stack(stack, index):
            return model.apply({"params": params}, x)

    y = forward(stack, base, jnp.asarray(X), INDEX)
    assert rel_err(y, mixed) <= TOL
