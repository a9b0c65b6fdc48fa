"""A quantized frozen base for Linen models: ``quantize_base`` / ``dequantize_base``.

Each chosen layer's weight leaves the ``params`` collection for a ``"quant"`` collection under
the same layer path and name, as a ``QuantizedWeight`` of the torch Linear it is
(``jaxlora.quant._layout``: (out, in) = (prod free, prod contracted), so the blocks are those
bitsandbytes / a Hugging Face ``Linear4bit`` hold): an ``nn.Dense`` kernel as ``kernel.T``;
an ``nn.DenseGeneral`` kernel (its first ``ndim(lora_a) - 1`` axes contracted) and the weight
of a module adapted at its product (``lora_roles``) beside a ``"roles"`` leaf (a
``ProductRoles``, no arrays) that says how the weight's axes make that matrix. The packed
bytes are then not parameters: ``jax.grad`` over ``params``, ``freeze_base``, ``split`` and
optax never see them, and nothing of them is copied per adapter. ``jaxlora.intercept``
dequantizes the weight to its own shape and runs the layer's own product on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from jaxlora import kinds
from jaxlora.config import LoRAConfig
from jaxlora.oplevel import Roles
from jaxlora.product import ProductRoles, check_products, records
from jaxlora.quant._api import QuantizedWeight, _check_options, stack_length
from jaxlora.quant._layout import (
    dequantize_stack,
    linear_roles,
    quantize_stack,
    requantize_stack,
    stacked_shape,
)
from jaxlora.tree import QUANT_NAME as QUANT
from jaxlora.tree import ROLES_NAME, PyTree, StackRecord, _like, _require_mapping, factor_names

# in 'quant': how a weight that is not a Dense kernel makes its Linear: a ProductRoles, or for
# a module with several adapted weights the tuple of them ``lora_roles`` holds (one per weight)
ROLES = "roles"
# in 'quant': the weight is an nn.scan stack, its layer axis in 'params' at the record's axis
STACK = "stack"
# in 'quant', beside a stack's record: each layer's index, shaped (L, 1, 1, 1) (``stack_index``)
STACK_INDEX = "stack_index"
# One layer's slice of it. Its rank (4) is at least every quantized array's (at most 4: (L, E,
# out, in) int8 codes of a stack of layers of experts), so a negative axis that reaches its
# axis 0 reaches every array's axis 0 too (or fails on a lower-rank one).
ONE_INDEX = (1, 1, 1)


def quantize_base(
    variables: PyTree,
    targets: LoRAConfig | str | Sequence[str],
    *,
    quant_type: str = "nf4",
    blocksize: int | None = None,
    double_quant: bool = False,
    layouts: Mapping[str, Any] | None = None,
) -> PyTree:
    """Returns new variables with each chosen layer's weight quantized into ``"quant"``.

    The layers: ``nn.Dense`` (a 2-D ``kernel``, with or without an adapter), ``nn.DenseGeneral``
    holding an adapter (its ``lora_a`` says which kernel axes are contracted) or described by
    ``layouts``, and modules adapted at their weight's product (``lora_roles``: an einsum
    weight, ``x @ kernel.T``). Use the result with ``jaxlora.intercept`` (which dequantizes
    each weight in the forward pass); train ``variables["params"]`` only. LoRA leaves already
    injected stay in ``params``; inject before quantizing (``inject`` needs the float weight).

    A Dense/DenseGeneral layer stacked by ``nn.scan`` (a kernel with one layer axis L, at the
    axis its adapter's ``lora_stack`` record or ``layouts`` gives: ``variable_axes={"params":
    k}``) is quantized layer by layer, each layer exactly as its unstacked twin (its own
    blocks), the L quantized weights' arrays stacked in front, with a ``"stack"`` record of k
    beside them. The scan must then slice ``'quant'`` on axis 0 whatever k is
    (``variable_axes={"params": k, "quant": 0}``, as MaxText scans its ``"aqt"`` collection),
    so each layer dequantizes its own weight; a scan that does not slice it, or slices it on
    another axis, is refused at the call (a ``"stack_index"`` entry, see ``stack_index``).
    A weight adapted at its product inside ``nn.scan`` (an einsum or ``FlaxConv1D`` weight
    stacked with its adapter) is quantized the same way, layer by layer; a scanned MoE weight
    (L, E, …) layer by layer and expert by expert, its arrays leading with (L, E). A module
    with several adapted weights (``<weight>_lora_a``, a ``lora_roles`` tuple) has each weight
    quantized as its own Linear, beside the same tuple in ``"roles"``. Nested scans (a
    weight with two layer axes) are refused, as ``inject`` refuses them.

    Args:
        variables: a variables dict with a ``'params'`` collection (other collections pass
            through); it must not already hold a ``'quant'`` collection.
        targets: a ``LoRAConfig`` (its ``targets``) or targets as ``LoRAConfig`` takes them
            (a list of layer names or a regex of '.'-joined layer paths).
        quant_type, blocksize, double_quant: as ``jaxlora.quant.quantize``.
        layouts: ``jaxlora.layouts(model, *inputs)``: says which axes a kernel without an
            adapter contracts and where an ``nn.scan`` stack's layer axis is.

    Raises:
        ValueError: no layer matches, a targets entry matches no layer, or a matched layer
            has no weight of the layers above (a Conv/Embed, a kernel with more than 2 axes
            and neither an adapter nor a layout, a stack over nested scans, a partitioned
            kernel, a weight with batch axes), naming its path;
            nothing is changed.

    Examples:
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
    # all checked before anything is quantized
    found = {
        path: _target(nodes[path], f"quantize_base: layer '{path}'", (layouts or {}).get(path))
        for path in chosen
    }
    options = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    quantized = {}
    for path, (weights, marker, axis) in found.items():
        # each weight of the layer quantized alone, as its own Linear
        entry: dict[str, Any] = {
            name: quantize_stack(meta.unbox(nodes[path][name]), roles, axis, **options)
            for name, roles in weights
        }
        if marker is not None:
            entry[ROLES] = marker
        if axis is not None:  # one weight (check_products refuses several stacked)
            entry[STACK] = StackRecord(axis)
            entry[STACK_INDEX] = stack_index(entry[weights[0][0]].absmax.shape[0])
        quantized[path] = entry
    names = {path: {name for name, _ in weights} for path, (weights, _, _) in found.items()}
    out = {**variables, "params": _drop_weights(params, (), names)}
    out[QUANT] = _nest(quantized)
    return _like(variables, out)


