"""Hostile but realistic torch models and inputs (issue 15): each gives the closed-form result
or a clear refusal that changes nothing.

References are numpy: a Linear's output is ``x Wᵀ + b + scaling · x Aᵀ Bᵀ``, so an adapted
module must give exactly what the same module gives with ``W + scaling · B A`` put in place of
its weight.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import torchlora


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v if _lazy(v) else v.clone() for k, v in model.state_dict().items()}


def _lazy(value: torch.Tensor) -> bool:
    return isinstance(value, nn.parameter.UninitializedParameter)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b if _lazy(b) else torch.equal(a, b)


def _unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor], types: list[type]) -> bool:
    """Same tensors, same module types, no lora_config and every parameter still trainable."""
    state = model.state_dict()
    return (
        set(state) == set(snapshot)
        and all(_same(state[k], v) for k, v in snapshot.items())
        and [type(m) for m in model.modules()] == types
        and not hasattr(model, "lora_config")
        and all(p.requires_grad for p in model.parameters())
    )


def _refused(model, config, error, match):
    """inject raises ``error`` matching ``match`` and leaves ``model`` exactly as it was."""
    snapshot, types = _snapshot(model), [type(m) for m in model.modules()]
    with pytest.raises(error, match=match):
        torchlora.inject(model, config)
    assert _unchanged(model, snapshot, types)


def _random_b(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torchlora.LoRALayer):
                m.lora_b.normal_()


def _with_merged_weight(model: nn.Module, path: str, layer: torchlora.LoRALayer) -> nn.Module:
    """A plain copy of ``model`` whose module at ``path`` holds W + scaling·B A (numpy)."""
    delta = layer.scaling * _np(layer.lora_b.flatten(1)) @ _np(layer.lora_a.flatten(1))
    merged = _np(layer.weight) + delta.reshape(layer.weight.shape)
    reference = copy.deepcopy(model)
    plain = reference.get_submodule(path).to_base()
    with torch.no_grad():
        plain.weight.copy_(torch.from_numpy(merged))
    parent, _, name = path.rpartition(".")
    setattr(reference.get_submodule(parent), name, plain)
    return reference


# 1. Layers whose forward is not the base class's ---------------------------------------------


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


class ShiftedEmbedding(nn.Embedding):
    def forward(self, x):
        return super().forward(x) + 1.0


class OddConv(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight.flip(-1), bias)


class PlainSubclass(nn.Linear):
    """Overrides nothing that computes the output: it may be adapted."""

    def extra_repr(self) -> str:
        return "plain subclass"


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize(
    "layer,method",
    [
        (ScaledLinear(6, 4), "Linear.forward"),
        (ShiftedEmbedding(10, 4), "Embedding.forward"),
        (OddConv(2, 3, 3), "Conv2d._conv_forward"),
    ],
    ids=["linear", "embedding", "conv2d"],
)
def test_a_subclass_with_its_own_forward_is_refused(layer, method):
    _refused(
        Holder(layer),
        torchlora.LoRAConfig(r=2, targets=["layer"]),
        TypeError,
        rf"layer 'layer' \({type(layer).__name__}\) cannot be adapted: its class "
        rf"{type(layer).__name__} overrides {method}",
    )


def test_a_subclass_that_keeps_the_forward_is_adapted_exactly():
    torch.manual_seed(0)
    attention_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(6, 5)
    model = nn.Sequential(PlainSubclass(8, 6), nn.Tanh(), attention_proj)
    x = torch.randn(3, 8)
    torchlora.inject(model, torchlora.LoRAConfig(r=2, alpha=3, targets=["0", "2"]))
    _random_b(model)
    reference = _with_merged_weight(model, "0", model[0])
    reference = _with_merged_weight(reference, "2", reference[2])
    np.testing.assert_allclose(_np(model(x)), _np(reference(x)), atol=1e-5)


def _hooked() -> nn.Linear:
    layer = nn.Linear(4, 4)
    layer.register_forward_hook(lambda module, args, out: out * 2)
    return layer


def _instance_forward() -> nn.Linear:
    layer = nn.Linear(4, 4)
    plain = layer.forward
    layer.forward = lambda x: plain(x) + 1  # what wrappers such as accelerate's hooks do
    return layer


def _parametrized() -> nn.Linear:
    layer = nn.Linear(4, 4)
    parametrize.register_parametrization(layer, "weight", nn.Tanh())
    return layer


def _extra_parameter() -> nn.Linear:
    layer = PlainSubclass(4, 4)
    layer.temperature = nn.Parameter(torch.ones(()))
    return layer


@pytest.mark.parametrize(
    "make,match",
    [
        (_hooked, "it has forward_hooks registered, which replacing it would drop"),
        (_instance_forward, "its forward was replaced on the instance"),
        (_parametrized, r"it is parametrized \(torch.nn.utils.parametrize: weight\)"),
        (lambda: nn.LazyLinear(4), "it is a lazy module not yet initialised"),
        (_extra_parameter, "it holds parameter 'temperature' beyond weight and bias"),
    ],
    ids=["forward-hook", "instance-forward", "parametrized", "lazy", "extra-parameter"],
)
def test_a_module_whose_replacement_would_drop_behaviour_is_refused(make, match):
    model = Holder(make())
    snapshot, types = _snapshot(model), [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=rf"layer 'layer' \(\w+\) cannot be adapted: {match}"):
        torchlora.inject(model, torchlora.LoRAConfig(r=2, targets=["layer"]))
    assert _unchanged(model, snapshot, types)


# 2. Modules that read a child's weight instead of calling it -----------------------------------


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


@pytest.mark.parametrize(
    "make,targets,path,match",
    [
        (Attention, ["out_proj"], "attn.out_proj", "nn.MultiheadAttention never calls out_proj"),
        (_encoder, ["linear1"], "layers.0.linear1", "fused fast path"),
        (_encoder, ["layers.1.linear2"], "layers.1.linear2", "reads linear1.weight and linear2"),
        (
            lambda: nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True),
            ["out_proj"],
            "encoder.layers.0.self_attn.out_proj",
            "out_proj.weight and out_proj.bias to F.multi_head_attention_forward",
        ),
    ],
    ids=["mha-out-proj", "encoder-linear1", "encoder-linear2", "transformer-out-proj"],
)
def test_a_layer_its_parent_reads_directly_is_refused(make, targets, path, match):
    """PEFT injects these and the adapter is silently skipped (always for out_proj; in eval
    for the encoder layer's feed-forward)."""
    _refused(
        make(),
        torchlora.LoRAConfig(r=2, targets=targets),
        ValueError,
        rf"layer '{path}' cannot be adapted: .*{match}.*silently skipped",
    )


def test_the_weight_readers_really_skip_a_layer_put_there():
    """Why the refusals above exist, pinned on this torch: a LoRA layer put by hand where
    out_proj or linear1 was changes nothing in eval (the fast paths) or at all (out_proj)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8)
    attention, encoder = Attention().eval(), _encoder().layers[0].eval()
    with torch.no_grad():
        plain = [attention(x), encoder(x), attention.train()(x)]
    attention.eval()
    attention.attn.out_proj = torchlora.Linear.from_linear(attention.attn.out_proj, 2, copy=True)
    encoder.linear1 = torchlora.Linear.from_linear(encoder.linear1, 2, copy=True)
    _random_b(attention), _random_b(encoder)
    with torch.no_grad():
        assert torch.allclose(attention(x), plain[0], atol=1e-6)
        assert torch.allclose(encoder(x), plain[1], atol=1e-6)
        assert torch.allclose(attention.train()(x), plain[2], atol=1e-6)  # never called
    assert not torch.allclose(encoder.train()(x), plain[1], atol=1e-3)  # called when training


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_decoder_layer_calls_its_feed_forward_so_it_is_adapted_exactly(train):
    """nn.TransformerDecoderLayer has no fast path: linear1/linear2 are called in both modes."""
    torch.manual_seed(0)
    model = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    tgt, memory = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    plain = copy.deepcopy(model).train(train)
    torchlora.inject(model, torchlora.LoRAConfig(r=2, alpha=4, targets=["linear1", "linear2"]))
    _random_b(model)
    reference = _with_merged_weight(model, "linear1", model.linear1)
    reference = _with_merged_weight(reference, "linear2", model.linear2)
    model.train(train), reference.train(train)
    with torch.no_grad():
        out, expected = model(tgt, memory), reference(tgt, memory)
    np.testing.assert_allclose(_np(out), _np(expected), atol=1e-5)
    assert not torch.allclose(out, plain(tgt, memory), atol=1e-3)  # the adapter did act


# 3. Tied layers --------------------------------------------------------------------------------


class Aliased(nn.Module):
    """One Linear registered under two names (``first`` and ``blocks.0``), used twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 3)])
        self.first = self.blocks[0]

    def forward(self, x):
        return self.blocks[1](torch.tanh(self.first(torch.tanh(self.blocks[0](x)))))


