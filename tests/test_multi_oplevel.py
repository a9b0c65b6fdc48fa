"""Many adapters in one batch at op-level weights (einsum / ``x @ kernel.T`` products).

Each row of a mixed batch equals its own adapter alone, on the single-adapter op-level path
and in a closed form in numpy float64 (every weight replaced by ``W + s·delta``, the delta
written per layer as an einsum over the factors' own letters, independently of
``jaxlora.oplevel``'s role rule); base rows (index -1) equal the base model bit for bit;
setting, replacing and clearing adapters does not retrace; refusals name the layer and change
nothing. fp32 tolerance: 1e-5 of the output's scale.
"""

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
from tests._nnx_products import Conv1DLike as Conv1D

jax.config.update("jax_default_matmul_precision", "highest")

D, N, H, F, T = 8, 2, 3, 6, 3
RANKS_ALPHAS = [(2, 4.0), (4, 3.0), (1, 1.0)]  # mixed ranks and scales in one stack
INDEX = [0, 1, -1, 2, 1, -1]
TOL = 1e-5
# layer: (delta "A,B->W" in the weight's own axis order, numpy product f(x, W))
LAYERS = {
    "q": ("dr,rnh->dnh", lambda x, w: np.einsum("btd,dnh->btnh", x, w)),
    "o": ("nhr,rd->nhd", lambda x, w: np.einsum("btnh,nhd->btd", x, w)),
    "c": ("ir,ro->oi", lambda x, w: x @ w.T),  # FlaxConv1D: kernel (out, in)
    "wf": ("dr,rf->fd", lambda x, w: np.einsum("fd,btd->btf", w, x)),  # the weight on the left
    "fc": ("ir,ro->io", lambda x, w: x @ w),  # a plain Dense / Linear beside them
}
WEIGHT = {"q": "w", "o": "w", "c": "kernel", "wf": "w", "fc": "kernel"}


def _numpy_forward(weights: dict, row) -> np.ndarray:
    """The model in float64 on one example: q → o → c (+ bias) → tanh → wf → fc (+ bias)."""
    h = np.asarray(row, np.float64)[None]
    for name in ("q", "o", "c", "wf", "fc"):
        h = LAYERS[name][1](h, weights[name])
        if name in ("c", "fc"):
            h = h + weights[name + "_bias"]
        if name == "c":
            h = np.tanh(h)
    return h[0]


def _merged(layers: dict, scales: dict) -> dict:
    """{layer: W + s·delta} (and biases) in float64 from {layer: {weight, bias, a, b}}."""
    out = {}
    for name, node in layers.items():
        w = np.asarray(node[WEIGHT[name]], np.float64)
        if "lora_a" in node:
            a, b = (np.asarray(node[k], np.float64) for k in ("lora_a", "lora_b"))
            w = w + scales[name] * np.einsum(LAYERS[name][0], a, b)
        out[name] = w
        if "bias" in node:
            out[name + "_bias"] = np.asarray(node["bias"], np.float64)
    return out


def _close(got, want) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL * max(np.abs(want).max(), 1.0))


# ---------------------------------------------------------------- NNX


