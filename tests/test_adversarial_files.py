"""Hostile inputs to the configuration and the adapter files, on all three sides (torchlora,
Linen, NNX): each is either handled correctly (compared with the other frameworks) or refused
with an error naming the bad value, and a refused load changes nothing."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import jaxlora
import jaxlora.nnx
import torchlora
from _loracore import peft_fields
from jaxlora.config import LoRAConfig
from parity_tests.test_peft_files import LinenNet, NnxNet, TorchNet

X = np.random.default_rng(0).standard_normal((3, 12)).astype("f4")


# The nets of the PEFT file parity tests: the same three layers in each framework.


def linen_params() -> dict:
    model = TorchNet()
    names = ("query", "value", "out")
    return {n: jaxlora.from_torch(getattr(model, n).state_dict()) for n in names}


def nnx_net() -> NnxNet:
    net = NnxNet()
    for name, layer in linen_params().items():
        for leaf, value in layer.items():
            getattr(getattr(net, name), leaf)[...] = value
    return net


def torch_adapter(directory, seed=0, **config) -> TorchNet:
    """Saves a torchlora adapter with non-zero A and B; returns the adapted model."""
    config = {"r": 4, "alpha": 8, "targets": ["query", "value"], **config}
    model = torchlora.inject(TorchNet(), torchlora.LoRAConfig(**config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    torchlora.save_adapter(model, directory)
    return model


def load_everywhere(directory) -> dict[str, np.ndarray]:
    """Outputs of the adapter loaded into a plain model on each side."""
    params = jaxlora.load_adapter(linen_params(), directory)
    with jaxlora.intercept(jaxlora.read_adapter_config(directory, path_map=None)):
        y_linen = LinenNet().apply({"params": params}, X)
    return {
        "torch": torchlora.load_adapter(TorchNet(), directory)(torch.from_numpy(X)).detach(),
        "linen": np.asarray(y_linen),
        "nnx": np.asarray(jaxlora.nnx.load_adapter(nnx_net(), directory)(jnp.asarray(X))),
    }


def refused_everywhere(directory, match) -> None:
    """Each side refuses the directory with ``match``, and leaves its model unchanged."""
    model = TorchNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        torchlora.load_adapter(model, directory)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, torchlora.Linear) for m in model.modules())
    with pytest.raises(ValueError, match=match):
        jaxlora.load_adapter(linen_params(), directory)
    net = nnx_net()
    with pytest.raises(ValueError, match=match):
        jaxlora.nnx.load_adapter(net, directory)
    assert not any(isinstance(m, jaxlora.nnx.LoRALinear) for _, m in nnx.iter_modules(net))


# --- 2. The configuration is checked when it is built -----------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(use_rslora="no"), TypeError, r"use_rslora must be True or False, got 'no'"),
        (dict(use_rslora="false"), TypeError, r"use_rslora must be True or False, got 'false'"),
        (dict(use_rslora=1), TypeError, r"use_rslora must be True or False, got 1"),
        (dict(targets=None), TypeError, r"targets must be a regular expression .* got None"),
        (dict(targets={"q": 1}), TypeError, r"targets must be .* \(dict\)"),
        (dict(rank_pattern=["q"]), TypeError, r"rank_pattern must be a mapping .* \['q'\]"),
        (dict(alpha_pattern="q"), TypeError, r"alpha_pattern must be a mapping"),
        (dict(rank_pattern={"(q": 2}), ValueError, r"rank_pattern\['\(q'\]: the key is not a"),
        (dict(alpha_pattern={"q[": 2}), ValueError, r"alpha_pattern\['q\['\]: the key is not"),
        (dict(init=None), ValueError, r"init must be one of"),
    ],
    ids=[
        "rslora-no",
        "rslora-false",
        "rslora-1",
        "targets-none",
        "targets-dict",
        "rank-pattern-list",
        "alpha-pattern-str",
        "rank-key-regex",
        "alpha-key-regex",
        "init-none",
    ],
)
def test_config_refuses_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoRAConfig(**{"r": 4, "targets": ["q"], **kwargs})


@pytest.mark.parametrize("value", ["false", "no", 0, 1, None, "true"])
def test_peft_use_rslora_must_be_a_json_bool(tmp_path, value):
    torch_adapter(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_rslora": value}))
    refused_everywhere(tmp_path, r"adapter_config\.json: LoRAConfig: use_rslora must be True")


def test_numpy_scalars_become_plain_numbers():
    config = LoRAConfig(
        r=np.int64(4),
        alpha=np.float32(16),
        dropout=np.float64(0.1),
        targets=["q"],
        rank_pattern={"q": np.int32(2)},
        alpha_pattern={"q": np.float16(3)},
    )
    text = json.dumps(config.to_peft())  # raised TypeError for numpy scalars before
    back = json.loads(text)
    assert (back["r"], back["lora_alpha"], back["rank_pattern"]) == (4, 16.0, {"q": 2})
    assert type(config.r) is int and type(config.alpha) is float
    assert config.alpha_for("a.q") == 3.0 and config.rank_for("a.q") == 2


def test_save_with_numpy_scalar_hyperparameters_on_all_three_sides(tmp_path):
    config = LoRAConfig(r=np.int64(4), alpha=np.float32(16), targets=["query", "value"])
    params = jaxlora.inject(linen_params(), config, jax.random.key(0))
    jaxlora.save_adapter(params, tmp_path / "linen", config)
    net = jaxlora.nnx.inject(nnx_net(), config, nnx.Rngs(0))
    jaxlora.nnx.save_adapter(net, tmp_path / "nnx")
    model = torchlora.inject(TorchNet(), config)
    torchlora.save_adapter(model, tmp_path / "torch")
    for side in ("linen", "nnx", "torch"):
        saved = json.loads((tmp_path / side / "adapter_config.json").read_text())
        assert (saved["r"], saved["lora_alpha"]) == (4, 16.0)
        assert torchlora.load_adapter(TorchNet(), tmp_path / side).query.scaling == 4.0


# --- 3. A targets entry or a pattern key that matches nothing is a typo -------------------

PATHS = ["blocks.0.attn.query", "blocks.0.attn.value", "blocks.0.mlp.fc", "head"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(targets=["query", "valeu"]), r"targets entry 'valeu' matches no layer.*blocks\.0"),
        (dict(targets=["query"], rank_pattern={"valeu": 2}), r"rank_pattern key 'valeu'"),
        (dict(targets=["query"], alpha_pattern={"value": 2}), r"alpha_pattern key 'value'"),
    ],
    ids=["targets-typo", "rank-key-typo", "alpha-key-unselected"],
)
def test_select_refuses_what_matches_nothing(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(r=2, **kwargs).select(PATHS)
    assert LoRAConfig(r=2, **kwargs).select(PATHS, strict=False) == ["blocks.0.attn.query"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(targets=["query", "valeu"]), r"targets entry 'valeu' matches no layer"),
        (dict(targets=["query"], alpha_pattern={"qeury": 2}), r"alpha_pattern key 'qeury'"),
    ],
    ids=["targets-typo", "alpha-key-typo"],
)
def test_every_inject_refuses_typos(kwargs, match):
    config = LoRAConfig(r=2, **kwargs)
    model = TorchNet()
    with pytest.raises(ValueError, match=match):
        torchlora.inject(model, config)
    assert not any(isinstance(m, torchlora.Linear) for m in model.modules())
    with pytest.raises(ValueError, match=match):
        jaxlora.inject(linen_params(), config, jax.random.key(0))
    net = nnx_net()
    with pytest.raises(ValueError, match=match):
        jaxlora.nnx.inject(net, config, nnx.Rngs(0))
    assert not any(isinstance(m, jaxlora.nnx.LoRALinear) for _, m in nnx.iter_modules(net))


def test_file_with_unmatched_pattern_key_and_target_entry_loads(tmp_path):
    """PEFT ignores a rank/alpha_pattern key or a target entry that matches no layer (and
    writes such files), so a file is not refused for one: its tensors say exactly which layers
    it adapts, and the outputs agree on every side."""
    model = torch_adapter(tmp_path, rank_pattern={"value": 2}, alpha_pattern={"value": 6})
    path = tmp_path / "adapter_config.json"
    peft = json.loads(path.read_text())
    peft["rank_pattern"] = {"not_a_layer": 3, **peft["rank_pattern"]}
    peft["alpha_pattern"] = {"nor_this": 1, **peft["alpha_pattern"]}
    peft["target_modules"] = [*peft["target_modules"], "missing_layer"]
    path.write_text(json.dumps(peft))
    weights = tmp_path / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})  # as PEFT's: no metadata
    y = model(torch.from_numpy(X)).detach().numpy()
    for side, out in load_everywhere(tmp_path).items():
        np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-6, err_msg=side)


# --- 4. The files: checksum, dtypes, metadata, hand edits -----------------------------------


def _data_offset(path) -> int:
    blob = path.read_bytes()
    return 8 + int.from_bytes(blob[:8], "little")


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_flipped_bit_in_tensor_data_is_refused(tmp_path_factory, where, bit):
    directory = tmp_path_factory.mktemp("flip")
    torch_adapter(directory)
    path = directory / "adapter_model.safetensors"
    blob = bytearray(path.read_bytes())
    start = _data_offset(path)
    blob[start + int(where * (len(blob) - start))] ^= 1 << bit
    path.write_bytes(bytes(blob))
    refused_everywhere(directory, r"adapter_model\.safetensors: .*does not match the checksum")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_and_bool_tensors_are_refused(tmp_path, dtype):
    torch_adapter(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.query.lora_A.weight"
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, path, metadata={"format": "pt"})  # as PEFT writes it: no checksum
    name = {torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL", torch.uint8: "U8"}[dtype]
    refused_everywhere(tmp_path, rf"tensor '{key}' has dtype {name}; adapter tensors must be")


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]", '{"peft_type": "LORA"}'])
def test_bad_embedded_metadata_names_the_file(tmp_path, bad):
    torch_adapter(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file(load_file(path), path, metadata={"format": "pt", "lora_config": bad})
    refused_everywhere(
        tmp_path, r"adapter_model\.safetensors: its embedded 'lora_config' metadata is not"
    )


def test_bad_header_is_a_value_error(tmp_path):
    torch_adapter(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    blob = path.read_bytes()
    path.write_bytes(blob[:8] + b"[" + blob[9:])  # the header's JSON broken
    refused_everywhere(tmp_path, r"adapter_model\.safetensors: cannot be read as safetensors")


@pytest.mark.parametrize(
    "edit",
    [
        {"base_model_name_or_path": "gpt2"},
        {"revision": "main", "task_type": "CAUSAL_LM"},
        {"inference_mode": False, "peft_version": "0.21.2"},
        {"lora_alpha": 8.0},  # the same number written as a float
    ],
    ids=["base-model", "revision-task", "inference-mode", "alpha-float"],
)
def test_hand_edits_that_change_nothing_are_accepted(tmp_path, edit):
    model = torch_adapter(tmp_path)
    path = tmp_path / "adapter_config.json"
    peft = {**json.loads(path.read_text()), **edit}
    path.write_text(json.dumps(peft, indent=4))
    y = model(torch.from_numpy(X)).detach().numpy()
    for side, out in load_everywhere(tmp_path).items():
        np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-6, err_msg=side)


@pytest.mark.parametrize(
    "edit,match",
    [
        ({"lora_alpha": 9}, r"lora_alpha|alpha: 8 in adapter_model\.safetensors, 9 in"),
        ({"use_rslora": True}, r"use_rslora: False in adapter_model\.safetensors, True in"),
        ({"alpha_pattern": {"value": 2}}, r"alpha_pattern: \{\} in adapter_model"),
        ({"target_modules": ["query"]}, r"targets: \('query', 'value'\) in"),
    ],
    ids=["alpha", "rslora", "alpha-pattern", "targets"],
)
def test_a_mixed_save_is_still_detected(tmp_path, edit, match):
    torch_adapter(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    refused_everywhere(tmp_path, "come from different saves.*" + match)


# --- 5. Saving builds everything before touching the directory -----------------------------


def test_failed_serialisation_creates_nothing(tmp_path, monkeypatch):
    import safetensors.numpy

    def failing(*args, **kwargs):
        raise OSError("cannot serialise (injected)")

    monkeypatch.setattr(safetensors.numpy, "save", failing)
    config = LoRAConfig(r=2, targets=["query"])
    params = jaxlora.inject(linen_params(), config, jax.random.key(0))
    with pytest.raises(OSError, match="injected"):
        jaxlora.save_adapter(params, tmp_path / "new" / "adapter", config)
    assert not (tmp_path / "new").exists()


def test_checksum_is_written_and_verified(tmp_path):
    torch_adapter(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter_model.safetensors", "np") as f:
        digest = f.metadata()["lora_sha256"]
    assert len(digest) == 64 and int(digest, 16) >= 0
    load_everywhere(tmp_path)  # the intact file loads


# --- 6, 7. Linen and NNX with path_map ----------------------------------------------------

RENAMED = {"q_dense": "query", "v_dense": "value", "o_dense": "out"}  # JAX path -> torch path


class RenamedLinen(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(16, name="q_dense")(x))
        return nn.Dense(5, name="o_dense")(jnp.tanh(nn.Dense(16, name="v_dense")(x)))


class RenamedNnx(nnx.Module):
    def __init__(self) -> None:
        net = nnx_net()
        self.q_dense, self.v_dense, self.o_dense = net.query, net.value, net.out

    def __call__(self, x):
        return self.o_dense(jnp.tanh(self.v_dense(jnp.tanh(self.q_dense(x)))))


def renamed_params() -> dict:
    params = linen_params()
    return {flax: params[torch_path] for flax, torch_path in RENAMED.items()}


@pytest.mark.parametrize("as_function", [False, True], ids=["dict", "function"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_linen_path_map_keys_the_patterns_by_flax_path(tmp_path, as_function, use_rslora):
    model = torch_adapter(
        tmp_path,
        use_rslora=use_rslora,
        rank_pattern={"value": 2},
        alpha_pattern={"value": 27, "query": 5},
    )
    y_torch = model(torch.from_numpy(X)).detach().numpy()
    path_map = (lambda p: RENAMED.get(p, p)) if as_function else dict(RENAMED)
    params = renamed_params()
    loaded = jaxlora.load_adapter(params, tmp_path, path_map=path_map)
    config = jaxlora.read_adapter_config(tmp_path, path_map=path_map, params=params)
    assert (config.alpha_for("v_dense"), config.alpha_for("q_dense")) == (27.0, 5.0)
    assert config.rank_for("v_dense") == 2 and config.use_rslora is use_rslora
    with jaxlora.intercept(config):
        y_linen = RenamedLinen().apply({"params": loaded}, X)
    merged = jaxlora.merge(loaded, alpha=config.alpha_for, use_rslora=config.use_rslora)
    y_merged = RenamedLinen().apply({"params": merged}, X)
    y_nnx = jaxlora.nnx.load_adapter(RenamedNnx(), tmp_path, path_map=path_map)(jnp.asarray(X))
    for name, y in (("linen", y_linen), ("merged", y_merged), ("nnx", y_nnx)):
        np.testing.assert_allclose(np.asarray(y), y_torch, rtol=1e-5, atol=1e-5, err_msg=name)


def test_linen_path_map_must_be_stated_for_a_file_with_patterns(tmp_path):
    torch_adapter(tmp_path, alpha_pattern={"value": 27})
    with pytest.raises(ValueError, match=r"keyed by torch module paths: call read_adapter_config"):
        jaxlora.read_adapter_config(tmp_path)
    with pytest.raises(ValueError, match=r"a path_map function needs params="):
        jaxlora.read_adapter_config(tmp_path, path_map=lambda p: RENAMED.get(p, p))
    with pytest.raises(ValueError, match=r"'value' is the image of no Flax path"):
        jaxlora.read_adapter_config(
            tmp_path, path_map={"q_dense": "query"}, params=renamed_params()
        )
    with pytest.raises(ValueError, match=r"'query' is the image of \['a', 'b'\]"):
        jaxlora.read_adapter_config(tmp_path, path_map={"a": "query", "b": "query"})
    assert jaxlora.read_adapter_config(tmp_path, path_map=None).alpha_for("value") == 27.0
    torch_adapter(tmp_path / "plain")  # no patterns: nothing to re-key, no path_map needed
    assert jaxlora.read_adapter_config(tmp_path / "plain").alpha_for("x") == 8.0


def test_unmatched_paths_suggest_path_map(tmp_path):
    torch_adapter(tmp_path)
    match = (
        r"the file's module path\(s\) \['query', 'value'\] are not in the model \(the file "
        r"holds: query, value; the model's layer paths are: o_dense, q_dense, v_dense\); if "
        r"the model's names differ from the torch names, pass path_map="
    )
    params = renamed_params()
    with pytest.raises(ValueError, match=match):
        jaxlora.load_adapter(params, tmp_path)
    injected = jaxlora.inject(params, LoRAConfig(r=4, targets=["q_dense"]), jax.random.key(0))
    with pytest.raises(ValueError, match=match):
        jaxlora.load_adapter(injected, tmp_path)
    with pytest.raises(ValueError, match=match):
        jaxlora.nnx.load_adapter(RenamedNnx(), tmp_path)
    with pytest.raises(ValueError, match=r"after path_map are: .*fix path_map="):
        jaxlora.load_adapter(params, tmp_path, path_map={"q_dense": "query"})


# --- 8. PiSSA/OLoRA files and injected models ---------------------------------------------

INJECTED = dict(r=4, targets=["query", "value"])


def _plain_load_reference(directory) -> np.ndarray:
    return torchlora.load_adapter(TorchNet(), directory)(torch.from_numpy(X)).detach().numpy()


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("injected_init", ["kaiming", "gaussian"])
def test_weight_init_file_into_kaiming_injected_model(tmp_path, init, injected_init):
    """The residual is built from the injected layer's weight (still W), as a plain load does."""
    torch_adapter(tmp_path, init=init, alpha=6)
    y_ref = _plain_load_reference(tmp_path)
    injected = LoRAConfig(**INJECTED, alpha=3, init=injected_init)
    model = torchlora.load_adapter(torchlora.inject(TorchNet(), injected), tmp_path)
    assert model.query.init == init and model.query.scaling == 1.5
    net = jaxlora.nnx.load_adapter(jaxlora.nnx.inject(nnx_net(), injected, nnx.Rngs(0)), tmp_path)
    for name, y in (("torch", model(torch.from_numpy(X)).detach()), ("nnx", net(jnp.asarray(X)))):
        np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5, err_msg=name)
    params = jaxlora.inject(linen_params(), injected, jax.random.key(0))
    with pytest.raises(ValueError, match=rf"init='{init}' adapter, .* load it into the plain"):
        jaxlora.load_adapter(params, tmp_path)


