"""Adapters trained with Google's qwix, read into jaxlora (``from_qwix``), so they can be
merged (``jaxlora.nnx.merge``) and written as PEFT files (``jaxlora.nnx.save_adapter``).

qwix 0.1.8 (``qwix.apply_lora_to_model(model, qwix.LoraProvider(...), *inputs)``) puts
``<weight>_lora_a`` / ``<weight>_lora_b`` beside a weight that reaches an einsum or
dot_general as its right operand, and adds ``(alpha / rank) · (x ⋅ a) ⋅ b`` to that product:
through ``jnp.einsum``, ``a`` holds the weight's axes shared with x (contracted or batch), in
the weight's order, then the rank, and ``b`` the rank then the weight's other axes; through
``jax.lax.dot_general`` (``nnx.Linear``), ``a`` is (batch…, prod(contracted), rank) and ``b``
(batch…, rank, prod(free)). For a weight without batch axes whose contracted and free axes
are one each, or reached through an einsum, that is exactly jaxlora's op-level adapter
(``lora_a`` (contracted…, r), ``lora_b`` (r, free…), scaling ``alpha / r``; qwix has no
rsLoRA), so the arrays are copied as they are. Anything else is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.config import LoRAConfig
from jaxlora.nnx.base import Adapter
from jaxlora.nnx.inject import _by_product, _module_paths, inject
from jaxlora.nnx.layer import LoRALinear
from jaxlora.nnx.oplevel import OpAdapter, find_weights

_SUFFIXES = ("_lora_a", "_lora_b")
_OPS = {"einsum", "dot_general"}


def from_qwix(
    model: nnx.Module,
    lora: Any,
    rules: Any,
    *,
    inputs: Sequence[Any],
    rngs: nnx.Rngs | None = None,
    param_dtype: Any = jnp.float32,
) -> nnx.Module:
    """Injects, in place, jaxlora adapters into the un-adapted ``model`` holding the qwix
    adapters ``lora``, so that ``model`` computes what the qwix-adapted model computed.

    Args:
        model: the model before ``qwix.apply_lora_to_model`` (same base weights).
        lora: the qwix adapters: an ``nnx.State`` of the qwix-adapted model (all of it or
            ``nnx.state(m, nnx.LoRAParam)``), or a nested dict of arrays as an orbax
            checkpoint of those restores it. Leaves named ``<weight>_lora_a`` /
            ``<weight>_lora_b`` are the adapters; other leaves are ignored.
        rules: the ``qwix.LoraProvider`` used for training (its rules are read), or its list
            of ``qwix.LoraRule``: each adapter's rank, alpha and dropout come from the first
            rule whose ``module_path`` fully matches its '/'-joined module path, as in qwix.
        inputs: ``model(*inputs)`` arguments, to find each weight's product (as ``inject``).
        rngs: for the adapters' dropout stream (their values come from ``lora``).
        param_dtype: the adapters' dtype; the qwix arrays must convert to it exactly.

    Returns ``model``, injected with ``LoRAConfig(r=rank, alpha=alpha, targets=<the adapted
    paths>)``. Raises ``ValueError`` naming the path, before anything changes, for an adapter
    it cannot map exactly: an ``_lora_a`` without its ``_lora_b``, a module or weight the model
    lacks, a weight jaxlora adapts differently (not
    an ``nnx.Linear`` or a module adapted at its product; batch axes), a shape other than
    jaxlora's, a rank other than the rule's, no LoRA rule, a quantized rule (QLoRA: the base
    qwix trained against was quantized), or rules giving different (rank, alpha, dropout).
    """
    adapters = qwix_adapters(lora)
    if not adapters:
        raise ValueError("from_qwix: no '<weight>_lora_a' / '<weight>_lora_b' arrays in lora")
    rule_list = list(getattr(rules, "_rules", rules))
    settings = {path: rule_for(rule_list, path) for path in adapters}
    if len(set(settings.values())) != 1:
        raise ValueError(
            "from_qwix: the rules give different (rank, alpha, dropout) per module "
            f"({sorted(set(settings.values()))}); only one setting is supported so far"
        )
    rank, alpha, dropout = next(iter(settings.values()))
    weights = {p: sorted(pairs) for p, pairs in adapters.items()}
    expected, by_product = expected_shapes(model, weights, rank, inputs)
    check_shapes(adapters, expected, rank, param_dtype)
    # Exactly the weights qwix adapted: a module adapted at its products by weight name (all
    # of its product weights or some), the others (nnx.Linear) by path.
    config = LoRAConfig(
        r=rank,
        alpha=alpha,
        dropout=dropout,
        targets=sorted(p for p in adapters if p not in by_product),
        target_parameters=[f"{p}.{w}" for p in sorted(by_product) for w in weights[p]],
    )
    inject(model, config, rngs or nnx.Rngs(0), param_dtype=param_dtype, inputs=inputs)
    modules = _module_paths(model)
    for path, pairs in adapters.items():
        # inject adapted every weight of adapters.
        layer = cast(LoRALinear | Adapter | OpAdapter, modules[path][1])
        for weight, (a, b) in pairs.items():
            var_a, var_b = (
                layer.factors(weight)
                if isinstance(layer, OpAdapter)
                else (layer.lora_a, layer.lora_b)
            )
            var_a[...] = jnp.asarray(a, param_dtype)
            var_b[...] = jnp.asarray(b, param_dtype)
    return model


def qwix_adapters(lora: Any) -> dict[str, dict[str, tuple[Any, Any]]]:
    """{'.'-joined module path: {weight name: (lora_a, lora_b)}} from a qwix state or dict."""
    if isinstance(lora, nnx.State):
        lora = nnx.to_pure_dict(lora)
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(lora)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in key_path]
        name = keys[-1]
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        if suffix is None or name == suffix:
            continue
        module = ".".join(keys[:-1])
        found.setdefault((module, name.removesuffix(suffix)), {})[suffix] = leaf
    adapters: dict[str, dict[str, tuple[Any, Any]]] = {}
    for (module, weight), pair in sorted(found.items()):
        where = f"from_qwix: layer '{module}', weight '{weight}'"
        missing = [weight + s for s in _SUFFIXES if s not in pair]
        if missing:
            raise ValueError(f"{where}: {missing[0]} is missing (qwix writes both factors)")
        adapters.setdefault(module, {})[weight] = (pair["_lora_a"], pair["_lora_b"])
    return adapters


def rule_for(rules: Sequence[Any], path: str) -> tuple[int, float, float]:
    """(rank, alpha, dropout) of the first rule that qwix applies to the module at ``path``
    ('.'-joined; qwix matches the '/'-joined path), refusing a quantized (QLoRA) rule.

    qwix picks the first rule whose ``op_names`` (empty: any op) hold the op the module
    called, ``einsum`` or ``dot_general``; the traced product does not say which of the two
    the module's code called, so where the two ops pick different rules it is refused."""
    qwix_path = path.replace(".", "/")
    where = f"from_qwix: layer '{path}'"
    picked = {op: _first_rule(rules, qwix_path, op) for op in sorted(_OPS)}
    found = [rule for rule in picked.values() if rule is not None]
    if not found:
        raise ValueError(f"{where}: no rule's module_path matches '{qwix_path}'")
    rule = found[0]
    if any(other is not rule for other in found):
        raise ValueError(
            f"{where}: the first rule matching it is {picked['einsum']} for jnp.einsum and "
            f"{picked['dot_general']} for jax.lax.dot_general (their op_names differ), and "
            "from_qwix cannot tell which of the two the module called; give both ops one rule"
        )
    if not hasattr(rule, "rank") or not hasattr(rule, "alpha"):
        raise ValueError(f"{where}: the first rule matching it is not a LoRA rule: {rule}")
    quantized = {
        k: getattr(rule, k) for k in ("weight_qtype", "act_qtype") if getattr(rule, k, None)
    }
    if quantized:
        raise ValueError(
            f"{where}: its rule quantizes ({quantized}): QLoRA adapters were trained "
            "against a quantized base, which jaxlora's float base would not reproduce"
        )
    return int(rule.rank), float(rule.alpha), float(getattr(rule, "dropout", 0.0))


