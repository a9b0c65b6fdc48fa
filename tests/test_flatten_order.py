"""PEFT files of op-level weights whose product flattens their axes (``jaxlora.hf_maps``,
``oplevel.torch_order``): the torch order is the order the JAX computation's reshape merges
them in (what a torch port of the same code computes), W's own order where no reshape merges
them, an explicit ``HFLinear`` order always; ambiguous evidence is refused by name.

Each case is a tiny module computing ``y`` from ``x`` and a weight ``w`` (NNX and Linen), and a
torch twin written with torch ops mirroring the JAX code: one ``nn.Linear`` whose weight is
built from ``w`` as the JAX code builds its operand, its output shaped as the JAX code shapes
it. Checked against the real ``peft`` both ways: a file saved by jaxlora, loaded by
``PeftModel.from_pretrained`` on the twin, gives the JAX outputs; a PEFT-saved adapter loaded
into the JAX model gives PEFT's outputs. fp32, 1e-5 of the output's scale (sums of 6-8 terms
associated differently).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import linen as nn
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model

import jaxlora
from jaxlora import nnx as jnnx
from tests._nnx_stacks import ScannedLayers

B, T, D, N, H, R, ALPHA = 2, 3, 4, 2, 3, 2, 4.0
CONFIG = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["p"])


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]  # w's
    x: tuple[int, ...]  # x's
    jax: Callable  # (x, w) -> y
    linear: Callable  # torch w -> the nn.Linear's weight (out, in)
    torch: Callable  # (x, the Linear) -> y


CASES = {
    # (a) einsum, w's axes in its own order: no reshape, W's own order (N, H).
    "a-einsum": Case(
        (D, N, H),
        (B, T, D),
        lambda x, w: jnp.einsum("btd,dnh->btnh", x, w),
        lambda w: w.reshape(D, N * H).T,
        lambda x, lin: lin(x).reshape(B, T, N, H),
    ),
    # (b) einsum listing w's axes permuted in its output: no reshape, W's own order.
    "b-einsum-permuted": Case(
        (D, N, H),
        (B, T, D),
        lambda x, w: jnp.einsum("btd,dnh->bthn", x, w),
        lambda w: w.reshape(D, N * H).T,
        lambda x, lin: lin(x).reshape(B, T, N, H).permute(0, 1, 3, 2),
    ),
    # (c) transpose then reshape: the free axes flatten as (H, N).
    "c-transpose-reshape": Case(
        (D, N, H),
        (B, T, D),
        lambda x, w: x @ w.transpose(0, 2, 1).reshape(D, H * N),
        lambda w: w.permute(0, 2, 1).reshape(D, H * N).T,
        lambda x, lin: lin(x),
    ),
    # (d) reshape only: merged in W's own order.
    "d-reshape": Case(
        (D, N, H),
        (B, T, D),
        lambda x, w: x @ w.reshape(D, N * H),
        lambda w: w.reshape(D, N * H).T,
        lambda x, lin: lin(x),
    ),
    # An o_proj whose contracted axes (N, H) flatten as (H, N).
    "contracted-transpose-reshape": Case(
        (N, H, D),
        (B, T, H * N),
        lambda x, w: x @ w.transpose(1, 0, 2).reshape(H * N, D),
        lambda w: w.permute(1, 0, 2).reshape(H * N, D).T,
        lambda x, lin: lin(x),
    ),
}


class NnxProj(nnx.Module):
    def __init__(self, case: str):
        self.case = case
        shape = CASES[case].shape
        self.w = nnx.Param(jax.random.normal(jax.random.key(0), shape) / np.sqrt(D))

    def __call__(self, x):
        return CASES[self.case].jax(x, self.w[...])


class NnxModel(nnx.Module):
    def __init__(self, case: str):
        self.p = NnxProj(case)

    def __call__(self, x):
        return self.p(x)


class LinenProj(nn.Module):
    case: str

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(1.0), CASES[self.case].shape)
        return CASES[self.case].jax(x, w)


class LinenModel(nn.Module):
    case: str

    @nn.compact
    def __call__(self, x):
        return LinenProj(self.case, name="p")(x)


class Twin(torch.nn.Module):
    """The torch port: ``p`` an ``nn.Linear`` whose weight is built from ``w`` as the JAX code
    builds its operand."""

    def __init__(self, case: str, w: np.ndarray):
        super().__init__()
        self.case = CASES[case]
        weight = self.case.linear(torch.from_numpy(np.array(w, np.float32)))
        self.p = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.p.weight.copy_(weight)

    def forward(self, x):
        return self.case.torch(x, self.p)


def _x(case: str) -> np.ndarray:
    return np.array(jax.random.normal(jax.random.key(1), CASES[case].x), np.float32)


def _nnx(case: str, seed: int = 3) -> NnxModel:
    """The NNX model injected at ``p``'s product, ``lora_b`` random (the branch counts)."""
    model = NnxModel(case)
    jnnx.inject(model, CONFIG, nnx.Rngs(2), inputs=(jnp.asarray(_x(case)),))
    model.p.lora_b[...] = jax.random.normal(jax.random.key(seed), model.p.lora_b.shape)
    return model


