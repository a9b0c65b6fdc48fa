"""The gated MLP's numbers shared by ``tests/test_linen_multiweight.py`` (Linen) and
``tests/test_oplevel_multiweight.py`` (NNX): ``w_gate`` (D, F), ``w_up`` (D, F) and ``w_down``
(F, D), an input X, and the closed-form float64 reference with ``scale · (x a) b`` added at
the product of each adapted weight."""

from __future__ import annotations

import numpy as np

D, F, R, ALPHA = 8, 12, 2, 3.0
S = ALPHA / R
WEIGHTS = ("w_down", "w_gate", "w_up")


def base_and_input(*, cast_before_scale: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({weight: array}, X) drawn from ``default_rng(0)``. The two test files place the fp32
    cast differently and keep doing so (their tolerances were set on these exact numbers):
    ``cast_before_scale`` casts the normal draw to float32 and then divides by ``sqrt(fan_in)``
    (a float64 result, NumPy 2 promotion); otherwise the float64 quotient is cast to float32."""
    rng = np.random.default_rng(0)

    def weight(fan_in: int, fan_out: int) -> np.ndarray:
        draw = rng.normal(size=(fan_in, fan_out))
        if cast_before_scale:
            return draw.astype(np.float32) / np.sqrt(fan_in)
        return (draw / np.sqrt(fan_in)).astype(np.float32)

    base = {"w_gate": weight(D, F), "w_up": weight(D, F), "w_down": weight(F, D)}
    return base, rng.normal(size=(2, 3, D)).astype(np.float32)


def silu(v):
    return v / (1.0 + np.exp(-v))


def reference(base: dict, factors: dict, x: np.ndarray, scale: float) -> np.ndarray:
    """The gated MLP of ``base`` with ``scale · (x a) b`` added at the product of each weight
    in ``factors`` ({weight: (a, b)}), in float64."""
    x = x.astype(np.float64)

    def product(inp, name):
        out = inp @ base[name].astype(np.float64)
        if name in factors:
            a, b = (np.asarray(f, np.float64) for f in factors[name])
            out = out + scale * (inp @ a) @ b
        return out

    h = silu(product(x, "w_gate")) * product(x, "w_up")
    return product(h, "w_down")