@pytest.mark.parametrize(
    "file_init,file_alpha,model_init,model_alpha",
    [
        ("kaiming", 8, "pissa", 8),
        ("gaussian", 8, "olora", 8),
        ("olora", 8, "pissa", 8),
        ("olora", 8, "olora", 3),  # OLoRA's residual depends on the scaling
    ],
    ids=["plain-into-pissa", "plain-into-olora", "olora-into-pissa", "olora-other-scaling"],
)
def test_file_into_weight_init_model_it_does_not_fit_is_refused(
    tmp_path, file_init, file_alpha, model_init, model_alpha
):
    torch_adapter(tmp_path, init=file_init, alpha=file_alpha)
    injected = LoRAConfig(**INJECTED, alpha=model_alpha, init=model_init)
    match = rf"was injected with init='{model_init}' .* load the file into the plain base model"
    model = torchlora.inject(TorchNet(), injected)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        torchlora.load_adapter(model, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    net = jaxlora.nnx.inject(nnx_net(), injected, nnx.Rngs(0))
    kernel = np.asarray(net.query.kernel[...])
    with pytest.raises(ValueError, match=match):
        jaxlora.nnx.load_adapter(net, tmp_path)
    np.testing.assert_array_equal(np.asarray(net.query.kernel[...]), kernel)
    # Linen: the tree's lora_init record says its kernels are residuals.
    params = jaxlora.inject(linen_params(), injected, jax.random.key(0))
    linen_match = (
        rf"was injected with init='{model_init}', so its kernel is the residual"
        if file_init in ("kaiming", "gaussian")
        else "load it into the plain base tree"
    )
    with pytest.raises(ValueError, match=linen_match):
        jaxlora.load_adapter(params, tmp_path)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_linen_residual_record_survives_training_split_and_unmerge(tmp_path, init):
    """The lora_init record (no arrays) goes through jit, grad, freeze_base/optax, split/combine
    and a merge record; merging drops it (the merged kernel is the full weight again); a
    PiSSA/OLoRA file loaded into the plain tree adds it; then a plain file is refused."""
    import optax

    config = LoRAConfig(**INJECTED, alpha=8, init=init)
    params = jaxlora.inject(linen_params(), config, jax.random.key(0))
    tx = jaxlora.freeze_base(optax.adam(1e-2))
    model = LinenNet()

    @jax.jit
    def step(params, state):
        with jaxlora.intercept(config):
            grads = jax.grad(lambda p: (model.apply({"params": p}, X) ** 2).sum())(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, _ = step(params, tx.init(params))
    adapter, base = jaxlora.split(params)
    params = jaxlora.combine(adapter, base)
    merged, record = jaxlora.merge(params, alpha=8, record=True)
    assert "lora_init" not in merged["query"]
    params = jaxlora.unmerge(merged, record)
    assert params["query"]["lora_init"] == params["value"]["lora_init"]
    torch_adapter(tmp_path / "plain", alpha=8)
    with pytest.raises(ValueError, match=rf"init='{init}', so its kernel is the residual"):
        jaxlora.load_adapter(params, tmp_path / "plain")
    torch_adapter(tmp_path / "weight-init", init=init, alpha=8)
    loaded = jaxlora.load_adapter(linen_params(), tmp_path / "weight-init")
    assert loaded["query"]["lora_init"] == params["query"]["lora_init"]
    with pytest.raises(ValueError, match=rf"init='{init}', so its kernel is the residual"):
        jaxlora.load_adapter(loaded, tmp_path / "plain")


@pytest.mark.parametrize("tree_init,config_init", [("pissa", "kaiming"), ("kaiming", "olora")])
def test_linen_save_refuses_a_config_with_another_init(tmp_path, tree_init, config_init):
    """The file's init tells PEFT whether to rebuild a residual base: it must be the tree's."""
    params = jaxlora.inject(
        linen_params(), LoRAConfig(**INJECTED, alpha=8, init=tree_init), jax.random.key(0)
    )
    with pytest.raises(ValueError, match=rf"injected with init=.*config says init='{config_init}'"):
        jaxlora.save_adapter(params, tmp_path, LoRAConfig(**INJECTED, alpha=8, init=config_init))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_plain_file_into_hand_built_weight_init_layer_is_refused(tmp_path, init):
    """A LoRALinear made with from_linear(init=...) by hand (no model.lora_config) records its
    init, so a plain file is refused there too, and its residual kernel is left as it was."""
    torch_adapter(tmp_path, alpha=8)
    net = nnx_net()
    for name in ("query", "value"):
        layer = jaxlora.nnx.LoRALinear.from_linear(
            getattr(net, name), r=4, alpha=8, init=init, rngs=nnx.Rngs(0)
        )
        setattr(net, name, layer)
    assert not hasattr(net, "lora_config")
    kernel = np.asarray(net.query.kernel[...])
    with pytest.raises(ValueError, match=rf"was injected with init='{init}' .* plain base model"):
        jaxlora.nnx.load_adapter(net, tmp_path)
    np.testing.assert_array_equal(np.asarray(net.query.kernel[...]), kernel)


@pytest.mark.parametrize("init,alpha", [("pissa", 3), ("olora", 8)])
def test_weight_init_file_into_same_init_model(tmp_path, init, alpha):
    """A PiSSA-injected model holds the same residual whatever its alpha (the SVD part does not
    depend on the scaling); an OLoRA one the same residual at the same scaling."""
    torch_adapter(tmp_path, init=init, alpha=8)
    y_ref = _plain_load_reference(tmp_path)
    injected = LoRAConfig(**INJECTED, alpha=alpha, init=init)
    model = torchlora.load_adapter(torchlora.inject(TorchNet(), injected), tmp_path)
    net = jaxlora.nnx.load_adapter(jaxlora.nnx.inject(nnx_net(), injected, nnx.Rngs(0)), tmp_path)
    for name, y in (("torch", model(torch.from_numpy(X)).detach()), ("nnx", net(jnp.asarray(X)))):
        np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5, err_msg=name)


# --- Property tests: any config dict, any truncation ---------------------------------------

JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 20),
    st.floats(-2, 40, allow_nan=False),
    st.sampled_from(["", "none", "all", "q", "pissa", "false", "(bad"]),
    st.lists(st.sampled_from(["q", "k", ""]), max_size=2),
    st.dictionaries(st.sampled_from(["q", "k", "(x"]), st.integers(0, 4), max_size=2),
)
FIELD_NAMES = st.sampled_from([*sorted(peft_fields.KNOWN - {"peft_type"}), "future_option"])


