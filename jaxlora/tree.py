"""The naming convention: a leaf is LoRA exactly when it is named ``lora_a`` or ``lora_b``
(or ``lora_magnitude``, DoRA's magnitude vector), or ``<weight>_lora_a``/``<weight>_lora_b``
(``factor_names``: each weight of a module with several adapted weights).

``lora_mask``, ``split``/``combine`` and ``freeze_base`` all rest on this one rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core import FrozenDict

from _loracore.config import LORA_NAMES  # the one naming rule, shared with torchlora
from _loracore.report import ParamCount

# Records beside an adapter: pytrees with no arrays (jit, grad, optax and meta.unbox carry them
# unchanged), saying how the adapter was made where the arrays cannot. They go with the adapter
# (split, MergeRecord) and are dropped by merge.
ROLES_NAME = "lora_roles"  # made at its weight's product (jaxlora.product)
QUANT_NAME = "quant"  # the collection of quantized base weights (jaxlora.quant.quantize_base)
INIT_NAME = "lora_init"  # made by PiSSA/OLoRA: the base weight beside it is the residual
STACK_NAME = "lora_stack"  # stacked by nn.scan on a layer axis other than 0 (its position)
RECORD_NAMES = (ROLES_NAME, INIT_NAME, STACK_NAME)


def factor_names(weight: str | None) -> tuple[str, str]:
    """The names of an adapter's two factors: ``lora_a``/``lora_b`` for a module with one adapted
    weight (``weight`` None), ``<weight>_lora_a``/``<weight>_lora_b`` for each weight of a module
    whose several weights each enter their own product (qwix names them so too).

    Examples:
        >>> factor_names(None), factor_names("w_gate")
        (('lora_a', 'lora_b'), ('w_gate_lora_a', 'w_gate_lora_b'))
    """
    return ("lora_a", "lora_b") if weight is None else (f"{weight}_lora_a", f"{weight}_lora_b")


def is_lora_name(name: Any) -> bool:
    """Whether a leaf named ``name`` is LoRA: ``LORA_NAMES``, or a factor ``factor_names`` gives
    one weight of several (``<weight>_lora_a``/``<weight>_lora_b``).

    Examples:
        >>> [is_lora_name(n) for n in ("lora_a", "w_up_lora_b", "kernel", "_lora_a")]
        [True, True, False, False]
    """
    if name in LORA_NAMES:
        return True
    return isinstance(name, str) and any(
        name.endswith(suffix) and len(name) > len(suffix) for suffix in _FACTOR_SUFFIXES
    )


_FACTOR_SUFFIXES = tuple(f"_{n}" for n in factor_names(None))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class InitRecord:
    """The ``lora_init`` record of a Linen layer injected (or loaded) with ``init`` "pissa" or
    "olora": its base weight is the residual W − scaling·B₀A₀, not W. A params tree cannot
    tell that from its arrays; with the record, ``load_adapter`` refuses a plain adapter for
    such a layer and ``save_adapter`` a config that says another init (either would pair the
    residual with an adapter made for W: silently wrong outputs)."""

    init: str


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class StackRecord:
    """The ``lora_stack`` record of a Linen layer stacked by ``nn.scan``/``nn.vmap`` with
    ``variable_axes={"params": axis}``, ``axis`` not 0 (MaxText scans with
    ``param_scan_axis=1``): the layer axis of the weight and of both factors is at ``axis``
    (``nn.scan``'s convention: a negative one counts from the end of each stacked array), not
    in front. Shapes alone cannot tell where it is when sizes coincide; without the record a
    stacked adapter's layer axis is axis 0."""

    axis: int


PyTree = Any
Path = tuple[str, ...]


def lora_mask(params: PyTree) -> PyTree:
    """A tree of bools shaped like ``params``: True exactly at leaves named lora_a/lora_b (and
    DoRA's lora_magnitude, and ``<weight>_lora_a``/``<weight>_lora_b``: ``is_lora_name``).

    Examples:
        >>> lora_mask({"dense": {"kernel": 1.0, "lora_a": 2.0, "lora_b": 3.0}})
        {'dense': {'kernel': False, 'lora_a': True, 'lora_b': True}}
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: is_lora_name(_leaf_name(path)), params)


def freeze_base(
    tx: optax.GradientTransformation,
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> optax.GradientTransformation:
    """Applies ``tx`` to the LoRA leaves and zero updates to every other leaf.

    Built on ``optax.multi_transform`` with ``optax.set_to_zero`` for the frozen part, so the
    base receives exactly zero updates and ``tx`` keeps no state (no Adam moments) for it. Do
    not use ``optax.masked`` alone to freeze: it passes the frozen leaves' raw
    gradients through as updates. Under one ``jax.jit`` with the gradient computation, XLA then
    prunes the frozen weights' gradients entirely. ``update`` refuses (``ValueError``) updates
    or params whose tree differs from the one ``init`` saw: re-init after injecting LoRA.

    Args:
        tx: the optimizer for the adapter, e.g. ``optax.adamw(1e-3)``.
        mask: a bool tree (or a function of the params returning one) that is True at the
            leaves to train; defaults to ``lora_mask``.

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> params = {"kernel": jnp.ones((4, 2)), "lora_a": jnp.ones((4, 1)),
        ...           "lora_b": jnp.ones((1, 2))}
        >>> tx = freeze_base(optax.sgd(0.5))
        >>> updates, _ = tx.update(params, tx.init(params), params)
        >>> float(updates["kernel"].sum()), float(updates["lora_a"].sum())
        (0.0, -2.0)
    """

    def labels(params: PyTree) -> PyTree:
        chosen = lora_mask(params) if mask is None else (mask(params) if callable(mask) else mask)
        if not any(jax.tree.leaves(chosen)):
            raise ValueError(
                "freeze_base: the mask selects no leaf to train; with the default mask the "
                "params need leaves named 'lora_a'/'lora_b' (use LoRADense, or inject LoRA)"
            )
        return jax.tree.map(lambda trainable: "lora" if trainable else "frozen", chosen)

    inner = optax.multi_transform({"lora": tx, "frozen": optax.set_to_zero()}, labels)

    def init(params: PyTree) -> FreezeBaseState:
        return FreezeBaseState(inner.init(params), _skeleton(params))

    def update(updates, state: FreezeBaseState, params=None, **extra):
        for name, tree in (("updates", updates), ("params", params)):
            if tree is not None:
                _check_same_tree(state.skeleton, tree, name)
        updates, inner_state = inner.update(updates, state.inner, params, **extra)
        return updates, FreezeBaseState(inner_state, state.skeleton)

    return optax.GradientTransformationExtraArgs(init, update)


class FreezeBaseState(NamedTuple):
    """``freeze_base``'s state: the inner ``optax.multi_transform`` state, and the params tree
    ``init`` saw with every leaf replaced by ``None`` (no arrays: only its structure, which
    is static under ``jax.jit``)."""

    inner: optax.OptState
    skeleton: PyTree


def _skeleton(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda _: None, tree)


def _check_same_tree(skeleton: PyTree, tree: PyTree, name: str) -> None:
    """A ``ValueError`` (at trace time under jit: structures are static) if ``tree``'s
    structure is not the one ``init`` saw, naming leaves that were added or removed."""
    # jaxlib ships PyTreeDef without type stubs, so the checker cannot see its __eq__.
    if jax.tree.structure(_skeleton(tree)) == jax.tree.structure(skeleton):  # type: ignore[operator]
        return

    def paths(t: PyTree) -> set[str]:
        flat, _ = jax.tree_util.tree_flatten_with_path(_skeleton(t), is_leaf=lambda x: x is None)
        return {jax.tree_util.keystr(p) for p, _ in flat}

    before, now = paths(skeleton), paths(tree)
    added, removed = (", ".join(sorted(p)[:5]) or "none" for p in (now - before, before - now))
    raise ValueError(
        f"freeze_base: the {name} tree is not shaped like the params the optimizer state was "
        f"made for (added: {added}; removed: {removed}; or the container types differ). The "
        "params tree changed since tx.init (e.g. LoRA was injected after it): call "
        "tx.init(params) again on the current params"
    )


def split(params: PyTree) -> tuple[PyTree, PyTree]:
    """Splits a nested-dict params tree into ``(adapter, base)`` by the LoRA naming rule.

    Both keep the nesting (and the dict/FrozenDict type); subtrees that end up empty are
    dropped from the adapter. ``combine(adapter, base)`` gives back ``params``.

    Examples:
        >>> adapter, base = split({"dense": {"kernel": 1, "lora_a": 2, "lora_b": 3}})
        >>> adapter, base
        ({'dense': {'lora_a': 2, 'lora_b': 3}}, {'dense': {'kernel': 1}})
    """
    _require_mapping(params, "split")
    adapter = _filter(params, keep_lora=True)
    base = _filter(params, keep_lora=False)
    return adapter if adapter is not None else _like(params, {}), base


def combine(adapter: PyTree, base: PyTree) -> PyTree:
    """Merges two nested-dict trees (the inverse of ``split``); a leaf in both is an error."""
    _require_mapping(adapter, "combine")
    _require_mapping(base, "combine")
    return _union(adapter, base, ())


def iter_lora_layers(params: Mapping[str, Any], path: Path = ()) -> Iterator[tuple[Path, Mapping]]:
    """Yields ``(path, node)`` for each dict that holds LoRA leaves (``is_lora_name``)."""
    if any(is_lora_name(k) and not isinstance(v, Mapping) for k, v in params.items()):
        yield path, params
    for key, value in params.items():
        if isinstance(value, Mapping):
            yield from iter_lora_layers(value, (*path, str(key)))


def path_str(path: Path) -> str:
    """A params path as a layer path string: '.'-joined, without a leading 'params' collection."""
    if path and path[0] == "params":
        path = path[1:]
    return ".".join(path) or "<root>"


def _leaf_name(path: tuple[Any, ...]) -> str | None:
    # The last dict key: metadata boxes such as nn.Partitioned add a trailing '.value' entry.
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey):
            return str(entry.key)
    return None


def _require_mapping(tree: Any, fn: str) -> None:
    if not isinstance(tree, Mapping):
        raise TypeError(f"{fn} expects a nested dict of params, got {type(tree).__name__}")


def _like(template: Mapping, items: dict) -> Mapping:
    return FrozenDict(items) if isinstance(template, FrozenDict) else items


def _filter(tree: Mapping, *, keep_lora: bool) -> Mapping | None:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            sub = _filter(value, keep_lora=keep_lora)
            if sub is not None and (sub or not keep_lora):
                out[key] = sub
        elif (is_lora_name(key) or key in RECORD_NAMES) == keep_lora:
            out[key] = value
    if keep_lora and not out:
        return None
    return _like(tree, out)


def _union(a: Mapping, b: Mapping, path: Path) -> Mapping:
    out = dict(b)
    for key, value in a.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, Mapping) and isinstance(out[key], Mapping):
            out[key] = _union(value, out[key], (*path, str(key)))
        else:
            raise ValueError(f"combine: '{'.'.join((*path, str(key)))}' is in both trees")
    return _like(b, out)


def trainable_parameters(params: PyTree, mask: PyTree | None = None) -> ParamCount:
    """Counts the elements where ``mask`` (default ``lora_mask``) is True against all elements."""
    mask = lora_mask(params) if mask is None else mask
    sizes = jax.tree.map(lambda v: int(np.prod(jnp.shape(v))), params)
    return ParamCount(
        sum(s for s, m in zip(jax.tree.leaves(sizes), jax.tree.leaves(mask), strict=True) if m),
        sum(jax.tree.leaves(sizes)),
    )
