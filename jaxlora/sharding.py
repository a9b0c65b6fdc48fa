"""Sharding for LoRA params: the adapter follows its base weight's partitioning.

``lora_a`` takes the weight's input-axis sharding and ``lora_b`` its output-axis sharding; the
rank axis is replicated (``jaxlora.kinds.lora_axis_names``, for every layer kind; an adapter
made at a product takes, axis by axis, the names of the weight axes it stands for:
``jaxlora.product.axis_names``). Boxed
params (``nn.with_partitioning`` / logical axis names) get matching boxes from
``jaxlora.inject`` directly, so ``nn.get_partition_spec`` already covers them; for plain
trees, ``partition_specs`` completes a spec tree written for the base.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jax.sharding import PartitionSpec

from jaxlora import kinds, product
from jaxlora.tree import (
    LORA_NAMES,
    RECORD_NAMES,
    ROLES_NAME,
    PyTree,
    _like,
    _require_mapping,
    is_lora_name,
    path_str,
)


def partition_specs(params: PyTree, base_specs: PyTree) -> PyTree:
    """A ``PartitionSpec`` tree shaped like ``params`` (LoRA leaves included).

    ``base_specs`` gives the specs of the base leaves (nested like ``params``; missing entries
    and ``None`` mean replicated). Each ``lora_a`` gets ``P(kernel_in, None)`` and each
    ``lora_b`` ``P(None, kernel_out)`` from its sibling kernel's (or embedding's) spec; for
    multi-axis kernels (DenseGeneral, Conv) all input / output axes carry over, and a stacked
    (``nn.scan``) layer's layer axis is partitioned as the kernel's (in front, or where its
    ``lora_stack`` record says: MaxText's ``param_scan_axis=1``). ``params`` must
    hold each adapter beside its base weight (spec the whole tree, then ``split`` it).

    Examples:
        >>> import jax.numpy as jnp
        >>> params = {"q": {"kernel": jnp.ones((8, 4)), "lora_a": jnp.ones((8, 2)),
        ...                 "lora_b": jnp.ones((2, 4))}}
        >>> specs = partition_specs(params, {"q": {"kernel": PartitionSpec("fsdp", "tensor")}})["q"]
        >>> {name: tuple(spec) for name, spec in specs.items()}
        {'kernel': ('fsdp', 'tensor'), 'lora_a': ('fsdp', None), 'lora_b': (None, 'tensor')}
    """
    _require_mapping(params, "partition_specs")
    return _specs(params, base_specs if isinstance(base_specs, Mapping) else {}, ())


def _specs(node: Mapping, specs: Mapping, path: tuple) -> Mapping:
    out: dict[str, Any] = {}
    for key, value in node.items():
        spec = specs.get(key) if isinstance(specs, Mapping) else None
        if isinstance(value, Mapping):
            out[key] = _specs(value, spec if isinstance(spec, Mapping) else {}, (*path, key))
        elif key in RECORD_NAMES:  # no arrays: it stays as it is, so the trees match
            out[key] = value
        elif not is_lora_name(key):
            out[key] = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
    if ROLES_NAME in node:  # an adapter made at a product: each axis as its weight's
        where = f"partition_specs: layer '{path_str(path)}'"
        for one in product.check_products(node, where, stacked=True):
            spec = specs.get(one.weight) if isinstance(specs, Mapping) else None
            names = tuple(spec) if isinstance(spec, PartitionSpec) else ()
            names += (None,) * (len(one.value.shape) - len(names))
            stack, axis = (0, 0) if one.layer is None else (1, one.layer)
            names_a, names_b = product.stacked_axis_names(one.marker.roles, names, stack, axis)
            name_a, name_b = one.names
            out[name_a], out[name_b] = PartitionSpec(*names_a), PartitionSpec(*names_b)
    elif any(name in node for name in LORA_NAMES):
        where = f"partition_specs: layer '{path_str(path)}'"
        kind, name, base, lora_a, lora_b = kinds.check_layer(node, where, stacked=True)
        stack = kinds.stack_of(kind, base.shape, lora_a.shape, lora_b.shape)
        spec = specs.get(name) if isinstance(specs, Mapping) else None
        names = tuple(spec) if isinstance(spec, PartitionSpec) else ()
        names += (None,) * (len(base.shape) - len(names))
        # a stack on another layer axis (lora_stack): its names in front, and back per factor
        axis = kinds.front_axis(node, base, lora_a, lora_b)
        front = kinds.to_front(names, axis)
        names_a, names_b = kinds.lora_axis_names(kind, front, len(lora_a.shape), stack)
        names_a, names_b = kinds.from_front(names_a, axis), kinds.from_front(names_b, axis)
        out["lora_a"], out["lora_b"] = PartitionSpec(*names_a), PartitionSpec(*names_b)
        if "lora_magnitude" in node:  # DoRA's m (out,): sharded as the output features are
            out["lora_magnitude"] = PartitionSpec(names[-1])
    return _like(node, out)
