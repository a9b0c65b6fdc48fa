"""One mechanism (issue #13 item 2): a known linear layer is an instance of the op-level rule.

``nn.Dense``, ``nn.DenseGeneral``, ``nnx.Linear`` (``LoRALinear``) and ``nnx.LinearGeneral``
compute their branch, merge delta and torch layout through the product rule
(``jaxlora.oplevel``) with the roles of their static contraction (``Roles.linear``). So the
same projection written as an einsum module, adapted where its weight enters the product,
must give the same bits as the known layer holding the same kernel and factors: output,
gradients of both factors, merged kernel and PEFT tensors. A drift of either path (another
formula, order of operations, layout trick or rounding) fails here. No bias: the two paths
add a bias at different points (the layer's own order), which is not the branch's business.

The numbers are also checked against closed forms in numpy float64, so two paths that
drifted together would fail too.
"""

from __future__ import annotations

import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from safetensors.numpy import load_file

import jaxlora
from jaxlora import nnx as jnnx
from jaxlora import oplevel

R, ALPHA = 2, 6.0
S = ALPHA / R
CONFIG = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["proj"])


def _dense_general_in(x, w):
    # Flax's DenseGeneral product: jnp.einsum("bnh,nho->bo") lists the contracted axes in
    # another order, (2, 1), so its base product sums in another order and rounds differently
    # (not the branch's business); this op-level adapter is on Flax's own dot_general.
    return jax.lax.dot_general(x, w, (((1, 2), (0, 1)), ((), ())))


# name: (x shape, kernel shape, DenseGeneral's axis, the einsum of the layer's contraction,
# the same product as a module jaxlora does not know writes it)
CASES = {
    "dense": ((3, 4), (4, 5), (-1,), "bi,io->bo", functools.partial(jnp.einsum, "bi,io->bo")),
    "dense_general_out": (
        (3, 4),
        (4, 2, 3),
        (-1,),
        "bi,inh->bnh",
        functools.partial(jnp.einsum, "bi,inh->bnh"),
    ),
    "dense_general_in": ((3, 2, 4), (2, 4, 5), (-2, -1), "bnh,nho->bo", _dense_general_in),
}


def _values(kernel_shape: tuple[int, ...], in_axes: int):
    """kernel, lora_a (*in, r), lora_b (r, *out): all nonzero, so every path is exercised
    (numpy draws: nothing to compile)."""
    rng = np.random.default_rng(0)
    shapes = (kernel_shape, (*kernel_shape[:in_axes], R), (R, *kernel_shape[in_axes:]))
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)


