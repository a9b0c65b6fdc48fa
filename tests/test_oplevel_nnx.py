"""Op-level LoRA in NNX (``inject(..., inputs=)``): any module whose weight enters one product.

The references are closed forms in numpy float64: the same product with the weight replaced
by ``W + s·delta``, the delta written out per case (``delta_eqn``) independently of
``jaxlora.oplevel``'s role rule. fp32 tolerance: 2e-5 of the output's scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlora
from jaxlora import nnx as jnnx
from tests._nnx_products import Conv1DLike, Einsum, Holder, WeightFirst, einsum_case
from tests._train import nnx_lora_step

R, ALPHA = 3, 6.0
S = ALPHA / R
TOL = 2e-5


class Dot(nnx.Module):
    """``jax.lax.dot_general`` / ``jnp.dot`` / a merging reshape, chosen by ``how``."""

    def __init__(self, how: str, rngs: nnx.Rngs):
        self.how = how
        self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 2, 3)) / 3.0)

    def __call__(self, x):
        w = self.w[...]
        if self.how == "reshape":
            return jnp.dot(x, w.reshape(8, 6))
        return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@jax.jit
def _jitted_product(x, w):
    return jnp.einsum("bd,dnh->bnh", x, w)


class Jitted(Dot):
    """The product inside a jitted helper (a nested jaxpr the weight enters)."""

    def __call__(self, x):
        return _jitted_product(x, self.w[...])


# name: (module factory, input shape, delta einsum over (A, B), the product in numpy)
CASES = {
    "llama_q": einsum_case(Einsum, "BTD,DNH->BTNH", (8, 2, 4), (2, 5, 8), "dr,rnh->dnh"),
    "llama_o": einsum_case(Einsum, "BTNH,NHD->BTD", (2, 4, 8), (2, 5, 2, 4), "nhr,rd->nhd"),
    "gemma_q": einsum_case(Einsum, "BTD,NDH->BTNH", (2, 8, 4), (2, 5, 8), "dr,rnh->ndh"),
    "gemma_kv": einsum_case(Einsum, "BSD,CKDH->CBSKH", (2, 2, 8, 4), (2, 5, 8), "dr,rckh->ckdh"),
    "moe": einsum_case(Einsum, "EBD,EDF->EBF", (3, 8, 6), (3, 5, 8), "edr,erf->edf"),
    "weight_first": einsum_case(WeightFirst, "NDH,BTD->BTNH", (2, 8, 4), (2, 5, 8), "dr,rnh->ndh"),
    "conv1d_transpose": (
        lambda r: Conv1DLike(8, 6, r),
        (2, 5, 8),
        "ir,ro->oi",
        None,  # x @ w.T + bias: written in _reference
    ),
    "dot_general": (
        lambda r: Dot("dot_general", r),
        (4, 8),
        "dr,rnh->dnh",
        lambda x, w: np.einsum("bd,dnh->bnh", x, w),
    ),
    "jitted_helper": (
        lambda r: Jitted("jit", r),
        (4, 8),
        "dr,rnh->dnh",
        lambda x, w: np.einsum("bd,dnh->bnh", x, w),
    ),
    "merging_reshape": (
        lambda r: Dot("reshape", r),
        (4, 8),
        "dr,rnh->dnh",
        lambda x, w: x @ w.reshape(8, 6),
    ),
}


def _model(name: str):
    make, shape, _, _ = CASES[name]
    model = Holder(make(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), shape)
    return model, x


def _injected(name: str, dropout: float = 0.0):
    model, x = _model(name)
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["proj"], dropout=dropout)
    jnnx.inject(model, config, nnx.Rngs(2), inputs=(x,))
    layer = model.proj
    # A nonzero B, so the branch counts.
    layer.lora_b[...] = jax.random.normal(jax.random.key(3), layer.lora_b.shape)
    return model, x


def _weight_name(layer) -> str:
    return "kernel" if isinstance(layer, Conv1DLike) else "w"


def _reference(name: str, layer, x, a, b) -> np.ndarray:
    """The product in float64 with ``W + s·delta``."""
    _, _, delta_eqn, product = CASES[name]
    w = np.asarray(getattr(layer, _weight_name(layer))[...], np.float64)
    w = w + S * np.einsum(delta_eqn, np.asarray(a, np.float64), np.asarray(b, np.float64))
    x = np.asarray(x, np.float64)
    if product is None:
        return x @ w.T + np.asarray(layer.bias[...], np.float64)
    return product(x, w)


def _close(got, want) -> None:
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape
    scale = max(np.abs(want).max(), 1.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL * scale)


@pytest.mark.parametrize("name", list(CASES))
def test_output_is_the_product_with_the_adapted_weight(name):
    model, x = _injected(name)
    layer = model.proj
    assert isinstance(layer, jnnx.OpAdapter)
    want = _reference(name, layer, x, layer.lora_a[...], layer.lora_b[...])
    _close(model(x), want)
    _close(nnx.jit(lambda m, x: m(x))(model, x), want)  # and under jit (cached trace)


@pytest.mark.parametrize(
    ("name", "shape_a", "shape_b"),
    [
        ("llama_q", (8, R), (R, 2, 4)),
        ("llama_o", (2, 4, R), (R, 8)),
        ("gemma_q", (8, R), (R, 2, 4)),
        ("gemma_kv", (8, R), (R, 2, 2, 4)),  # C free: one A shared by k and v
        ("moe", (3, 8, R), (3, R, 6)),  # E batch: one adapter per expert
        ("conv1d_transpose", (8, R), (R, 6)),  # in, out: whatever the kernel's layout
    ],
)
def test_adapter_shapes_follow_the_contraction(name, shape_a, shape_b):
    model, _ = _injected(name)
    assert model.proj.lora_a.shape == shape_a
    assert model.proj.lora_b.shape == shape_b
    assert type(model.proj.lora_a) is nnx.LoRAParam


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_the_closed_form(name):
    model, x = _injected(name)
    layer = model.proj
    cot = jax.random.normal(jax.random.key(4), model(x).shape)
    _, _, delta_eqn, _ = CASES[name]
    w = getattr(layer, _weight_name(layer))[...]

    def closed(a, b):
        merged = w + S * jnp.einsum(delta_eqn, a, b, precision="highest")
        if isinstance(layer, Conv1DLike):
            return jnp.sum((x @ merged.T + layer.bias[...]) * cot)
        return jnp.sum(_jax_product(name, x, merged) * cot)

    want_a, want_b = jax.grad(closed, argnums=(0, 1))(layer.lora_a[...], layer.lora_b[...])
    grads = nnx.grad(lambda m: jnp.sum(m(x) * cot), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    for got, want in (
        (grads["proj"]["lora_a"][...], want_a),
        (grads["proj"]["lora_b"][...], want_b),
    ):
        _close(got, np.asarray(want, np.float64))


def _jax_product(name, x, w):
    eqns = {
        "llama_q": "btd,dnh->btnh",
        "llama_o": "btnh,nhd->btd",
        "gemma_q": "btd,ndh->btnh",
        "gemma_kv": "bsd,ckdh->cbskh",
        "moe": "ebd,edf->ebf",
        "dot_general": "bd,dnh->bnh",
        "jitted_helper": "bd,dnh->bnh",
    }
    if name == "weight_first":
        return jnp.einsum("ndh,btd->btnh", w, x, precision="highest")
    if name == "merging_reshape":
        return jnp.dot(x, w.reshape(8, 6), precision="highest")
    return jnp.einsum(eqns[name], x, w, precision="highest")


@pytest.mark.parametrize("name", list(CASES))
def test_merge_equals_unmerged_and_restores_the_type(name):
    model, x = _injected(name)
    layer = model.proj
    want = _reference(name, layer, x, layer.lora_a[...], layer.lora_b[...])
    _, _, delta_eqn, _ = CASES[name]
    weight = np.asarray(getattr(layer, _weight_name(layer))[...], np.float64)
    merged_want = weight + S * np.einsum(
        delta_eqn, np.asarray(layer.lora_a[...], np.float64), np.asarray(layer.lora_b[...])
    )
    unmerged = model(x)
    jnnx.merge(model)
    plain = model.proj
    assert type(plain) is CASES[name][0](nnx.Rngs(0)).__class__
    assert not nnx.state(plain, nnx.LoRAParam)
    _close(getattr(plain, _weight_name(plain))[...], merged_want)
    _close(model(x), want)
    _close(unmerged, want)


class Half(Einsum):
    """Computes in bf16 from fp32 storage, as ``dtype=bfloat16`` layers do."""

    def __call__(self, x):
        return jnp.einsum(self.shape_eqn, x.astype(jnp.bfloat16), self.w[...].astype(jnp.bfloat16))


def test_bf16_compute_keeps_fp32_adapters():
    model = Holder(Half("BTD,DNH->BTNH", (8, 2, 4), nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["proj"])
    jnnx.inject(model, config, nnx.Rngs(2), inputs=(x,))
    layer = model.proj
    layer.lora_b[...] = jax.random.normal(jax.random.key(3), layer.lora_b.shape)
    assert layer.lora_a[...].dtype == layer.lora_b[...].dtype == jnp.float32
    y = model(x)
    assert y.dtype == jnp.bfloat16
    want = _reference("llama_q", layer, x, layer.lora_a[...], layer.lora_b[...])
    scale = np.abs(want).max()
    # bf16 has an 8-bit mantissa: inputs, factors and products each round at ~4e-3.
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=0, atol=3e-2 * scale)


def test_a_model_that_cannot_be_traced_is_refused():
    model, x = _model("llama_q")
    with pytest.raises(ValueError, match="could not be traced on the inputs given"):
        jnnx.inject(
            model, jaxlora.LoRAConfig(r=2, targets=["proj"]), nnx.Rngs(1), inputs=(x[..., :3],)
        )
    assert type(model.proj) is Einsum


def test_training_moves_only_the_adapter():
    model, x = _model("llama_q")
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["proj"])
    jnnx.inject(model, config, nnx.Rngs(2), inputs=(x,))
    target = jax.random.normal(jax.random.key(5), model(x).shape)
    w0 = np.asarray(model.proj.w[...])
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    losses = [float(nnx_lora_step(model, opt, x, target)[0]) for _ in range(5)]
    assert losses[-1] < losses[0]
    assert np.array_equal(np.asarray(model.proj.w[...]), w0)  # base bit-identical
    assert np.abs(np.asarray(model.proj.lora_b[...])).max() > 0


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_functional_jax_jit_with_split_and_merge(dropout):
    """NNX's functional pattern: ``nnx.merge`` inside ``jax.jit`` and ``jax.grad``. Failed
    before (the call wrote every variable back, also unchanged ones of the outer trace)."""
    model, x = _injected("llama_q", dropout=dropout)
    layer = model.proj
    want = _reference("llama_q", layer, x, layer.lora_a[...], layer.lora_b[...])
    model.eval()
    graph, adapter, rest = nnx.split(model, nnx.LoRAParam, ...)

    def forward(adapter, rest, x):
        return nnx.merge(graph, adapter, rest)(x)

    _close(jax.jit(forward)(adapter, rest, x), want)
    grads = jax.jit(jax.grad(lambda a: jnp.sum(forward(a, rest, x) ** 2)))(adapter)
    assert float(jnp.abs(grads["proj"]["lora_a"][...]).max()) > 0
    model.train()
    graph, adapter, rest = nnx.split(model, nnx.LoRAParam, ...)

    def step(adapter, rest, x):
        m = nnx.merge(graph, adapter, rest)
        y = m(x)
        return y, nnx.split(m, nnx.LoRAParam, ...)[2]

    _, new_rest = jax.jit(step)(adapter, rest, x)
    counts = [v for p, v in nnx.to_flat_state(new_rest) if "count" in p]
    old = [v for p, v in nnx.to_flat_state(rest) if "count" in p]
    # training with dropout advances the branch's rng count; without, nothing is written
    advanced = [int(n[...]) - int(o[...]) for n, o in zip(counts, old, strict=True)]
    assert advanced == ([1] if dropout else [0])


def test_dropout_is_on_the_branch_input_only():
    model, x = _injected("llama_q", dropout=0.5)
    layer = model.proj
    want = _reference("llama_q", layer, x, layer.lora_a[...], layer.lora_b[...])
    model.eval()
    _close(model(x), want)  # eval: dropout is the identity
    model.train()
    assert not np.allclose(np.asarray(model(x)), want, atol=1e-3)
    layer.lora_b[...] = jnp.zeros_like(layer.lora_b[...])
    base = np.einsum("btd,dnh->btnh", np.asarray(x, np.float64), np.asarray(layer.w[...]))
    _close(model(x), base)  # the base path sees the undropped input


def test_the_branch_is_factored_in_the_compiled_flops():
    b, t, d, n, h = 2, 4, 64, 4, 16
    model = Holder(Einsum("BTD,DNH->BTNH", (d, n, h), nnx.Rngs(0)))
    x = jnp.ones((b, t, d))

    def flops(m):
        graphdef, state = nnx.split(m)
        fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
        return fn.lower(state, x).compile().cost_analysis()["flops"]

    base = flops(model)
    jnnx.inject(model, jaxlora.LoRAConfig(r=R, targets=["proj"]), nnx.Rngs(1), inputs=(x,))
    adapted = flops(model)
    branch = 2 * b * t * d * R + 2 * b * t * R * n * h
    materialised = 2 * d * R * n * h
    elementwise = 2 * b * t * (R + n * h)  # the scale and the add
    assert base == 2 * b * t * d * n * h
    assert base + branch <= adapted <= base + branch + elementwise < base + branch + materialised


def test_a_linear_subclass_is_adapted_as_lora_linear_is():
    """The op-level rule on ``x @ kernel`` gives LoRALinear's tree and numbers: the Linear
    path is an instance of the general rule."""

    class MyLinear(nnx.Linear):
        def __call__(self, x):  # its own __call__: not adaptable as a plain nnx.Linear
            return super().__call__(x)

    x = jax.random.normal(jax.random.key(1), (4, 8))
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["proj"])
    mine = jnnx.inject(Holder(MyLinear(8, 6, rngs=nnx.Rngs(0))), config, nnx.Rngs(2), inputs=(x,))
    plain = jnnx.inject(Holder(nnx.Linear(8, 6, rngs=nnx.Rngs(0))), config, nnx.Rngs(2))
    assert isinstance(mine.proj, jnnx.OpAdapter) and isinstance(plain.proj, jnnx.LoRALinear)
    assert mine.proj.lora_a.shape == plain.proj.lora_a.shape == (8, R)
    assert mine.proj.lora_b.shape == plain.proj.lora_b.shape == (R, 6)
    b = jax.random.normal(jax.random.key(3), (R, 6))
    for model in (mine, plain):
        model.proj.lora_a[...] = plain.proj.lora_a[...]
        model.proj.lora_b[...] = b
    np.testing.assert_allclose(mine(x), plain(x), rtol=1e-6, atol=1e-6)


class Misuse(nnx.Module):
    def __init__(self, how: str, rngs: nnx.Rngs):
        self.how = how
        self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 6)))

    def __call__(self, x):
        w = self.w[...]
        if self.how == "tanh":
            return x @ jnp.tanh(w)
        if self.how == "plus_sum":
            return x @ w + w.sum()
        if self.how == "two_products":
            return x @ w + (2 * x) @ w
        if self.how == "splitting_reshape":
            return jnp.einsum("bd,dnh->bnh", x, w.reshape(8, 2, 3))
        return x * w.sum()  # "no_product"


class Twice(nnx.Module):
    def __init__(self, rngs):
        self.proj = Einsum("BD,DF->BF", (8, 8), rngs)

    def __call__(self, x):
        return self.proj(self.proj(x))


class Shared(nnx.Module):
    """``proj``'s weight is also read by its parent (a tied head)."""

    def __init__(self, rngs):
        self.proj = Einsum("BD,DF->BF", (8, 8), rngs)

    def __call__(self, x):
        return self.proj(x) + x @ self.proj.w[...].T


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (
            Holder(Misuse("tanh", nnx.Rngs(0))),
            r"layer 'proj'.*weight 'w' \(8, 6\): used only by tanh",
        ),
        (Holder(Misuse("plus_sum", nnx.Rngs(0))), r"layer 'proj', weight 'w'.*reduce_sum"),
        (Holder(Misuse("two_products", nnx.Rngs(0))), r"layer 'proj', weight 'w'.*2 products"),
        (Holder(Misuse("splitting_reshape", nnx.Rngs(0))), r"weight 'w'.*splits"),
        (
            Holder(Misuse("no_product", nnx.Rngs(0))),
            r"layer 'proj'.*no nnx.Param.*weight 'w' \(8, 6\): used only by reduce_sum",
        ),
        (Twice(nnx.Rngs(0)), r"layer 'proj', weight 'w'.*2 products"),
        (Shared(nnx.Rngs(0)), r"layer 'proj', weight 'w'.*2 products"),
    ],
    ids=["nonlinear", "also_reduced", "two_products", "split", "no_product", "twice", "shared"],
)
def test_refusals_name_the_path_and_change_nothing(model, match):
    x = jnp.ones((4, 8))
    before = jax.tree.map(np.asarray, nnx.state(model))
    kinds = [type(m) for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)]
    config = jaxlora.LoRAConfig(r=2, targets=["proj"])
    with pytest.raises(ValueError, match=match):
        jnnx.inject(model, config, nnx.Rngs(1), inputs=(x,))
    after = jax.tree.map(np.asarray, nnx.state(model))
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))
    assert kinds == [type(m) for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)]
    assert not hasattr(model, "lora_config")