class Einsum(nnx.Module):
    """tunix's ``Einsum``; ``weight_first`` puts the weight on the left of the product."""

    def __init__(self, eqn: str, shape, rngs: nnx.Rngs, weight_first: bool = False):
        self.eqn, self.weight_first = eqn, weight_first
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape) / np.sqrt(shape[0]))

    def __call__(self, x):
        w = self.w[...]
        return jnp.einsum(self.eqn, w, x) if self.weight_first else jnp.einsum(self.eqn, x, w)


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q = Einsum("BTD,DNH->BTNH", (D, N, H), rngs)
        self.o = Einsum("BTNH,NHD->BTD", (N, H, D), rngs)
        self.c = Conv1D(D, D, rngs)
        self.wf = Einsum("FD,BTD->BTF", (F, D), rngs, weight_first=True)
        self.fc = nnx.Linear(F, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc(self.wf(jnp.tanh(self.c(self.o(self.q(x))))))


TARGETS = ["q", "o", "c", "wf", "fc"]
X = jax.random.normal(jax.random.key(1), (len(INDEX), T, D))


def _nnx_sources():
    base = Net(nnx.Rngs(0))
    sources = []
    for i, (r, alpha) in enumerate(RANKS_ALPHAS):
        model = nnx.clone(base)
        config = jaxlora.LoRAConfig(r=r, alpha=alpha, targets=TARGETS)
        jnnx.inject(model, config, nnx.Rngs(10 + i), inputs=(X,))
        for k, name in enumerate(TARGETS):  # B = 0 at init would make every adapter the base
            layer = getattr(model, name)
            key = jax.random.key(20 + 5 * i + k)
            layer.lora_b[...] = jax.random.normal(key, layer.lora_b.shape)
        sources.append(model)
    return base, sources


@pytest.fixture(scope="module")
def nnx_setup():
    return _nnx_sources()


def _nnx_closed_form(model: nnx.Module, x) -> np.ndarray:
    layers, scales = {}, {}
    for name in TARGETS:
        layer = getattr(model, name)
        node = {WEIGHT[name]: getattr(layer, WEIGHT[name])[...]}
        if getattr(layer, "bias", None) is not None:
            node["bias"] = layer.bias[...]
        if hasattr(layer, "lora_a"):
            node.update(lora_a=layer.lora_a[...], lora_b=layer.lora_b[...])
            scales[name] = layer.scaling
        layers[name] = node
    return _numpy_forward(_merged(layers, scales), x)


def _nnx_forward():
    traces = []

    @nnx.jit
    def forward(model, x, index):
        traces.append(1)  # runs once per trace
        with jnnx.adapter_index(index):
            return model(x)

    return forward, traces


def _serving(sources, slots=None, capacity=4, rank=4):
    serving = jnnx.to_multi(nnx.clone(sources[0]), capacity=capacity, rank=rank)
    for slot, source in enumerate(sources if slots is None else slots):
        jnnx.set_adapter(serving, slot, source)
    return serving


def test_nnx_layers_become_stacks_in_the_product_layout(nnx_setup):
    _, sources = nnx_setup
    serving = _serving(sources)
    shapes = {
        name: (getattr(serving, name).lora_a.shape, getattr(serving, name).lora_b.shape)
        for name in TARGETS
    }
    assert shapes == {
        "q": ((4, D, 4), (4, 4, N, H)),  # contracted then r; r then the free axes
        "o": ((4, N, H, 4), (4, 4, D)),
        "c": ((4, D, 4), (4, 4, D)),  # in = axis 1 of the (out, in) kernel
        "wf": ((4, D, 4), (4, 4, F)),
        "fc": ((4, F, 4), (4, 4, 4)),
    }
    assert isinstance(serving.q, jnnx.MultiOpAdapter) and isinstance(serving.q, Einsum)
    assert isinstance(serving.fc, jnnx.MultiLoRALinear)
    assert not nnx.state(serving, nnx.LoRAParam)  # served, never trained


def test_nnx_rows_equal_their_own_adapter(nnx_setup):
    base, sources = nnx_setup
    forward, _ = _nnx_forward()
    y = forward(_serving(sources), X, jnp.array(INDEX))
    alone = {i: (base if i == -1 else sources[i])(X) for i in set(INDEX)}
    for row, i in enumerate(INDEX):
        _close(y[row], alone[i][row])  # the single-adapter op-level path
        _close(y[row], _nnx_closed_form(base if i == -1 else sources[i], X[row]))
    # A wrong gather (rows given another adapter) would be caught: the adapters differ.
    for i, j in ((0, 1), (1, 2), (0, 2), (0, -1)):
        assert np.abs(np.asarray(alone[i] - alone[j])).max() > 1e-2
    # Base-only rows add an exact zero: the base model on the same batch, bit for bit.
    rows = np.array([row for row, i in enumerate(INDEX) if i == -1])
    y_base = nnx.jit(lambda model, x: model(x))(base, X)
    np.testing.assert_array_equal(np.asarray(y)[rows], np.asarray(y_base)[rows])


def test_nnx_set_replace_clear_do_not_retrace(nnx_setup):
    base, sources = nnx_setup
    serving = _serving(sources, slots=sources[:2], capacity=3)
    forward, traces = _nnx_forward()
    forward(serving, X, jnp.array([0, 1, -1, 0, 1, -1]))
    jnnx.set_adapter(serving, 2, sources[2])  # add one
    jnnx.set_adapter(serving, 0, sources[1])  # replace one (another rank)
    y = forward(serving, X, jnp.array([2, 0, -1, 2, 0, 1]))
    jnnx.clear_adapter(serving, 1)
    y_cleared = forward(serving, X, jnp.array([2, 0, -1, 2, 0, 0]))
    assert len(traces) == 1
    for row, i in enumerate([2, 1, -1, 2, 1, 1]):
        _close(y[row], _nnx_closed_form(base if i == -1 else sources[i], X[row]))
    _close(y_cleared[5], _nnx_closed_form(sources[1], X[5]))
    with pytest.raises(ValueError, match=r"layer 'q'.*values \[1\] name no adapter"):
        with jnnx.adapter_index(jnp.array(INDEX)):
            serving(X)


@settings(max_examples=12, deadline=None)
@given(index=st.lists(st.integers(-1, 2), min_size=len(INDEX), max_size=len(INDEX)))
def test_nnx_any_index_gathers_each_rows_adapter(index):
    base, sources = _CACHE.setdefault("nnx", _nnx_sources())
    if "served" not in _CACHE:
        _CACHE["served"] = (_serving(sources, capacity=3), *_nnx_forward())
        _CACHE["refs"] = {i: (base if i == -1 else sources[i])(X) for i in range(-1, 3)}
    serving, forward, traces = _CACHE["served"]
    y = forward(serving, X, jnp.asarray(index, jnp.int32))
    for row, i in enumerate(index):
        _close(y[row], _CACHE["refs"][i][row])
    assert len(traces) == 1


_CACHE: dict = {}


def _state(model) -> dict:
    def value(v):
        is_key = jnp.issubdtype(v.dtype, jax.dtypes.prng_key)
        return np.asarray(jax.random.key_data(v) if is_key else v)

    return jax.tree.map(value, nnx.to_pure_dict(nnx.state(model)))


def _same(a: dict, b: dict) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and jax.tree.all(
        jax.tree.map(np.array_equal, a, b)
    )


class Experts(nnx.Module):
    def __init__(self):
        self.moe = Einsum("EBD,EDF->EBF", (3, D, F), nnx.Rngs(0))

    def __call__(self, x):
        return self.moe(x)


def test_nnx_batch_axes_are_refused_and_change_nothing():
    model = Experts()
    x = jnp.ones((3, 4, D))
    jnnx.inject(model, jaxlora.LoRAConfig(r=2, targets=["moe"]), nnx.Rngs(1), inputs=(x,))
    before = _state(model)
    match = r"to_multi: layer 'moe': the weight \(3, 8, 6\) has batch axes \[0\]"
    with pytest.raises(ValueError, match=match):
        jnnx.to_multi(model, capacity=2)
    assert isinstance(model.moe, jnnx.OpAdapter) and _same(before, _state(model))


class SwapEinsum(Einsum):
    """Moves the examples off axis 0 inside the layer, before its product."""

    def __call__(self, x):
        return jnp.einsum(self.eqn, jnp.swapaxes(x, 0, 1), self.w[...])


class Transposed(nnx.Module):
    """Examples moved off the activation's axis 0 (T = B, so shapes alone cannot tell)."""

    def __init__(self):
        self.proj = SwapEinsum("TBD,DF->TBF", (D, F), nnx.Rngs(0))

    def __call__(self, x):
        return self.proj(x)


class Summed(nnx.Module):
    """Examples summed away before the product."""

    def __init__(self):
        self.proj = Einsum("BTD,DF->TF", (D, F), nnx.Rngs(0))

    def __call__(self, x):
        return self.proj(x)


class Contracted(nnx.Module):
    """The product contracts its activation's axis 0 (the examples) with the weight."""

    def __init__(self):
        self.proj = Einsum("BD,BF->DF", (4, F), nnx.Rngs(0))

    def __call__(self, x):
        return self.proj(x)


@pytest.mark.parametrize(
    ("make", "shape", "match"),
    [
        (Transposed, (4, 4, D), r"layer 'proj': the product's activation \(4, 4, 8\).*axes \[1\]"),
        (Summed, (4, T, D), r"layer 'proj': the product's activation \(3, 8\).*axes \[\]"),
        (Contracted, (4, D), r"layer 'proj': .*cannot be traced with 5 examples"),
    ],
    ids=["transposed", "summed", "contracted"],
)
def test_nnx_examples_not_on_axis_0_are_refused(make, shape, match):
    model = make()
    x = jax.random.normal(jax.random.key(0), shape)
    jnnx.inject(model, jaxlora.LoRAConfig(r=2, targets=["proj"]), nnx.Rngs(1), inputs=(x,))
    source = nnx.clone(model)
    jnnx.to_multi(model, capacity=2)
    jnnx.set_adapter(model, 0, source)
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        with jnnx.adapter_index(jnp.zeros(shape[0], jnp.int32)):
            model(x)
    assert _same(before, _state(model))


def test_nnx_set_adapter_refusals_change_nothing(nnx_setup):
    base, sources = nnx_setup
    serving = _serving(sources[:1], capacity=2, rank=2)
    before = _state(serving)
    with pytest.raises(ValueError, match=r"layer '\w+' has r=4, above the stack's rank 2"):
        jnnx.set_adapter(serving, 1, sources[1])
    other = nnx.clone(sources[0])
    other.c.kernel[...] = other.c.kernel[...] + 1.0  # another base
    with pytest.raises(ValueError, match=r"layer 'c'.*kernel differs from the stack's base"):
        jnnx.set_adapter(serving, 1, other)
    dense = nnx.clone(base)  # 'q' adapted as nothing: the adapter's layers differ
    jnnx.inject(dense, jaxlora.LoRAConfig(r=2, targets=["fc"]), nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"missing \['c', 'o', 'q', 'wf'\]"):
        jnnx.set_adapter(serving, 1, dense)
    assert _same(before, _state(serving))


# ---------------------------------------------------------------- Linen


class LinenEinsum(nn.Module):
    eqn: str
    shape: tuple[int, ...]
    weight_first: bool = False

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(1 / np.sqrt(self.shape[0])), self.shape)
        return jnp.einsum(self.eqn, w, x) if self.weight_first else jnp.einsum(self.eqn, x, w)


