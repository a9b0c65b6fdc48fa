"""A weight the model also reads outside its own layer is refused by ``layouts``/``inject``.

transformers' ``FlaxGPT2LMHeadModel`` ties its head to the embedding table by reading the
table's params: ``lm_head.apply({"params": {"kernel": wte.T}})``. LoRA on ``wte`` would adapt
the lookups only (that read sees the base table), and ``merge`` would write the delta into the
table the head reads too: merged ≠ adapted, silently. ``jaxlora.layouts`` traces the model's
``apply`` and refuses every layer whose adapted weight is read outside its own calls, through
whatever Flax wraps around it (``nn.scan`` on any axis, ``nn.remat``, ``nn.jit``, ``nn.cond``);
``Embed.attend`` (the layer's own method) and reads of weights the adapter does not change
(a bias) are not refusals. The accepted cases are checked to merge to the adapted model.
NNX: ``jaxlora.nnx.inject(..., inputs=)`` does the same for the layers of known kinds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxlora
from jaxlora import nnx as jnnx

IDS = jnp.array([[1, 2, 3, 4], [5, 6, 7, 0]])
X = jnp.linspace(-1.0, 1.0, 24, dtype=jnp.float32).reshape(2, 3, 4)


class RawTiedHead(nn.Module):
    """FlaxGPT2LMHeadModel's tie: the head applied on the embedding's params, transposed."""

    @nn.compact
    def __call__(self, ids):
        h = nn.Dense(8, name="mid")(nn.Embed(16, 8, name="wte")(ids))
        table = self.variables["params"]["wte"]["embedding"]
        head = nn.Dense(16, use_bias=False, name="lm_head")
        return head.apply({"params": {"kernel": table.T}}, h)


class AttendTiedHead(nn.Module):
    """The tie through the layer's own method: ``Embed.attend`` uses the adapted table."""

    @nn.compact
    def __call__(self, ids):
        wte = nn.Embed(16, 8, name="wte")
        return wte.attend(nn.Dense(8, name="mid")(wte(ids)))


class KernelPenalty(nn.Module):
    """A parent that reads a child's kernel (a norm penalty added to the output)."""

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(4, name="proj")(x)
        return y + jnp.sum(self.variables["params"]["proj"]["kernel"] ** 2)


class BiasRead(nn.Module):
    """A parent that reads only the child's bias, which no adapter changes."""

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(4, name="proj")(x)
        return y + self.variables["params"]["proj"]["bias"]