def _first_rule(rules: Sequence[Any], qwix_path: str, op: str) -> Any:
    """The rule qwix applies to ``op`` in the module at ``qwix_path``, or ``None``."""
    for rule in rules:
        ops = set(getattr(rule, "op_names", ()) or ())
        if re.fullmatch(rule.module_path, qwix_path) is not None and (not ops or op in ops):
            return rule
    return None


def expected_shapes(
    model: nnx.Module, weights: Mapping[str, Sequence[str]], rank: int, inputs: Sequence[Any]
) -> tuple[dict[tuple[str, str], tuple[tuple[int, ...], tuple[int, ...]]], set[str]]:
    """({(path, weight): (lora_a shape, lora_b shape)} jaxlora gives each weight ``weights[path]``
    of the module at ``path``, the paths adapted at their products); a ``ValueError`` for one
    it cannot adapt as qwix did."""
    modules = _module_paths(model)
    shapes, by_product = {}, {}
    for path, names in weights.items():
        for weight in names:
            where = f"from_qwix: layer '{path}', weight '{weight}'"
            if path not in modules or not path:
                raise ValueError(f"{where}: the model has no module at that path")
            module = modules[path][1]
            if not isinstance(getattr(module, weight, None), nnx.Param):
                raise ValueError(f"{where}: the module has no nnx.Param '{weight}'")
            if _by_product(module, path, inputs):
                by_product[path] = module
            elif type(module) is nnx.Linear and weight == "kernel":
                *stack, n_in, n_out = module.kernel.shape
                shapes[path, weight] = ((*stack, n_in, rank), (*stack, rank, n_out))
            else:
                raise ValueError(
                    f"{where}: a {type(module).__name__}, which jaxlora adapts as a layer of "
                    "its own kind; from_qwix reads adapters on nnx.Linear kernels and on "
                    "weights adapted at their product only"
                )
    orders: dict[tuple[str, str], tuple[int, ...]] = {}
    only = {p: weights[p] for p in by_product}
    for path, found in find_weights(model, by_product, inputs, orders, only=only).items():
        for weight, roles in found.items():
            where = f"from_qwix: layer '{path}', weight '{weight}'"
            _check_axis_order(orders[path, weight], roles, where)
            if roles.batch:
                raise ValueError(
                    f"{where}: its product has batch axes {roles.batch}; qwix's einsum adapter "
                    "shares lora_b across them, which jaxlora's per-batch adapter is not"
                )
            shapes[path, weight] = roles.lora_shapes(rank)
    return shapes, set(by_product)