def _aliased_reference(model: Aliased, x: torch.Tensor) -> np.ndarray:
    layer = model.first
    w = _np(layer.weight) + layer.scaling * _np(layer.lora_b) @ _np(layer.lora_a)
    b, head = _np(layer.bias), model.blocks[1]
    h = np.tanh(np.tanh(_np(x) @ w.T + b) @ w.T + b)
    return h @ _np(head.weight).T + _np(head.bias)


@pytest.mark.parametrize("target", ["first", "blocks.0"])
def test_a_module_under_two_names_gets_one_adapter_at_both(target):
    model = torchlora.inject(Aliased(), torchlora.LoRAConfig(r=2, alpha=5, targets=[target]))
    assert model.first is model.blocks[0] and isinstance(model.first, torchlora.Linear)
    _random_b(model)
    x = torch.randn(4, 6)
    np.testing.assert_allclose(_np(model(x)), _aliased_reference(model, x), atol=1e-5)
    # One adapter, under named_modules()'s name for it.
    assert sorted(torchlora.lora_state_dict(model)) == ["blocks.0.lora_a", "blocks.0.lora_b"]
    assert torchlora.trainable_parameters(model).trainable == 2 * 6 * 2


def test_a_module_under_two_names_saves_loads_and_merges(tmp_path):
    model = torchlora.inject(Aliased(), torchlora.LoRAConfig(r=2, targets=["blocks.0"]))
    _random_b(model)
    x = torch.randn(4, 6)
    expected = _aliased_reference(model, x)
    torchlora.save_adapter(model, tmp_path / "adapter")
    loaded = torchlora.load_adapter(Aliased(), tmp_path / "adapter")
    assert loaded.first is loaded.blocks[0] and isinstance(loaded.first, torchlora.Linear)
    np.testing.assert_allclose(_np(loaded(x)), expected, atol=1e-5)
    torchlora.merge(loaded)
    assert loaded.first is loaded.blocks[0] and type(loaded.first) is nn.Linear
    np.testing.assert_allclose(_np(loaded(x)), expected, atol=1e-5)
    assert set(loaded.state_dict()) == set(Aliased().state_dict())


