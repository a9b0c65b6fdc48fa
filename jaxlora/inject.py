"""LoRA for unmodified Flax Linen models: ``inject`` adds the leaves, ``intercept`` uses them.

``inject(params, config, rng)`` puts ``lora_a``/``lora_b`` beside each matched ``nn.Dense``
kernel. ``intercept(config)`` is a context (or decorator) under which every ``nn.Dense`` call
that finds those leaves adds ``scaling · dropout(x) @ lora_a @ lora_b`` to its output, factored
(the (in, out) delta is never built). The model's code and its own ``init``/``apply`` are
unchanged; the params tree is the single source of truth for which layers are adapted.

Supported: ``nn.Dense`` (and subclasses, e.g. ``nn.remat(nn.Dense)``), under ``jax.jit`` and
``nn.remat``. Not supported: ``nn.scan``/``nn.vmap``-stacked kernels (``inject`` rejects them),
``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Conv`` and ``nn.Embed`` — calling such a layer while
it holds LoRA leaves is an error, never silently ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import meta

from jaxlora import core
from jaxlora.config import LoRAConfig
from jaxlora.tree import LORA_NAMES, PyTree, _like, _require_mapping

SUPPORTED = "flax.linen.Dense (a 2-D 'kernel')"


def inject(
    params: PyTree,
    config: LoRAConfig,
    rng: jax.Array,
    *,
    param_dtype: Any = jnp.float32,
) -> PyTree:
    """Returns a new params tree with ``lora_a`` (in, r) and ``lora_b`` (r, out) beside each kernel
    whose '.'-joined layer path matches ``config.targets``.

    ``lora_a`` is drawn like torch's kaiming_uniform(a=√5) from ``rng`` folded with a hash of
    the layer path (so one layer's init does not depend on which others are targeted);
    ``lora_b`` is zero, so the adapted model starts equal to the base. Accepts the params
    tree or the variables dict holding it under 'params'.

    Raises:
        ValueError: no layer matches (the message lists the layer paths), a layer already has
            LoRA leaves, or a layer's rank exceeds its ``min(in, out)``.
        TypeError: a matched layer is not a Dense-style layer with a 2-D kernel.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"inject expects a jaxlora.LoRAConfig, got {type(config).__name__}")
    _require_mapping(params, "inject")
    nodes = dict(_iter_nodes(params))
    chosen = config.select(nodes)
    new = {}
    for path in chosen:
        node, where = nodes[path], f"inject: layer '{path}'"
        boxed = node.get("kernel")
        kernel = meta.unbox(boxed) if boxed is not None else None
        if kernel is None or jnp.ndim(kernel) != 2:
            found = {k: tuple(jnp.shape(v)) for k, v in node.items() if not isinstance(v, Mapping)}
            raise TypeError(
                f"{where} holds {found}, which cannot be adapted; supported: "
                f"{SUPPORTED} (kernels stacked by nn.scan/nn.vmap are not supported)"
            )
        if any(name in node for name in LORA_NAMES):
            raise ValueError(f"{where} already has LoRA leaves")
        n_in, n_out = jnp.shape(kernel)
        r = config.rank_for(path)
        core.check_hparams(
            r=r,
            alpha=config.alpha_for(path),
            dropout=config.dropout,
            in_features=n_in,
            out_features=n_out,
            where=where,
        )
        key = jax.random.fold_in(rng, zlib.crc32(path.encode()))
        scale = core.scaling(r, config.alpha_for(path), use_rslora=config.use_rslora)
        new[path] = init_leaves(kernel, r, scale, config.init, key, param_dtype)
        if "kernel" in new[path] and isinstance(boxed, meta.AxisMetadata):
            new[path]["kernel"] = boxed.replace_boxed(new[path]["kernel"])
        if isinstance(boxed, meta.AxisMetadata) and hasattr(boxed, "names"):
            # lora_a shares the kernel's input-axis partitioning, lora_b its output axis;
            # the rank axis is replicated.
            names_in, names_out = boxed.names
            new[path]["lora_a"] = dataclasses.replace(
                boxed, value=new[path]["lora_a"], names=(names_in, None)
            )
            new[path]["lora_b"] = dataclasses.replace(
                boxed, value=new[path]["lora_b"], names=(None, names_out)
            )
    return _add_leaves(params, (), new)