class FlaxConv1D(nn.Module):
    """transformers 4.57's ``FlaxConv1D``: kernel (out, in), ``x @ kernel.T + bias``."""

    features: int

    @nn.compact
    def __call__(self, inputs):
        kernel = self.param("kernel", nn.initializers.normal(0.3), (self.features, D))
        y = jax.lax.dot_general(inputs, kernel.T, (((inputs.ndim - 1,), (0,)), ((), ())))
        return y + self.param("bias", nn.initializers.normal(1.0), (self.features,))


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = LinenEinsum("BTD,DNH->BTNH", (D, N, H), name="q")(x)
        h = LinenEinsum("BTNH,NHD->BTD", (N, H, D), name="o")(h)
        h = jnp.tanh(FlaxConv1D(D, name="c")(h))
        h = LinenEinsum("FD,BTD->BTF", (F, D), weight_first=True, name="wf")(h)
        return nn.Dense(4, name="fc")(h)


@pytest.fixture(scope="module")
def linen_setup():
    model = LinenNet()
    base = model.init(jax.random.key(0), X)["params"]
    layouts = jaxlora.layouts(model, X)
    adapters = []
    for i, (r, alpha) in enumerate(RANKS_ALPHAS):
        config = jaxlora.LoRAConfig(r=r, alpha=alpha, targets=TARGETS)
        params = jaxlora.inject(base, config, jax.random.key(10 + i), layouts=layouts)
        for k, name in enumerate(TARGETS):
            node = dict(params[name])
            node["lora_b"] = jax.random.normal(jax.random.key(20 + 5 * i + k), node["lora_b"].shape)
            params = {**params, name: node}
        adapters.append((params, config))
    return model, base, adapters