def dequantize_base(variables: PyTree) -> PyTree:
    """The inverse layout of ``quantize_base``: each quantized weight dequantized (in its
    stored dtype, in its own shape) into ``params``; the ``'quant'`` collection dropped. The
    values are the quantized ones (NF4 rounding is not undone)."""
    _require_mapping(variables, "dequantize_base")
    if not is_quantized(variables):
        return variables
    weights: dict[str, dict[str, Any]] = {}
    for path, name, q, roles, axis in iter_quantized(variables[QUANT]):
        weights.setdefault(path, {})[name] = dequantize_stack(q, roles, axis)
    missing = sorted(set(weights) - {path for path, _ in _iter_nodes(variables["params"])})
    if missing:
        raise ValueError(f"dequantize_base: quantized layers {missing} are not in 'params'")
    params = _add_weights(variables["params"], (), weights)
    rest = {k: v for k, v in variables.items() if k != QUANT}
    return _like(variables, {**rest, "params": params})


def is_quantized(variables: PyTree) -> bool:
    """Whether ``variables`` is a variables dict holding ``'params'`` and a ``'quant'``
    collection (a params tree may have a module named 'quant': that is not one)."""
    return isinstance(variables, Mapping) and QUANT in variables and "params" in variables


def with_kernel_shapes(variables: PyTree) -> PyTree:
    """``variables`` without its ``'quant'`` collection, each quantized weight standing in
    ``params`` as a read-only zero array of its own shape and dtype that allocates no memory
    (a broadcast view): for code that reads only a layer's weight shape (adapter files), never
    its values. Unchanged without a ``'quant'`` collection."""
    if not is_quantized(variables):
        return variables
    weights: dict[str, dict[str, Any]] = {}
    for path, name, q, roles, axis in iter_quantized(variables[QUANT]):
        shape = stacked_shape(q, roles, axis)
        weights.setdefault(path, {})[name] = np.broadcast_to(np.zeros((), q.dtype), shape)
    rest = {k: v for k, v in variables.items() if k != QUANT}
    return _like(variables, {**rest, "params": _add_weights(variables["params"], (), weights)})