class Einsum(nn.Module):
    """A custom projection: adapted at its weight's product."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.5), (4, 4))
        return jnp.einsum("btd,df->btf", x, w)


class EinsumShared(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = Einsum(name="proj")(x)
        return y @ self.variables["params"]["proj"]["w"].T  # the weight's transpose, again


class Block(nn.Module):
    peek: bool = False  # a sibling reads the projection's kernel inside the scanned body

    @nn.compact
    def __call__(self, h, _):
        out = nn.Dense(4, name="q")(h)
        if self.peek:
            out = out + nn.Dense(4, name="o")(h) @ self.variables["params"]["q"]["kernel"]
        return jnp.tanh(out), None


def _scanned(axis: int, remat: bool, peek: bool):
    body = nn.remat(Block) if remat else Block

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(
                body,
                variable_axes={"params": axis},
                split_rngs={"params": True},
                length=3,
                metadata_params={nn.PARTITION_NAME: None},
            )
            return scan(peek, name="blocks")(x, None)[0]

    return Stack()


class CondRead(nn.Module):
    """The read happens in one branch of ``nn.cond``."""

    @nn.compact
    def __call__(self, x):
        proj = nn.Dense(4, name="proj")
        y = proj(x)

        def penalty(module, y):
            return y + jnp.sum(module.variables["params"]["proj"]["kernel"])

        return nn.cond(jnp.sum(x) > 0, penalty, lambda module, y: y, self, y)


REFUSED = [
    (RawTiedHead(), IDS, "wte", "embedding", "lm_head"),
    (KernelPenalty(), X, "proj", "kernel", "KernelPenalty"),
    (EinsumShared(), X, "proj", "w", "EinsumShared"),
    (nn.jit(KernelPenalty)(), X, "proj", "kernel", "KernelPenalty"),
    (_scanned(0, False, True), X, "blocks.q", "kernel", "blocks"),  # the block's own matmul
    (_scanned(1, True, True), X, "blocks.q", "kernel", "blocks"),
    (CondRead(), X, "proj", "kernel", "CondRead.penalty"),
]


@pytest.mark.parametrize(("model", "x", "path", "weight", "reader"), REFUSED)
def test_a_weight_read_outside_its_layer_is_refused_by_inject(model, x, path, weight, reader):
    layouts = jaxlora.layouts(model, x)
    assert path not in layouts
    assert path in layouts.reasons and weight in layouts.shared[path]
    variables = model.init(jax.random.key(0), x)
    before = jax.tree.map(np.asarray, variables)
    config = jaxlora.LoRAConfig(r=2, targets=[path.rsplit(".", 1)[-1]])
    match = rf"layer '{path}' .*cannot be adapted: the model also reads its weight outside it "
    match += rf"\(its {weight} by \w+ at '{reader}'"
    with pytest.raises(TypeError, match=match):
        jaxlora.inject(variables, config, jax.random.key(1), layouts=layouts)
    jax.tree.map(np.testing.assert_array_equal, variables, before)  # nothing changed


def _merged_equals_adapted(model, x, targets):
    variables = model.init(jax.random.key(0), x)
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=targets, init="gaussian")
    adapted = jaxlora.inject(
        variables, config, jax.random.key(1), layouts=jaxlora.layouts(model, x)
    )
    # lora_b is zero at init: give it values so the adapter changes the output
    adapted = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.3 if "lora_b" in jax.tree_util.keystr(p) else v, adapted
    )
    with jaxlora.intercept(config):
        out = model.apply(adapted, x)
    merged = jaxlora.merge(adapted, alpha=config.alpha)
    base = model.apply(variables, x)
    assert float(jnp.max(jnp.abs(out - base))) > 1e-2  # the adapter matters
    np.testing.assert_allclose(model.apply(merged, x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "x", "targets"),
    [
        (AttendTiedHead(), IDS, ["wte", "mid"]),
        (BiasRead(), X, ["proj"]),
        (RawTiedHead(), IDS, ["mid"]),  # the shared table left alone: the rest is adaptable
        (_scanned(0, False, False), X, ["q"]),
        (_scanned(1, True, False), X, ["q"]),
        (nn.jit(_scanned(0, True, False).__class__)(), X, ["q"]),
    ],
)
def test_a_weight_read_only_by_its_own_layer_is_adapted_and_merges(model, x, targets):
    _merged_equals_adapted(model, x, targets)


def test_the_refused_case_is_the_silent_wrong_merge():
    """What the refusal prevents: the table adapted without ``layouts`` (unchecked), then
    merged, changes the tied head too, so merged and adapted logits differ."""
    model = RawTiedHead()
    variables = model.init(jax.random.key(0), IDS)
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=["wte"])
    adapted = jaxlora.inject(variables, config, jax.random.key(1))
    adapted = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.3 if "lora_a" in jax.tree_util.keystr(p) else v, adapted
    )
    with jaxlora.intercept(config):
        out = model.apply(adapted, IDS)
    merged = model.apply(jaxlora.merge(adapted, alpha=config.alpha), IDS)
    assert float(jnp.max(jnp.abs(merged - out))) > 1e-2


# NNX: with inputs=, inject traces the model once (as for op-level modules) with the chosen
# layers' methods in their own named scopes and refuses a layer whose weight is used outside.


class NnxRawTiedHead(nnx.Module):
    """The head multiplies by the embedding's table itself (not through a method of it)."""

    def __init__(self, rngs: nnx.Rngs):
        self.wte = nnx.Embed(16, 8, rngs=rngs)
        self.mid = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, ids):
        return self.mid(self.wte(ids)) @ self.wte.embedding[...].T


class NnxAttendTiedHead(NnxRawTiedHead):
    def __call__(self, ids):
        return self.wte.attend(self.mid(self.wte(ids)))


class NnxKernelPenalty(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.proj = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return self.proj(x) + jnp.sum(self.proj.kernel[...] ** 2)


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, peek: bool = False):
        self.q = nnx.Linear(4, 4, rngs=rngs)
        self.peek = peek

    def __call__(self, h):
        out = self.q(h)
        return jnp.tanh(out + h @ self.q.kernel[...] if self.peek else out)


class NnxStack(nnx.Module):
    def __init__(self, peek: bool):
        keys = jax.random.split(jax.random.key(0), 3)
        self.blocks = nnx.vmap(lambda k: NnxBlock(nnx.Rngs(k), peek))(keys)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(h, block):
            return block(h)

        return run(x, self.blocks)