class Linen:
    """The Linen model, its params injected at ``p``'s product (``layouts``), ``lora_b``
    random."""

    def __init__(self, case: str, seed: int = 3):
        self.case, self.model = case, LinenModel(case)
        x = jnp.asarray(_x(case))
        base = self.model.init(jax.random.key(0), x)
        layouts = jaxlora.layouts(self.model, x)
        self.params = jaxlora.inject(base, CONFIG, jax.random.key(2), layouts=layouts)["params"]
        b = self.params["p"]["lora_b"]
        self.params["p"]["lora_b"] = jax.random.normal(jax.random.key(seed), b.shape)

    def __call__(self, params, config=CONFIG) -> np.ndarray:
        with jaxlora.intercept(config):
            return np.asarray(self.model.apply({"params": params}, jnp.asarray(_x(self.case))))

    @property
    def w(self) -> np.ndarray:
        return np.asarray(self.params["p"]["w"])


def _peft_load(twin: torch.nn.Module, directory) -> PeftModel:
    """``PeftModel.from_pretrained``, which must not warn (a warning there means keys it
    ignored or a config it rewrote)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(twin, str(directory))
    assert not caught, [str(w.message) for w in caught]
    return model.eval()


def _torch_out(model: torch.nn.Module, case: str) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(_x(case))).numpy()


def _close(got, want) -> None:
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def _peft_saved(twin: Twin, directory) -> np.ndarray:
    """A PEFT adapter on the twin's ``p`` with random A and B, saved; PEFT's outputs."""
    peft_model = get_peft_model(twin, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["p"]))
    torch.manual_seed(4)
    with torch.no_grad():
        for name, value in peft_model.named_parameters():
            if "lora_" in name:
                value.copy_(torch.randn_like(value))
    peft_model.save_pretrained(str(directory))
    return _torch_out(peft_model.eval(), twin_case(twin))


def twin_case(twin: Twin) -> str:
    return next(k for k, c in CASES.items() if c is twin.case)


@pytest.mark.parametrize("case", list(CASES))
def test_nnx_file_gives_the_jax_outputs_in_peft(tmp_path, case):
    model = _nnx(case)
    jnnx.save_adapter(model, tmp_path)
    twin = Twin(case, np.asarray(model.p.w[...]))
    want = np.asarray(model(jnp.asarray(_x(case))))
    assert np.abs(_torch_out(twin, case) - want).max() > 1e-2  # the branch counts
    _close(_torch_out(_peft_load(twin, tmp_path), case), want)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_file_gives_peft_outputs_in_nnx(tmp_path, case):
    model = _nnx(case)
    want = _peft_saved(Twin(case, np.asarray(model.p.w[...])), tmp_path)
    jnnx.load_adapter(model, tmp_path)
    _close(np.asarray(model(jnp.asarray(_x(case)))), want)


@pytest.mark.parametrize("case", list(CASES))
def test_linen_file_gives_the_jax_outputs_in_peft(tmp_path, case):
    linen = Linen(case)
    jaxlora.save_adapter(linen.params, tmp_path, CONFIG)
    twin = Twin(case, linen.w)
    _close(_torch_out(_peft_load(twin, tmp_path), case), linen(linen.params))


@pytest.mark.parametrize("case", list(CASES))
def test_peft_file_gives_peft_outputs_in_linen(tmp_path, case):
    linen = Linen(case)
    want = _peft_saved(Twin(case, linen.w), tmp_path)
    loaded = jaxlora.load_adapter(linen.params, tmp_path)
    _close(linen(loaded), want)


# A reshape merging only some free axes: w (D, N, H, 2) used as (D, N, H·2), so the torch
# order of (N, H, 2) could be (N, H, 2) or (H, 2, N): refused without an explicit order.
PARTIAL = Case(
    (D, N, H, 2),
    (B, T, D),
    lambda x, w: jnp.einsum("btd,dnk->btnk", x, w.reshape(D, N, H * 2)),
    lambda w: w.reshape(D, N * H * 2).T,
    lambda x, lin: lin(x).reshape(B, T, N, H * 2),
)
AMBIGUOUS = r"layer 'p', weight 'w'.*holds its axes \[1, 2, 3\] as \(\(1,\), \(2, 3\)\)"


@pytest.fixture
def partial(monkeypatch):
    monkeypatch.setitem(CASES, "partial", PARTIAL)
    return "partial"


def test_partial_merge_is_refused_by_name_nothing_written(tmp_path, partial):
    model, linen = _nnx(partial), Linen(partial)
    for save in (
        lambda d: jnnx.save_adapter(model, d),
        lambda d: jaxlora.save_adapter(linen.params, d, CONFIG),
    ):
        with pytest.raises(ValueError, match=AMBIGUOUS + r".*HFLinear\(\.\.\., out_axes="):
            save(tmp_path / "a")
        assert not (tmp_path / "a").exists()


def test_partial_merge_load_refused_by_name_nothing_changed(tmp_path, partial):
    model = _nnx(partial)
    _peft_saved(Twin(partial, np.asarray(model.p.w[...])), tmp_path)
    before = np.asarray(model.p.lora_b[...])
    with pytest.raises(ValueError, match=AMBIGUOUS):
        jnnx.load_adapter(model, tmp_path)
    np.testing.assert_array_equal(model.p.lora_b[...], before)
    linen = Linen(partial)
    with pytest.raises(ValueError, match=AMBIGUOUS):
        jaxlora.load_adapter(linen.params, tmp_path)


def test_explicit_order_wins(tmp_path, partial):
    """An ``HFLinear`` order is used as given: the partial merge saved and read with W's own
    order (what its twin computes), and case (c) with the order the trace would not give."""
    model = _nnx(partial)
    spec = {"p": jaxlora.HFLinear("p", out_axes=(1, 2, 3))}
    jnnx.save_adapter(model, tmp_path / "a", path_map=spec)
    twin = Twin(partial, np.asarray(model.p.w[...]))
    want = np.asarray(model(jnp.asarray(_x(partial))))
    _close(_torch_out(_peft_load(twin, tmp_path / "a"), partial), want)
    linen = Linen(partial)
    loaded = jaxlora.load_adapter(linen.params, tmp_path / "a", path_map=spec)
    np.testing.assert_array_equal(loaded["p"]["lora_b"], np.asarray(model.p.lora_b[...]))
    # (c) written with an explicit (N, H) order: its (H, N) twin computes something else.
    model_c = _nnx("c-transpose-reshape")
    own = {"p": jaxlora.HFLinear("p", out_axes=(1, 2))}
    jnnx.save_adapter(model_c, tmp_path / "c", path_map=own)
    twin_c = Twin("c-transpose-reshape", np.asarray(model_c.p.w[...]))
    got = _torch_out(_peft_load(twin_c, tmp_path / "c"), "c-transpose-reshape")
    assert np.abs(got - np.asarray(model_c(jnp.asarray(_x("c-transpose-reshape"))))).max() > 1e-2


def test_record_less_roles_keep_own_order(tmp_path):
    """A Linen tree whose ``lora_roles`` record has no ``operands`` (made before they were
    recorded) is written in W's own order, as before, and still runs."""
    linen = Linen("c-transpose-reshape")
    marker = linen.params["p"]["lora_roles"]
    assert marker.roles.operands == (((0,), (2, 1)),)
    old = dataclasses.replace(marker, roles=dataclasses.replace(marker.roles, operands=()))
    params = {"p": {**linen.params["p"], "lora_roles": old}}
    _close(linen(params), linen(linen.params))
    jaxlora.save_adapter(params, tmp_path / "old", CONFIG)
    jaxlora.save_adapter(linen.params, tmp_path / "new", CONFIG)
    jaxlora.save_adapter(
        linen.params,
        tmp_path / "own",
        CONFIG,
        path_map={"p": jaxlora.HFLinear("p", out_axes=(1, 2))},
    )
    old_b, new_b, own_b = (
        safetensors.numpy.load_file(tmp_path / d / "adapter_model.safetensors")[
            "base_model.model.p.lora_B.weight"
        ]
        for d in ("old", "new", "own")
    )
    np.testing.assert_array_equal(old_b, own_b)
    assert not np.array_equal(old_b, new_b)