def restore_quantized(loaded: PyTree, quantized: PyTree) -> PyTree:
    """``loaded`` (a tree ``with_kernel_shapes(quantized)`` became) with the stand-in weights
    dropped and ``quantized``'s ``'quant'`` collection back."""
    names: dict[str, set[str]] = {}
    for path, name, *_ in iter_quantized(quantized[QUANT]):
        names.setdefault(path, set()).add(name)
    out = {**loaded, "params": _drop_weights(loaded["params"], (), names)}
    out[QUANT] = quantized[QUANT]
    return _like(quantized, out)


def requantize_merged(merged: PyTree, quantized: PyTree) -> PyTree:
    """``merged`` (``quantized`` dequantized and merged) with each quantized layer's weight in
    ``'quant'`` again: a layer that held an adapter in ``quantized`` gets its merged weight
    re-quantized in its own format and layout, the others keep their quantized weight."""
    new: dict[str, Any] = {}
    for path, name, q, roles, axis in iter_quantized(quantized[QUANT]):
        node = _node(quantized["params"], path)
        if node is not None and _adapted(node, name):
            # merged is quantized merged (jaxlora.merge): it has every layer quantized has.
            merged_node = cast(Mapping, _node(merged["params"], path))
            q = requantize_stack(q, roles, axis, merged_node[name])
        entry = new.get(path) or dict(cast(Mapping, _node(quantized[QUANT], path)))
        new[path] = {**entry, name: q}
    return restore_quantized(merged, _like(quantized, {**quantized, QUANT: _nest(new)}))


def _adapted(node: Mapping, name: str) -> bool:
    """Whether the params ``node`` holds an adapter of its weight ``name``: ``lora_a``, or
    ``<name>_lora_a`` in a module with several adapted weights."""
    return any(factor_names(w)[0] in node for w in (None, name))


def stack_index(length: int) -> jax.Array:
    """The ``"stack_index"`` entry of a stack of ``length`` layers: layer i's index at [i].

    An ``nn.scan`` must slice ``'quant'`` on axis 0. One that slices it on another axis k
    fails loudly for most shapes, but not always: stacked int8 codes (L, out, in) and scales
    (L, blocks) sliced on axis 1 when out == blocks == L are arrays of one layer's shapes
    holding a column of every layer's values. This entry, sliced alike, is (1, 1, 1) in the
    forward pass only when the slice is on axis 0 (on any other axis it keeps L), so
    ``layer_weight`` refuses every other slice before a value is read; Flax traces the scan's
    body before ``lax.scan`` compares the sliced axes' sizes, so the refusal comes first."""
    return jnp.arange(length, dtype=jnp.int32).reshape(length, *ONE_INDEX)


