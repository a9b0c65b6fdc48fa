"""PEFT files for op-level adapted weights (``jaxlora.hf_maps``), against the real ``peft``.

A tiny NNX attention made of tunix-style ``Einsum`` modules (Llama-style q 'BTD,DNH->BTNH',
o 'BTNH,NHD->BTD', Gemma-style fused kv 'BSD,CKDH->CBSKH' with grouped heads) and its torch
twin of ``nn.Linear`` modules (q_proj, k_proj, v_proj, o_proj) holding the same base weights.
jaxlora saves → ``PeftModel.from_pretrained`` on the twin gives the same outputs; an adapter
made by PEFT (A shared by k and v) loads into the JAX model and gives PEFT's outputs; the
round trip is exact; what a file cannot hold is refused by name and writes/changes nothing.

Tolerance: fp32, 1e-5 of the output's scale, as in the other PEFT parity tests: both sides
compute the same sums of ~D=16..32 terms in a different association (einsum over (N, H) vs a
matmul over N·H, factored branch vs PEFT's), so they differ by a few fp32 ulps of the scale.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model

import jaxlora
from jaxlora import hf_maps, oplevel
from jaxlora import nnx as jnnx
from jaxlora.hf_maps import HFLinear
from parity_tests.twins import peft_load, rel_err

B, T, D, N, K, H, R, ALPHA = 2, 5, 16, 4, 2, 8, 4, 8.0
TOL = 1e-5
TARGETS = ["q_einsum", "kv_einsum", "o_einsum"]
PATH_MAP = {
    "attn.q_einsum": "attn.q_proj",
    "attn.kv_einsum": HFLinear(("attn.k_proj", "attn.v_proj"), split=0),
    "attn.o_einsum": "attn.o_proj",
}
X = np.random.default_rng(0).standard_normal((B, T, D)).astype("f4")


class Einsum(nnx.Module):
    """tunix's ``Einsum``: ``jnp.einsum(shape_eqn, x, w)``."""

    def __init__(self, eqn: str, shape, rngs: nnx.Rngs):
        self.shape_eqn = eqn
        self.w = nnx.Param(jax.random.normal(rngs.params(), shape) / np.sqrt(D))

    def __call__(self, x):
        return jnp.einsum(self.shape_eqn, x, self.w[...])


def _attend(q, k, v):
    """(B, T, N, H) queries, (B, S, K, H) keys/values, K | N: grouped heads, softmax."""
    k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    p = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(H), axis=-1)
    return jnp.einsum("BNTS,BSNH->BTNH", p, v)


class Attention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q_einsum = Einsum("BTD,DNH->BTNH", (D, N, H), rngs)
        self.kv_einsum = Einsum("BSD,CKDH->CBSKH", (2, K, D, H), rngs)
        self.o_einsum = Einsum("BTNH,NHD->BTD", (N, H, D), rngs)

    def __call__(self, x):
        k, v = self.kv_einsum(x)
        return self.o_einsum(_attend(self.q_einsum(x), k, v))


class Model(nnx.Module):
    def __init__(self, seed: int = 0):
        self.attn = Attention(nnx.Rngs(seed))

    def __call__(self, x):
        return self.attn(x)


class TorchAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(D, N * H, bias=False)
        self.k_proj = torch.nn.Linear(D, K * H, bias=False)
        self.v_proj = torch.nn.Linear(D, K * H, bias=False)
        self.o_proj = torch.nn.Linear(N * H, D, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, N, H)
        k = self.k_proj(x).view(b, t, K, H).repeat_interleave(N // K, dim=2)
        v = self.v_proj(x).view(b, t, K, H).repeat_interleave(N // K, dim=2)
        p = torch.softmax(torch.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H), dim=-1)
        return self.o_proj(torch.einsum("bnts,bsnh->btnh", p, v).reshape(b, t, N * H))


class TorchModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = TorchAttention()

    def forward(self, x):
        return self.attn(x)


def _torch_twin(model: Model) -> TorchModel:
    """The torch model holding ``model``'s base weights (the documented layout)."""
    attn = model.attn
    q, kv, o = (np.asarray(m.w[...]) for m in (attn.q_einsum, attn.kv_einsum, attn.o_einsum))
    weights = {
        "q_proj": q.reshape(D, N * H).T,
        "k_proj": kv[0].transpose(1, 0, 2).reshape(D, K * H).T,
        "v_proj": kv[1].transpose(1, 0, 2).reshape(D, K * H).T,
        "o_proj": o.reshape(N * H, D).T,
    }
    twin = TorchModel()
    with torch.no_grad():
        for name, w in weights.items():
            getattr(twin.attn, name).weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
    return twin.eval()


def _injected(seed: int = 0, adapter_seed: int | None = 3) -> Model:
    """The JAX model, injected; nonzero random A and B when ``adapter_seed`` is given."""
    model = Model(seed)
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=TARGETS)
    jnnx.inject(model, config, nnx.Rngs(2), inputs=(jnp.asarray(X),))
    if adapter_seed is not None:
        keys = iter(jax.random.split(jax.random.key(adapter_seed), 8))
        for _, layer in nnx.iter_graph(model):
            if isinstance(layer, jnnx.OpAdapter):
                for factor in (layer.lora_a, layer.lora_b):
                    factor[...] = 0.3 * jax.random.normal(next(keys), factor.shape)
    return model


