"""Op-level LoRA for NNX: any module whose weight enters one product (``jaxlora.oplevel``).

``adapt(module, …)`` returns an instance of a subclass of the module's own type holding the
same variables plus ``lora_a``/``lora_b`` (``nnx.LoRAParam``) and ``lora_dropout``, so the
weight keeps its name and place (``q_proj.w`` beside ``q_proj.lora_a``), as the Dense-family
LoRA layers keep ``kernel``. Its ``__call__`` evaluates the original ``__call__``'s jaxpr with
the branch added at the weight's product (traced once per input shapes and static
arguments, cached); ``to_base`` returns a module of the original type holding the merged
weight. Dropout on the branch input follows ``nnx``'s ``train()``/``eval()`` (the wrapped call
keeps the original signature, so it has no ``deterministic`` argument of its own).

A stack of such modules made by ``nnx.vmap`` and run by ``nnx.scan`` (a weight with a leading
layer axis) is found through the scan (``find_weights``: one layer's roles) and adapted as
stacked ``nnx.Linear`` layers are, by ``nnx.vmap`` over the layers (``jaxlora.nnx.inject``):
the same ``OpAdapter`` per layer, its factors stacked on axis 0, each layer's slice called
inside the scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import HashableMapping

from _loracore.config import WEIGHT_INITS
from jaxlora import core, oplevel, product
from jaxlora.nnx.quant import QuantizedKernel, kernel_value, requantized_kernel

LORA_ATTRIBUTES = (
    "r",
    "alpha",
    "use_rslora",
    "lora_a",
    "lora_b",
    "lora_dropout",
    "lora_weight",
    "lora_roles",
    "lora_base_type",
    "lora_init",
)
_CLASSES: dict[type, type] = {}
_TRACES: dict[Any, tuple] = {}
_MAX_TRACES = 256


if TYPE_CHECKING:
    from jaxlora.nnx.multi_op import MultiOpAdapter

    _Module = nnx.Module  # OpAdapter is only ever mixed into an NNX module (adapted_class)
else:
    _Module = object


class OpAdapter(_Module):
    """The mixin of every op-level adapted module (see the module docstring)."""

    __slots__ = ()
    lora_a: nnx.LoRAParam
    lora_b: nnx.LoRAParam
    lora_base_type: type[nnx.Module]
    lora_weight: str
    lora_roles: oplevel.Roles
    lora_init: str

    def __init__(
        self,
        base: nnx.Module,
        *,
        weight: str,
        roles: oplevel.Roles,
        r: int,
        alpha: float | None,
        dropout: float,
        use_rslora: bool,
        param_dtype: Any,
        rngs: nnx.Rngs,
        init: str = "kaiming",
    ) -> None:
        for name, value in vars(base).items():
            if not name.startswith("_pytree__"):
                setattr(self, name, value)
        self.lora_base_type = type(base)
        self.lora_weight, self.lora_roles = weight, roles
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        # The one rule of Linen's product adapters (jaxlora.product.init_factors); PiSSA/OLoRA
        # also give the residual, written into the (shared) weight as the Dense layers do.
        self.lora_init = init
        held = getattr(base, weight)
        a, b, residual = product.init_factors(
            roles,
            r,
            init,
            rngs.params(),
            param_dtype,
            weight=held[...] if init in WEIGHT_INITS else None,
            scale=self.scaling,
            where=f"{type(base).__name__}: weight '{self.lora_weight}'",
        )
        if residual is not None:
            held[...] = residual
        self.lora_a = nnx.LoRAParam(a)
        self.lora_b = nnx.LoRAParam(b)
        self.lora_dropout = nnx.Dropout(dropout, rngs=rngs)

    @property
    def scaling(self) -> float:
        return core.scaling(self.r, self.alpha, use_rslora=self.use_rslora)

    def __call__(self, *args, **kwargs):
        def extra(product, eqn, operands):
            x = self.lora_dropout(operands[1 - product.side])
            a, b = self.lora_a[...], self.lora_b[...]
            return oplevel.branch(product, eqn, operands, a, b, self.scaling, x=x)

        return call(self, args, kwargs, extra)

    def delta(self) -> jax.Array:
        """``scaling · lora_a ⋅ lora_b`` in fp32, in the weight's own axis order."""
        return oplevel.delta(self.lora_roles, self.lora_a[...], self.lora_b[...], self.scaling)

    @property
    def is_quantized(self) -> bool:
        return isinstance(getattr(self, self.lora_weight), QuantizedKernel)

    def merged_weight(self) -> jax.Array:
        """``weight + delta`` (the weight dequantized if quantized; fp32, rounded once to the
        weight's dtype); a ``ValueError`` if non-finite."""
        weight = kernel_value(getattr(self, self.lora_weight))
        merged = (weight.astype(jnp.float32) + self.delta()).astype(weight.dtype)
        finite = jnp.isfinite(merged).all()
        # Under nnx.vmap (a stacked layer) the caller checks the whole stack before
        if not isinstance(finite, jax.core.Tracer) and not bool(finite):
            raise ValueError("the merged weight has non-finite values")
        return merged

    def to_base(self) -> nnx.Module:
        """A module of the original type sharing every variable but the weight, which holds
        ``weight + delta`` (fp32, rounded once; a quantized weight is dequantized first and
        merges into a float ``nnx.Param``); a non-finite result is a ``ValueError``."""
        weight = getattr(self, self.lora_weight)
        merged = self.merged_weight()
        state = {k: v for k, v in self.__getstate__().items() if k not in LORA_ATTRIBUTES}
        nodes = self._pytree__nodes
        state["_pytree__nodes"] = HashableMapping(
            {k: v for k, v in nodes.items() if k not in LORA_ATTRIBUTES}
        )
        state["_pytree__state"] = type(self._pytree__state)()
        if isinstance(weight, QuantizedKernel):
            state[self.lora_weight] = nnx.Param(merged)
        else:
            state[self.lora_weight] = weight.replace(merged)  # keeps the variable's metadata
        base_type = self.lora_base_type
        plain = base_type.__new__(base_type)
        plain.__setstate__(state)
        return plain

    def requantized(self) -> QuantizedKernel:
        """The merged weight ``to_base`` computes, quantized again in this module's quantized
        weight's format and layout; for ``jaxlora.nnx.merge(model, requantize=True)``."""
        if not self.is_quantized:
            raise ValueError("requantized: the weight is not quantized")
        return requantized_kernel(getattr(self, self.lora_weight), self.merged_weight())