def _check_stack_index(tree: Mapping, q: QuantizedWeight, where: str, *, sliced: bool) -> None:
    """A ``ValueError`` unless a stacked entry ``tree`` holds its layer index as
    ``quantize_base`` made it: (L, 1, 1, 1) for the whole stack, or one layer's (1, 1, 1)
    when ``sliced`` (in the forward pass: an nn.scan slicing 'quant' on axis 0)."""
    index = tree.get(STACK_INDEX)
    if STACK not in tree:
        if index is not None:
            raise ValueError(
                f"'quant' collection: '{where}' has a '{STACK_INDEX}' but no '{STACK}'"
            )
        return
    shape = tuple(np.shape(index)) if index is not None else None
    if sliced and shape == ONE_INDEX:
        return
    if sliced and shape is not None and len(shape) == len(ONE_INDEX):
        raise ValueError(
            f"layer '{where}' is called inside an nn.scan that slices the 'quant' collection on "
            f"an axis other than 0: its layer index '{STACK_INDEX}' arrives as {shape}, one "
            f"layer's is {ONE_INDEX}; its quantized arrays hold each layer's weight on axis 0 "
            "whatever axis 'params' is scanned on, so the scan must be nn.scan(..., "
            "variable_axes={'params': k, 'quant': 0})"
        )
    length = stack_length(q, f"'quant' collection: layer '{where}'")
    if length is not None and shape == (length, *ONE_INDEX):
        return  # the whole stack: dequantize_base, files, or a call outside the scan
    raise ValueError(
        f"'quant' collection: the stacked layer '{where}' must hold its '{STACK_INDEX}' "
        f"{(length, *ONE_INDEX) if length else ('L', *ONE_INDEX)} (quantize_base writes it)"
        + (
            f" or one layer's {ONE_INDEX} inside an nn.scan slicing 'quant' on axis 0"
            if sliced
            else ""
        )
        + f", got {'none' if shape is None else shape}"
    )


def _node(tree: Mapping, path: str) -> Mapping | None:
    node: Any = tree
    for key in path.split("."):
        node = node.get(key) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else None


def iter_quantized(tree: Mapping, path: tuple[str, ...] = ()):
    """Yields ('.'-joined layer path, weight name, QuantizedWeight, Roles, layer axis) for each
    quantized weight: a node holding one ``QuantizedWeight`` (named ``kernel``, a Dense
    kernel, unless a ``"roles"`` leaf names it and gives its roles), or several named by a
    ``"roles"`` tuple (a module with several adapted weights: one yield each); the layer axis
    is the ``"stack"`` record's for a stacked weight (``nn.scan``), None for one layer's."""
    where = ".".join(path)
    weights = {k: v for k, v in tree.items() if isinstance(v, QuantizedWeight)}
    marker = tree.get(ROLES)
    if weights or marker is not None or STACK in tree:
        held = _quantized_layer(tree, weights, marker, where)
        _check_stack_index(tree, held[0][1], where, sliced=False)
        axis = _stack_axis(tree, where)
        for name, q, roles in held:
            yield where, name, q, roles, axis
        return
    for key, value in tree.items():
        if not isinstance(value, Mapping):
            raise ValueError(
                f"'quant' collection: '{'.'.join((*path, str(key)))}' is a "
                f"{type(value).__name__}, expected a QuantizedWeight named 'kernel' (or one "
                f"named by a '{ROLES}' ProductRoles beside it)"
            )
        yield from iter_quantized(value, (*path, str(key)))


def layer_weight(node: Mapping, where: str) -> list[tuple[str, QuantizedWeight, Roles]]:
    """[(weight name, QuantizedWeight, Roles)] of each quantized weight of the layer whose
    ``'quant'`` entries are ``node`` (its submodules' entries, mappings, aside): one, several
    (a module with several adapted weights), or none."""
    own = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
    if not own:
        return []
    weights = {k: v for k, v in own.items() if isinstance(v, QuantizedWeight)}
    held = _quantized_layer(own, weights, own.get(ROLES), where)
    _check_stack_index(own, held[0][1], where, sliced=True)  # before a value is read
    return held