def _lora_state(model: Model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))


def test_base_twin_matches():
    model = Model()
    want = _torch_twin(model)(torch.from_numpy(X)).detach().numpy()
    assert rel_err(model(jnp.asarray(X)), want) <= TOL


def test_jax_adapter_loads_in_peft(tmp_path):
    model = _injected()
    twin = _torch_twin(model)
    y_base = twin(torch.from_numpy(X)).detach().numpy()
    jnnx.save_adapter(model, tmp_path, path_map=PATH_MAP)
    peft_model = peft_load(twin, tmp_path)
    y_jax = np.asarray(model(jnp.asarray(X)))
    y_peft = peft_model(torch.from_numpy(X)).detach().numpy()
    assert rel_err(y_jax, y_base) > 1e-2  # the adapters count
    assert rel_err(y_jax, y_peft) <= TOL
    modules = peft_model.base_model.model.attn
    k_a, v_a = (getattr(modules, n).lora_A["default"].weight for n in ("k_proj", "v_proj"))
    assert torch.equal(k_a, v_a)  # the fused weight's one A, written to both modules
    # PEFT's merge computes the same weights as jaxlora's.
    merged = peft_model.merge_and_unload()
    jnnx.merge(model)
    assert rel_err(merged(torch.from_numpy(X)).detach().numpy(), y_jax) <= TOL
    assert rel_err(_torch_twin(model)(torch.from_numpy(X)).detach().numpy(), y_jax) <= TOL


def test_round_trip_is_exact(tmp_path):
    model = _injected()
    jnnx.save_adapter(model, tmp_path, path_map=PATH_MAP)
    other = _injected(adapter_seed=9)
    jnnx.load_adapter(other, tmp_path, path_map=PATH_MAP)
    want, got = _lora_state(model), _lora_state(other)
    assert jax.tree.all(jax.tree.map(np.array_equal, want, got))
    np.testing.assert_array_equal(np.asarray(other(jnp.asarray(X))), model(jnp.asarray(X)))


def _peft_adapter(twin: TorchModel, directory, *, shared_a: bool = True) -> PeftModel:
    """A PEFT adapter on the twin with nonzero random A and B (k and v sharing A if asked)."""
    torch.manual_seed(5)
    config = LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    peft_model = get_peft_model(copy.deepcopy(twin), config)
    attn = peft_model.base_model.model.attn
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            module = getattr(attn, name)
            module.lora_A["default"].weight.normal_(0.0, 0.3)
            module.lora_B["default"].weight.normal_(0.0, 0.3)
        if shared_a:
            attn.v_proj.lora_A["default"].weight.copy_(attn.k_proj.lora_A["default"].weight)
    peft_model.save_pretrained(str(directory))
    return peft_model.eval()


def test_peft_adapter_loads_in_jax(tmp_path):
    model = _injected(adapter_seed=None)
    twin = _torch_twin(model)
    peft_model = _peft_adapter(twin, tmp_path)
    jnnx.load_adapter(model, tmp_path, path_map=PATH_MAP)
    want = peft_model(torch.from_numpy(X)).detach().numpy()
    assert rel_err(twin(torch.from_numpy(X)).detach().numpy(), want) > 1e-2
    assert rel_err(model(jnp.asarray(X)), want) <= TOL


def _unchanged(model: Model, before: dict) -> bool:
    return jax.tree.all(jax.tree.map(np.array_equal, before, _lora_state(model)))


def test_fused_modules_with_different_a_are_refused(tmp_path):
    model = _injected()
    _peft_adapter(_torch_twin(model), tmp_path, shared_a=False)
    before = _lora_state(model)
    with pytest.raises(ValueError, match=r"lora_A of 'attn.k_proj' and 'attn.v_proj' differ"):
        jnnx.load_adapter(model, tmp_path, path_map=PATH_MAP)
    assert _unchanged(model, before)