NNX_REFUSED = [
    (lambda: NnxRawTiedHead(nnx.Rngs(0)), IDS, "wte", "embedding"),
    (lambda: NnxKernelPenalty(nnx.Rngs(0)), X, "proj", "kernel"),
    (lambda: NnxStack(True), X, "blocks.q", "kernel"),
]


@pytest.mark.parametrize(("make", "x", "path", "weight"), NNX_REFUSED)
def test_nnx_a_weight_read_outside_its_layer_is_refused_by_inject(make, x, path, weight):
    model = make()
    before = nnx.state(model)
    classes = [type(m) for _, m in nnx.iter_modules(model)]
    config = jaxlora.LoRAConfig(r=2, targets=[path.rsplit(".", 1)[-1]])
    match = rf"layer '{path}' \(a \w+\) cannot be adapted: the model also reads its weight "
    match += rf"outside it \(its {weight} by \w+ "
    with pytest.raises(ValueError, match=match):
        jnnx.inject(model, config, rngs=nnx.Rngs(1), inputs=(x,))
    assert [type(m) for _, m in nnx.iter_modules(model)] == classes  # the layers put back
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)
    jnnx.inject(make(), config, rngs=nnx.Rngs(1))  # without inputs, nothing is traced


@pytest.mark.parametrize(
    ("make", "x", "targets"),
    [
        (lambda: NnxAttendTiedHead(nnx.Rngs(0)), IDS, ["wte", "mid"]),
        (lambda: NnxRawTiedHead(nnx.Rngs(0)), IDS, ["mid"]),
        (lambda: NnxStack(False), X, ["q"]),
    ],
)
def test_nnx_a_weight_read_only_by_its_own_layer_is_adapted_and_merges(make, x, targets):
    base = make()
    want_base = base(x)
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=targets, init="gaussian")
    model = jnnx.inject(make(), config, rngs=nnx.Rngs(1), inputs=(x,))
    state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(lambda v: v + 0.3, state))
    out = model(x)
    assert float(jnp.max(jnp.abs(out - want_base))) > 1e-2  # the adapter matters
    merged = jnnx.merge(model)
    np.testing.assert_allclose(merged(x), out, rtol=1e-5, atol=1e-5)


def _peft_file(params, targets, directory) -> None:
    """A PEFT file adapting ``targets`` of the plain (unscanned) ``params``."""
    config = jaxlora.LoRAConfig(r=2, alpha=4, targets=targets)
    jaxlora.save_adapter(jaxlora.inject(params, config, jax.random.key(1)), directory, config)


def test_load_adapter_with_layouts_refuses_a_layer_read_outside_it(tmp_path):
    """A PEFT file adapting the tied table (PEFT allows LoRA on an Embedding whose weight the
    lm_head shares) is refused into the model by ``load_adapter(..., layouts=)``; without
    ``layouts`` the params tree alone cannot tell (documented)."""
    model = RawTiedHead()
    variables = model.init(jax.random.key(0), IDS)
    _peft_file(variables["params"], ["wte"], tmp_path)
    layouts = jaxlora.layouts(model, IDS)
    match = r"layer 'wte' cannot take the adapter: the model also reads its weight outside it "
    with pytest.raises(ValueError, match=match + r"\(its embedding by dot_general at 'lm_head'"):
        jaxlora.load_adapter(variables, tmp_path, layouts=layouts)
    jaxlora.load_adapter(variables, tmp_path)  # unchecked without layouts


def test_load_adapter_into_a_scanned_tree_refuses_a_layer_read_outside_it(tmp_path):
    model = _scanned(0, False, True)
    variables = model.init(jax.random.key(0), X)
    names = {"blocks": "layers.{i}"}
    _peft_file(jaxlora.stacks.unstack(variables["params"], names), ["q"], tmp_path)
    layouts = jaxlora.layouts(model, X)
    with pytest.raises(ValueError, match=r"layer 'blocks.q' cannot take the adapter"):
        jaxlora.load_adapter(variables, tmp_path, layer_names=names, layouts=layouts)
    unpeeked = _scanned(0, False, False)  # the same tree, its kernel read only by its layer
    loaded = jaxlora.load_adapter(
        variables, tmp_path, layer_names=names, layouts=jaxlora.layouts(unpeeked, X)
    )
    assert jnp.shape(loaded["params"]["blocks"]["q"]["lora_a"]) == (3, 4, 2)
