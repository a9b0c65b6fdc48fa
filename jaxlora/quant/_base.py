"""A quantized frozen base for Linen models: ``quantize_base`` / ``dequantize_base``.

Each chosen ``nn.Dense`` kernel leaves the ``params`` collection for a ``"quant"`` collection
under the same layer path (name ``kernel``), as a ``QuantizedWeight`` of ``kernel.T`` (torch's
(out, in) layout, so the blocks are those bitsandbytes / a Hugging Face ``Linear4bit`` hold).
The packed bytes are then not parameters: ``jax.grad`` over ``params``, ``freeze_base``,
``split`` and optax never see them, and nothing of them is copied per adapter.
``jaxlora.intercept`` computes such a layer's base product from the quantized kernel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax.numpy as jnp
import numpy as np
from flax.core import meta

from jaxlora.config import LoRAConfig
from jaxlora.quant._api import QuantizedWeight, _check_options, dequantize, quantize, requantize
from jaxlora.tree import PyTree, _like, _require_mapping

QUANT = "quant"  # the collection holding the quantized kernels


def quantize_base(
    variables: PyTree,
    targets: LoRAConfig | str | Sequence[str],
    *,
    quant_type: str = "nf4",
    blocksize: int | None = None,
    double_quant: bool = False,
) -> PyTree:
    """Returns new variables with each chosen ``nn.Dense`` kernel quantized into ``"quant"``.

    Use the result with ``jaxlora.intercept`` (which dequantizes each kernel in the forward
    pass); train ``variables["params"]`` only. LoRA leaves already injected stay in
    ``params``; inject before quantizing (``inject`` needs the float kernel).

    Args:
        variables: a variables dict with a ``'params'`` collection (other collections pass
            through); it must not already hold a ``'quant'`` collection.
        targets: a ``LoRAConfig`` (its ``targets``) or targets as ``LoRAConfig`` takes them
            (a list of layer names or a regex of '.'-joined layer paths).
        quant_type, blocksize, double_quant: as ``jaxlora.quant.quantize``.

    Raises:
        ValueError: no layer matches, a targets entry matches no layer, or a matched layer
            has no 2-D ``kernel`` (an ``nn.Dense``'s), naming its path; nothing is changed.

    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import jaxlora
    >>> model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(4)])
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 64)))
    >>> q = quantize_base(variables, ["layers_0"])
    >>> sorted(q["params"]["layers_0"]), q["quant"]["layers_0"]["kernel"].packed.shape
    (['bias'], (2048, 1))
    >>> with jaxlora.intercept(jaxlora.LoRAConfig(r=1, targets=["layers_0"])):
    ...     y = model.apply(q, jnp.ones((1, 64)))
    """
    _require_mapping(variables, "quantize_base")
    if "params" not in variables:
        raise ValueError("quantize_base expects a variables dict holding a 'params' collection")
    if QUANT in variables:
        raise ValueError("quantize_base: the variables already hold a 'quant' collection")
    config = targets if isinstance(targets, LoRAConfig) else LoRAConfig(r=1, targets=targets)
    blocksize = _check_options(quant_type, blocksize, double_quant)
    params = variables["params"]
    nodes = dict(_iter_nodes(params))
    try:  # LoRAConfig's rule: a targets entry that matches no layer is an error too
        chosen = config.select(nodes)
    except ValueError as error:
        raise ValueError(f"quantize_base: {error}") from None
    for path in chosen:  # all checked before anything is quantized
        _check_kernel(nodes[path], path)
    quantized = {
        path: quantize(
            meta.unbox(nodes[path]["kernel"]).T,
            quant_type=quant_type,
            blocksize=blocksize,
            double_quant=double_quant,
        )
        for path in chosen
    }
    out = {**variables, "params": _drop_kernels(params, (), set(chosen))}
    out[QUANT] = _nest(quantized)
    return _like(variables, out)


def dequantize_base(variables: PyTree) -> PyTree:
    """The inverse layout of ``quantize_base``: each quantized kernel dequantized (in its
    stored dtype, transposed back to (in, out)) into ``params``; the ``'quant'`` collection
    dropped. The values are the quantized ones (NF4 rounding is not undone)."""
    _require_mapping(variables, "dequantize_base")
    if not is_quantized(variables):
        return variables
    kernels = {path: dequantize(q).T for path, q in iter_quantized(variables[QUANT])}
    missing = sorted(set(kernels) - {path for path, _ in _iter_nodes(variables["params"])})
    if missing:
        raise ValueError(f"dequantize_base: quantized layers {missing} are not in 'params'")
    params = _add_kernels(variables["params"], (), kernels)
    rest = {k: v for k, v in variables.items() if k != QUANT}
    return _like(variables, {**rest, "params": params})


def is_quantized(variables: PyTree) -> bool:
    """Whether ``variables`` is a variables dict holding ``'params'`` and a ``'quant'``
    collection (a params tree may have a module named 'quant': that is not one)."""
    return isinstance(variables, Mapping) and QUANT in variables and "params" in variables


def with_kernel_shapes(variables: PyTree) -> PyTree:
    """``variables`` without its ``'quant'`` collection, each quantized kernel standing in
    ``params`` as a read-only zero array of its (in, out) shape and dtype that allocates no
    memory (a broadcast view): for code that reads only a layer's kernel shape (adapter files),
    never its values. Unchanged without a ``'quant'`` collection."""
    if not is_quantized(variables):
        return variables
    kernels = {
        path: np.broadcast_to(np.zeros((), q.dtype), tuple(reversed(q.shape)))
        for path, q in iter_quantized(variables[QUANT])
    }
    rest = {k: v for k, v in variables.items() if k != QUANT}
    return _like(variables, {**rest, "params": _add_kernels(variables["params"], (), kernels)})


def restore_quantized(loaded: PyTree, quantized: PyTree) -> PyTree:
    """``loaded`` (a tree ``with_kernel_shapes(quantized)`` became) with the stand-in kernels
    dropped and ``quantized``'s ``'quant'`` collection back."""
    paths = {path for path, _ in iter_quantized(quantized[QUANT])}
    out = {**loaded, "params": _drop_kernels(loaded["params"], (), paths)}
    out[QUANT] = quantized[QUANT]
    return _like(quantized, out)