@settings(max_examples=300, deadline=None)
@given(changes=st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=4))
def test_from_peft_is_right_or_refuses(changes):
    """Any edit of a valid adapter_config.json: a ValueError/TypeError, or a config that says
    exactly what the file says (and no refused or unknown feature switched on)."""
    peft = {**LoRAConfig(r=4, alpha=8, targets=["q"]).to_peft(), **changes}
    try:
        config = LoRAConfig.from_peft(peft)
    except (TypeError, ValueError):
        return
    for key, value in peft.items():
        if key in peft_fields.REFUSED:
            assert any(peft_fields._same(value, off) for off in peft_fields.REFUSED[key]), key
        elif key not in peft_fields.KNOWN:
            assert peft_fields._off_like(value), key
    assert config.r == peft["r"] and config.alpha == peft["lora_alpha"]
    assert config.use_rslora is peft.get("use_rslora", False)
    targets = peft["target_modules"]
    assert config.targets == (targets if isinstance(targets, str) else tuple(targets))
    assert config.dropout == (peft.get("lora_dropout") or 0.0)
    assert config.rank_pattern == (peft.get("rank_pattern") or {})
    assert config.alpha_pattern == (peft.get("alpha_pattern") or {})


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(keep=st.floats(0, 1, exclude_max=True))
def test_any_truncation_is_a_value_error(tmp_path_factory, keep):
    directory = tmp_path_factory.mktemp("cut")
    torch_adapter(directory)
    path = directory / "adapter_model.safetensors"
    blob = path.read_bytes()
    path.write_bytes(blob[: int(keep * len(blob))])
    for read in (jaxlora.read_adapter_config, torchlora.read_adapter_config):
        with pytest.raises(ValueError, match=r"adapter_model\.safetensors: cannot be read"):
            read(directory)