@pytest.mark.parametrize(
    ("path_map", "targets", "match"),
    [
        # The map lacks the fused weight: its default torch path is not in the file.
        (
            {k: v for k, v in PATH_MAP.items() if k != "attn.kv_einsum"},
            ["q_proj", "k_proj", "v_proj", "o_proj"],
            r"module path\(s\) \['attn.k_proj', 'attn.v_proj'\] are not in the model",
        ),
        # The file lacks one module of the fused weight.
        (
            PATH_MAP,
            ["q_proj", "k_proj", "o_proj"],
            r"missing tensors for layer\(s\) \['attn.v_proj'\]",
        ),
    ],
    ids=["map_lacks_kv", "file_lacks_v"],
)
def test_missing_paths_are_refused(tmp_path, path_map, targets, match):
    model = _injected()
    twin = _torch_twin(model)
    peft_model = get_peft_model(copy.deepcopy(twin), LoraConfig(r=R, target_modules=targets))
    peft_model.save_pretrained(str(tmp_path))
    before = _lora_state(model)
    with pytest.raises(ValueError, match=match):
        jnnx.load_adapter(model, tmp_path, path_map=path_map)
    assert _unchanged(model, before)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (HFLinear(("attn.k_proj", "attn.v_proj")), r"names 2 modules.*no split= axis"),
        (HFLinear(("attn.k_proj",), split=0), r"splits axis 0 of size 2 into 1 modules"),
        (HFLinear(("attn.k_proj", "attn.v_proj"), split=2), r"split=2 is not a free axis"),
        (HFLinear(("attn.k_proj", "attn.v_proj"), split=0, out_axes=(1,)), r"out_axes=\(1,\)"),
        ("attn.q_proj", r"torch module\(s\) \['attn.q_proj'\] for several weights"),
    ],
    ids=["no_split", "split_size", "split_not_free", "out_axes", "twice"],
)
def test_bad_specs_are_refused_by_layer(tmp_path, spec, match):
    model = _injected()
    with pytest.raises(ValueError, match=match):
        jnnx.save_adapter(model, tmp_path / "a", path_map={**PATH_MAP, "attn.kv_einsum": spec})
    assert not (tmp_path / "a").exists()


class Experts(nnx.Module):
    def __init__(self):
        self.moe = Einsum("EBD,EDF->EBF", (3, D, 6), nnx.Rngs(0))

    def __call__(self, x):
        return self.moe(x)


def test_moe_batch_axes_are_refused_both_ways(tmp_path):
    x = jnp.ones((3, 2, D))
    model = Experts()
    jnnx.inject(model, jaxlora.LoRAConfig(r=2, targets=["moe"]), nnx.Rngs(1), inputs=(x,))
    # Without an HFLinear(experts=...) spec naming the per-expert torch modules.
    match = r"layer 'moe', weight 'w' \(3, 16, 6\): its axis 0 \(size 3\) is a batch axis"
    with pytest.raises(ValueError, match=match):
        jnnx.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    other = _injected()
    jnnx.save_adapter(other, tmp_path / "b", path_map=PATH_MAP)
    before = _lora_state(model)
    with pytest.raises(ValueError, match=match):
        jnnx.load_adapter(model, tmp_path / "b")
    assert _unchanged(model, before)


