"""Adversarial cases for op-level adapters, their files, ``from_qwix`` and the adapter file
writer: inputs a demanding user tries, each checked against a closed form (numpy) or the
real ``peft``, or required to be refused with nothing changed. Each case here failed (gave a
wrong number or a different file) before its fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora import nnx as jnnx
from tests.test_from_qwix import ALPHA, Rule, Tiny, X, _lora, _reference

# ------------------------------------------------------------------------------- from_qwix


def test_from_qwix_takes_the_rule_qwix_takes_for_the_op():
    """qwix applies the first rule whose op_names hold the op the module calls. A rule for
    einsum only does not apply to nnx.Linear (dot_general): qwix trained 'out' with the second
    rule's alpha. from_qwix took the first rule for both (a silently wrong alpha for 'out');
    it cannot tell from the trace which op a module called, so it refuses."""
    rules = [Rule(module_path=".*", op_names=("einsum",)), Rule(module_path=".*", alpha=1.0)]
    model, lora = Tiny(), _lora()
    before = nnx.to_pure_dict(nnx.state(model))
    with pytest.raises(ValueError, match=r"layer 'out'.*cannot tell which"):
        jnnx.from_qwix(model, lora, rules, inputs=(jnp.asarray(X),))
    assert not nnx.state(model, nnx.LoRAParam)
    after = nnx.to_pure_dict(nnx.state(model))
    assert all(map(np.array_equal, jax.tree.leaves(before), jax.tree.leaves(after)))


def test_from_qwix_rules_per_op_that_agree_are_accepted():
    """An op-restricted rule that is the only one matching (the other op has none, or the
    same rule): the adapter is qwix's, with that rule's alpha (numpy reference)."""
    rules = [Rule(module_path="proj", op_names=("einsum",)), Rule(module_path="out")]
    model, lora = Tiny(), _lora()
    want = _reference(model, lora)
    jnnx.from_qwix(model, lora, rules, inputs=(jnp.asarray(X),))
    assert model.lora_config.alpha == ALPHA
    got = np.asarray(model(jnp.asarray(X)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
