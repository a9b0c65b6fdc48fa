"""tunix 0.1.7's Qwen3 MoE on its megablox path (issue 13): on a TPU/GPU with a device mesh,
``MoELayer.__call__`` runs its experts through ``megablox.gmm`` (a Pallas kernel under a
``custom_vjp``) inside a ``shard_map`` instead of its dense per-expert loop.

Reached here on the CPU by forcing tunix's branch condition: a non-empty 1-device mesh with
the axis names of tunix's sharding config (``with mesh:``, which tunix reads), the platform
check patched in what ``tunix.models.qwen3.model`` sees (its module global ``jax``), and
``megablox.gmm`` in Pallas' interpret mode (its module global ``megablox``). The base model's
logits on that path equal the dense path's (the harness is sound), and every call there is
counted (the path is really taken).

jaxlora adapts the expert weights (gate/up/down (E, D, F)) there at megablox's grouped
product inside the shard_map (``jaxlora.oplevel``: the factors enter the shard_map sharded as
the weight, the branch is ``ragged_dot(ragged_dot(x, A, gs)·s, B, gs)``): the logits, the
adapter gradients and a few optax steps equal the dense path's (1e-5), and the PEFT files
(one torch Linear per expert) are the same.
"""

from __future__ import annotations

import contextlib
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import load_file

import jaxlora
from jaxlora import nnx as jnnx
from thirdparty_tests.twins import qwen3_moe_config, rel_err, tunix_inputs


def _pure(state) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


TOKENS = np.random.default_rng(5).integers(0, 128, (2, 8))  # B·T·top_k: tunix's gmm tile of 8
EXPERTS = ("gate_proj", "up_proj", "down_proj")


class _PlatformTPU(types.ModuleType):
    """``jax`` as tunix's Qwen3 module sees it, but on a "tpu": its megablox branch is taken."""

    def __getattr__(self, name):
        return getattr(jax, name)

    @staticmethod
    def devices(*args, **kwargs):
        return [types.SimpleNamespace(platform="tpu")]


@contextlib.contextmanager
def gmm_path(calls: list | None = None):
    """tunix's Qwen3 ``MoELayer`` runs its megablox (gmm) path on this CPU (module docstring);
    each gmm call is appended to ``calls``."""
    from jax.experimental.pallas.ops.tpu import megablox
    from tunix.models.qwen3 import model as model_lib

    def gmm(*args, **kwargs):
        if calls is not None:
            calls.append(args[1].shape)
        return megablox.gmm(*args, interpret=True, **kwargs)

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    saved = model_lib.jax, model_lib.megablox
    model_lib.jax, model_lib.megablox = _PlatformTPU("jax"), types.SimpleNamespace(gmm=gmm)
    with warnings.catch_warnings():  # tunix reads the mesh `with mesh:` sets, deprecated
        warnings.filterwarnings("ignore", "`with mesh:`", DeprecationWarning)
        mesh.__enter__()
    try:
        yield
    finally:
        mesh.__exit__(None, None, None)
        model_lib.jax, model_lib.megablox = saved


def _model(seed: int = 0) -> nnx.Module:
    from tunix.models.qwen3 import model as model_lib

    return model_lib.Qwen3(qwen3_moe_config(num_layers=1), rngs=nnx.Rngs(seed))


@nnx.jit
def _forward(model: nnx.Module, tokens: jax.Array) -> jax.Array:
    return model(*tunix_inputs(tokens))[0]


def _logits(model: nnx.Module) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(TOKENS)))


def _inject(model: nnx.Module, targets: list[str]) -> nnx.Module:
    config = jaxlora.LoRAConfig(r=4, alpha=8.0, targets=targets)
    return jnnx.inject(model, config, nnx.Rngs(1), inputs=tunix_inputs(TOKENS))


def _nonzero_b(model: nnx.Module) -> None:
    """Nonzero lora_b (the same on every model): the first step's gradients of lora_a and the
    expert branches' values count."""
    rng = np.random.default_rng(2)
    for module in (model.layers[0].mlp, model.layers[0].attn.q_proj):
        for weight in module.lora_weights:
            b = module.factors(weight)[1]
            b[...] = jnp.asarray(rng.normal(size=b.shape) * 0.3, jnp.float32)


