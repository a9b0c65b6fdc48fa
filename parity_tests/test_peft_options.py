"""Every option of the installed ``peft.LoraConfig`` against our loaders: each field is in the
one table (``_loracore/peft_fields.py``), an option that changes the math is refused naming
it on all three sides, and what PEFT ignores we ignore too (with PEFT's outputs)."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings

import jax.numpy as jnp
import numpy as np
import peft
import peft.tuners.lora.config as lora_config
import pytest
import torch
from flax import nnx
from peft import LoraConfig, get_peft_model

import jaxlora.nnx
import torchlora
from _loracore import peft_fields
from jaxlora.config import LoRAConfig
from tests.test_adversarial_files import (
    TorchNet,
    X,
    load_everywhere,
    nnx_net,
    refused_everywhere,
)

BASE = dict(r=4, lora_alpha=8, target_modules=["query", "value"])

# Each refused field set to a value PEFT's LoraConfig accepts. PEFT can save most of them for
# this small net; the others (PEFT needs a transformers model, megatron, an embedding, or
# resets the option on nn.Linear) are written as PEFT serialises them: the config's to_dict().
OPTIONS = {
    "exclude_modules": lambda: ["out"],
    "bias": lambda: "all",
    "layers_to_transform": lambda: [0],
    "eva_config": lora_config.EvaConfig,
    "corda_config": lora_config.CordaConfig,
    "lora_ga_config": lora_config.LoraGAConfig,
    "velora_config": lora_config.VeloraConfig,
    "alora_invocation_tokens": lambda: [1, 2],
    "use_qalora": lambda: True,
    "monteclora_config": lora_config.MontecloraConfig,
    "lora_bias": lambda: True,
    "kasa_config": lora_config.KasaConfig,
    "ensure_weight_tying": lambda: True,
}
WRITTEN = {
    "fan_in_fan_out": lambda: True,  # PEFT resets it to False for nn.Linear, with a warning
    "loftq_config": lambda: lora_config.LoftQConfig(loftq_bits=4),  # dropped unless loftq init
    "modules_to_save": lambda: ["out"],
    "megatron_config": lambda: {"num_layers": 2},
    "trainable_token_indices": lambda: [0, 1],
    "layer_replication": lambda: [[0, 1]],
    "target_parameters": lambda: ["query.weight"],
    "use_bdlora": lora_config.BdLoraConfig,
    "arrow_config": lora_config.ArrowConfig,
    "layers_pattern": lambda: "blocks",  # needs layers_to_transform in PEFT; removed below
}


def test_every_field_of_the_installed_lora_config_is_in_the_table():
    fields = {f.name: f for f in dataclasses.fields(LoraConfig)}
    missing = sorted(set(fields) - peft_fields.KNOWN)
    assert not missing, f"peft {peft.__version__} has LoraConfig fields not in the table: {missing}"
    # each refusal is tested; target_parameters is read into LoRAConfig (from_peft) but
    # refused in an adapter file (parse_config), which OPTIONS tests
    refused_in_files = set(peft_fields.REFUSED) | {"target_parameters"}
    assert set(OPTIONS) | set(WRITTEN) == refused_in_files
    for name, off in peft_fields.REFUSED.items():  # PEFT's default is an accepted "off" value
        field = fields[name]
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        assert any(type(default) is type(v) and default == v for v in off), name


def _plain_peft_adapter(directory) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(TorchNet(), LoraConfig(**BASE))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(str(directory))
    return model.eval()


def _as_json(value):
    if isinstance(value, set):
        return sorted(value)
    raise TypeError(type(value))


@pytest.mark.parametrize("field", sorted(OPTIONS))
def test_option_saved_by_peft_is_refused_by_name(tmp_path, field):
    value = OPTIONS[field]()
    with warnings.catch_warnings():  # PEFT warns about several of these options
        warnings.simplefilter("ignore")
        model = get_peft_model(TorchNet(), LoraConfig(**BASE, **{field: value}))
        model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())[field]
    assert saved not in peft_fields.REFUSED[field]  # PEFT kept the option in its file
    refused_everywhere(tmp_path, "sets " + re.escape(f"{field}={saved!r}") + ", which is not")


@pytest.mark.parametrize("field", sorted(WRITTEN))
def test_option_in_peft_to_dict_is_refused_by_name(tmp_path, field):
    _plain_peft_adapter(tmp_path)
    # PEFT needs layers_to_transform with layers_pattern (reset below, so that only the
    # option under test is set), and keeps loftq_config only with LoftQ's init (refused too,
    # after it: the refusal names loftq_config).
    needs = {"layers_pattern": {"layers_to_transform": [0]}}
    needs["loftq_config"] = {"init_lora_weights": "loftq"}
    extra = needs.get(field, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LoraConfig(**BASE, **extra, **{field: WRITTEN[field]()}).to_dict()
    if field == "layers_pattern":
        config["layers_to_transform"] = None
    (tmp_path / "adapter_config.json").write_text(json.dumps(config, default=_as_json))
    value = json.loads(json.dumps(config[field], default=_as_json))
    refused_everywhere(tmp_path, "sets " + re.escape(f"{field}={value!r}") + ", which is not")


@pytest.mark.parametrize(
    "value,refused",
    [(True, True), (3, True), ("x", True), ([1], True), (None, False), ({}, False), ("", False)],
    ids=["true", "int", "str", "list", "null", "empty-dict", "empty-str"],
)
def test_unknown_field_is_refused_unless_off(tmp_path, value, refused):
    model = _plain_peft_adapter(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "future_option": value}))
    if refused:
        refused_everywhere(tmp_path, re.escape(f"sets future_option={value!r}, a field"))
        return
    y = model(torch.from_numpy(X)).detach().numpy()
    for side, out in load_everywhere(tmp_path).items():
        np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-6, err_msg=side)


def test_inert_fields_as_peft_writes_them_load(tmp_path):
    """Metadata PEFT writes (task_type, base model, revision, peft_version ...) loads, with the
    outputs of the same adapter without it."""
    model = _plain_peft_adapter(tmp_path)
    path = tmp_path / "adapter_config.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LoraConfig(
            **BASE, task_type="CAUSAL_LM", base_model_name_or_path="x/y", revision="main"
        ).to_dict()
    config = {**json.loads(path.read_text()), **config, "inference_mode": True}
    path.write_text(json.dumps(config, default=_as_json))
    y = model(torch.from_numpy(X)).detach().numpy()
    for side, out in load_everywhere(tmp_path).items():
        np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-6, err_msg=side)


def test_unmatched_pattern_key_is_ignored_as_peft_does(tmp_path):
    """A rank/alpha_pattern key that matches no layer: PEFT saves and serves the file (the key
    does nothing), so our loaders accept it and give PEFT's outputs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(
            TorchNet(),
            LoraConfig(
                **BASE,
                rank_pattern={"no_such_layer": 2, "value": 3},
                alpha_pattern={"nor_this": 1, "value": 5},
            ),
        )
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(str(tmp_path))
    assert (
        "no_such_layer"
        in json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    )
    y = model.eval()(torch.from_numpy(X)).detach().numpy()
    for side, out in load_everywhere(tmp_path).items():
        np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-6, err_msg=side)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_weight_init_file_into_injected_models(tmp_path, init):
    """A PiSSA/OLoRA file saved by PEFT, loaded into a kaiming-injected torch or NNX model,
    gives PEFT's outputs (the residual is built from the injected layer's weight)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(TorchNet(), LoraConfig(**BASE, init_lora_weights=init))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)  # trained away from the init
    model.save_pretrained(str(tmp_path))
    y_peft = model.eval()(torch.from_numpy(X)).detach().numpy()
    injected = LoRAConfig(r=4, alpha=2, targets=["query", "value"])
    ours = torchlora.load_adapter(torchlora.inject(TorchNet(), injected), tmp_path)
    net = jaxlora.nnx.load_adapter(jaxlora.nnx.inject(nnx_net(), injected, nnx.Rngs(0)), tmp_path)
    for name, y in (("torch", ours(torch.from_numpy(X)).detach()), ("nnx", net(jnp.asarray(X)))):
        np.testing.assert_allclose(np.asarray(y), y_peft, rtol=1e-5, atol=1e-5, err_msg=name)
