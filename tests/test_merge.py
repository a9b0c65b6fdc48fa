"""jaxlora.merge / unmerge: equal outputs, zero inference overhead, strict errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxlora


def _mlp(dense_1, dense_2):
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return dense_2(8, name="fc2")(jax.nn.relu(dense_1(64, name="fc1")(x)))

    return MLP()


LORA = _mlp(
    lambda f, name: jaxlora.LoRADense(f, 4, 8, name=name),
    lambda f, name: jaxlora.LoRADense(f, 2, 8, name=name),
)
PLAIN = _mlp(nn.Dense, nn.Dense)
X = jax.random.normal(jax.random.key(1), (16, 32))


def _variables():
    variables = LORA.init(jax.random.key(0), X)
    for name in ("fc1", "fc2"):
        shape = variables["params"][name]["lora_b"].shape
        variables["params"][name]["lora_b"] = jax.random.normal(jax.random.key(2), shape)
    return variables


def test_merged_tree_runs_in_the_plain_model_with_same_outputs():
    variables = _variables()
    merged = jaxlora.merge(variables, alpha=8)
    assert jax.tree.structure(merged) == jax.tree.structure(PLAIN.init(jax.random.key(0), X))
    np.testing.assert_allclose(
        PLAIN.apply(merged, X), LORA.apply(variables, X), rtol=1e-5, atol=1e-5
    )
    k = np.asarray(variables["params"]["fc1"]["kernel"], np.float64)
    a = np.asarray(variables["params"]["fc1"]["lora_a"], np.float64)
    b = np.asarray(variables["params"]["fc1"]["lora_b"], np.float64)
    np.testing.assert_allclose(merged["params"]["fc1"]["kernel"], k + 2.0 * a @ b, atol=1e-6)


def _flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_merged_forward_costs_exactly_the_plain_model():
    variables = _variables()
    merged = jaxlora.merge(variables, alpha=8)
    plain_params = PLAIN.init(jax.random.key(0), X)
    merged_flops = _flops(PLAIN.apply, merged, X)
    assert merged_flops == _flops(PLAIN.apply, plain_params, X)
    assert _flops(LORA.apply, variables, X) > merged_flops  # the unmerged branch costs more


def test_unmerge_inverts_merge_and_input_is_not_modified():
    variables = _variables()
    snapshot = jax.tree.map(np.array, variables)
    merged, record = jaxlora.merge(variables, alpha=8, record=True)
    jax.tree.map(np.testing.assert_array_equal, variables, snapshot)
    restored = jaxlora.unmerge(merged, record)
    assert jax.tree.structure(restored) == jax.tree.structure(variables)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), restored, variables)


def test_alpha_per_layer_and_rslora():
    variables = _variables()
    alphas = {"fc1": 8.0, "fc2": 1.0}
    merged = jaxlora.merge(variables, alpha=alphas.__getitem__, use_rslora=True)
    p = variables["params"]
    for name, r in (("fc1", 4), ("fc2", 2)):
        expected = (
            p[name]["kernel"] + alphas[name] / np.sqrt(r) * p[name]["lora_a"] @ p[name]["lora_b"]
        )
        np.testing.assert_allclose(merged["params"][name]["kernel"], expected, atol=1e-5)
    default = jaxlora.merge(variables, alpha=None)  # None means alpha = r: scaling 1
    np.testing.assert_allclose(
        default["params"]["fc2"]["kernel"],
        p["fc2"]["kernel"] + p["fc2"]["lora_a"] @ p["fc2"]["lora_b"],
        atol=1e-5,
    )


def test_bf16_kernel_merges_in_fp32_and_rounds_once():
    k = jax.random.normal(jax.random.key(0), (64, 64)).astype(jnp.bfloat16)
    a = (jax.random.normal(jax.random.key(1), (64, 8)) * 0.1).astype(jnp.bfloat16)
    b = (jax.random.normal(jax.random.key(2), (8, 64)) * 0.1).astype(jnp.bfloat16)
    merged = jaxlora.merge({"kernel": k, "lora_a": a, "lora_b": b}, alpha=16)["kernel"]
    exact = np.asarray(k, np.float64) + 2.0 * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    assert merged.dtype == jnp.bfloat16
    np.testing.assert_array_equal(merged, jnp.asarray(exact.astype(np.float32), jnp.bfloat16))


def test_merge_under_jit():
    variables = _variables()
    merged = jax.jit(lambda v: jaxlora.merge(v, alpha=8))(variables)
    np.testing.assert_allclose(
        merged["params"]["fc1"]["kernel"],
        jaxlora.merge(variables, alpha=8)["params"]["fc1"]["kernel"],
        atol=1e-6,
    )


def test_merge_refuses_non_finite():
    tree = {
        "layer": {
            "kernel": jnp.ones((4, 4)),
            "lora_a": jnp.full((4, 2), jnp.inf),
            "lora_b": jnp.ones((2, 4)),
        }
    }
    with pytest.raises(ValueError, match="layer 'layer': the merged kernel has non-finite"):
        jaxlora.merge(tree, alpha=None)


@pytest.mark.parametrize(
    "layer,match",
    [
        (
            {"kernel": jnp.ones((4, 3)), "lora_a": jnp.ones((4, 2))},
            r"layer 'blk.q' has \['kernel', 'lora_a'\] but no \['lora_b'\]",
        ),
        ({"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}, r"but no \['kernel'\]"),
        (
            {"kernel": jnp.ones((4, 3)), "lora_a": jnp.ones((5, 2)), "lora_b": jnp.ones((2, 3))},
            r"'lora_a': expected shape \(4, 2\) for a linear layer with 'kernel' \(4, 3\) and r=2, "
            r"got \(5, 2\)",
        ),
        (
            {"kernel": jnp.ones((4, 3)), "lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 7))},
            r"'lora_b': expected shape \(2, 3\) for a linear layer with 'kernel' \(4, 3\) and r=2, "
            r"got \(2, 7\)",
        ),
        (
            {"kernel": jnp.ones((4, 3)), "lora_a": jnp.ones((4, 5)), "lora_b": jnp.ones((5, 3))},
            r"r must be in \[1, min\(in, out\)\] = \[1, 3\], got 5",
        ),
    ],
    ids=["no-lora_b", "no-kernel", "lora_a-shape", "lora_b-shape", "rank-too-big"],
)
def test_merge_errors_name_the_layer(layer, match):
    with pytest.raises(ValueError, match=match):
        jaxlora.merge({"params": {"blk": {"q": layer}}}, alpha=None)


def test_merge_requires_alpha_and_rejects_bad_alpha():
    variables = _variables()
    with pytest.raises(TypeError, match="alpha"):
        jaxlora.merge(variables)  # no default: the scale must match the forward pass's
    with pytest.raises(ValueError, match="layer 'fc1': alpha must be a finite number > 0"):
        jaxlora.merge(variables, alpha=-1.0)


def test_unmerge_errors():
    variables = _variables()
    merged, record = jaxlora.merge(variables, alpha=8, record=True)
    with pytest.raises(ValueError, match="still holds LoRA leaves"):
        jaxlora.unmerge(variables, record)
    del merged["params"]["fc2"]
    with pytest.raises(ValueError, match="layer 'fc2': the merged tree has no kernel"):
        jaxlora.unmerge(merged, record)