def requantize_merged(merged: PyTree, quantized: PyTree) -> PyTree:
    """``merged`` (``quantized`` dequantized and merged) with each quantized layer's kernel in
    ``'quant'`` again: a layer that held an adapter in ``quantized`` gets its merged kernel
    re-quantized in its own format, the others keep their quantized kernel unchanged."""
    new: dict[str, Any] = {}
    for path, q in iter_quantized(quantized[QUANT]):
        node = _node(quantized["params"], path)
        if node is not None and "lora_a" in node:
            # merged is quantized merged (jaxlora.merge): it has every layer quantized has.
            merged_node = cast(Mapping, _node(merged["params"], path))
            new[path] = requantize(q, merged_node["kernel"].T)
        else:
            new[path] = q
    return restore_quantized(merged, _like(quantized, {**quantized, QUANT: _nest(new)}))


def _node(tree: Mapping, path: str) -> Mapping | None:
    node: Any = tree
    for key in path.split("."):
        node = node.get(key) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else None


def iter_quantized(tree: Mapping, path: tuple[str, ...] = ()):
    """Yields ('.'-joined layer path, QuantizedWeight) for each quantized kernel."""
    for key, value in tree.items():
        if isinstance(value, QuantizedWeight) and key == "kernel":
            yield ".".join(path), value
        elif isinstance(value, Mapping):
            yield from iter_quantized(value, (*path, str(key)))
        else:
            raise ValueError(
                f"'quant' collection: '{'.'.join((*path, str(key)))}' is a "
                f"{type(value).__name__}, expected a QuantizedWeight named 'kernel'"
            )


def _check_kernel(node: Any, path: str) -> None:
    kernel = node.get("kernel") if isinstance(node, Mapping) else None
    if kernel is None or isinstance(kernel, Mapping):
        found = sorted(node) if isinstance(node, Mapping) else type(node).__name__
        raise ValueError(
            f"quantize_base: layer '{path}' has no 'kernel' (found {found}): only nn.Dense "
            "kernels can be quantized"
        )
    shape = jnp.shape(meta.unbox(kernel))
    if len(shape) != 2:
        raise ValueError(
            f"quantize_base: layer '{path}' has a kernel of shape {shape}; only 2-D nn.Dense "
            "kernels (in, out) can be quantized (not nn.DenseGeneral/nn.Conv kernels or an "
            "nn.scan stack)"
        )
    if isinstance(kernel, meta.AxisMetadata):
        raise ValueError(
            f"quantize_base: layer '{path}' has a partitioned kernel "
            f"({type(kernel).__name__}); quantized kernels keep no partitioning metadata"
        )


def _iter_nodes(tree: Mapping, path: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            sub = (*path, str(key))
            yield ".".join(sub), value
            yield from _iter_nodes(value, sub)


def _drop_kernels(tree: Mapping, path: tuple[str, ...], chosen: set[str]) -> Mapping:
    out = {}
    for key, value in tree.items():
        sub = (*path, str(key))
        if isinstance(value, Mapping):
            out[key] = _drop_kernels(value, sub, chosen)
        elif not (key == "kernel" and ".".join(path) in chosen):
            out[key] = value
    return _like(tree, out)


def _add_kernels(tree: Mapping, path: tuple[str, ...], kernels: dict[str, Any]) -> Mapping:
    out = {}
    for key, value in tree.items():
        sub = (*path, str(key))
        out[key] = _add_kernels(value, sub, kernels) if isinstance(value, Mapping) else value
    where = ".".join(path)
    if where in kernels:
        if "kernel" in out:
            raise ValueError(f"layer '{where}' has a kernel both in 'params' and in 'quant'")
        out["kernel"] = kernels[where]
    return _like(tree, out)


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for path, q in flat.items():
        node = out
        for key in path.split("."):
            node = node.setdefault(key, {})
        node["kernel"] = q
    return out
