"""torchlora.Embedding and torchlora.Conv1d/2d/3d against closed forms and their plain layers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchlora


def _train(layer: torchlora.LoRALayer) -> torchlora.LoRALayer:
    """Moves the adapter off its initial values (B = 0 or A = 0 would hide mistakes)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_a.copy_(torch.randn(layer.lora_a.shape, generator=gen) * 0.3)
        layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=gen) * 0.3)
    return layer


def test_embedding_forward_is_the_lookup_of_the_adapted_table():
    torch.manual_seed(0)
    layer = _train(torchlora.Embedding(10, 6, 3, alpha=4.5, padding_idx=0))
    tokens = torch.tensor([[0, 3, 9], [3, 3, 1]])
    a, b, w = (t.detach().double() for t in (layer.lora_a, layer.lora_b, layer.weight))
    table = w + 1.5 * (b @ a).T  # (num, dim): W + scaling·(B A)ᵀ
    torch.testing.assert_close(layer(tokens).double(), table[tokens], rtol=1e-6, atol=1e-6)
    plain = layer.to_base()
    assert type(plain) is nn.Embedding and plain.padding_idx == 0
    torch.testing.assert_close(plain(tokens), layer(tokens), rtol=1e-6, atol=1e-6)
    layer.merge()
    torch.testing.assert_close(layer.weight.double(), table, rtol=1e-6, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.weight.double(), w, rtol=0, atol=1e-6)


def test_embedding_init_and_gradients_follow_peft():
    torch.manual_seed(0)
    base = nn.Embedding(50, 8, padding_idx=2)
    layer = torchlora.Embedding.from_embedding(base, 4)
    assert layer.weight is base.weight and not base.weight.requires_grad
    assert not layer.lora_a.any() and 0.7 < float(layer.lora_b.detach().std()) < 1.3
    torch.testing.assert_close(layer(torch.arange(50)), base(torch.arange(50)))
    layer(torch.tensor([2, 5])).sum().backward()
    grad = layer.lora_a.grad
    # A = 0, B ≠ 0: the rows a batch looks up train from the first step; the padding row never.
    assert grad[:, 5].abs().sum() > 0 and not grad[:, 2].any()
    assert not grad[:, [i for i in range(50) if i not in (2, 5)]].any()


def test_embedding_refusals():
    with pytest.raises(ValueError, match=r"max_norm=1.0, sparse=False cannot be adapted"):
        torchlora.Embedding.from_embedding(nn.Embedding(5, 4, max_norm=1.0), 2)
    with pytest.raises(ValueError, match=r"init must be one of \('kaiming', 'gaussian'\)"):
        torchlora.Embedding(5, 4, 2, init="pissa")
    with pytest.raises(ValueError, match="expected integer token ids"):
        torchlora.Embedding(5, 4, 2)(torch.ones(2))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"stride": 2, "padding": 1},
        {"dilation": 2, "padding": "same"},
        {"stride": (1, 2), "padding": (2, 0), "bias": False},
    ],
    ids=["plain", "stride-pad", "dilated-same", "asymmetric-nobias"],
)
def test_conv_branch_equals_the_merged_kernel(options):
    torch.manual_seed(0)
    layer = _train(torchlora.Conv2d(3, 5, 3, 2, alpha=3, **options))
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    a, b, w = (t.detach().double() for t in (layer.lora_a, layer.lora_b, layer.weight))
    kernel = w + 1.5 * (b.flatten(1) @ a.flatten(1)).reshape(w.shape)
    bias = None if layer.bias is None else layer.bias.detach().double()
    expected = F.conv2d(x, kernel, bias, layer.stride, layer.padding, layer.dilation)
    torch.testing.assert_close(layer.double()(x), expected, rtol=1e-10, atol=1e-10)
    plain = layer.to_base()
    assert type(plain) is nn.Conv2d
    assert (plain.stride, plain.padding, plain.dilation) == (
        layer.stride,
        layer.padding,
        layer.dilation,
    )
    torch.testing.assert_close(plain(x), expected, rtol=1e-10, atol=1e-10)


def test_conv_from_conv_shares_and_refuses_grouped():
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, (3, 1), stride=2, padding=1)
    layer = torchlora.Conv2d.from_conv(base, 2, init="gaussian")
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.lora_b.any() and abs(float(layer.lora_a.detach().std()) - 0.5) < 0.25
    x = torch.randn(1, 4, 7, 7)
    torch.testing.assert_close(layer(x), base(x))
    with pytest.raises(ValueError, match=r"groups=2, padding_mode='zeros' cannot be adapted"):
        torchlora.Conv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), 2)
    with pytest.raises(
        ValueError, match=r"expected input \(N, 4, 2 spatial dims\), got shape \(1, 3, 5, 5\)"
    ):
        layer(torch.ones(1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"r must be in \[1, min\(in, out\)\] = \[1, 6\]"):
        torchlora.Conv2d(2, 6, 3, 7)  # in = 2·3·3 = 18, out = 6


@pytest.mark.parametrize("dims", [1, 3], ids=["conv1d", "conv3d"])
def test_conv1d_and_conv3d_equal_their_merged_kernel(dims):
    torch.manual_seed(0)
    cls = {1: torchlora.Conv1d, 3: torchlora.Conv3d}[dims]
    layer = _train(cls(3, 4, 3, 2, alpha=5, stride=2, padding=1).double())
    x = torch.randn(2, 3, *(7,) * dims, dtype=torch.float64)
    a, b, w = (t.detach() for t in (layer.lora_a, layer.lora_b, layer.weight))
    kernel = w + 2.5 * (b.flatten(1) @ a.flatten(1)).reshape(w.shape)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    expected = conv(x, kernel, layer.bias, layer.stride, layer.padding, layer.dilation)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    assert type(layer.to_base()) is cls.base_type
    torch.testing.assert_close(layer.to_base()(x), expected, rtol=1e-10, atol=1e-10)
    model = torchlora.inject(
        nn.Sequential(cls.base_type(3, 4, 3)), torchlora.LoRAConfig(r=2, targets=["0"])
    )
    assert type(model[0]) is cls


class Vision(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 4)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):  # tokens (N, H, W)
        x = self.embed(tokens).permute(0, 3, 1, 2)
        return self.head(self.conv(x).mean((2, 3)))


def test_inject_merge_and_adapter_state_over_all_kinds():
    torch.manual_seed(0)
    model = torchlora.inject(Vision(), torchlora.LoRAConfig(r=2, targets=["embed", "conv", "head"]))
    kinds = {n: type(m) for n, m in model.named_children()}
    assert kinds == {
        "embed": torchlora.Embedding,
        "conv": torchlora.Conv2d,
        "head": torchlora.Linear,
    }
    for layer in model.children():
        _train(layer)
    assert sorted(torchlora.lora_state_dict(model)) == [
        f"{n}.{leaf}" for n in ("conv", "embed", "head") for leaf in ("lora_a", "lora_b")
    ]
    tokens = torch.randint(0, 12, (2, 5, 5))
    expected = model(tokens)
    torchlora.merge(model)
    assert [type(m) for m in model.children()] == [nn.Embedding, nn.Conv2d, nn.Linear]
    torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-6)