def _quantized_layer(tree: Mapping, weights: dict, marker, where: str):
    """[(name, QuantizedWeight, Roles)] of a layer's 'quant' entries ``tree``: ``kernel``
    without a ``"roles"`` record, else each weight the record names; a ``ValueError`` for a
    record that is not ``lora_roles``' kind, a weight missing or an entry it does not name."""
    named: dict[str, Roles | None]
    if marker is None:
        named = {"kernel": None}
    else:
        try:
            named = {m.weight: m.roles for m in records({ROLES_NAME: marker}, where)}
        except ValueError:
            raise ValueError(
                f"'quant' collection: '{where}.{ROLES}' must be a ProductRoles, or a tuple of "
                f"several with distinct weights sorted by name, got {marker!r}"
            ) from None
    extra = sorted(set(tree) - {*named, ROLES, STACK, STACK_INDEX})
    if not set(named) <= set(weights) or extra:
        what = "one QuantizedWeight named" if len(named) == 1 else "QuantizedWeights named"
        raise ValueError(
            f"'quant' collection: layer '{where}' holds {sorted(tree)}; expected {what} "
            f"{sorted(named)}"
            + (f" and its '{ROLES}'" if marker else "")
            + f" (and a '{STACK}' record and '{STACK_INDEX}' if it is an nn.scan stack)"
        )
    return [
        (
            name,
            weights[name],
            linear_roles(tuple(reversed(weights[name].shape))) if r is None else r,
        )
        for name, r in named.items()
    ]


def _stack_axis(tree: Mapping, where: str) -> int | None:
    """The layer axis a stacked weight's ``"stack"`` record gives, None without one; the
    weight's arrays must then be a stack's (a leading layer axis) or one layer's."""
    record = tree.get(STACK)
    if record is not None and not isinstance(record, StackRecord):
        raise ValueError(f"'quant' collection: '{where}.{STACK}' must be a StackRecord")
    return None if record is None else record.axis


def _target(node: Any, where: str, layout: Any = None):
    """([(weight name, roles of one layer's weight)], the ``"roles"`` record to store or None,
    layer axis of an nn.scan stack or None) of a params node ``quantize_base`` may quantize:
    a Dense kernel, or each weight a ``lora_roles`` record names (several in a module with
    several adapted weights, each its own Linear); a ``ValueError`` naming the layer otherwise."""
    if isinstance(node, Mapping) and ROLES_NAME in node:  # adapted at its weights' products
        adapted = check_products(node, where, stacked=True)
        weights = [(one.weight, one.marker.roles) for one in adapted]
        # a product stacked by nn.scan is quantized per layer, as a stacked Dense kernel is
        # (several weights of one module: each stacked alike, check_products checks)
        marker, axis = node[ROLES_NAME], adapted[0].layer
    else:
        kernel = _kernel(node, where)
        roles, marked, axis = _dense_roles(node, tuple(jnp.shape(kernel)), where, layout)
        weights, marker = [("kernel", roles)], ProductRoles("kernel", roles) if marked else None
    for name, _ in weights:
        if isinstance(node[name], meta.AxisMetadata):
            raise ValueError(
                f"{where} has a partitioned weight '{name}' ({type(node[name]).__name__}); "
                "quantized weights keep no partitioning metadata"
            )
    return weights, marker, axis


def _kernel(node: Any, where: str) -> Any:
    kernel = node.get("kernel") if isinstance(node, Mapping) else None
    if kernel is None or isinstance(kernel, Mapping):
        found = sorted(node) if isinstance(node, Mapping) else type(node).__name__
        raise ValueError(
            f"{where} has no 'kernel' (found {found}): only nn.Dense/nn.DenseGeneral kernels "
            "and weights adapted at their product ('lora_roles') can be quantized"
        )
    return meta.unbox(kernel)


