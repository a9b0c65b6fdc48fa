"""DenseGeneral, Conv and Embed adapters in unmodified Linen models, against numpy merges."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxlora

VOCAB, FEATURES, HEADS, HEAD_DIM = 11, 6, 2, 3


class Model(nn.Module):
    @nn.compact
    def __call__(self, tokens):  # tokens (batch, height, width)
        embed = nn.Embed(VOCAB, FEATURES, name="embed")
        x = embed(tokens)
        x = nn.Conv(FEATURES, (3, 3), strides=(1, 2), kernel_dilation=(2, 1), name="conv")(x)
        x = nn.DenseGeneral((HEADS, HEAD_DIM), name="heads")(nn.relu(x))
        x = nn.DenseGeneral(FEATURES, axis=(-2, -1), name="merge")(x)
        return embed.attend(x)


TARGETS = ["embed", "conv", "heads", "merge"]
TOKENS = jnp.arange(2 * 5 * 6).reshape(2, 5, 6) % VOCAB


def _setup(r=2, alpha=3.0):
    model = Model()
    variables = model.init(jax.random.key(0), TOKENS)
    config = jaxlora.LoRAConfig(r=r, alpha=alpha, targets=TARGETS)
    shapes = jaxlora.layouts(model, TOKENS)
    lora = jaxlora.inject(variables, config, jax.random.key(1), layouts=shapes)
    return model, variables, config, lora


def _randomize(params, seed=0):
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree_util.tree_map_with_path(
        lambda p, v: (
            jax.random.normal(next(keys), v.shape) * 0.3 if p[-1].key in ("lora_a", "lora_b") else v
        ),
        params,
    )


def _numpy_merge(params, scale):
    """The closed form: base + scale · (a.reshape(-1, r) @ b.reshape(r, -1)).reshape(base)."""
    out = {}
    for name, node in params["params"].items():
        node = {k: np.asarray(v, np.float64) for k, v in node.items()}
        base = "embedding" if "embedding" in node else "kernel"
        a, b = node.pop("lora_a"), node.pop("lora_b")
        r = a.shape[-1]
        node[base] = node[base] + scale * (a.reshape(-1, r) @ b.reshape(r, -1)).reshape(
            node[base].shape
        )
        out[name] = node
    return {"params": out}


def test_layouts_and_leaf_shapes():
    model, _, _, lora = _setup()
    shapes = jaxlora.layouts(model, TOKENS)
    assert shapes == {
        "embed": jaxlora.Layout("embed", 1, 2),
        "conv": jaxlora.Layout("conv", 1, 4),
        "heads": jaxlora.Layout("linear", 1, 3),
        "merge": jaxlora.Layout("linear", 2, 3),
    }
    got = {k: (v["lora_a"].shape, v["lora_b"].shape) for k, v in lora["params"].items()}
    assert got == {
        "embed": ((VOCAB, 2), (2, FEATURES)),
        "conv": ((3, 3, FEATURES, 2), (1, 1, 2, FEATURES)),
        "heads": ((FEATURES, 2), (2, HEADS, HEAD_DIM)),
        "merge": ((HEADS, HEAD_DIM, 2), (2, FEATURES)),
    }
    # PEFT's embedding init: A zero, B standard normal; the others: A random, B zero.
    assert not lora["params"]["embed"]["lora_a"].any()
    assert 0.5 < float(jnp.std(lora["params"]["embed"]["lora_b"])) < 1.5
    for name in ("conv", "heads", "merge"):
        assert not lora["params"][name]["lora_b"].any()
        a = lora["params"][name]["lora_a"]
        bound = 1 / np.sqrt(np.prod(a.shape[:-1]))  # torch's kaiming_uniform(a=√5) on (r, in)
        assert float(jnp.abs(a).max()) <= bound and float(jnp.abs(a).max()) > 0.5 * bound


def test_fresh_adapter_leaves_the_output_unchanged():
    model, variables, config, lora = _setup()
    with jaxlora.intercept(config):
        adapted = model.apply(lora, TOKENS)
    np.testing.assert_allclose(adapted, model.apply(variables, TOKENS), rtol=1e-6, atol=1e-6)


def test_forward_and_merge_equal_the_numpy_merged_model():
    model, variables, config, lora = _setup()
    lora = _randomize(lora)
    scale = 3.0 / 2
    with jax.default_matmul_precision("highest"):
        with jaxlora.intercept(config):
            adapted = model.apply(lora, TOKENS)
        reference = model.apply(jax.tree.map(jnp.asarray, _numpy_merge(lora, scale)), TOKENS)
        merged, record = jaxlora.merge(lora, alpha=config.alpha, record=True)
        np.testing.assert_allclose(adapted, reference, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(model.apply(merged, TOKENS), reference, rtol=1e-5, atol=1e-5)
    expected = _numpy_merge(lora, scale)["params"]
    for name, node in merged["params"].items():
        assert set(node) == set(variables["params"][name])
        for leaf, value in node.items():
            np.testing.assert_allclose(value, expected[name][leaf], rtol=1e-6, atol=1e-6)
    back = jaxlora.unmerge(merged, record)
    for name in TARGETS:
        for leaf, value in lora["params"][name].items():
            np.testing.assert_allclose(back["params"][name][leaf], value, atol=1e-5)


def test_every_adapter_gets_a_gradient():
    model, _, config, lora = _setup()
    lora = _randomize(lora)
    adapter, base = jaxlora.split(lora)

    @jax.grad
    def grads(adapter):
        with jaxlora.intercept(config):
            return jnp.sum(model.apply(jaxlora.combine(adapter, base), TOKENS) ** 2)

    for name, node in grads(adapter)["params"].items():
        for leaf, g in node.items():
            assert float(jnp.abs(g).max()) > 0, (name, leaf)


def test_layout_mismatch_and_pissa_errors():
    model, variables, _, lora = _setup()
    swapped = jax.tree.map(lambda v: v, lora)
    swapped["params"]["merge"]["lora_a"] = jnp.zeros((HEADS * HEAD_DIM, 2))  # flattened
    with pytest.raises(ValueError, match=r"layer 'merge': 'lora_a' \(6, 2\) and 'lora_b' "):
        jaxlora.merge(swapped, alpha=None)
    swapped["params"]["merge"]["lora_b"] = jnp.zeros((2, HEADS, FEATURES))
    with pytest.raises(ValueError, match=r"layer 'merge', 'lora_a': expected shape \(2, 2\)"):
        jaxlora.merge(swapped, alpha=None)
    with pytest.raises(ValueError, match=r"init='pissa' adapts linear layers only, not a conv"):
        jaxlora.inject(
            variables,
            jaxlora.LoRAConfig(r=2, targets=["conv"], init="pissa"),
            jax.random.key(0),
            layouts=jaxlora.layouts(model, TOKENS),
        )


def test_pissa_on_a_dense_general_kernel_keeps_the_output():
    model, variables, _, _ = _setup()
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=["heads", "merge"], init="pissa")
    lora = jaxlora.inject(
        variables, config, jax.random.key(0), layouts=jaxlora.layouts(model, TOKENS)
    )
    with jax.default_matmul_precision("highest"), jaxlora.intercept(config):
        np.testing.assert_allclose(
            model.apply(lora, TOKENS), model.apply(variables, TOKENS), rtol=1e-5, atol=1e-5
        )


class Partitioned(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(
            VOCAB,
            FEATURES,
            embedding_init=nn.with_partitioning(nn.initializers.normal(), ("vocab", "embed")),
        )(tokens)
        x = nn.Conv(
            4,
            (3,),
            kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "in", "out")),
        )(x)
        return nn.DenseGeneral(
            (2, 2),
            kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("in", "heads", "kv")),
        )(x)


def test_adapters_inherit_the_partitioning():
    model = Partitioned()
    tokens = jnp.zeros((1, 5), jnp.int32)
    variables = model.init(jax.random.key(0), tokens)
    config = jaxlora.LoRAConfig(r=2, targets=["Embed_0", "Conv_0", "DenseGeneral_0"])
    lora = jaxlora.inject(
        variables, config, jax.random.key(1), layouts=jaxlora.layouts(model, tokens)
    )
    names = {
        (layer, leaf): box.names
        for layer, node in lora["params"].items()
        for leaf, box in node.items()
        if leaf.startswith("lora")
    }
    assert names == {
        ("Embed_0", "lora_a"): ("vocab", None),
        ("Embed_0", "lora_b"): (None, "embed"),
        ("Conv_0", "lora_a"): (None, "in", None),
        ("Conv_0", "lora_b"): (None, None, "out"),
        ("DenseGeneral_0", "lora_a"): ("in", None),
        ("DenseGeneral_0", "lora_b"): (None, "heads", "kv"),
    }
    with jaxlora.intercept(config):
        model.apply(lora, tokens)  # the boxed leaves are used as they are


class LoRAModel(nn.Module):
    """``Model`` written with jaxlora's Linen layers: the same params tree as the injected one."""

    @nn.compact
    def __call__(self, tokens, deterministic=True):
        lora = dict(r=2, alpha=3.0)
        embed = jaxlora.LoRAEmbed(VOCAB, FEATURES, name="embed", **lora)
        x = embed(tokens)
        x = jaxlora.LoRAConv(
            FEATURES, (3, 3), strides=(1, 2), kernel_dilation=(2, 1), name="conv", **lora
        )(x, deterministic)
        x = jaxlora.LoRADenseGeneral((HEADS, HEAD_DIM), name="heads", **lora)(nn.relu(x))
        x = jaxlora.LoRADenseGeneral(FEATURES, axis=(-2, -1), name="merge", **lora)(x)
        return embed.attend(x)