def _input(x_shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(np.random.default_rng(7).standard_normal(x_shape), jnp.float32)


class LinenEinsum(nn.Module):
    """A module jaxlora does not know: ``product(x, kernel)`` (adapted at its product)."""

    case: str

    @nn.compact
    def __call__(self, x):
        _, shape, _, _, product = CASES[self.case]
        return product(x, self.param("kernel", nn.initializers.zeros, shape))


class LinenNet(nn.Module):
    case: str
    einsum: bool

    @nn.compact
    def __call__(self, x):
        _, shape, axis, _, _ = CASES[self.case]
        if self.einsum:
            return LinenEinsum(self.case, name="proj")(x)
        n_in = len(axis)
        if self.case == "dense":
            return nn.Dense(shape[-1], use_bias=False, name="proj")(x)
        return nn.DenseGeneral(shape[n_in:], axis=axis, use_bias=False, name="proj")(x)


def _linen(case: str, einsum: bool):
    """(forward(adapter, x), adapter, base, marker) with the shared kernel and factors."""
    x_shape, shape, axis, _, _ = CASES[case]
    x = _input(x_shape)
    model = LinenNet(case, einsum)
    params = model.init(jax.random.key(0), x)["params"]
    layouts = jaxlora.layouts(model, x)
    assert (layouts["proj"].kind == "product") == einsum  # the einsum is no known layer
    params = jaxlora.inject(params, CONFIG, jax.random.key(1), layouts=layouts)
    kernel, a, b = _values(shape, len(axis))
    params["proj"].update(kernel=kernel, lora_a=a, lora_b=b)
    adapter, base = jaxlora.split(params)

    def forward(adapter, x):
        with jaxlora.intercept(CONFIG):
            return model.apply({"params": jaxlora.combine(adapter, base)}, x)

    return forward, adapter, base, x


class NnxEinsum(nnx.Module):
    def __init__(self, case: str):
        self.case = case
        self.kernel = nnx.Param(jnp.zeros(CASES[case][1]))

    def __call__(self, x):
        return CASES[self.case][4](x, self.kernel[...])


class NnxNet(nnx.Module):
    def __init__(self, case: str, einsum: bool):
        _, shape, axis, _, _ = CASES[case]
        n_in = len(axis)
        rngs = nnx.Rngs(0)
        if einsum:
            self.proj = NnxEinsum(case)
        elif case == "dense":
            self.proj = nnx.Linear(shape[0], shape[1], use_bias=False, rngs=rngs)
        else:
            self.proj = nnx.LinearGeneral(
                shape[:n_in], shape[n_in:], axis=axis, use_bias=False, rngs=rngs
            )

    def __call__(self, x):
        return self.proj(x)


def _nnx(case: str, einsum: bool):
    x_shape, shape, axis, _, _ = CASES[case]
    x = _input(x_shape)
    model = NnxNet(case, einsum)
    jnnx.inject(model, CONFIG, nnx.Rngs(1), inputs=(x,))
    kernel, a, b = _values(shape, len(axis))
    model.proj.kernel[...] = kernel
    model.proj.lora_a[...] = a
    model.proj.lora_b[...] = b
    known = (jnnx.LoRALinear, jnnx.LoRALinearGeneral)
    assert isinstance(model.proj, known) != einsum  # the einsum is adapted at its product
    graph, adapter, rest = nnx.split(model, nnx.LoRAParam, ...)

    def forward(adapter, x):
        return nnx.merge(graph, adapter, rest)(x)

    return forward, adapter, (graph, rest), x


def _linen_merged_and_file(adapter, base):
    params = jaxlora.combine(adapter, base)
    merged = jaxlora.merge(params, alpha=ALPHA)["proj"]["kernel"]
    with tempfile.TemporaryDirectory() as directory:
        jaxlora.save_adapter(params, directory, CONFIG)
        tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
    return np.asarray(merged), tensors


def _nnx_merged_and_file(adapter, parts):
    graph, rest = parts
    model = nnx.merge(graph, adapter, rest)
    with tempfile.TemporaryDirectory() as directory:
        jnnx.save_adapter(model, directory, CONFIG)
        tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
    jnnx.merge(model)
    return np.asarray(model.proj.kernel[...]), tensors


def _results(build, finish, case: str, einsum: bool) -> dict[str, np.ndarray]:
    forward, adapter, base, x = build(case, einsum)
    grad = jax.grad(lambda a: jnp.sum(jnp.sin(forward(a, x))))
    merged, tensors = finish(adapter, base)
    found = {"y": jax.jit(forward)(adapter, x), "merged": merged, **tensors}
    leaves = jax.tree_util.tree_leaves_with_path(jax.jit(grad)(adapter))
    found.update({jax.tree_util.keystr(path): g for path, g in leaves})
    # the train step's products and layout barriers (core.factored's rank-first operands)
    ops = [op for op in _ops(grad, adapter) if op in ("dot_general", "optimization_barrier")]
    return {k: np.asarray(v) for k, v in found.items()}, sorted(ops)


def _reference(case: str) -> dict[str, np.ndarray]:
    """Closed forms in float64: y = x·(W + s·a b) over the layer's contraction, the factors'
    gradients of Σ sin(y), the merged kernel and PEFT's A (r, in), B (out, r)."""
    x_shape, shape, axis, eqn, _ = CASES[case]
    x = np.asarray(_input(x_shape), np.float64)
    kernel, a, b = (np.asarray(v, np.float64) for v in _values(shape, len(axis)))
    n_in = len(axis)
    flat_a, flat_b = a.reshape(-1, R), b.reshape(R, -1)
    delta = S * (flat_a @ flat_b).reshape(shape)
    y = np.einsum(eqn, x, kernel + delta)
    g = np.cos(y)  # dL/dy
    x_flat = x.reshape(x.shape[0], -1)
    g_flat = g.reshape(g.shape[0], -1)
    grad_a = S * x_flat.T @ (g_flat @ flat_b.T)
    grad_b = S * (x_flat @ flat_a).T @ g_flat
    return {
        "y": y,
        "merged": kernel + delta,
        "grad_a": grad_a.reshape(*shape[:n_in], R),
        "grad_b": grad_b.reshape(R, *shape[n_in:]),
        "A": flat_a.T,
        "B": flat_b.T,
    }


FRAMEWORKS = {"linen": (_linen, _linen_merged_and_file), "nnx": (_nnx, _nnx_merged_and_file)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_known_layer_and_einsum_adapter_agree_bit_for_bit(framework, case):
    build, finish = FRAMEWORKS[framework]
    known, known_ops = _results(build, finish, case, einsum=False)
    product, product_ops = _results(build, finish, case, einsum=True)
    assert known_ops == product_ops  # the same factored branch, not a second formula
    assert "optimization_barrier" in known_ops
    assert sorted(known) == sorted(product)
    assert any("lora_A" in k for k in known) and len(known) == 6  # y, merged, 2 grads, A, B
    for name, want in known.items():
        got = product[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert np.array_equal(got, want), (name, np.max(np.abs(got - want)))
    ref = _reference(case)
    by_role = {
        "y": "y",
        "merged": "merged",
        "lora_a": "grad_a",
        "lora_b": "grad_b",
        "lora_A": "A",
        "lora_B": "B",
    }
    for name, value in known.items():
        role = next(r for k, r in by_role.items() if k in name)
        np.testing.assert_allclose(value, ref[role], rtol=2e-5, atol=2e-5, err_msg=name)


def _ops(fn, *args) -> list[str]:
    """The primitives of ``fn``'s jaxpr, nested calls and custom rules inlined."""

    def walk(jaxpr) -> list[str]:
        out = []
        for eqn in jaxpr.eqns:
            inner = [v for v in eqn.params.values() if hasattr(v, "eqns") or hasattr(v, "jaxpr")]
            if inner:
                for sub in inner:
                    out += walk(getattr(sub, "jaxpr", sub))
            else:
                out.append(eqn.primitive.name)
        return out

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("case", list(CASES))
def test_known_layer_branch_is_the_product_rule(case):
    """The branch a known layer adds is ``oplevel.product_branch`` of its ``linear_product``,
    the function every op-level adapter calls: the same equations as that product's branch
    found by tracing the equivalent einsum (its dot_general's roles and dimension numbers)."""
    x_shape, shape, axis, _, product = CASES[case]
    x = _input(x_shape)
    kernel, a, b = _values(shape, len(axis))
    traced = jax.make_jaxpr(product)(x, kernel)
    found = oplevel.with_shape(oplevel.find_product(traced.jaxpr, 1, shape, where="einsum"), shape)
    static = oplevel.linear_product(x.ndim, shape, axis)
    assert static.side == found.side and static.roles.matches(found.roles)
    assert static.dims == tuple(tuple(map(tuple, d)) for d in found.dims)

    def known(x, a, b):
        return oplevel.linear_branch(x, a, b, S, axis)

    def by_trace(x, a, b):
        return oplevel.product_branch(found, x, a, b, S)

    assert _ops(known, x, a, b) == _ops(by_trace, x, a, b)
    grad = lambda f: jax.grad(lambda a, b: jnp.sum(jnp.sin(f(x, a, b))), (0, 1))  # noqa: E731
    assert _ops(grad(known), a, b) == _ops(grad(by_trace), a, b)
    assert "optimization_barrier" in _ops(grad(by_trace), a, b)  # the rank-first layout