def _dense_roles(node: Mapping, shape: tuple[int, ...], where: str, layout: Any):
    """(roles, marked, layer axis) of an nn.Dense kernel (in, out), or of an nn.DenseGeneral
    one, or of a stack of either (nn.scan), whose adapter or ``layout`` (``jaxlora.layouts``)
    says how many axes it contracts and where its layer axis is (the kernel alone does not)."""
    if len(shape) == 2 and ("lora_a" not in node or jnp.ndim(meta.unbox(node["lora_a"])) == 2):
        return linear_roles(shape), False, None
    if "lora_a" in node:
        n_in, stack, axis = _adapted_axes(node, shape, where)
    elif layout is not None:
        n_in, stack, axis = _layout_axes(layout, shape, where)
    else:
        raise ValueError(
            f"{where} has a kernel of shape {shape} and no adapter: which of its axes are "
            "contracted (nn.DenseGeneral), a window (nn.Conv) or layers (nn.scan) is not known "
            "from the tree; inject LoRA first, or pass layouts=jaxlora.layouts(model, *inputs) "
            "(only 2-D nn.Dense kernels are quantized without either)"
        )
    if stack > 1:
        raise ValueError(
            f"{where} has a kernel of shape {shape} stacked over {stack} layer axes (nested "
            "nn.scan/nn.vmap); a quantized stack has one layer axis"
        )
    one = kinds.to_front(shape, axis)[1:] if stack else shape
    roles = Roles(one, (), tuple(range(n_in)), tuple(range(n_in, len(one))))
    return roles, not (len(one) == 2 and n_in == 1), axis if stack else None


def _adapted_axes(node: Mapping, shape: tuple[int, ...], where: str) -> tuple[int, int, int]:
    """(contracted axes, stacked layer axes, layer axis) a linear adapter's shapes say."""
    kind, _, base, a, b = kinds.check_layer(node, where, stacked=True)
    if kind != "linear":
        raise ValueError(
            f"{where} has a kernel of shape {shape} with a {kind} adapter: only linear layers "
            "(nn.Dense, nn.DenseGeneral) have a torch Linear layout to be quantized in"
        )
    axis = kinds.layer_axis(node)
    front = [
        kinds.to_front(tuple(jnp.shape(x)), kinds.front_axis(node, base, a, b))
        for x in (base, a, b)
    ]
    stack = kinds.stack_of(kind, *front)
    return kinds.in_axes_of(kind, front[1], stack), stack, axis


def _layout_axes(layout: Any, shape: tuple[int, ...], where: str) -> tuple[int, int, int]:
    """(contracted axes, stacked layer axes, layer axis) a ``jaxlora.layouts`` entry says."""
    kind = getattr(layout, "kind", None)
    if kind != "linear":
        what = f"a {kind} layer" if kind else f"a {type(layout).__name__}"
        raise ValueError(
            f"{where} has a kernel of shape {shape} and, by its layout, is {what}: only linear "
            "layers (nn.Dense, nn.DenseGeneral) have a torch Linear layout to be quantized in"
        )
    if layout.ndim + layout.stack != len(shape):
        raise ValueError(
            f"{where}: its layout says {layout.ndim} weight axes and {layout.stack} layer "
            f"axes, but the kernel is {shape}: the layouts are of another model"
        )
    return layout.in_axes, layout.stack, layout.axis


def _iter_nodes(tree: Mapping, path: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            sub = (*path, str(key))
            yield ".".join(sub), value
            yield from _iter_nodes(value, sub)


def _drop_weights(tree: Mapping, path: tuple[str, ...], names: Mapping[str, set[str]]) -> Mapping:
    """``tree`` without the weights ``names[layer path]`` of each named layer."""
    out = {}
    where = ".".join(path)
    for key, value in tree.items():
        sub = (*path, str(key))
        if isinstance(value, Mapping):
            out[key] = _drop_weights(value, sub, names)
        elif key not in names.get(where, ()):
            out[key] = value
    return _like(tree, out)


def _add_weights(tree: Mapping, path: tuple[str, ...], weights: Mapping[str, dict]) -> Mapping:
    """``tree`` with ``weights[layer path]`` = {name: value} put into each layer."""
    out = {}
    for key, value in tree.items():
        sub = (*path, str(key))
        out[key] = _add_weights(value, sub, weights) if isinstance(value, Mapping) else value
    where = ".".join(path)
    for name, value in weights.get(where, {}).items():
        if name in out:
            raise ValueError(f"layer '{where}' has a '{name}' both in 'params' and in 'quant'")
        out[name] = value
    return _like(tree, out)


def _nest(flat: dict[str, dict]) -> dict:
    out: dict = {}
    for path, entry in flat.items():
        node = out
        for key in path.split("."):
            node = node.setdefault(key, {})
        node.update(entry)
    return out