class TwoOrders(nnx.Module):
    """Slice views (one adapter per expert) whose two products flatten (N, H) differently."""

    def __init__(self):
        self.w = nnx.Param(jax.random.normal(jax.random.key(0), (2, D, N, H)))

    def __call__(self, x):
        w = self.w[...]
        first = x[0] @ w[0].reshape(D, N * H)
        second = x[1] @ w[1].transpose(0, 2, 1).reshape(D, H * N)
        return first + second


def test_slice_views_flattening_differently_are_refused_by_name(tmp_path):
    model = NnxModel("a-einsum")
    model.p = TwoOrders()
    x = jnp.ones((2, T, D))
    jnnx.inject(model, CONFIG, nnx.Rngs(2), inputs=(x,))
    spec = {"p": jaxlora.HFLinear("p", experts="p.{}")}
    match = r"layer 'p', weight 'w'.*its products hold its axes \[2, 3\] differently"
    with pytest.raises(ValueError, match=match):
        jnnx.save_adapter(model, tmp_path / "a", path_map=spec)
    assert not (tmp_path / "a").exists()
    # Given the order, it is written (an explicit HFLinear wins).
    jnnx.save_adapter(
        model, tmp_path / "b", path_map={"p": dataclasses.replace(spec["p"], out_axes=(2, 3))}
    )
    assert (tmp_path / "b" / "adapter_model.safetensors").exists()