@pytest.mark.parametrize(
    ("eqn", "shape", "in_axes", "out_axes", "split"),
    [
        ("btnh,hnd->btd", (H, N, D), (1, 0), None, None),  # torch input flattens (N, H)
        ("btd,dnh->btnh", (D, N, H), None, (2, 1), None),  # torch output flattens (H, N)
        ("bsd,ckdh->cbskh", (2, K, D, H), None, (3, 1), 0),  # fused, (H, K) outputs
    ],
)
def test_axis_orders_match_the_closed_form(eqn, shape, in_axes, out_axes, split):
    """Any spec: PEFT's per-module ``scaling·B@A`` equals the weight's delta (W's own order)
    laid out as (out_axes…, in_axes…), per split index; and reading back inverts writing."""
    x = jnp.ones([{"b": 2, "t": 3, "s": 3, "n": N, "h": H, "d": D}[c] for c in eqn.split(",")[0]])
    model = Einsum(eqn, shape, nnx.Rngs(0))

    class One(nnx.Module):
        def __init__(self):
            self.proj = model

        def __call__(self, x):
            return self.proj(x)

    one = One()
    jnnx.inject(
        one, jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=["proj"]), nnx.Rngs(1), inputs=(x,)
    )
    layer = one.proj
    layer.lora_b[...] = jax.random.normal(jax.random.key(4), layer.lora_b.shape)
    roles = layer.lora_roles
    paths = ("p0", "p1") if split is not None else "p"
    lay = hf_maps.layout(HFLinear(paths, in_axes, out_axes, split), roles, "proj")
    a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
    pairs = hf_maps.to_peft(lay, a, b)
    delta = np.asarray(oplevel.delta(roles, a, b, layer.scaling), np.float64)
    for i, path in enumerate(lay.paths):
        d = delta if split is None else np.take(delta, i, axis=split)
        kept = [w for w in range(len(shape)) if w != split]
        order = [kept.index(w) for w in (*lay.out_axes, *lay.in_axes)]
        n_out = int(np.prod([shape[w] for w in lay.out_axes]))
        want = np.transpose(d, order).reshape(n_out, -1)
        big_a, big_b = (np.asarray(t, np.float64) for t in pairs[path])
        np.testing.assert_allclose(layer.scaling * big_b @ big_a, want, rtol=0, atol=1e-5)
    back = hf_maps.from_peft(lay, pairs, "proj")
    np.testing.assert_array_equal(back[0], a)
    np.testing.assert_array_equal(back[1], b)


def test_hflinear_for_a_layer_not_adapted_at_its_product_is_refused(tmp_path):
    jnnx.save_adapter(_injected(), tmp_path, path_map=PATH_MAP)
    plain = Model()
    with pytest.raises(ValueError, match=r"layer 'attn.kv_einsum' \(a Einsum\).*inject it first"):
        jnnx.load_adapter(plain, tmp_path, path_map=PATH_MAP)
    assert type(plain.attn.kv_einsum) is Einsum and not nnx.state(plain, nnx.LoRAParam)


def test_path_map_may_be_a_function(tmp_path):
    """A callable path_map may return an HFLinear too: the same file as the dict's."""
    from safetensors.numpy import load_file

    model = _injected()
    jnnx.save_adapter(model, tmp_path / "dict", path_map=PATH_MAP)
    jnnx.save_adapter(model, tmp_path / "func", path_map=lambda p: PATH_MAP.get(p, p))
    want, got = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("dict", "func"))
    assert sorted(want) == sorted(got) and len(want) == 8
    assert all(np.array_equal(want[k], got[k]) for k in want)


class Mixed(Model):
    """Op-level layers beside a Dense-family LoRA layer (``nnx.Linear`` → ``LoRALinear``)."""

    def __init__(self):
        super().__init__()
        self.out = nnx.Linear(D, 5, rngs=nnx.Rngs(7))

    def __call__(self, x):
        return self.out(jnp.tanh(self.attn(x)))


class TorchMixed(TorchModel):
    def __init__(self):
        super().__init__()
        self.out = torch.nn.Linear(D, 5)

    def forward(self, x):
        return self.out(torch.tanh(self.attn(x)))


def test_op_level_and_dense_layers_in_one_file(tmp_path):
    model = Mixed()
    config = jaxlora.LoRAConfig(r=R, alpha=ALPHA, targets=[*TARGETS, "out"])
    jnnx.inject(model, config, nnx.Rngs(2), inputs=(jnp.asarray(X),))
    keys = iter(jax.random.split(jax.random.key(11), 16))
    for factor in jax.tree.leaves(
        nnx.state(model, nnx.LoRAParam), is_leaf=lambda v: isinstance(v, nnx.Variable)
    ):
        factor[...] = 0.3 * jax.random.normal(next(keys), factor.shape)
    twin = TorchMixed()
    twin.attn = _torch_twin(model).attn
    with torch.no_grad():
        twin.out.weight.copy_(torch.from_numpy(np.asarray(model.out.kernel[...]).T.copy()))
        twin.out.bias.copy_(torch.from_numpy(np.asarray(model.out.bias[...]).copy()))
    jnnx.save_adapter(model, tmp_path, path_map=PATH_MAP)
    y_peft = peft_load(twin.eval(), tmp_path)(torch.from_numpy(X)).detach().numpy()
    assert rel_err(model(jnp.asarray(X)), y_peft) <= TOL
    other = Mixed()
    jnnx.inject(other, config, nnx.Rngs(5), inputs=(jnp.asarray(X),))
    jnnx.load_adapter(other, tmp_path, path_map=PATH_MAP)
    want, got = _lora_state(model), _lora_state(other)
    assert jax.tree.all(jax.tree.map(np.array_equal, want, got))