def _linen_closed_form(params, config, x) -> np.ndarray:
    scales = {n: config.alpha_for(n) / config.rank_for(n) for n in TARGETS} if config else {}
    return _numpy_forward(_merged(params, scales), x)


def _linen_forward(model):
    traces = []

    @jax.jit
    def forward(stack, base, x, index):
        traces.append(1)
        with jaxlora.intercept_stack(stack, index):
            return model.apply({"params": base}, x)

    return forward, traces


def test_linen_rows_equal_their_own_adapter(linen_setup):
    model, base, adapters = linen_setup
    stack = jaxlora.stack_adapters(adapters, capacity=4)
    assert stack.lora_a["o"].shape == (4, N, H, 4) and stack.lora_b["q"].shape == (4, 4, N, H)
    forward, _ = _linen_forward(model)
    y = forward(stack, base, X, jnp.array(INDEX))
    for row, i in enumerate(INDEX):
        if i == -1:
            ref = model.apply({"params": base}, X[row : row + 1])[0]
            _close(y[row], _linen_closed_form(base, None, X[row]))
        else:
            with jaxlora.intercept(adapters[i][1]):  # the single-adapter product path
                ref = model.apply({"params": adapters[i][0]}, X[row : row + 1])[0]
            _close(y[row], _linen_closed_form(*adapters[i], X[row]))
        _close(y[row], ref)
    rows = np.array([row for row, i in enumerate(INDEX) if i == -1])
    y_base = jax.jit(model.apply)({"params": base}, X)
    np.testing.assert_array_equal(np.asarray(y)[rows], np.asarray(y_base)[rows])


