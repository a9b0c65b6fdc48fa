"""torchlora.inject / merge / lora_state_dict / mark_only_lora_as_trainable."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchlora


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 16)
        self.query = nn.Linear(16, 16)
        self.value = nn.Linear(16, 16)
        self.block = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.block(self.query(h) + self.value(h))


TOKENS = torch.arange(6).reshape(2, 3)


def test_inject_wraps_shared_weights_and_freezes_the_rest():
    model = Net()
    original_weight = model.query.weight
    before = model(TOKENS)
    config = torchlora.LoRAConfig(r=4, alpha=8, targets=["query", "value"])
    assert torchlora.inject(model, config) is model
    assert isinstance(model.query, torchlora.Linear) and model.query.weight is original_weight
    assert model.query.scaling == 2.0 and model.lora_config == config
    assert torch.equal(model(TOKENS), before)  # B = 0: unchanged at start
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"query.lora_a", "query.lora_b", "value.lora_a", "value.lora_b"}
    assert set(torchlora.lora_state_dict(model)) == trainable
    report = torchlora.trainable_parameters(model)
    assert report.trainable == 2 * 4 * 32
    assert report.total == sum(p.numel() for p in model.parameters())


def test_regex_targets_inside_sequential():
    model = torchlora.inject(Net(), torchlora.LoRAConfig(r=2, targets=r"block\.(0|2)"))
    assert isinstance(model.block[0], torchlora.Linear)
    assert isinstance(model.block[2], torchlora.Linear)
    assert isinstance(model.query, nn.Linear) and not isinstance(model.query, torchlora.Linear)


def test_failed_inject_changes_nothing():
    model = Net()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        TypeError,
        match=r"layer 'block.1' is a ReLU, which cannot be adapted; "
        r"supported types: Linear, Embedding, Conv1d, Conv2d, Conv3d",
    ):
        torchlora.inject(model, torchlora.LoRAConfig(r=2, targets=["query", "block.1"]))
    assert type(model.query) is nn.Linear and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    # PiSSA would rewrite query's weight; the embedding it cannot adapt is found first.
    with pytest.raises(ValueError, match=r"'embed': init='pissa' adapts Linear layers only"):
        torchlora.inject(model, torchlora.LoRAConfig(r=2, targets=["query", "embed"], init="pissa"))
    assert type(model.query) is nn.Linear and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"r must be in \[1, 4\], got 8"):
        torchlora.inject(model, torchlora.LoRAConfig(r=8, targets=["query", "block.2"]))
    assert type(model.query) is nn.Linear
    with pytest.raises(ValueError, match="the layer paths are: embed, query, value, block, "):
        torchlora.inject(model, torchlora.LoRAConfig(r=2, targets=["qkv"]))
    with pytest.raises(ValueError, match="root module"):
        torchlora.inject(model, torchlora.LoRAConfig(r=2, targets=".*"))


def test_inject_twice_is_an_error():
    model = torchlora.inject(Net(), torchlora.LoRAConfig(r=2, targets=["query"]))
    with pytest.raises(ValueError, match="'query' is already a torchlora.Linear"):
        torchlora.inject(model, torchlora.LoRAConfig(r=2, targets=["query"]))


def test_merge_restores_the_original_architecture():
    model = torchlora.inject(Net(), torchlora.LoRAConfig(r=4, alpha=8, targets=["query", "value"]))
    with torch.no_grad():
        model.query.lora_b.normal_()
    adapted = model(TOKENS).detach()
    torchlora.merge(model)
    reference = Net()
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert set(model.state_dict()) == set(reference.state_dict())
    assert torch.allclose(model(TOKENS), adapted, atol=1e-5)
    assert not hasattr(model, "lora_config")


def test_mark_only_lora_as_trainable():
    model = Net()
    model.query = torchlora.Linear.from_linear(model.query, 2)
    model.embed.weight.requires_grad_(True)
    torchlora.mark_only_lora_as_trainable(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "query.lora_a",
        "query.lora_b",
    }


def test_set_adapter_switches_without_touching_the_base():
    model = torchlora.inject(Net(), torchlora.LoRAConfig(r=2, targets=["query", "value"]))
    first = {k: torch.randn_like(v) for k, v in torchlora.lora_state_dict(model).items()}
    second = {k: torch.randn_like(v) for k, v in first.items()}
    weight = model.query.weight
    torchlora.set_adapter(model, first)
    out_first = model(TOKENS).detach()
    torchlora.set_adapter(model, second)
    assert not torch.allclose(model(TOKENS), out_first)
    torchlora.set_adapter(model, first)
    assert torch.equal(model(TOKENS), out_first) and model.query.weight is weight
    with pytest.raises(ValueError, match=r"missing keys \['value.lora_b'\]"):
        torchlora.set_adapter(model, {k: v for k, v in second.items() if k != "value.lora_b"})
    bad = {**second, "query.lora_a": torch.zeros(3, 16)}
    with pytest.raises(ValueError, match=r"'query.lora_a' has shape \(3, 16\), expected \(2, 16\)"):
        torchlora.set_adapter(model, bad)
    assert torch.equal(model(TOKENS), out_first)  # the failed calls changed nothing