def test_linen_lora_layers_equal_the_injected_model():
    model, _, config, lora = _setup()
    own = LoRAModel().init(jax.random.key(0), TOKENS)
    assert jax.tree.map(jnp.shape, own) == jax.tree.map(jnp.shape, lora)
    params = _randomize(own, seed=4)
    with jax.default_matmul_precision("highest"):
        with jaxlora.intercept(config):
            expected = model.apply(params, TOKENS)
        np.testing.assert_allclose(LoRAModel().apply(params, TOKENS), expected, rtol=1e-6)
        merged = model.apply(jaxlora.merge(params, alpha=config.alpha), TOKENS)
        np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-5)


def test_linen_lora_layer_errors():
    with pytest.raises(
        ValueError, match=r"LoRAConv at '<root>': r must be in \[1, min\(in, out\)\]"
    ):
        jaxlora.LoRAConv(2, (1,), r=3, name="conv").init(jax.random.key(0), jnp.ones((1, 4, 8)))
    with pytest.raises(ValueError, match="grouped or masked convs are not supported"):
        jaxlora.LoRAConv(4, (3,), feature_group_count=2, r=1).init(
            jax.random.key(0), jnp.ones((1, 4, 4))
        )
    with pytest.raises(ValueError, match="batch_dims is not supported"):
        jaxlora.LoRADenseGeneral(4, batch_dims=(0,), r=1).init(jax.random.key(0), jnp.ones((2, 3)))


def test_partition_specs_cover_every_kind():
    from jax.sharding import PartitionSpec as P

    _, _, _, lora = _setup()
    base_specs = {
        "embed": {"embedding": P("vocab", "embed")},
        "conv": {"kernel": P(None, None, "embed", "mlp")},
        "heads": {"kernel": P("embed", "heads")},  # trailing axes: replicated
        "merge": {"kernel": P("heads", None, "embed")},
    }
    specs = jaxlora.partition_specs(lora["params"], base_specs)
    got = {k: (v["lora_a"], v["lora_b"]) for k, v in specs.items()}
    assert got == {
        "embed": (P("vocab", None), P(None, "embed")),
        "conv": (P(None, None, "embed", None), P(None, None, None, "mlp")),
        "heads": (P("embed", None), P(None, "heads", None)),
        "merge": (P("heads", None, None), P(None, "embed")),
    }
    adapter, _ = jaxlora.split(lora["params"])
    with pytest.raises(ValueError, match=r"partition_specs: layer 'embed' has .* but no"):
        jaxlora.partition_specs(adapter, base_specs)  # the adapter alone has no base weight
