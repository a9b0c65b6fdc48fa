"""Many adapters in one batch: each row equals its own adapter alone, no recompiles, refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxlora
import jaxlora.nnx as jnnx
from jaxlora import multi
from jaxlora.models import gpt as jgpt

jax.config.update("jax_default_matmul_precision", "highest")

RANKS_ALPHAS = [(2, 4.0), (4, 3.0), (1, 1.0)]  # different ranks and scales in one stack
INDEX = [0, 1, -1, 2, 1, -1]
SCAN_CFG = dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, d_model=8)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Dense(16, name="fc0")(x))
        x = nn.DenseGeneral((2, 3), name="fc1")(x)  # multi-axis output: the general layout
        return nn.Dense(4, name="fc2")(x.reshape(*x.shape[:-2], 6))


class OnlyFc0(nn.Module):  # a model that calls only one of the stack's layers
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16, name="fc0")(x)


def _random_b(params, seed):
    """B = 0 at init would make every adapter the base: give each a non-zero B."""
    return jax.tree_util.tree_map_with_path(
        lambda p, v: jax.random.normal(jax.random.key(seed), v.shape) if "lora_b" in str(p) else v,
        params,
    )


@pytest.fixture(scope="module")
def linen_setup():
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (len(INDEX), 3, 8))
    base = model.init(jax.random.key(0), x)["params"]
    layouts = jaxlora.layouts(model, x)
    adapters = []
    for i, (r, alpha) in enumerate(RANKS_ALPHAS):
        config = jaxlora.LoRAConfig(r=r, alpha=alpha, targets=r"fc\d")
        params = jaxlora.inject(base, config, jax.random.key(10 + i), layouts=layouts)
        params = _random_b(params, 20 + i)
        adapters.append((params, config))
    return model, base, x, adapters


def _alone(model, base, adapters, x, i):
    if i == -1:
        return model.apply({"params": base}, x)
    params, config = adapters[i]
    with jaxlora.intercept(config):
        return model.apply({"params": params}, x)


def _served(model):
    traces = []

    @jax.jit
    def forward(stack, base, x, index):
        traces.append(1)  # runs once per trace
        with jaxlora.intercept_stack(stack, index):
            return model.apply({"params": base}, x)

    return forward, traces


def test_linen_rows_equal_their_own_adapter(linen_setup):
    model, base, x, adapters = linen_setup
    stack = jaxlora.stack_adapters(adapters, capacity=4)
    forward, _ = _served(model)
    y = forward(stack, base, x, jnp.array(INDEX))
    for row, i in enumerate(INDEX):
        ref = _alone(model, base, adapters, x[row : row + 1], i)[0]
        np.testing.assert_allclose(y[row], ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    # Base-only rows add an exact zero: equal to the base model on the same batch, bit for bit.
    y_base = jax.jit(model.apply)({"params": base}, x)
    rows = [row for row, i in enumerate(INDEX) if i == -1]
    np.testing.assert_array_equal(y[np.array(rows)], y_base[np.array(rows)])
    assert not np.allclose(y[0], y[1])  # the adapters really differ


def test_linen_replacing_an_adapter_does_not_recompile(linen_setup):
    model, base, x, adapters = linen_setup
    stack = jaxlora.stack_adapters(adapters[:2], capacity=4, rank=4)
    forward, traces = _served(model)
    forward(stack, base, x, jnp.array([0, 1, -1, 0, 1, -1]))
    stack = stack.set(2, *adapters[2]).set(0, *adapters[1])  # add one, replace one
    y = forward(stack, base, x, jnp.array([2, 0, -1, 2, 0, 1]))
    stack = stack.clear(1)
    forward(stack, base, x, jnp.array([2, 0, -1, 2, 0, 0]))
    assert len(traces) == 1
    for row, i in enumerate([2, 1, -1, 2, 1, 1]):
        ref = _alone(model, base, adapters, x[row : row + 1], i)[0]
        np.testing.assert_allclose(y[row], ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def test_traced_bad_index_gives_nan_rows(linen_setup):
    model, base, x, adapters = linen_setup
    stack = jaxlora.stack_adapters(adapters[:2], capacity=3)
    forward, _ = _served(model)
    y = forward(stack, base, x, jnp.array([0, 2, -1, 5, -2, 1]))  # 2 is empty, 5 and -2 invalid
    rows_nan = np.isnan(np.asarray(y)).any(axis=(1, 2))
    assert rows_nan.tolist() == [False, True, False, True, True, False]


def test_linen_refusals(linen_setup):
    model, base, x, adapters = linen_setup
    stack = jaxlora.stack_adapters(adapters, capacity=3)
    params0, config0 = adapters[0]

    def run(stack, index, params=base):
        with jaxlora.intercept_stack(stack, index):
            return model.apply({"params": params}, x)

    with pytest.raises(TypeError, match="integer array"):
        run(stack, jnp.zeros(len(INDEX)))
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        run(stack, jnp.zeros((len(INDEX), 1), jnp.int32))
    with pytest.raises(ValueError, match=r"layer 'fc0'.*index has shape \(2,\)"):
        run(stack, jnp.array([0, 1]))
    with pytest.raises(ValueError, match=r"values \[3\] name no adapter"):
        run(stack, jnp.array([0, 3, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"values \[1\] name no adapter"):
        run(stack.clear(1), jnp.array(INDEX))
    with pytest.raises(ValueError, match="capacity 3"):
        stack.set(3, params0, config0)
    with pytest.raises(ValueError, match=r"r=4, above the stack's rank 2"):
        jaxlora.stack_adapters(adapters[:1], capacity=2).set(1, *adapters[1])
    fewer = jaxlora.LoRAConfig(r=2, targets=r"fc[02]")
    with pytest.raises(ValueError, match=r"missing \['fc1'\]"):
        stack.set(0, jaxlora.inject(base, fewer, jax.random.key(0)), fewer)
    wide_base = MLP().init(jax.random.key(0), jnp.ones((1, 5)))["params"]
    wide_layouts = jaxlora.layouts(MLP(), jnp.ones((1, 5)))
    wide = jaxlora.inject(wide_base, config0, jax.random.key(0), layouts=wide_layouts)
    with pytest.raises(ValueError, match=r"layer 'fc0'.*\(5, 16\).*another base"):
        stack.set(0, wide, config0)
    with pytest.raises(ValueError, match=r"layer 'fc0'.*kernel has shape \(5, 16\)"):
        with jaxlora.intercept_stack(stack, jnp.array([0])):
            model.apply({"params": wide_base}, jnp.ones((1, 5)))
    with pytest.raises(ValueError, match=r"layer 'fc0' holds its own"):
        run(stack, jnp.array(INDEX), params0)
    with pytest.raises(ValueError, match="already active"):
        with jaxlora.intercept(config0), jaxlora.intercept_stack(stack, jnp.array(INDEX)):
            pass
    with pytest.raises(ValueError, match=r"r=2 \(from its shapes\) but the config gives it r=4"):
        stack.set(0, params0, adapters[1][1])
    pissa = jaxlora.LoRAConfig(r=2, alpha=4.0, targets=r"fc\d", init="pissa")
    with pytest.raises(ValueError, match="init='pissa' is relative to a residual"):
        stack.set(0, params0, pissa)


def test_linen_stack_layers_never_called_are_an_error(linen_setup):
    _, base, x, adapters = linen_setup
    stack = jaxlora.stack_adapters(adapters, capacity=3)
    with pytest.raises(ValueError, match=r"\['fc1', 'fc2'\] were never called"):
        with jaxlora.intercept_stack(stack, jnp.array(INDEX)):
            OnlyFc0().apply({"params": {"fc0": base["fc0"]}}, x)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc0 = nnx.Linear(8, 16, rngs=rngs)
        self.fc1 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc1(jax.nn.relu(self.fc0(x)))


@pytest.fixture(scope="module")
def nnx_setup():
    base = NnxMLP(nnx.Rngs(0))
    sources = []
    for i, (r, alpha) in enumerate(RANKS_ALPHAS):
        model = nnx.clone(base)
        jnnx.inject(model, jaxlora.LoRAConfig(r=r, alpha=alpha, targets=r"fc\d"), rngs=nnx.Rngs(i))
        for layer in (model.fc0, model.fc1):
            layer.lora_b[...] = jax.random.normal(jax.random.key(20 + i), layer.lora_b.shape)
        sources.append(model)
    return base, sources


def test_nnx_rows_equal_their_own_adapter_and_no_recompile(nnx_setup):
    base, sources = nnx_setup
    serving = jnnx.to_multi(nnx.clone(sources[0]), capacity=4, rank=4)
    for slot, source in enumerate(sources[:2]):
        jnnx.set_adapter(serving, slot, source)
    traces = []

    @nnx.jit
    def forward(model, x, index):
        traces.append(1)
        with jnnx.adapter_index(index):
            return model(x)

    x = jax.random.normal(jax.random.key(1), (len(INDEX), 3, 8))
    forward(serving, x, jnp.array([0, 1, -1, 0, 1, -1]))
    jnnx.set_adapter(serving, 2, sources[2])
    y = forward(serving, x, jnp.array(INDEX))
    assert len(traces) == 1
    for row, i in enumerate(INDEX):
        ref = (base if i == -1 else sources[i])(x[row])
        np.testing.assert_allclose(y[row], ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    rows = np.array([row for row, i in enumerate(INDEX) if i == -1])
    y_base = nnx.jit(lambda model, x: model(x))(base, x)  # the base on the same batch
    np.testing.assert_array_equal(y[rows], y_base[rows])
    jnnx.clear_adapter(serving, 1)
    with pytest.raises(ValueError, match=r"values \[1\] name no adapter"):
        with jnnx.adapter_index(jnp.array(INDEX)):
            serving(x)


def test_nnx_refusals(nnx_setup):
    base, sources = nnx_setup
    serving = jnnx.to_multi(nnx.clone(sources[0]), capacity=2, rank=2)
    with pytest.raises(ValueError, match="outside jaxlora.nnx.adapter_index"):
        serving(jnp.ones((2, 8)))
    with pytest.raises(TypeError, match="integer array"):
        with jnnx.adapter_index(jnp.zeros(2)):
            pass
    with pytest.raises(ValueError, match=r"index has shape \(3,\)"):
        with jnnx.adapter_index(jnp.zeros(3, jnp.int32)):
            serving(jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="capacity 2"):
        jnnx.set_adapter(serving, 2, sources[0])
    with pytest.raises(ValueError, match=r"layer 'fc0' has r=4, above the stack's rank 2"):
        jnnx.set_adapter(serving, 0, sources[1])
    fewer = nnx.clone(base)
    jnnx.inject(fewer, jaxlora.LoRAConfig(r=2, targets=["fc0"]), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"missing \['fc1'\]"):
        jnnx.set_adapter(serving, 0, fewer)
    other = NnxMLP(nnx.Rngs(0))
    other.fc0 = nnx.Linear(5, 16, rngs=nnx.Rngs(0))
    jnnx.inject(other, jaxlora.LoRAConfig(r=2, targets=r"fc\d"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"layer 'fc0'.*\(5, 16\).*another base"):
        jnnx.set_adapter(serving, 0, other)
    retrained = nnx.clone(sources[0])
    retrained.fc1.kernel[...] = retrained.fc1.kernel[...] + 1.0  # a fine-tuned base
    with pytest.raises(ValueError, match=r"layer 'fc1'.*kernel differs from the stack's base"):
        jnnx.set_adapter(serving, 0, retrained)
    pissa = nnx.clone(base)
    jnnx.inject(pissa, jaxlora.LoRAConfig(r=2, targets=r"fc\d", init="pissa"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"kernel differs.*init='pissa'"):
        jnnx.set_adapter(serving, 0, pissa)
    assert not bool(serving.fc1.occupied[...].any())  # the refused sets changed nothing
    # refused until tests/test_stacked_serving.py, which serves them: an nnx.vmap stack's
    # LoRALinear holds its stacks with the layer axis in front, sliced per layer by nnx.scan
    scanned = jgpt.NnxScanGPT(jgpt.GPTConfig(**SCAN_CFG), rngs=nnx.Rngs(0))
    jnnx.inject(scanned, jaxlora.LoRAConfig(r=2, targets=["query"]), nnx.Rngs(1))
    jnnx.to_multi(scanned, capacity=2)
    query = scanned.blocks.attn.query
    assert isinstance(query, jnnx.MultiLoRALinear) and query.lora_a.shape == (2, 2, 8, 2)


def test_linen_stack_on_a_quantized_base():
    """QLoRA serving: the stack's adapters on an nf4 base, each row as its adapter alone."""
    from jaxlora.quant import quantize_base

    model = nn.Sequential([nn.Dense(32), jax.nn.relu, nn.Dense(4)])
    x = jax.random.normal(jax.random.key(0), (4, 16))
    variables = model.init(jax.random.key(0), x)
    config = jaxlora.LoRAConfig(r=2, alpha=4.0, targets=["layers_0", "layers_2"])
    adapters = [_random_b(jaxlora.inject(variables, config, jax.random.key(i)), i) for i in (1, 2)]
    stack = jaxlora.stack_adapters([(a, config) for a in adapters])
    quantized = [quantize_base(a, config) for a in adapters]
    base = {"params": jaxlora.split(quantized[0]["params"])[1], "quant": quantized[0]["quant"]}
    index = [1, -1, 0, 1]
    with jaxlora.intercept_stack(stack, jnp.array(index)):
        y = model.apply(base, x)
    for row, i in enumerate(index):
        with jaxlora.intercept(config):  # the quantized base alone, or with adapter i
            ref = model.apply(base if i == -1 else quantized[i], x[row : row + 1])
        np.testing.assert_allclose(y[row], ref[0], rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 5),
    rank=st.integers(1, 4),
    index=st.lists(st.integers(-1, 4), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_gathered_branch_is_each_rows_own_branch(n, rank, index, seed):
    """Closed form, in float64 numpy: row i is ``scale[k] · x[i] @ a[k] @ b[k]`` for
    k = index[i], 0 for -1, NaN for an index past the stack."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(index), 3, 5)).astype("f4")
    a = rng.standard_normal((n, 5, rank)).astype("f4")
    b = rng.standard_normal((n, rank, 7)).astype("f4")
    scale = rng.uniform(0.5, 2.0, n).astype("f4")
    y = multi.gathered_branch(
        jnp.asarray(x), a, b, scale, jnp.ones(n, bool), jnp.asarray(index, jnp.int32)
    )
    for row, k in enumerate(index):
        if k >= n:
            assert np.isnan(np.asarray(y[row])).all()
            continue
        ref = np.zeros((3, 7)) if k == -1 else scale[k] * (x[row] @ a[k].astype("f8")) @ b[k]
        np.testing.assert_allclose(y[row], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(initial=1))


def test_linen_scanned_adapters_need_their_params_by_name():
    """Refused until tests/test_stacked_serving.py, which serves them: an nn.scan'ned
    nn.Dense's stack holds every layer's factors, which reach the scan body through
    stack.params(base); applied on the plain base, the scan body has none: refused by name."""
    model = jgpt.ScanGPT(jgpt.GPTConfig(**SCAN_CFG))
    tokens = jnp.zeros((1, 8), jnp.int32)
    config = jaxlora.LoRAConfig(r=2, targets=["query"])
    params = model.init(jax.random.key(0), tokens)["params"]
    params = jaxlora.inject(
        params, config, jax.random.key(1), layouts=jaxlora.layouts(model, tokens)
    )
    stack = jaxlora.stack_adapters([(params, config)])
    assert stack.scanned == (("blocks.attn.query", 0),)
    with pytest.raises(ValueError, match=r"layer 'blocks.attn.query' is stacked by nn.scan"):
        with jaxlora.intercept_stack(stack, jnp.zeros(1, jnp.int32)):
            model.apply({"params": jaxlora.split(params)[1]}, tokens)


def test_linen_layer_contracting_the_examples_axis_is_refused():
    model = nn.Sequential([nn.DenseGeneral(4, axis=0)])
    x = jnp.ones((6, 8))
    base = model.init(jax.random.key(0), x)["params"]
    config = jaxlora.LoRAConfig(r=2, targets=["layers_0"])
    stack = jaxlora.stack_adapters([(jaxlora.inject(base, config, jax.random.key(1)), config)])
    with pytest.raises(ValueError, match="layer 'layers_0' contracts its input's axis 0"):
        with jaxlora.intercept_stack(stack, jnp.zeros(6, jnp.int32)):
            model.apply({"params": base}, x)


def test_dora_adapters_are_refused_by_stacks():
    """A stack's branch has no magnitude: a DoRA adapter would be served without it."""
    model = nn.Dense(4)
    base = model.init(jax.random.key(0), jnp.ones((1, 6)))["params"]
    config = jaxlora.LoRAConfig(r=2, targets=["fc"], use_dora=True)
    params = jaxlora.inject({"fc": base}, config, jax.random.key(1))
    with pytest.raises(ValueError, match=r"layer 'fc' is a DoRA adapter"):
        jaxlora.stack_adapters([(params, config)], capacity=2)

    class Net(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(6, 4, rngs=nnx.Rngs(0))

    net = jnnx.inject(Net(), config, nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"to_multi: layers \['fc'\] are DoRA"):
        jnnx.to_multi(net, capacity=2)
    assert isinstance(net.fc, jnnx.LoRALinear)  # unchanged
    plain = jnnx.inject(Net(), jaxlora.LoRAConfig(r=2, targets=["fc"]), nnx.Rngs(1))
    jnnx.to_multi(plain, capacity=2)
    with pytest.raises(ValueError, match=r"set_adapter: layer 'fc' is a DoRA adapter"):
        jnnx.set_adapter(plain, 0, net)