def test_linen_set_replace_clear_do_not_retrace(linen_setup):
    model, base, adapters = linen_setup
    stack = jaxlora.stack_adapters(adapters[:2], capacity=3, rank=4)
    forward, traces = _linen_forward(model)
    forward(stack, base, X, jnp.array([0, 1, -1, 0, 1, -1]))
    stack = stack.set(2, *adapters[2]).set(0, *adapters[1])
    y = forward(stack, base, X, jnp.array([2, 0, -1, 2, 0, 1]))
    forward(stack.clear(1), base, X, jnp.array([2, 0, -1, 2, 0, 0]))
    assert len(traces) == 1
    for row, i in enumerate([2, 1, -1, 2, 1, 1]):
        _close(y[row], _linen_closed_form(*(adapters[i] if i >= 0 else (base, None)), X[row]))


def test_linen_refusals(linen_setup):
    model, base, adapters = linen_setup
    stack = jaxlora.stack_adapters(adapters[:1], capacity=2)
    with pytest.raises(ValueError, match=r"r=4, above the stack's rank 2"):
        stack.set(1, *adapters[1])
    with pytest.raises(ValueError, match=r"layer 'q' holds its own \['lora_a', 'lora_b'"):
        with jaxlora.intercept_stack(stack, jnp.array([0, -1, 0, 0, -1, 0])):
            model.apply({"params": adapters[0][0]}, X)
    with pytest.raises(ValueError, match=r"intercept_stack: adapter index values \[1, 2\]"):
        with jaxlora.intercept_stack(stack, jnp.array(INDEX)):
            model.apply({"params": base}, X)

    class Experts(nn.Module):
        @nn.compact
        def __call__(self, x):
            return LinenEinsum("EBD,EDF->EBF", (3, D, F), name="moe")(x)

    x = jnp.ones((3, 4, D))
    variables = Experts().init(jax.random.key(0), x)
    config = jaxlora.LoRAConfig(r=2, targets=["moe"])
    layouts = jaxlora.layouts(Experts(), x)
    moe = jaxlora.inject(variables, config, jax.random.key(1), layouts=layouts)
    with pytest.raises(ValueError, match=r"layer 'moe': the weight \(3, 8, 6\) has batch axes"):
        jaxlora.stack_adapters([(moe, config)])
    with pytest.raises(ValueError, match=r"layer 'moe': the weight \(3, 8, 6\) has batch axes"):
        stack.set(0, moe, config)
    np.testing.assert_array_equal(stack.occupied, [True, False])  # a new stack, never this one


def test_linen_examples_not_on_axis_0_are_refused():
    class SwapEinsum(LinenEinsum):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.initializers.normal(0.5), self.shape)
            return jnp.einsum(self.eqn, jnp.swapaxes(x, 0, 1), w)

    class Transposed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return SwapEinsum("TBD,DF->TBF", (D, F), name="proj")(x)

    model = Transposed()
    x = jax.random.normal(jax.random.key(0), (4, 4, D))
    variables = model.init(jax.random.key(0), x)
    config = jaxlora.LoRAConfig(r=2, targets=["proj"])
    params = jaxlora.inject(variables, config, jax.random.key(1), layouts=jaxlora.layouts(model, x))
    stack = jaxlora.stack_adapters([(params, config)])
    match = r"layer 'proj': the product's activation \(4, 4, 8\).*axes \[1\] follow the batch"
    with pytest.raises(ValueError, match=match):
        with jaxlora.intercept_stack(stack, jnp.zeros(4, jnp.int32)):
            model.apply(variables, x)
