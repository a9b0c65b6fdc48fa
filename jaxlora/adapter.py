"""Adapter files in Hugging Face PEFT's format, for Flax Linen params trees.

The format and its safety rules (safetensors only, atomic writes, strict reading) live in
``_loracore/peft_format.py``, shared with torchlora and ``jaxlora.nnx``; this file maps Linen
params trees onto it (Flax layout in, torch layout on disk).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax.core import meta

from _loracore import peft_format
from _loracore.config import WEIGHT_INITS
from _loracore.peft_format import (
    check_layer_set,
    check_pair,
    check_paths_exist,
    file_config,
    magnitude_key,
    magnitude_shape,
    map_path,
    tensor_keys,
)
from jaxlora import hf_maps, kinds, product, reads, stacks
from jaxlora.config import LoRAConfig
from jaxlora.core import scaling, weight_init
from jaxlora.quant._base import is_quantized, restore_quantized, with_kernel_shapes
from jaxlora.tree import (
    INIT_NAME,
    ROLES_NAME,
    InitRecord,
    PyTree,
    _like,
    _require_mapping,
    combine,
    iter_lora_layers,
    path_str,
    split,
)


def is_finite(value) -> bool:
    return bool(np.isfinite(np.asarray(value, np.float32)).all())


def write_adapter(directory, tensors, peft) -> None:
    peft_format.write_adapter(
        directory, tensors, peft, serialize=safetensors.numpy.save, is_finite=is_finite
    )


def read_adapter(directory, *, conv1d=None):
    """The adapter's config and {torch module path: (A, B, kind)} as numpy arrays, checked;
    ``conv1d``: the torch paths known to be transformers ``Conv1D`` (``fan_in_fan_out``)."""
    return peft_format.read_adapter(directory, framework="np", is_finite=is_finite, conv1d=conv1d)


def save_adapter(
    params: PyTree,
    directory: str | os.PathLike,
    config: LoRAConfig,
    *,
    path_map: hf_maps.PathMapArg = None,
    layer_names: Mapping[str, str] | None = None,
) -> Path:
    """Writes the LoRA leaves of a Linen params tree as a PEFT adapter; returns the directory.

    Only ``lora_a``/``lora_b`` are written (in torch layout for their kind: Dense and
    DenseGeneral as a Linear over the flattened axes, Conv as PEFT's Conv2d, Embed as PEFT's
    Embedding; in their own dtype). Each
    layer's rank comes from its shapes and its alpha from ``config.alpha_for(path)``;
    ``rank_pattern`` and ``target_modules`` are written so that PEFT rebuilds exactly these
    layers. ``path_map`` maps a '.'-joined Flax layer path to the torch module path where the
    names differ (a dict or a function).

    Stacked (``nn.scan``) layers are written per layer, as PEFT's keys for the unscanned twin:
    ``layer_names`` says, for each scanned module, where the layer index goes
    (``{"blocks": "blocks.{i}"}`` writes ``…blocks.0.attn.query.lora_A.weight``, …;
    ``{"blocks": "blocks_{i}"}`` writes ``blocks_0.…``); ``path_map`` then applies to the
    per-layer paths. Without it a stacked layer is refused. Each layer is the stack's slice on
    its layer axis (axis 0, or the one its ``lora_stack`` record says: a tree scanned with
    ``variable_axes={"params": 1}``), so the file is the unrolled twin's. ``path_map`` may
    also name a ready map (``"transformers.flax_llama"``; see ``jaxlora.hf_maps.NAMED_MAPS``).

    An adapter made at its weight's product (``inject(..., layouts=)`` on a module such as
    ``FlaxConv1D`` or an einsum projection) is written as the torch ``nn.Linear`` module(s) its
    ``path_map`` value names: a torch path, or a ``jaxlora.HFLinear`` with the axis orders, a
    fused weight's modules, or ``conv1d=True`` for transformers' ``Conv1D`` (``jaxlora.hf_maps``;
    ``path_map="transformers.flax_gpt2"`` says it for GPT-2). When every module written is a
    Conv1D the file says ``fan_in_fan_out: true``, as PEFT's own GPT-2 files do.
    """
    path_map = hf_maps.resolve(path_map)
    _require_mapping(params, "save_adapter")
    if is_quantized(params):  # a quantized base: only its shapes are read
        params = with_kernel_shapes(params)
        if layer_names:  # a variables dict: its stacks are in its 'params' collection
            unstacked = stacks.unstack(meta.unbox(params["params"]), layer_names)
            params = {**params, "params": unstacked}
    elif layer_names:
        params = stacks.unstack(meta.unbox(params), layer_names)
    tensors: dict[str, np.ndarray] = {}
    layers: dict[str, tuple[int, float]] = {}
    products = _product_layouts(params, path_map, "save_adapter")
    for entry in products.values():  # adapted at a weight's product: written as torch Linear(s)
        _save_product(entry, config, tensors, layers)
    for path, node in iter_lora_layers(params):
        name = path_str(path)
        if ROLES_NAME in node:
            continue
        kind, _, _, a, b = kinds.check_layer(node, f"save_adapter: layer '{name}'")
        _check_init_record(node, config, f"save_adapter: layer '{name}'")
        torch_path = _torch_path(path_map, name, "save_adapter")
        key_a, key_b = tensor_keys(torch_path, kind)
        tensors[key_a], tensors[key_b] = kinds.to_torch(kind, np.asarray(a), np.asarray(b))
        magnitude = _saved_magnitude(node, kind, config, f"save_adapter: layer '{name}'")
        if magnitude is not None:
            tensors[magnitude_key(torch_path)] = magnitude
        layers[torch_path] = (a.shape[-1], config.alpha_for(name))
    if not layers:
        raise ValueError("save_adapter: the params tree has no 'lora_a'/'lora_b' leaves")
    mapped = (map_path(path_map, p) for p in _node_paths(params))
    # a product layer's modules are named by its layout (an HFLinear may name several)
    candidates = [*(p for p in mapped if isinstance(p, str) and p not in layers), *layers]
    lays = [entry.lay for entry in products.values()]
    fan = hf_maps.fan_in_fan_out(lays, len(layers))
    write_adapter(directory, tensors, file_config(config, layers, candidates, fan_in_fan_out=fan))
    return Path(directory)


def _saved_magnitude(node, kind: str, config: LoRAConfig, where: str) -> np.ndarray | None:
    """A layer's DoRA magnitude for the file, or ``None``; a ``ValueError`` unless the layer
    has one exactly when ``config.use_dora``."""
    if ("lora_magnitude" in node) != config.use_dora:
        raise ValueError(
            f"{where}: the config has use_dora={config.use_dora} but the layer "
            f"{'holds' if 'lora_magnitude' in node else 'has no'} 'lora_magnitude'"
        )
    if not config.use_dora:
        return None
    base = meta.unbox(node[kinds.base_name(node)])
    magnitude = np.asarray(kinds.check_magnitude(node, kind, base, 0, where))
    return magnitude.reshape(magnitude_shape(kind, magnitude.shape[0], np.ndim(base) - 2))


def load_adapter(
    params: PyTree,
    directory: str | os.PathLike,
    *,
    path_map: hf_maps.PathMapArg = None,
    layer_names: Mapping[str, str] | None = None,
    layouts: Mapping | None = None,
) -> PyTree:
    """Returns a new params tree holding the adapter in ``directory``.

    Into a plain tree (no LoRA leaves) the layers selected by the file's ``target_modules`` get
    new leaves; into an injected tree the existing leaves are replaced. The file must match the
    tree exactly: a missing, unexpected or wrongly shaped tensor, a rank that disagrees with
    the config, a non-finite value or a damaged file is a ``ValueError`` naming the key, and
    the input tree is never modified. Use ``read_adapter_config(directory)`` for the config to
    pass to ``jaxlora.intercept``.

    PiSSA/OLoRA files (``init_lora_weights`` "pissa"/"olora") are relative to the residual
    W − scaling·B₀A₀ that PEFT builds from the base kernel W: loaded into a plain tree, the
    residual is built here as PEFT does. A params tree does not record how it was injected,
    so such a file is refused for an injected tree (load it into the base tree). For the same
    reason, a plain file loaded into a PiSSA/OLoRA-injected tree is applied to that tree's
    kernels, which are residuals: load it into the base tree (torchlora and ``jaxlora.nnx``,
    whose layers know their init, refuse that case).

    A per-layer file (PEFT's keys of the unscanned twin) loads into a scanned (``nn.scan``)
    tree with ``layer_names`` as for ``save_adapter``: the layers' adapters are stacked, and
    every layer of a stack must be in the file. The base is not copied. ``path_map`` as for
    ``save_adapter`` (a dict, a function or a ready map's name). A tree stacked on a layer
    axis other than 0 (``nn.scan(..., variable_axes={"params": 1})``, MaxText's) says so by
    its adapters' ``lora_stack`` records once injected; a plain one needs
    ``layouts=jaxlora.layouts(model, *inputs)``, which records the axis (without either, the
    layer axis is taken to be 0, and params that do not share a length there are refused).
    With ``layouts``, a layer the model also reads outside it (``Layouts.shared``: a head
    tied to the embedding's params) is refused, as ``inject`` refuses it.

    Adapters made at a weight's product (``inject(..., layouts=)``) are read from the torch
    module(s) their ``path_map`` value names, by the rule that writes them (``jaxlora.hf_maps``,
    shared with ``jaxlora.nnx``): into a tree already injected with layouts only (a plain
    tree's layout is not known without tracing: refused, saying so). Each module's
    ``lora_A``/``lora_B`` shapes must be those of the tree's adapter (its rank), a fused
    weight's modules must share one ``lora_A`` and one alpha; PiSSA/OLoRA and DoRA files are
    refused for them. A file with ``fan_in_fan_out: true`` (PEFT's GPT-2 files) loads only
    where ``path_map`` gives every layer as a transformers ``Conv1D``; a layer given as an
    ``nn.Linear`` is refused by name (the tensors are never transposed to fit).
    """
    path_map = hf_maps.resolve(path_map)
    _require_mapping(params, "load_adapter")
    if (is_quantized(params) or layer_names) and read_adapter(directory)[0].use_dora:
        raise ValueError(
            f"{directory}: a DoRA adapter (use_dora=true) loads into a plain, unstacked params "
            f"tree only: DoRA is implemented for {kinds.DORA_KINDS}"
        )
    if is_quantized(params):
        return _load_quantized(params, directory, path_map, layer_names, layouts)
    if layer_names:
        return _load_stacked(params, directory, path_map, layer_names, layouts)
    products = _product_layouts(params, path_map, f"load_adapter {directory}")
    lays = [entry.lay for entry in products.values()]
    config, everything = read_adapter(directory, conv1d=_conv1d_of(path_map, params))
    op_paths = {t for lay in lays for t in lay.paths}
    nodes = _plain_nodes(
        params, path_map, {e.module for e in products.values()}, set(everything), directory
    )
    check_paths_exist(set(everything), {**nodes, **dict.fromkeys(op_paths)}, path_map, directory)
    modules = {entry.module for entry in products.values()}
    injected = {path_str(p) for p, _ in iter_lora_layers(params)} - modules
    if injected or products:
        expected = {_torch_path(path_map, p, "load_adapter") for p in injected} | op_paths
    else:
        expected = set(config.select(nodes, strict=False))
    check_layer_set(expected, set(everything), directory)
    if config.use_dora and products:
        raise ValueError(
            f"{directory}: a DoRA adapter (use_dora=true) cannot be loaded into adapters made at "
            f"a weight's product ({', '.join(sorted(products))}): DoRA is implemented for "
            f"{kinds.DORA_KINDS}"
        )
    new = _products_from_file(products, everything, config, directory)
    tensors = {p: t for p, t in everything.items() if p not in op_paths}
    if config.init in WEIGHT_INITS and injected:
        raise ValueError(
            f"{directory}: the file is an init={config.init!r} adapter, relative to the "
            "residual W − scaling·B₀A₀ of the base kernel W, and a params tree does not record "
            "how it was injected (a PiSSA/OLoRA-injected tree's kernels are residuals already); "
            "load it into the plain base tree instead (no LoRA leaves, the original kernels): "
            "jaxlora.load_adapter(base_params, directory)"
        )
    _check_residual_bases(tensors, nodes, config, directory)
    keyed = [nodes[t][0] for t in tensors]
    _check_not_shared(
        layouts, [".".join(k[1:] if k[0] == "params" else k) for k in keyed], directory
    )
    for torch_path, (a, b, file_kind) in tensors.items():
        flax_path, node = nodes[torch_path]
        kind, name, in_axes = _target(node, file_kind, a, f"{directory}: layer '{torch_path}'")
        boxed = node[name]
        base = meta.unbox(boxed)
        shape = tuple(jnp.shape(base))
        layer = (
            kind,
            f"{kind} layer with '{name}' {shape}",
            lambda r, kind=kind, shape=shape, n=in_axes: kinds.torch_shapes(kind, shape, r, n),
        )
        check_pair(torch_path, file_kind, a, b, layer, directory)
        if "lora_a" in node and jnp.shape(meta.unbox(node["lora_a"]))[-1] != a.shape[0]:
            raise ValueError(
                f"{directory}: layer '{torch_path}' has rank {a.shape[0]} in the "
                f"file but {jnp.shape(meta.unbox(node['lora_a']))[-1]} in the params tree"
            )
        dtype = meta.unbox(node["lora_a"]).dtype if "lora_a" in node else a.dtype
        lora_a, lora_b = kinds.from_torch(kind, a, b, shape, in_axes)
        new[flax_path] = {
            "lora_a": jnp.asarray(lora_a, dtype),
            "lora_b": jnp.asarray(lora_b, dtype),
        }
        where = f"{directory}: layer '{torch_path}'"
        if injected and ("lora_magnitude" in node) != config.use_dora:
            raise ValueError(
                f"{where}: the file has use_dora={config.use_dora} but the params tree's layer "
                f"{'has' if 'lora_magnitude' in node else 'has no'} 'lora_magnitude'"
            )
        if config.use_dora:
            m = tensors[torch_path].magnitude
            kinds.check_magnitude({"lora_magnitude": m}, kind, base, 0, where)
            new[flax_path]["lora_magnitude"] = jnp.asarray(m, dtype)
        if config.init in WEIGHT_INITS and not injected:
            # A PiSSA/OLoRA adapter is relative to the residual base W − scaling·B₀A₀ (B₀A₀: the
            # top-r SVD/QR part of W, sign-free), which PEFT's loader recomputes the same way.
            scale = scaling(a.shape[0], config.alpha_for(torch_path), use_rslora=config.use_rslora)
            flat = base.reshape(kinds.flat_features(kind, shape, in_axes))
            make = weight_init(config.init)
            residual = make(flat, a.shape[0], scale)[2].reshape(shape).astype(base.dtype)
            new[flax_path][name] = (
                boxed.replace_boxed(residual) if isinstance(boxed, meta.AxisMetadata) else residual
            )
            new[flax_path][INIT_NAME] = InitRecord(config.init)  # the kernel is the residual
    return _set_leaves(params, (), new)


def _check_not_shared(layouts: Mapping | None, names: list[str], directory) -> None:
    """A ``ValueError`` for a layer (by '.'-joined path) that ``layouts`` found the model
    reading outside the layer (``Layouts.shared``: a head tied to the embedding's params), as
    ``inject`` refuses it."""
    shared = getattr(layouts, "shared", {})
    for name in names:
        if name in shared:
            raise ValueError(
                f"{directory}: layer '{name}' cannot take the adapter: "
                f"{reads.refusal(shared[name])} (jaxlora.layouts found it)"
            )


class _Product(NamedTuple):
    """An adapter made at a weight's product, as the adapter files see it: the node's key path,
    the node, the weight's torch layout, the weight (``product.Adapted``) and the module's
    layer path."""

    path: tuple
    node: Mapping
    lay: hf_maps.HFLayout
    one: product.Adapted
    module: str


def _product_layouts(params, path_map, caller: str) -> dict[str, _Product]:
    """{key: ``_Product``} of the adapters made at a weight's product, each node checked
    (``product.check_products``) and each weight's torch layout taken from ``path_map`` (a
    torch path or a ``jaxlora.HFLinear``: ``jaxlora.hf_maps``, the rule NNX's op-level layers
    use). The key, which ``path_map`` maps, is the layer path, or ``<path>.<weight>`` for each
    weight of a module with several adapted weights (as ``jaxlora.nnx``'s). A torch module
    named for two weights is refused."""
    out: dict[str, _Product] = {}
    seen: dict[str, str] = {}
    for path, node in iter_lora_layers(params):
        if ROLES_NAME not in node:
            continue
        name = path_str(path)
        where = f"{caller}: layer '{name}'"
        adapted = product.check_products(node, where)
        if "lora_magnitude" in node:
            raise ValueError(f"{where}: DoRA is not supported for an adapter made at a product")
        for one in adapted:
            key = name if len(adapted) == 1 else f"{name}.{one.weight}"
            spec = hf_maps.product_spec(path_map, key)
            lay = hf_maps.layout(spec, one.marker.roles, f"{where}, weight '{one.weight}'")
            for torch_path in lay.paths:
                if torch_path in seen:
                    raise ValueError(
                        f"{where}: path_map names the torch module '{torch_path}' for layer "
                        f"'{seen[torch_path]}' too"
                    )
                seen[torch_path] = key
            out[key] = _Product(path, node, lay, one, name)
    return out


def _torch_path(path_map, name: str, caller: str) -> str:
    """The torch module of a layer adapted as its own kind (Dense, Conv, Embed): a path; an
    ``HFLinear`` describes an adapter made at a product (``inject(..., layouts=)``)."""
    spec = map_path(path_map, name)
    if not isinstance(spec, str):
        raise ValueError(
            f"{caller}: path_map gives {spec!r} for layer '{name}', whose adapter is not made "
            "at its weight's product (no 'lora_roles'): an HFLinear describes such an adapter; "
            "inject the layer with layouts= (jaxlora.layouts(model, ...)) or give a torch path"
        )
    return spec


def _save_product(entry: _Product, config, tensors: dict, layers: dict) -> None:
    """A Linen adapter made at its weight's product (``jaxlora.product``) as the torch
    module(s) its layout names (``jaxlora.hf_maps``, the same rule as NNX's op-level layers);
    its alpha is its module's (one per module)."""
    where = f"save_adapter: layer '{entry.module}'"
    a, b = entry.one.lora_a, entry.one.lora_b
    hf_maps.check_op_init(_init_of(entry.node), config, where, "save")
    for torch_path, pair in hf_maps.to_peft(entry.lay, np.asarray(a), np.asarray(b)).items():
        if torch_path in layers:
            raise ValueError(f"{where}: path_map names the torch module '{torch_path}' twice")
        key_a, key_b = tensor_keys(torch_path, "linear")
        tensors[key_a], tensors[key_b] = pair
        layers[torch_path] = (int(np.shape(a)[-1]), config.alpha_for(entry.module))


def _plain_nodes(params, path_map, products: set[str], found: set[str], directory) -> dict:
    """{torch path: (key path, node)} of the nodes not adapted at a product. A node that
    ``path_map`` gives as an ``HFLinear`` is left out, and refused if the file names its
    module: its layout is found by tracing (``inject(..., layouts=)``), not from a file."""
    nodes = {}
    for name, kn in _node_paths(params).items():
        if name in products:
            continue
        spec = map_path(path_map, name)
        if isinstance(spec, str):
            nodes[spec] = kn
            continue
        named = {spec.path} if isinstance(spec.path, str) else set(spec.path)
        if isinstance(spec, hf_maps.HFLinear) and named & found:
            raise ValueError(
                f"{directory}: path_map gives {spec!r} for layer '{name}', which holds no "
                "adapter made at its weight's product: its layout is found by tracing. Inject "
                "it first (jaxlora.inject(params, config, key, layouts=jaxlora.layouts(model, "
                "...))), then load"
            )
    return nodes


def _products_from_file(products: dict[str, _Product], tensors: dict, config, directory) -> dict:
    """{key path: new factors} of the product adapters (each weight's, by its factors' names),
    each read by ``hf_maps.read_op`` (the reader NNX's op-level layers use), in the tree's
    dtypes and boxes; everything is checked before the caller changes anything. The weights
    of one module must get one alpha from the file (the module has one)."""
    new: dict[tuple, dict] = {}
    alphas: dict[str, dict[str, float]] = {}
    for key, entry in products.items():
        name_a, name_b = entry.one.names
        r = int(jnp.shape(entry.one.lora_a)[-1])
        where = f"{directory}: layer '{key}'"
        hf_maps.check_op_init(_init_of(entry.node), config, where, "load")
        lora_a, lora_b, _ = hf_maps.read_op(entry.lay, r, tensors, config, where)
        for torch_path in entry.lay.paths:
            alphas.setdefault(entry.module, {})[torch_path] = config.alpha_for(torch_path)
        new.setdefault(entry.path, {}).update(
            {
                leaf: _replace(entry.node[leaf], value)
                for leaf, value in ((name_a, lora_a), (name_b, lora_b))
            }
        )
    for module, by_path in alphas.items():
        if len(set(by_path.values())) > 1:
            raise ValueError(
                f"{directory}: the torch modules of layer '{module}' have different alphas "
                f"{by_path}; its adapted weights share one (one alpha per module)"
            )
    return new


def _init_of(node: Mapping) -> str | None:
    """The init a layer's ``lora_init`` record says (PiSSA/OLoRA), else ``None``."""
    record = node.get(INIT_NAME)
    return None if record is None else record.init


def _replace(boxed, value):
    """``value`` in the dtype (and the ``nn.Partitioned`` box) of the leaf it replaces."""
    array = jnp.asarray(value, meta.unbox(boxed).dtype)
    return boxed.replace_boxed(array) if isinstance(boxed, meta.AxisMetadata) else array


def _check_init_record(node: Mapping, config, where: str) -> None:
    """The file says ``config.init``; a PiSSA/OLoRA file makes its reader rebuild the residual
    from the base weight, so it must describe a layer whose kernel is that residual (its
    ``lora_init`` record), and a plain file a layer whose kernel is the base weight itself."""
    record = node.get(INIT_NAME)
    made = (
        "kaiming/gaussian (its kernel is the base weight)"
        if record is None
        else (f"{record.init!r} (its kernel is the residual W − scaling·B₀A₀)")
    )
    if (record.init if record is not None else None) != (
        config.init if config.init in WEIGHT_INITS else None
    ):
        raise ValueError(
            f"{where} was injected with init={made}, but the config says "
            f"init={config.init!r}: the file would make PEFT rebuild the wrong base. Pass the "
            "config the tree was injected with"
        )


def _check_residual_bases(tensors: Mapping, nodes: Mapping, config, directory) -> None:
    """A plain adapter is relative to the base weight W; a layer injected (or loaded) with
    PiSSA/OLoRA holds the residual W − scaling·B₀A₀ instead (its ``lora_init`` record)."""
    for torch_path in tensors:
        record = nodes[torch_path][1].get(INIT_NAME)
        if record is not None and config.init != record.init:
            raise ValueError(
                f"{directory}: layer '{torch_path}' was injected with init={record.init!r}, so "
                "its kernel is the residual W − scaling·B₀A₀, but the file is an "
                f"init={config.init!r} adapter, made for the original W: applied to the "
                "residual it would compute something else. Load it into the plain base tree "
                "(no LoRA leaves, the original kernels): jaxlora.load_adapter(base_params, "
                "directory)"
            )


def _load_quantized(variables, directory, path_map, layer_names, layouts) -> PyTree:
    """``load_adapter`` into variables holding a quantized base (``jaxlora.quant.quantize_base``):
    the adapter's shapes are checked against the quantized kernels' and the base is left as it
    is. PiSSA/OLoRA files are refused: they need the float kernel to build the residual."""
    config, _ = read_adapter(directory)
    if config.init in WEIGHT_INITS:
        raise ValueError(
            f"{directory}: the file is an init={config.init!r} adapter, relative to a residual "
            "base PEFT builds from the float kernel; load it into the float base, then quantize"
        )
    shaped = with_kernel_shapes(variables)
    loaded = load_adapter(
        shaped, directory, path_map=path_map, layer_names=layer_names, layouts=layouts
    )
    return restore_quantized(loaded, variables)


def _load_stacked(params, directory, path_map, layer_names, layouts) -> PyTree:
    """``load_adapter`` into the per-layer view of a scanned tree (sliced on each stack's
    layer axis), the adapter stacked back on it and combined with the tree's own base leaves
    (no copy of the base)."""
    if "params" in params:
        inner = _load_stacked(params["params"], directory, path_map, layer_names, layouts)
        return _like(params, {**params, "params": inner})
    config, _ = read_adapter(directory)
    if config.init in WEIGHT_INITS:
        raise ValueError(
            f"{directory}: init={config.init!r} files rewrite the base kernel, which is not "
            "supported for stacked (nn.scan) layers"
        )
    plain = meta.unbox(params)
    lengths, axes = {}, {}
    for root in layer_names:
        sub = stacks._subtree(plain, root)
        leaves = jax.tree.leaves(sub) if isinstance(sub, Mapping) else []
        if not leaves:
            raise ValueError(f"layer_names names '{root}', which is not a module in the params")
        axes[root] = stacks.stack_axis(plain, root, layouts)
        lengths[root] = stacks.stack_length(sub, root, axes[root])
    per_layer = stacks.unstack(plain, layer_names, axes)
    loaded = load_adapter(per_layer, directory, path_map=path_map)
    adapter = stacks.restack_adapter(split(loaded)[0], layer_names, lengths, axes)
    _check_not_shared(layouts, [path_str(p) for p, _ in iter_lora_layers(adapter)], directory)
    return combine(adapter, split(params)[1])


def _target(node, file_kind: str, a: np.ndarray, where: str) -> tuple[str, str, int]:
    """(kind, base leaf name, input axes) of the layer a file's adapter goes to: from its LoRA
    leaves when injected, else from its weight and the file's tensors."""
    name: str | None
    if "lora_a" in node or "lora_b" in node:
        kind, name, _, lora_a, _ = kinds.check_layer(node, where)
        return kind, name, kinds.in_axes_of(kind, jnp.shape(lora_a))
    name = kinds.base_name(node)
    base = meta.unbox(node[name]) if name is not None else None
    if name is None or base is None or jnp.ndim(base) < 2:
        raise ValueError(f"{where} has no kernel or embedding to adapt")
    shape = tuple(jnp.shape(base))
    if name == "embedding":
        return "embed", name, 1
    if file_kind == "conv" or len(shape) == 2:
        return ("conv" if file_kind == "conv" else "linear"), name, 1
    return "linear", name, kinds.linear_in_axes(shape, a.shape[1], where)


_UNSET: hf_maps.PathMapArg = object()  # type: ignore[assignment]


def read_adapter_config(
    directory: str | os.PathLike,
    *,
    path_map: hf_maps.PathMapArg = _UNSET,
    params: PyTree | None = None,
) -> LoRAConfig:
    """The ``LoRAConfig`` stored in an adapter directory, keyed by Flax paths, for
    ``intercept`` and ``merge(alpha=config.alpha_for)``.

    The file's ``rank_pattern``/``alpha_pattern`` and ``target_modules`` name torch module
    paths. With the ``path_map`` given to ``load_adapter`` (a dict, or a function, which needs
    ``params``: the tree whose layer paths it maps), the config returned names each of the
    file's layers by its Flax path, with its rank and alpha. A file with a rank or alpha
    pattern must be read with ``path_map`` stated (``None`` when the Flax paths are the torch
    paths): otherwise a Flax path that the torch-keyed patterns miss would silently get the
    default alpha.

    Raises:
        ValueError: as ``load_adapter`` for a bad file; a file with patterns and no
            ``path_map`` argument; a path_map under which a file layer has no (or two) Flax
            paths.
    """
    path_map = hf_maps.resolve(path_map)
    config, tensors = read_adapter(directory, conv1d=_conv1d_of(path_map, params))
    if path_map is _UNSET:
        if config.rank_pattern or config.alpha_pattern:
            raise ValueError(
                f"{directory}: the adapter has rank_pattern/alpha_pattern keyed by torch module "
                "paths: call read_adapter_config(directory, path_map=...) with the path_map "
                "given to load_adapter (path_map=None if the Flax paths are the torch paths), "
                "so each layer gets its own rank and alpha"
            )
        return config
    if path_map is None:
        return config
    if params is not None:
        flax_paths = list(_node_paths(params))
    elif callable(path_map):
        raise ValueError(
            "read_adapter_config: a path_map function needs params= (the params tree it "
            "maps) to find the Flax path of each of the file's layers"
        )
    else:  # a dict: a torch path that no key maps to is its own Flax path
        images = {t for spec in path_map.values() for t in _spec_paths(spec)}
        flax_paths = [*path_map, *(t for t in tensors if t not in images)]
    flax_of: dict[str | hf_maps.HFLinear, list[str]] = {}
    for flax_path in dict.fromkeys(flax_paths):
        for torch_path in _spec_paths(map_path(path_map, flax_path)):
            flax_of.setdefault(torch_path, []).append(flax_path)
    if params is not None:  # each weight of a module adapted at several products: the module
        for entry in _product_layouts(params, path_map, "read_adapter_config").values():
            for torch_path in entry.lay.paths:
                flax_of[torch_path] = [entry.module]
    exact: dict[str, tuple[int, float]] = {}
    for torch_path, (a, _, _) in tensors.items():
        found = flax_of.get(torch_path, [])
        if len(found) != 1:
            raise ValueError(
                f"{directory}: the file's layer '{torch_path}' is the image of "
                f"{found or 'no Flax path'} under path_map; expected exactly one"
            )
        setting = (a.shape[0], config.alpha_for(torch_path))
        if exact.setdefault(found[0], setting) != setting:  # a fused weight's modules
            raise ValueError(
                f"{directory}: the file gives the torch modules of layer '{found[0]}' different "
                f"(r, alpha): {exact[found[0]]} and {setting} for '{torch_path}'; one weight "
                "has one of each"
            )
    return config.for_layers(exact)


def _conv1d_of(path_map, params) -> frozenset[str]:
    """The torch paths ``path_map`` gives as transformers ``Conv1D`` (``HFLinear(conv1d=True)``):
    a dict's values, or a function's images of ``params``' layer paths."""
    if path_map is _UNSET or path_map is None:
        return frozenset()
    if callable(path_map):
        return hf_maps.conv1d_of(map(path_map, _node_paths(params) if params is not None else []))
    return hf_maps.conv1d_of(path_map.values())


def _spec_paths(spec) -> tuple[str, ...]:
    """The torch module path(s) a ``path_map`` value names (a path or a ``jaxlora.HFLinear``)."""
    if isinstance(spec, hf_maps.HFLinear):
        return (spec.path,) if isinstance(spec.path, str) else tuple(spec.path)
    return (spec,)


def _node_paths(params: Mapping, path: tuple[str, ...] = ()) -> dict[str, tuple]:
    """{'.'-joined layer path: (key path, node)} for every sub-dict below the 'params' level."""
    out = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            sub = (*path, str(key))
            name = ".".join(sub[1:] if sub[0] == "params" else sub)
            if name:
                out[name] = (sub, value)
            out.update(_node_paths(value, sub))
    return out


def _set_leaves(tree: Mapping, path: tuple, new: Mapping[tuple, dict]) -> Mapping:
    out = {}
    for key, value in tree.items():
        sub = (*path, str(key))
        out[key] = _set_leaves(value, sub, new) if isinstance(value, Mapping) else value
    if path in new:
        out.update(new[path])
    return _like(tree, out)
