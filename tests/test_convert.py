"""from_torch / to_torch: the layout conversion, checked against explicit transposes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxlora
import torchlora


def test_layer_roundtrip_and_layout():
    layer = torchlora.Linear(7, 5, True, 3)
    state = dict(layer.state_dict())
    params = jaxlora.from_torch(state)
    assert set(params) == {"kernel", "bias", "lora_a", "lora_b"}
    np.testing.assert_array_equal(params["kernel"], layer.weight.detach().numpy().T)
    np.testing.assert_array_equal(params["lora_a"], layer.lora_a.detach().numpy().T)
    np.testing.assert_array_equal(params["lora_b"], layer.lora_b.detach().numpy().T)
    back = jaxlora.to_torch(params)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value.numpy())
        assert back[key].flags.c_contiguous
    reloaded = torchlora.Linear(7, 5, True, 3)
    reloaded.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})


def test_bf16_tensors_convert_exactly():
    weight = torch.randn(4, 6).to(torch.bfloat16)
    kernel = jaxlora.from_torch({"weight": weight})["kernel"]
    assert kernel.dtype == jnp.bfloat16
    back = jaxlora.to_torch({"kernel": kernel})["weight"]
    assert torch.equal(torch.from_numpy(back.astype(np.float32)).to(torch.bfloat16), weight)


def test_plain_linear_state_dict():
    linear = torch.nn.Linear(3, 2, bias=False)
    assert set(jaxlora.from_torch(linear.state_dict())) == {"kernel"}


@pytest.mark.parametrize(
    "state,match",
    [
        (
            {"weight": np.ones((3, 5)), "lora_a": np.ones((2, 4)), "lora_b": np.ones((3, 2))},
            r"'lora_a' has shape \(2, 4\), expected \(2, 5\)",
        ),
        (
            {"weight": np.ones((3, 5)), "lora_a": np.ones((2, 5)), "lora_b": np.ones((4, 2))},
            r"'lora_b' has shape \(4, 2\), expected \(3, 2\)",
        ),
        (
            {"weight": np.ones((3, 5)), "bias": np.ones(5)},
            r"'bias' has shape \(5,\), expected \(3,\)",
        ),
        ({"weight": np.ones((3, 5)), "lora_a": np.ones((2, 5))}, "must come together"),
        ({"weight": np.ones((3, 5)), "scale": 1.0}, r"unexpected keys \['scale'\]"),
        ({"bias": np.ones(3)}, "no 'weight'"),
    ],
    ids=["lora_a", "lora_b", "bias", "lonely-a", "unknown-key", "no-weight"],
)
def test_from_torch_errors(state, match):
    with pytest.raises(ValueError, match=match):
        jaxlora.from_torch(state)


def test_to_torch_errors():
    with pytest.raises(ValueError, match="unexpected keys"):
        jaxlora.to_torch({"kernel": np.ones((2, 2)), "weight": np.ones((2, 2))})