def test_unmatched_targets_and_missing_inputs_are_refused():
    model, x = _model("llama_q")
    with pytest.raises(ValueError, match="proj"):
        jnnx.inject(model, jaxlora.LoRAConfig(r=2, targets=["q_proj"]), nnx.Rngs(1), inputs=(x,))
    with pytest.raises(TypeError, match=r"'proj' is a Einsum.*inputs="):
        jnnx.inject(model, jaxlora.LoRAConfig(r=2, targets=["proj"]), nnx.Rngs(1))
    assert type(model.proj) is Einsum and not nnx.state(model, nnx.LoRAParam)


def test_rank_above_the_contraction_is_refused():
    model, x = _model("llama_q")  # in = D = 8, out = N·H = 8
    with pytest.raises(ValueError, match=r"layer 'proj'.*r"):
        jnnx.inject(model, jaxlora.LoRAConfig(r=9, targets=["proj"]), nnx.Rngs(1), inputs=(x,))
    assert type(model.proj) is Einsum


def test_adapter_files_refuse_batch_axes_without_an_experts_spec(tmp_path):
    # An adapter per MoE expert is one torch Linear per expert, which path_map must name
    # (HFLinear(experts=...), tests/test_oplevel_slices.py); without it: refused.
    model, _ = _injected("moe")
    match = r"layer 'proj', weight 'w' \(3, 8, 6\).*axis 0 \(size 3\) is a batch axis.*experts="
    with pytest.raises(ValueError, match=match):
        jnnx.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