def init_leaves(
    kernel: jax.Array, r: int, scale: float, init: str, key: jax.Array, param_dtype: Any
) -> dict[str, jax.Array]:
    """New ``lora_a``/``lora_b`` for a kernel per ``init`` (and, for PiSSA, its residual
    ``kernel`` in the kernel's dtype): the adapted layer's output is unchanged."""
    n_in, n_out = jnp.shape(kernel)
    if init == "pissa":
        lora_a, lora_b, residual = core.pissa(kernel, r, scale)
        return {
            "kernel": residual.astype(kernel.dtype),
            "lora_a": lora_a.astype(param_dtype),
            "lora_b": lora_b.astype(param_dtype),
        }
    if init == "gaussian":  # PEFT's: std 1/r
        lora_a = jax.random.normal(key, (n_in, r), param_dtype) / r
    else:
        lora_a = core.default_lora_a_init(key, (n_in, r), param_dtype)
    return {"lora_a": lora_a, "lora_b": core.default_lora_b_init(key, (r, n_out), param_dtype)}


@contextlib.contextmanager
def intercept(config: LoRAConfig, *, deterministic: bool = True) -> Iterator[None]:
    """Within this context, ``nn.Dense`` layers that hold LoRA leaves apply them.

    Use it around ``model.apply`` (inside or outside ``jax.jit``), or as a decorator on the
    function that calls it. ``config.alpha_for(path)``/``use_rslora`` set each layer's scale;
    a layer whose ``r`` (read from its shapes) differs from ``config.rank_for(path)`` is an
    error, so the scale can't silently differ from the one the adapter was made with. With
    ``deterministic=False`` and ``config.dropout > 0`` the LoRA branch's input is dropped out
    with the ``'dropout'`` rng passed to ``apply``.

    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8)))
    >>> config = LoRAConfig(r=2, alpha=4, targets=["layers_0"])
    >>> variables = inject(variables, config, jax.random.key(1))
    >>> sorted(variables["params"]["layers_0"])
    ['bias', 'kernel', 'lora_a', 'lora_b']
    >>> with intercept(config):
    ...     y = model.apply(variables, jnp.ones((1, 8)))
    """
    state = _State(config, deterministic)
    with nn.intercept_methods(state.interceptor):
        yield


@dataclasses.dataclass
class _State:
    config: LoRAConfig
    deterministic: bool

    def interceptor(self, next_fun, args, kwargs, context):
        module = context.module
        if module.scope is None or context.method_name == "setup":
            return next_fun(*args, **kwargs)
        if not any(module.has_variable("params", n) for n in LORA_NAMES):
            return next_fun(*args, **kwargs)
        if isinstance(module, nn.Dense) and context.method_name == "__call__":
            return self._lora_dense(module, next_fun, args, kwargs)
        # A layer holding LoRA leaves that is not an nn.Dense would silently ignore them.
        where = ".".join(module.scope.path) or "<root>"
        raise ValueError(
            f"layer '{where}' is a {type(module).__name__} holding LoRA leaves; "
            f"only {SUPPORTED} layers are adapted"
        )

    def _lora_dense(self, module: nn.Dense, next_fun, args, kwargs):
        path = tuple(module.scope.path)
        where = f"layer '{'.'.join(path) or '<root>'}'"
        names = [n for n in ("kernel", *LORA_NAMES) if module.has_variable("params", n)]
        if len(names) != 3:
            raise ValueError(f"{where} has {names}: expected 'kernel', 'lora_a' and 'lora_b'")
        kernel, a, b = (
            meta.unbox(module.get_variable("params", n)) for n in ("kernel", *LORA_NAMES)
        )
        n_in, n_out = jnp.shape(kernel)
        r = jnp.shape(a)[-1]
        core.check_shape(a, (n_in, r), f"{where}, 'lora_a'")
        core.check_shape(b, (r, n_out), f"{where}, 'lora_b'")
        name = ".".join(path)
        if r != self.config.rank_for(name):
            raise ValueError(
                f"{where} has r={r} (from its shapes) but the config gives it "
                f"r={self.config.rank_for(name)}: the scale would be wrong"
            )
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=module.dtype)
        rate = self.config.dropout
        if rate > 0 and not self.deterministic:
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, jnp.shape(x))
            x = jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
        alpha = self.config.alpha_for(name)
        scale = core.scaling(r, alpha, use_rslora=self.config.use_rslora)
        return y + core.lora_branch(x, a, b, scale, module.precision)


def _iter_nodes(tree: Mapping, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Mapping]]:
    """Yields ('.'-joined layer path, node) for every sub-dict, skipping the 'params' level."""
    if path and path != ("params",):
        yield ".".join(path[1:] if path[0] == "params" else path), tree
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _iter_nodes(value, (*path, str(key)))


def _add_leaves(tree: Mapping, path: tuple[str, ...], new: dict[str, dict]) -> Mapping:
    out = {}
    for key, value in tree.items():
        sub = (*path, str(key))
        out[key] = _add_leaves(value, sub, new) if isinstance(value, Mapping) else value
    name = ".".join(path[1:] if path and path[0] == "params" else path)
    if path and path != ("params",) and name in new:
        out.update(new[name])
    return _like(tree, out)
