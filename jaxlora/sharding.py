"""Sharding for LoRA params: the adapter follows its kernel's partitioning.

``lora_a`` (in, r) takes the kernel's input-axis sharding and ``lora_b`` (r, out) its
output-axis sharding; the rank axis is replicated. Boxed params (``nn.with_partitioning`` /
logical axis names) get matching boxes from ``jaxlora.inject`` directly, so
``nn.get_partition_spec`` already covers them; for plain trees, ``partition_specs`` completes
a spec tree written for the base.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jax.sharding import PartitionSpec

from jaxlora.tree import LORA_NAMES, PyTree, _like, _require_mapping


def partition_specs(params: PyTree, base_specs: PyTree) -> PyTree:
    """A ``PartitionSpec`` tree shaped like ``params`` (LoRA leaves included).

    ``base_specs`` gives the specs of the base leaves (nested like ``params``; missing entries
    and ``None`` mean replicated). Each ``lora_a`` gets ``P(kernel_in, None)`` and each
    ``lora_b`` ``P(None, kernel_out)`` from its sibling kernel's spec.

    >>> import jax.numpy as jnp
    >>> params = {"q": {"kernel": jnp.ones((8, 4)), "lora_a": jnp.ones((8, 2)),
    ...                 "lora_b": jnp.ones((2, 4))}}
    >>> partition_specs(params, {"q": {"kernel": PartitionSpec("fsdp", "tensor")}})["q"]
    {'kernel': P('fsdp', 'tensor'), 'lora_a': P('fsdp', None), 'lora_b': P(None, 'tensor')}
    """
    _require_mapping(params, "partition_specs")
    return _specs(params, base_specs if isinstance(base_specs, Mapping) else {}, ())


def _specs(node: Mapping, specs: Mapping, path: tuple) -> Mapping:
    out: dict[str, Any] = {}
    for key, value in node.items():
        spec = specs.get(key) if isinstance(specs, Mapping) else None
        if isinstance(value, Mapping):
            out[key] = _specs(value, spec if isinstance(spec, Mapping) else {}, (*path, key))
        elif key not in LORA_NAMES:
            out[key] = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
    if any(name in node for name in LORA_NAMES):
        kernel = specs.get("kernel") if isinstance(specs, Mapping) else None
        axes = tuple(kernel) + (None,) * (2 - len(kernel)) if kernel else (None, None)
        if "lora_a" in node:
            out["lora_a"] = PartitionSpec(axes[0], None)
        if "lora_b" in node:
            out["lora_b"] = PartitionSpec(None, axes[1])
    return _like(node, out)