class FlatProj(nnx.Module):
    """A (c) projection D → D: w (D, 2, 2) used as ``x @ w.transpose(0, 2, 1).reshape(D, D)``."""

    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (D, 2, 2)) / np.sqrt(D))

    def __call__(self, x):
        return x @ self.w[...].transpose(0, 2, 1).reshape(D, D)


class FlatBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.p = FlatProj(rngs)

    def __call__(self, x):
        return self.p(x)


class FlatScanned(ScannedLayers):
    block, length = FlatBlock, 2


def test_stacked_layers_files_use_the_traced_order(tmp_path):
    """An ``nnx.vmap`` stack run by ``nnx.scan`` (its record renumbered to one layer's axes):
    layer i's ``lora_B`` rows in the (H, N) order its code flattens."""
    model = FlatScanned(nnx.Rngs(0))
    x = jnp.ones((B, T, D))
    jnnx.inject(
        model, jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["p"]), nnx.Rngs(2), inputs=(x,)
    )
    p = model.layers.p
    p.lora_b[...] = jax.random.normal(jax.random.key(5), p.lora_b.shape)
    jnnx.save_adapter(model, tmp_path)
    tensors = safetensors.numpy.load_file(tmp_path / "adapter_model.safetensors")
    for i in range(2):
        b = np.asarray(p.lora_b[...][i])  # (r, N, H)
        want = b.transpose(0, 2, 1).reshape(R, D).T
        np.testing.assert_array_equal(tensors[f"base_model.model.layers.{i}.p.lora_B.weight"], want)