def test_two_names_with_different_ranks_are_refused():
    config = torchlora.LoRAConfig(r=2, targets=["blocks.0"], rank_pattern={"first": 4})
    _refused(
        Aliased(),
        config,
        ValueError,
        r"layer 'blocks.0' is also registered as 'first' \(the same module\), but the config "
        r"gives them different \(r, alpha\): \(2, 2.0\) and \(4, 4.0\)",
    )


class TiedLM(nn.Module):
    """An embedding and a head sharing one weight, as in GPT-2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(12, 6)
        self.head = nn.Linear(6, 12, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)))


def test_a_weight_tied_layer_trains_but_refuses_to_merge():
    model = torchlora.inject(TiedLM(), torchlora.LoRAConfig(r=2, targets=["head"]))
    _random_b(model)
    tokens = torch.tensor([[1, 5, 7]])
    table = _np(model.embed.weight)
    head = table + model.head.scaling * _np(model.head.lora_b) @ _np(model.head.lora_a)
    np.testing.assert_allclose(_np(model(tokens)), np.tanh(table[[[1, 5, 7]]]) @ head.T, atol=1e-5)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"its weight is also 'embed.weight' \(tied\)"):
        model.head.merge()
    with pytest.raises(ValueError, match=r"'head' has its weight tied to 'embed.weight'"):
        torchlora.merge(model)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    assert isinstance(model.head, torchlora.Linear) and not model.head.merged
    # Untied by the user, as the message says: merging is allowed and leaves embed alone.
    model.head.weight = nn.Parameter(model.head.weight.detach().clone(), requires_grad=False)
    model.head.merge()
    np.testing.assert_allclose(_np(model.head.weight), head, atol=1e-6)
    np.testing.assert_array_equal(_np(model.embed.weight), table)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_weight_init_on_a_tied_weight_is_refused(init):
    _refused(
        TiedLM(),
        torchlora.LoRAConfig(r=2, targets=["head"], init=init),
        ValueError,
        rf"layer 'head': its weight is also 'embed.weight' \(tied\), and init='{init}' rewrites",
    )


# 4. set_adapter --------------------------------------------------------------------------------


def _small() -> nn.Module:
    torch.manual_seed(0)
    return torchlora.inject(
        nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), torchlora.LoRAConfig(r=2, targets=["0"])
    )


@pytest.mark.parametrize(
    "value,error,match",
    [
        (torch.full((4, 2), float("nan")), ValueError, r"'0.lora_b' has 8 non-finite value\(s\)"),
        (torch.ones(4, 2, dtype=torch.int64), TypeError, "'0.lora_b' has dtype torch.int64"),
        (torch.ones(4, 2, dtype=torch.bool), TypeError, "'0.lora_b' has dtype torch.bool"),
        (torch.ones(4, 2, dtype=torch.complex64), TypeError, "has dtype torch.complex64"),
        (np.ones((4, 2), np.float32), TypeError, "'0.lora_b' is a ndarray, expected a torch"),
    ],
    ids=["nan", "int", "bool", "complex", "numpy"],
)
def test_set_adapter_refuses_bad_values_and_changes_nothing(value, error, match):
    model = _small()
    good = {k: torch.randn_like(v) for k, v in torchlora.lora_state_dict(model).items()}
    torchlora.set_adapter(model, good)
    before = _snapshot(model)
    bad = {"0.lora_a": torch.zeros(2, 4), "0.lora_b": value}  # lora_a comes first and is fine
    with pytest.raises(error, match=match):
        torchlora.set_adapter(model, bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_set_adapter_checks_finiteness_in_the_parameters_dtype():
    model = _small().to(torch.bfloat16)
    huge = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in model.state_dict().items()}
    huge = {k: v for k, v in huge.items() if k.startswith("0.lora")}
    huge["0.lora_a"][0, 0] = 1e300  # finite in float64, inf in bfloat16
    with pytest.raises(ValueError, match=r"'0.lora_a' has 1 non-finite value\(s\) in torch.bf"):
        torchlora.set_adapter(model, huge)


# 5. merge / unmerge ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,value", [("alpha", 3), ("use_rslora", True)], ids=["alpha", "use_rslora"]
)
def test_hyperparameters_cannot_change_while_merged(name, value):
    layer = torchlora.Linear(5, 4, True, 2, alpha=4)
    with torch.no_grad():
        layer.lora_b.normal_()
    w0 = layer.weight.detach().clone()
    layer.merge()
    merged = layer.weight.detach().clone()
    match = rf"cannot set {name}={value!r} while merged .*scaling=2 times B A\); unmerge\(\) first"
    with pytest.raises(RuntimeError, match=match):
        setattr(layer, name, value)
    assert torch.equal(layer.weight, merged) and layer.alpha == 4.0 and not layer.use_rslora
    layer.unmerge()
    np.testing.assert_allclose(_np(layer.weight), _np(w0), atol=1e-6)
    setattr(layer, name, value)  # unmerged: allowed, and the forward follows it
    x = torch.randn(3, 5)
    expected = (
        _np(x) @ _np(w0).T
        + _np(layer.bias)
        + layer.scaling * (_np(x) @ _np(layer.lora_a).T @ _np(layer.lora_b).T)
    )
    assert layer.scaling == (1.5 if name == "alpha" else 4 / math.sqrt(2))
    np.testing.assert_allclose(_np(layer(x)), expected, atol=1e-5)


@pytest.mark.parametrize(
    "name,value,error,match",
    [
        ("alpha", float("nan"), ValueError, "alpha must be a finite number > 0, got nan"),
        ("alpha", "3", TypeError, "alpha must be a number"),
        ("use_rslora", "no", TypeError, "use_rslora must be True or False, got 'no'"),
        ("use_rslora", 1, TypeError, "use_rslora must be True or False, got 1"),
        ("r", 4, ValueError, "r is fixed by the shape of lora_a"),
    ],
    ids=["alpha-nan", "alpha-str", "rslora-str", "rslora-int", "r"],
)
def test_hyperparameters_set_on_a_layer_are_checked(name, value, error, match):
    layer = torchlora.Linear(5, 4, True, 2, alpha=4)
    with pytest.raises(error, match=match):
        setattr(layer, name, value)
    assert (layer.r, layer.alpha, layer.use_rslora) == (2, 4.0, False)


@pytest.mark.parametrize("value", ["no", "false", 0, None])
def test_use_rslora_must_be_a_bool_when_building(value):
    with pytest.raises(TypeError, match="use_rslora must be True or False"):
        torchlora.Linear(5, 4, True, 2, use_rslora=value)
    with pytest.raises(TypeError, match="use_rslora must be True or False"):
        torchlora.Embedding(5, 4, 2, use_rslora=value)
    with pytest.raises(TypeError, match="LoRAConfig: use_rslora must be True or False"):
        torchlora.LoRAConfig(r=2, targets=["0"], use_rslora=value)


@settings(max_examples=25, deadline=None)
@given(
    alpha=st.floats(0.1, 64),
    rslora=st.booleans(),
    edit=st.floats(-3, 3).filter(lambda v: abs(v) > 0.1),
    seed=st.integers(0, 2**16),
)
def test_unmerge_subtracts_what_merge_added_even_after_the_adapter_changed(
    alpha, rslora, edit, seed
):
    """Editing lora_a/lora_b while merged (an optimizer step with stale gradients, a manual
    copy) used to make unmerge subtract another delta and shift the weight."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Conv1d(2, 3, 3), nn.Embedding(7, 4))
    w0 = {i: _np(model[i].weight) for i in range(3)}
    config = torchlora.LoRAConfig(r=2, alpha=alpha, targets=["0", "1", "2"], use_rslora=rslora)
    torchlora.inject(model, config)
    for layer in model:
        with torch.no_grad():
            layer.lora_a.normal_(), layer.lora_b.normal_()
        layer.merge()
        with torch.no_grad():
            layer.lora_a.mul_(edit), layer.lora_b.add_(edit)
        layer.unmerge()
    for i, layer in enumerate(model):
        np.testing.assert_allclose(_np(layer.weight), w0[i], atol=1e-5 * (1 + alpha))
        assert not layer.merged and not dict(layer.named_buffers())


def test_merge_and_unmerge_states_are_refused_and_buffers_stay_out_of_state_dicts():
    layer = torchlora.Conv2d(2, 3, 3, 2)
    keys = set(layer.state_dict())
    with pytest.raises(RuntimeError, match="is not merged; nothing to unmerge"):
        layer.unmerge()
    layer.merge()
    assert set(layer.state_dict()) == keys
    with pytest.raises(RuntimeError, match="is already merged"):
        layer.merge()


def test_the_forward_still_equals_f_linear_for_a_plain_model():
    """A guard against the checks costing the common case: a plain MLP still adapts exactly."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    torchlora.inject(model, torchlora.LoRAConfig(r=1, targets=["0"]))
    _random_b(model)
    x = torch.randn(2, 3)
    layer = model[0]
    w = layer.weight + layer.scaling * layer.lora_b @ layer.lora_a
    expected = model[2](F.relu(F.linear(x, w, layer.bias)))
    np.testing.assert_allclose(_np(model(x)), _np(expected), atol=1e-6)