def _train(model: nnx.Module, steps: int) -> tuple[list[float], np.ndarray, dict]:
    """``steps`` Adam steps on the adapters: (the losses, the first step's logits and
    adapter gradients)."""
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    labels = jnp.asarray(TOKENS)[:, 1:]

    def loss(model):
        logits = model(*tunix_inputs(TOKENS))[0]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], labels)
        return ce.mean(), logits

    @nnx.jit
    def step(model, optimizer):
        diff = nnx.DiffState(0, nnx.LoRAParam)
        (value, logits), grads = nnx.value_and_grad(loss, argnums=diff, has_aux=True)(model)
        optimizer.update(model, grads)
        return value, logits, grads

    losses, first = [], None
    for _ in range(steps):
        value, logits, grads = step(model, optimizer)
        losses.append(float(value))
        first = first or (np.asarray(logits), jax.tree.map(np.asarray, nnx.to_pure_dict(grads)))
    return losses, *first


def test_harness_base_logits_on_the_gmm_path_equal_the_dense_path():
    model = _model()
    dense = _logits(model)
    calls: list = []
    with gmm_path(calls):
        grouped = _logits(model)
    assert calls == [(4, 64, 32), (4, 64, 32), (4, 32, 64)]  # gate, up, down: megablox ran
    assert rel_err(grouped, dense) <= 1e-5


def test_adapted_experts_on_the_gmm_path_train_as_on_the_dense_path(tmp_path):
    """The experts (and q_proj) adapted: injected and trained (2 Adam steps) on the dense path,
    and the same injected and trained under the mesh on the gmm path, after the dense run
    (before: inject refused under the mesh, 'used only by shard_map', and an adapted module
    called there after a dense call reused the dense trace: megablox silently did not run).
    The same adapter layout; logits, adapter gradients, losses and adapters within 1e-5; the
    base untouched; the same PEFT files, one torch Linear per expert."""
    dense_model = _inject(_model(), ["mlp", "q_proj"])
    _nonzero_b(dense_model)
    dense_losses, dense_logits, dense_grads = _train(dense_model, 2)
    calls: list = []
    with gmm_path(calls):
        model = _inject(_model(), ["mlp", "q_proj"])
        base = _pure(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
        _nonzero_b(model)
        losses, logits, grads = _train(model, 2)
    assert calls[-3:] == [(4, 64, 32), (4, 64, 32), (4, 32, 64)]  # megablox ran, adapted
    moe = model.layers[0].mlp
    dense_products = dense_model.layers[0].mlp.lora_products  # same axes, same torch orders
    assert [w for w, _ in moe.lora_products] == [w for w, _ in dense_products]
    pairs = zip(moe.lora_products, dense_products, strict=True)
    assert all(a.matches(b) for (_, a), (_, b) in pairs)
    assert moe.gate_proj_lora_a.shape == (4, 64, 4) and moe.down_proj_lora_b.shape == (4, 4, 64)
    assert rel_err(dense_logits, _logits(_model())) > 1e-3  # the adapters count
    assert rel_err(logits, dense_logits) <= 1e-5
    want_moe, got_moe = dense_grads["layers"][0]["mlp"], grads["layers"][0]["mlp"]
    assert sorted(want_moe) == sorted(f"{w}_lora_{f}" for w in EXPERTS for f in "ab")
    for name, want in want_moe.items():
        assert np.abs(want).max() > 0, name
        assert rel_err(got_moe[name], want) <= 1e-5, name
    assert dense_losses[-1] < dense_losses[0]
    np.testing.assert_allclose(losses, dense_losses, rtol=1e-5)
    after = _pure(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    assert jax.tree.all(jax.tree.map(np.array_equal, after, base))  # the base untouched
    for got, want in zip(
        jax.tree.leaves(_pure(nnx.state(model, nnx.LoRAParam))),
        jax.tree.leaves(_pure(nnx.state(dense_model, nnx.LoRAParam))),
        strict=True,
    ):
        # Adam divides each coordinate's step by its gradient's running scale, so the 1e-7
        # differences of the two paths' gradients reach the trained adapters a little larger
        assert rel_err(got, want) <= 1e-4

    for directory, trained in (("gmm", model), ("dense", dense_model)):
        jnnx.save_adapter(trained, tmp_path / directory, path_map="tunix.qwen3")
    saved = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("gmm", "dense")]
    assert sorted(saved[0]) == sorted(saved[1])
    for key, want in saved[1].items():
        assert rel_err(saved[0][key], want) <= 1e-4, key
    a = np.asarray(moe.up_proj_lora_a[...])
    for e in range(4):  # one torch Linear per expert, as on the dense path
        key = f"base_model.model.model.layers.0.mlp.experts.{e}.up_proj.lora_A.weight"
        np.testing.assert_array_equal(saved[0][key], a[e].T)
