"""The LoRA hyperparameter rules, shared by jaxlora and torchlora (pure Python, no framework).

``scaling`` is the one definition of the factor on ``B A``; ``check_hparams`` the one set of
checks on r, alpha and dropout, with errors that name the value, the layer and what was
expected.
"""

from __future__ import annotations

import math
import numbers


def scaling(r: int, alpha: float | None = None, *, use_rslora: bool = False) -> float:
    """Returns the factor that multiplies ``B A``: ``alpha / r``, or ``alpha / sqrt(r)`` (rsLoRA).

    ``alpha`` defaults to ``r``, so the default scaling is 1.

    Examples:
        >>> scaling(8, 16)
        2.0
        >>> scaling(4, 8, use_rslora=True)
        4.0
    """
    alpha = r if alpha is None else alpha
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def check_hparams(
    *,
    r: object,
    alpha: object,
    dropout: object,
    in_features: int | None,
    out_features: int | None,
    where: str,
) -> None:
    """Raises a ``TypeError``/``ValueError`` naming the bad value and what was expected."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"{where}: r must be an int, got {r!r} ({type(r).__name__})")
    # Compared as plain numbers: typeshed's numbers ABCs declare no mixed comparisons.
    rank = int(r)
    if in_features is None or out_features is None:
        if rank < 1:
            raise ValueError(f"{where}: r must be >= 1, got {r}")
        limit = rank
    else:
        limit = min(in_features, out_features)
    if not 1 <= rank <= limit:
        raise ValueError(f"{where}: r must be in [1, min(in, out)] = [1, {limit}], got {r}")
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
            raise TypeError(f"{where}: alpha must be a number or None, got {alpha!r}")
        if not (math.isfinite(alpha) and float(alpha) > 0):
            raise ValueError(f"{where}: alpha must be a finite number > 0, got {alpha}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"{where}: dropout must be a float in [0, 1), got {dropout!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"{where}: dropout must be in [0, 1), got {dropout}")