def adapted_class(base_type: type) -> type:
    """The subclass of ``base_type`` that ``adapt`` makes (one per type)."""
    if base_type not in _CLASSES:
        name = f"LoRA{base_type.__name__}"
        _CLASSES[base_type] = type(base_type)(
            name, (OpAdapter, base_type), {"__module__": __name__, "__qualname__": name}
        )
    return _CLASSES[base_type]


def adapt(base: nnx.Module, **options) -> nnx.Module:
    """``base`` adapted at its weight ``options['weight']`` (see ``OpAdapter.__init__``)."""
    return adapted_class(type(base))(base, **options)


def find_weights(
    model: nnx.Module,
    modules: dict[str, nnx.Module],
    inputs: Sequence[Any],
    orders: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, tuple[str, oplevel.Roles]]:
    """{path: (weight name, roles)} for each of ``modules`` (paths into ``model``), found by
    tracing ``model(*inputs)`` once with every variable an input. A ``ValueError`` names the
    path and the reason for any module that has no weight in exactly one product, or whose
    weight is also used otherwise (anywhere in the model). ``orders``, if given, receives per
    path the weight's axes in the order the product's operand holds them (after transposes)."""
    graphdef, state = nnx.split(model)
    paths, state_def = jax.tree_util.tree_flatten_with_path(state)
    leaves = [leaf for _, leaf in paths]
    index_of = {_key(path): i for i, (path, _) in enumerate(paths)}
    where_of = {id(v): p for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
    dynamic, static, arg_def = oplevel.split_args(tuple(inputs), {})

    def run(state_leaves, dyn):
        args, _ = oplevel.join_args(arg_def, dynamic, static, dyn)
        return nnx.merge(graphdef, jax.tree.unflatten(state_def, state_leaves))(*args)

    try:
        closed = jax.make_jaxpr(run)(leaves, [d for d in dynamic if d is not None])
    except Exception as err:  # any failure of the user's model: say where it came from
        raise ValueError(
            f"inject: the model could not be traced on the inputs given "
            f"({type(err).__name__}: {err})"
        ) from err
    found = {}
    for name, module in modules.items():
        weights, unused = {}, []
        for attr, var in vars(module).items():
            if type(var) is not nnx.Param:
                continue
            where = f"inject: layer '{name}', weight '{attr}' {tuple(var.shape)}"
            index = index_of[tuple(map(str, where_of[id(var)]))]
            try:
                product = oplevel.find_product(
                    closed.jaxpr, index, var.shape, where=where, through=True
                )
            except oplevel.NotAProduct as err:
                unused.append(str(err).removeprefix(f"inject: layer '{name}', "))
                continue
            product = _one_layer(oplevel.with_shape(product, tuple(var.shape)), where)
            weights[attr] = product.roles
            if orders is not None:
                orders[name] = tuple(axis for group in product.groups for axis in group)
        if len(weights) != 1:
            why = (
                f"its weights {sorted(weights)} are each used by a product; a module with "
                "several adapted weights is not supported yet"
                if weights
                else "no nnx.Param of it is used by a product (dot_general): "
                + ("; ".join(unused) or "it holds none")
            )
            raise ValueError(f"inject: layer '{name}' ({type(module).__name__}): {why}")
        found[name] = next(iter(weights.items()))
    return found


def _one_layer(product: oplevel.Product, where: str) -> oplevel.Product:
    """The product as one layer's (``oplevel.per_layer``) when the weight is a stack that an
    ``nnx.scan`` slices per layer: its axis 0, where ``inject`` stacks the adapter (as for
    ``nnx.Linear`` stacks); a ``TypeError`` for any other layer axis or for nested scans."""
    if product.sliced in ((), (0,)):
        return oplevel.per_layer(product)
    raise TypeError(
        f"{where} is a stack that scans slice on its axes {product.sliced}: jaxlora.nnx adapts "
        "stacks with one layer axis in front only (nnx.vmap(..., out_axes=0), run with "
        "nnx.scan(in_axes=0 ...)); restack the layers on axis 0"
    )


def _key(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path[:-1])


def _aval(x) -> tuple:
    return (tuple(jnp.shape(x)), jnp.result_type(x), getattr(x, "weak_type", False))


def _trace(module: OpAdapter | MultiOpAdapter, graphdef, state_def, leaves, args, kwargs):
    """(closed jaxpr, output treedef, product, static parts) of the base call, cached."""
    dynamic, static, arg_def = oplevel.split_args(args, kwargs)
    dyn = [d for d in dynamic if d is not None]
    key: tuple | None = (
        type(module),
        graphdef,
        state_def,
        tuple(map(_aval, leaves)),
        arg_def,
        tuple(d is None for d in dynamic),
        static,
        tuple(map(_aval, dyn)),
    )
    try:
        hash(key)
    except TypeError:  # an unhashable static argument: trace every call
        key = None
    if key is not None and key in _TRACES:
        return (*_TRACES[key], dyn)
    base_call = module.lora_base_type.__call__

    def run(state_leaves, dyn_leaves):
        m = nnx.merge(graphdef, jax.tree.unflatten(state_def, state_leaves))
        a, k = oplevel.join_args(arg_def, dynamic, static, dyn_leaves)
        out = base_call(m, *a, **k)
        return out, jax.tree.leaves(nnx.split(m)[1])

    closed, shapes = jax.make_jaxpr(run, return_shape=True)(leaves, dyn)
    out_def = jax.tree.structure(shapes[0])
    index = _weight_index(module, state_def, leaves)
    weight = getattr(module, module.lora_weight)
    where = f"{type(module).__name__}: weight '{module.lora_weight}' {tuple(weight.shape)}"
    # jaxlib ships PyTreeDef without type stubs, so the checker cannot see its attributes.
    returned = out_def.num_leaves + index  # type: ignore[attr-defined]
    product = oplevel.find_product(
        closed.jaxpr, index, weight.shape, where=where, returned=returned
    )
    product = oplevel.with_shape(product, tuple(weight.shape))
    if product.roles != module.lora_roles:
        raise ValueError(
            f"{where}: this call uses the weight as {product.roles}, but the adapter was made "
            f"for {module.lora_roles} (from the inputs given to inject)"
        )
    if key is not None:
        if len(_TRACES) >= _MAX_TRACES:
            _TRACES.pop(next(iter(_TRACES)))
        _TRACES[key] = (closed, out_def, product)
    return closed, out_def, product, dyn


def _weight_index(module: OpAdapter | MultiOpAdapter, state_def, leaves) -> int:
    paths = jax.tree_util.tree_flatten_with_path(jax.tree.unflatten(state_def, leaves))[0]
    return next(i for i, (p, _) in enumerate(paths) if _key(p) == (module.lora_weight,))


def _split(module: OpAdapter | MultiOpAdapter, weight: jax.Array | None):
    """``nnx.split(module)``, its weight's entry a plain ``nnx.Param`` holding ``weight`` (the
    dequantized weight of a quantized module) when given: the call is traced and evaluated on
    the weight's own shape and dtype, so its product is the module's own."""
    graphdef, state = nnx.split(module)
    if weight is not None:
        state[module.lora_weight] = nnx.Param(weight)
    return graphdef, state


def _dequantized(module: OpAdapter | MultiOpAdapter) -> jax.Array | None:
    held = getattr(module, module.lora_weight)
    return kernel_value(held) if isinstance(held, QuantizedKernel) else None


def traced_call(module: OpAdapter | MultiOpAdapter, args: tuple, kwargs: dict):
    """(closed jaxpr, product) of the base call of an op-level layer (``OpAdapter``, or a
    stacked one of ``to_multi``) on these arguments (cached, as its calls are)."""
    graphdef, state = _split(module, _dequantized(module))
    leaves, state_def = jax.tree.flatten(state)
    closed, _, product, _ = _trace(module, graphdef, state_def, leaves, args, kwargs)
    return closed, product


def call(module: OpAdapter | MultiOpAdapter, args: tuple, kwargs: dict, extra):
    """The base call of an op-level layer with ``extra(product, eqn, operands)`` added at its
    weight's product (the layer's branch); a quantized weight is dequantized first."""
    weight = _dequantized(module)
    graphdef, state = _split(module, weight)
    leaves, state_def = jax.tree.flatten(state)
    closed, out_def, product, dyn = _trace(module, graphdef, state_def, leaves, args, kwargs)

    def at_product(eqn, operands):
        base = eqn.primitive.bind(*operands, **eqn.params)
        return base + extra(product, eqn, operands).astype(base.dtype)

    outs = oplevel.evaluate(closed, [*leaves, *dyn], product.path, at_product)
    out = jax.tree.unflatten(out_def, outs[: out_def.num_leaves])
    new_leaves = outs[out_def.num_leaves :]
    # Write back only what the call changed (rng counts, statistics): the branch's dropout
    # advanced its own rng stream outside the jaxpr, which the old leaves would undo.
    # Nothing changed (no dropout, no statistics): write nothing, so a module rebuilt by
    # ``nnx.merge`` inside ``jax.jit`` is not asked to mutate variables of an outer trace.
    if any(n is not o for o, n in zip(leaves, new_leaves, strict=True)):
        current, _ = jax.tree.flatten(_split(module, weight)[1])
        merged = [c if n is o else n for o, n, c in zip(leaves, new_leaves, current, strict=True)]
        new_state = jax.tree.unflatten(state_def, merged)
        del new_state[module.lora_weight]  # the weight is never changed by the call
        nnx.update(module, new_state)
    return out