def _check_axis_order(order: tuple[int, ...], roles, where: str) -> None:
    """qwix's factors follow the product's operand (the weight after any transpose); jaxlora's
    follow the weight's own axis order. Where a transpose reorders the contracted (or free)
    axes the two differ, and equal axis sizes would hide it in the shapes: refused."""
    for role, axes in (("contracted", roles.contracted), ("free", roles.free)):
        seen = [axis for axis in order if axis in axes]
        if seen != sorted(seen):
            raise ValueError(
                f"{where}: the weight reaches its product through a transpose that reorders "
                f"its {role} axes (the product holds them as {tuple(seen)}); qwix's factors "
                "follow that order and jaxlora's the weight's own, so they cannot be copied"
            )


def check_shapes(
    adapters: Mapping[str, Mapping[str, tuple[Any, Any]]],
    expected: Mapping[tuple[str, str], tuple[tuple[int, ...], tuple[int, ...]]],
    rank: int,
    param_dtype: Any,
) -> None:
    """Each array has jaxlora's shape for its weight (a flattened dot_general layout of
    several axes is refused: the order qwix flattened them in is not in the state)."""
    for path, pairs in adapters.items():
        for weight, (a, b) in pairs.items():
            for name, array, want in zip(_SUFFIXES, (a, b), expected[path, weight], strict=True):
                _check_array(f"from_qwix: layer '{path}', {weight}{name}", name, array, want, rank)
                dtype = np.dtype(getattr(array, "dtype", None) or np.result_type(array))
                if not jnp.issubdtype(dtype, jnp.floating) or jnp.promote_types(
                    dtype, param_dtype
                ) != jnp.dtype(param_dtype):
                    raise ValueError(
                        f"from_qwix: layer '{path}', {weight}{name}: dtype {dtype} does not "
                        f"convert exactly to param_dtype {jnp.dtype(param_dtype)}"
                    )


def _check_array(where: str, name: str, array: Any, want: tuple, rank: int) -> None:
    shape = tuple(np.shape(array))
    if name == "_lora_a" and shape and shape[-1] != rank:
        raise ValueError(f"{where} {shape}: its rank {shape[-1]} is not the rule's {rank}")
    if shape != tuple(want):
        raise ValueError(f"{where}: shape {shape}, expected {tuple(want)}")
