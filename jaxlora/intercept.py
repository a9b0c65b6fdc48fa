"""``intercept(config)``: unmodified Linen layers that hold LoRA leaves apply them.

Within the context, every ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv`` and ``nn.Embed`` call
that finds ``lora_a``/``lora_b`` beside its weight adds its factored branch (the full delta is
never built): ``scaling · dropout(x) @ a @ b``, contracted over ``DenseGeneral``'s axes, as a
conv like the base's followed by a 1×1 conv, or as a second lookup for ``Embed`` (whose
``attend`` uses the adapted table too, so the merged model computes the same). A layer that also
holds ``lora_magnitude`` (DoRA, PEFT's ``use_dora``: not for ``DenseGeneral``) computes with
``m / ‖W + s·a b‖ ⊙ (W + s·a b)`` per output feature, the norm constant in backward, and with
dropout active PEFT's correction on the dropped-out input. Any other layer that holds LoRA
leaves is an error when called, never silently run without them, unless ``inject`` adapted it
at its weight's product (``jaxlora.product``: a ``lora_roles`` leaf).

``flax.linen.jit`` reuses a module's trace while a fingerprint of the module (its fields and its
scope) is unchanged, and the method interceptors that are active are not part of it: a trace
made outside ``intercept`` (no branch) would be reused inside it, and the reverse. While a
jaxlora context is active, nn.jit's key for a module (its fingerprint's hash) is folded with the
keys of the active contexts (``traced_as``), so each gets its own trace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import meta
from flax.linen import transforms as linen_transforms

from jaxlora import core, kinds, oplevel, product
from jaxlora.config import LoRAConfig
from jaxlora.quant._base import QUANT, layer_weight
from jaxlora.quant._layout import dequantize_weight, layer_length
from jaxlora.tree import LORA_NAMES, is_lora_name

SUPPORTED = "nn.Dense, nn.DenseGeneral (no batch_dims), nn.Conv (no mask, groups=1), nn.Embed"
_KIND = ((nn.Dense, "linear"), (nn.DenseGeneral, "linear"), (nn.Conv, "conv"), (nn.Embed, "embed"))


class _Active(threading.local):  # Flax's interceptor stack is per thread too
    def __init__(self) -> None:
        self.keys: list[Hashable] = []


_ACTIVE = _Active()


def _keyed_from_module(flax_from_module):
    """Flax's ``_HashableProxy.from_module`` (nn.jit's cache key for a module), with the keys
    of the jaxlora contexts active now folded into the hash; unchanged outside of them. It is
    the only hook: a root ``__call__`` wrapped by nn.jit is keyed before any interceptor runs."""

    def from_module(cls, module):
        proxy = flax_from_module(module)
        keys = tuple(_ACTIVE.keys)
        return cls(proxy.module_ref, hash((proxy.hash_key, keys))) if keys else proxy

    # A marker on the function object (any function takes attributes; mypy allows none).
    from_module.jaxlora_keyed = True  # type: ignore[attr-defined]
    return classmethod(from_module)


def _install_jit_key() -> bool:
    """Wraps nn.jit's key once; False where this flax's nn.jit is not keyed as expected.
    Done when a jaxlora context is first entered, not at import: with no context active the
    wrapped key equals Flax's own, so traces cached before are keyed alike."""
    proxy = getattr(linen_transforms, "_HashableProxy", None)
    fields = {f.name for f in dataclasses.fields(proxy)} if dataclasses.is_dataclass(proxy) else ()
    from_module = getattr(proxy, "from_module", None)
    if proxy is None or from_module is None or not {"module_ref", "hash_key"} <= set(fields):
        return False
    if not getattr(from_module, "jaxlora_keyed", False):
        proxy.from_module = _keyed_from_module(from_module)
    return True


@contextlib.contextmanager
def traced_as(key: Hashable) -> Iterator[None]:
    """Within this context, ``nn.jit`` keys its traces by ``key`` too (and by the keys of the
    contexts around it), so a trace made under a different interceptor state is not reused."""
    if not _install_jit_key():
        raise RuntimeError(
            "this flax version's nn.jit has no cache key jaxlora can extend "
            "(flax.linen.transforms._HashableProxy.from_module): its traces would ignore "
            "jaxlora's interceptors (written for flax 0.12.8's)"
        )
    _ACTIVE.keys.append(key)
    try:
        yield
    finally:
        _ACTIVE.keys.pop()


def module_kind(module: nn.Module) -> str | None:
    """The adapter kind of a Linen layer, or ``None`` where jaxlora cannot adapt it."""
    if isinstance(module, nn.DenseGeneral) and module.batch_dims:
        return None
    if isinstance(module, nn.Conv) and (module.mask is not None or module.feature_group_count != 1):
        return None
    return next((kind for cls, kind in _KIND if isinstance(module, cls)), None)


def _base_method(module: nn.Module, method: str):
    """The plain function of the supported Linen class's ``method`` that ``module`` inherits
    from, where ``intercept`` adds the branch (Linen wraps methods; ``unwrap`` undoes that)."""
    cls = next(cls for cls, _ in _KIND if isinstance(module, cls))
    return inspect.unwrap(getattr(cls, method))


def input_axes(module: nn.Module) -> int:
    """How many leading kernel axes a linear layer contracts (``DenseGeneral``'s ``axis``)."""
    axis = getattr(module, "axis", -1)
    return len(axis) if isinstance(axis, tuple | list) else 1


@contextlib.contextmanager
def intercept(config: LoRAConfig, *, deterministic: bool = True) -> Iterator[None]:
    """Within this context, Linen layers that hold LoRA leaves apply them.

    Use it around ``model.apply`` (inside or outside ``jax.jit``), or as a decorator on the
    function that calls it. ``config.alpha_for(path)``/``use_rslora`` set each layer's scale;
    a layer whose ``r`` (read from its shapes) differs from ``config.rank_for(path)`` is an
    error, so the scale can't silently differ from the one the adapter was made with. With
    ``deterministic=False`` and ``config.dropout > 0`` the LoRA branch's input is dropped out
    with the ``'dropout'`` rng passed to ``apply`` (never for ``nn.Embed``, as in PEFT).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import linen as nn
        >>> from jaxlora import inject
        >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8)))
        >>> config = LoRAConfig(r=2, alpha=4, targets=["layers_0"])
        >>> variables = inject(variables, config, jax.random.key(1))
        >>> sorted(variables["params"]["layers_0"])
        ['bias', 'kernel', 'lora_a', 'lora_b']
        >>> with intercept(config):
        ...     y = model.apply(variables, jnp.ones((1, 8)))
    """
    if any(isinstance(key, tuple) and key[0] == "intercept" for key in _ACTIVE.keys):
        raise ValueError(
            "intercept: another jaxlora.intercept is already active; nesting them would add "
            "each LoRA branch once per context. Enter it once, around the outermost call."
        )
    state = _State(config, deterministic)
    # The trace depends on the config and on deterministic only (and on the params' structure
    # and shapes, which jax.jit keys already): equal contexts share nn.jit's traces.
    with traced_as(("intercept", repr(config), deterministic)):
        with nn.intercept_methods(state.interceptor):
            yield


@dataclasses.dataclass
class _State:
    config: LoRAConfig
    deterministic: bool
    # how often each module's base method ran: a subclass's method must run it at least once
    base_calls: dict[int, int] = dataclasses.field(default_factory=dict)

    def interceptor(self, next_fun, args, kwargs, context):
        module = context.module
        if module.scope is None or context.method_name == "setup" or product.tracing():
            return next_fun(*args, **kwargs)
        if getattr(module, "adds_own_lora_branch", False):  # jaxlora.linen's LoRA layers
            return next_fun(*args, **kwargs)
        where = ".".join(module.path) or "<root>"
        quantized = _quantized(module, where)
        if not quantized:
            _check_weight_visible(module, where)
        if not quantized and not self.adapted(module):
            return next_fun(*args, **kwargs)
        kind = module_kind(module)
        method = context.method_name
        if kind is None and method == "__call__" and self.at_product(module):
            return self.apply_product(module, args, kwargs, quantized)
        if quantized and kind != "linear":
            if kind is None and method == "__call__" and not self.adapted(module):
                # a base quantized at its product whose adapter was merged (requantize=True)
                return product.call(module, "__call__", quantized, args, kwargs)
            raise ValueError(
                f"layer '{where}' is a {type(module).__name__} holding a quantized weight (in "
                f"the 'quant' collection, called as {method}); only these layers can have a "
                "quantized base: nn.Dense, nn.DenseGeneral (no batch_dims) and modules adapted "
                "at their weight's product"
            )
        if kind is None or not (method == "__call__" or (kind == "embed" and method == "attend")):
            held = "a quantized kernel" if quantized else "LoRA leaves"
            raise ValueError(
                f"layer '{where}' is a {type(module).__name__} holding {held} (called as "
                f"{method}); only these layers are adapted: {SUPPORTED}"
            )
        base = _base_method(module, method)
        if context.orig_method.func is base:
            self.base_calls[id(module)] = self.base_calls.get(id(module), 0) + 1
            return self._apply(module, kind, method, next_fun, args, kwargs, quantized)
        # A subclass's own method: the branch goes with the base product inside it (a super()
        # call), so that it is added once and what the subclass does after sees it, as the
        # merged kernel would. A method that never runs the base product would skip it.
        before = self.base_calls.get(id(module), 0)
        y = next_fun(*args, **kwargs)
        if self.base_calls.get(id(module), 0) == before:
            raise ValueError(
                f"layer '{where}' is a {type(module).__name__} holding LoRA leaves whose "
                f"{method} never calls {base.__qualname__}, where the LoRA branch is added: it "
                f"would silently run without its adapter. Only layers whose {method} is (or "
                f"calls) their base class's can be adapted: {SUPPORTED}"
            )
        return y

    def adapted(self, module: nn.Module) -> bool:
        """Whether this context adds a branch to ``module`` (``jaxlora.intercept_stack`` also
        adapts the layers its stack names)."""
        return bool(lora_leaves(module))

    def at_product(self, module: nn.Module) -> bool:
        """Whether ``module`` (of no kind jaxlora knows) is adapted at its weight's product."""
        return module.has_variable("params", product.ROLES)

    def apply_product(self, module: nn.Module, args: tuple, kwargs: dict, quantized):
        return product.apply(module, self.config, self.deterministic, args, kwargs, quantized)

    def _apply(self, module: nn.Module, kind: str, method: str, next_fun, args, kwargs, quantized):
        name = ".".join(module.path)
        where = f"layer '{name or '<root>'}'"
        node: dict[str, Any] = {
            n: module.get_variable("params", n)
            for n in (*kinds.BASE_NAMES, *LORA_NAMES)
            if module.has_variable("params", n)
        }
        x = args[0] if args else next(iter(kwargs.values()))
        if quantized:
            _check_dense_kernel(module, quantized, x, where)
            node.update(quantized)
        if not any(n in node for n in LORA_NAMES):  # a quantized base without an adapter
            return _own_call(module, method, quantized, args, kwargs)
        found, _, base, a, b = kinds.check_layer(node, where)
        magnitude = kinds.check_magnitude(node, found, base, 0, where)
        if magnitude is not None and (quantized or isinstance(module, nn.DenseGeneral)):
            raise ValueError(
                f"{where}: a {type(module).__name__}"
                + (" with a quantized kernel" if quantized else "")
                + f" holds 'lora_magnitude' (DoRA), which is implemented for {kinds.DORA_KINDS}"
            )
        if found != kind or (kind == "linear" and jnp.ndim(a) - 1 != input_axes(module)):
            raise ValueError(
                f"{where}: a {type(module).__name__} contracting {input_axes(module)} axis(es) "
                f"holds 'lora_a' {jnp.shape(a)} and 'lora_b' {jnp.shape(b)}, which are laid "
                f"out for a {found} layer (see jaxlora.kinds)"
            )
        r = jnp.shape(a)[-1]
        if r != self.config.rank_for(name):
            raise ValueError(
                f"{where} has r={r} (from its shapes) but the config gives it "
                f"r={self.config.rank_for(name)}: the scale would be wrong"
            )
        scale = core.scaling(r, self.config.alpha_for(name), use_rslora=self.config.use_rslora)
        rate = 0.0 if self.deterministic else self.config.dropout
        if magnitude is not None and method == "attend":
            # The merged table's attend: query @ (f ⊙ (E + s·a b))ᵀ = (query ⊙ f) @ (E + s·a b)ᵀ.
            (q,) = nn.dtypes.promote_dtype(x, dtype=module.dtype)
            q = q * core.dora_factor(base, a, b, meta.unbox(magnitude), scale, q.dtype)
            args, kwargs = _with_input(q, args, kwargs)
            return next_fun(*args, **kwargs) + branch(module, kind, method, q, a, b, scale)
        if quantized:
            y = _own_call(module, method, quantized, args, kwargs)
        else:
            y = next_fun(*args, **kwargs)
        if magnitude is not None:
            return y + dora_output(module, kind, x, y, base, (a, b, magnitude), scale, rate)
        return y + branch(module, kind, method, x, a, b, scale, rate)


def _with_input(x: jax.Array, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The method's arguments with its input (the first one) replaced by ``x``."""
    if args:
        return (x, *args[1:]), kwargs
    first = next(iter(kwargs))
    return args, {**kwargs, first: x}


def dora_output(module, kind: str, x, y, base, adapter, scale: float, rate: float) -> jax.Array:
    """What DoRA adds to the output ``y`` of a bound Dense, Conv or Embed layer's call (also
    ``LoRAConv``/``LoRAEmbed``'s) for the input ``x`` (``core.dora_combine``:
    the bias-free base output is ``y`` less its bias, or, while dropout is active, the base
    product of the same dropped-out input the LoRA branch gets, as in PEFT)."""
    a, b, magnitude = (meta.unbox(v) for v in adapter)
    factor = core.dora_factor(base, a, b, magnitude, scale, y.dtype)
    if kind == "embed":  # no bias and no dropout: f ⊙ (E[x] + s·a[x] b)
        return core.dora_combine(y, branch(module, kind, "__call__", x, a, b, scale), factor)
    (x,) = nn.dtypes.promote_dtype(x, dtype=module.dtype)
    h = dropped(module, x, rate)
    lora = branch(module, kind, "__call__", h, a, b, scale)
    if rate > 0:
        (kernel,) = nn.dtypes.promote_dtype(base, dtype=module.dtype)
        if kind == "conv":
            plain = _conv_like(module, jnp.shape(base)[-1])(h, kernel).astype(y.dtype)
        else:
            plain = jnp.matmul(h, kernel, precision=module.precision).astype(y.dtype)
    elif module.use_bias:
        plain = y - meta.unbox(module.get_variable("params", "bias")).astype(y.dtype)
    else:
        plain = y
    return core.dora_combine(plain, lora, factor)


def _quantized(module: nn.Module, where: str) -> dict[str, jax.Array]:
    """{name: weight} of the module's own quantized weights (one, or each of a module with
    several adapted weights), dequantized to their own shapes and stored dtypes
    (``jaxlora.quant.quantize_base``); empty if it holds none."""
    out = {}
    for name, q, roles in layer_weight(module.variables.get(QUANT, {}), where):
        length = layer_length(q, roles, f"layer '{where}', quantized weight '{name}'")
        if length is not None:
            raise ValueError(
                f"layer '{where}' is called with the quantized weights of a stack of {length} "
                "layers (arrays with a leading layer axis): an nn.scan over its layers must "
                "slice the 'quant' collection on axis 0 (variable_axes={'params': k, 'quant': "
                "0}), so that each layer gets its own"
            )
        if module.has_variable("params", name):  # which one would run is ambiguous: refuse
            raise ValueError(
                f"layer '{where}' has a '{name}' both in 'params' and in 'quant' (quantize_base "
                "moves it out of 'params')"
            )
        try:
            out[name] = dequantize_weight(q, roles)
        except ValueError as err:
            raise ValueError(f"layer '{where}': {err}") from None
    return out


def lora_leaves(module: nn.Module) -> list[str]:
    """The names of the LoRA leaves (``jaxlora.tree.is_lora_name``) among a bound module's own
    params: ``lora_a``/``lora_b``, or ``<weight>_lora_a``/``<weight>_lora_b`` per weight of a
    module adapted at several products."""
    params = module.variables.get("params", {})
    return [n for n, v in params.items() if is_lora_name(n) and not isinstance(v, Mapping)]


def _check_weight_visible(module: nn.Module, where: str) -> None:
    """A ``ValueError`` for a Dense/DenseGeneral run (not initialized) with no kernel in
    'params' nor in a visible 'quant': where ``quantize_base`` moved it into 'quant' and an
    ``nn.scan`` does not pass that collection to its body, the message says how to fix it
    (Flax's own names only the missing param)."""
    if module_kind(module) != "linear" or module.has_variable("params", "kernel"):
        return
    if module.is_initializing() or module.is_mutable_collection("params"):
        return
    raise ValueError(
        f"layer '{where}' has no 'kernel' in 'params' nor in the 'quant' collection it sees: "
        "if jaxlora.quant.quantize_base moved it into 'quant' and the layer runs inside an "
        "nn.scan, the scan must slice that collection too: variable_axes={'params': k, "
        "'quant': 0}"
    )


def _check_dense_kernel(module: nn.Module, quantized: dict, x: jax.Array, where: str) -> None:
    """An ``nn.Dense``'s quantized kernel must be (features, in) for its input (the message
    says what it is; Flax's own check would name only the param)."""
    if not isinstance(module, nn.Dense):
        return
    kernel = quantized.get("kernel")
    expected = (jnp.shape(x)[-1], module.features)
    if kernel is None or tuple(jnp.shape(kernel)) != expected:
        got = None if kernel is None else tuple(reversed(jnp.shape(kernel)))
        raise ValueError(
            f"layer '{where}': the 'quant' collection's kernel must be a QuantizedWeight of "
            f"shape (features, in) = {expected[::-1]} for this nn.Dense and its input, got {got}"
        )


def _own_call(module: nn.Module, method: str, quantized: dict, args: tuple, kwargs: dict):
    """The supported Linen class's ``method`` (``nn.Dense.__call__``, ...) run on the layer with
    its dequantized weight: the base product of a quantized layer is the layer's own
    (dtype promotion, dot_general, precision, bias), which it cannot compute itself (it looks
    the weight up in 'params')."""
    cls = next(cls for cls, _ in _KIND if isinstance(module, cls))
    return product.call(module, getattr(cls, method), quantized, args, kwargs)


def branch(
    module: nn.Module,
    kind: str,
    method: str,
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float,
    rate: float = 0.0,
) -> jax.Array:
    """The LoRA branch of a bound Linen layer of ``kind`` for its ``method``'s input ``x``:
    what ``intercept`` adds, and the ``LoRADenseGeneral``/``LoRAConv``/``LoRAEmbed`` modules too.
    ``rate`` > 0 drops out the branch's input with the layer's ``'dropout'`` rng."""
    r = jnp.shape(a)[-1]
    if kind == "embed":
        a, b = nn.dtypes.promote_dtype(a, b, dtype=module.dtype, inexact=False)
        if method == "attend":  # query @ (E + s·a b)ᵀ, factored
            (x,) = nn.dtypes.promote_dtype(x, dtype=module.dtype)
            return core.scaled_matmul(jnp.matmul(x, b.T), a.T, scale)
        return core.scaled_matmul(jnp.take(a, x, axis=0), b, scale)
    x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=module.dtype)
    x = dropped(module, x, rate)
    if kind == "conv":
        h = _conv_like(module, r)(x, a)
        return core.scaled_matmul(h, b.reshape(r, -1), scale, module.precision)
    axis = module.axis if isinstance(module, nn.DenseGeneral) else -1
    axes = tuple(axis) if isinstance(axis, Sequence) else (axis,)
    return oplevel.linear_branch(x, a, b, scale, axes, module.precision)


def dropped(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
    """``x`` with dropout at ``rate`` (the layer's ``'dropout'`` rng); ``x`` itself at 0."""
    if rate <= 0:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, jnp.shape(x))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _conv_like(module: nn.Module, r: int):
    """A function ``(x, kernel) -> (…, r)``: a plain ``nn.Conv`` with the layer's own settings
    (strides, padding, dilations, precision, dtypes), ``r`` output features and no bias (the
    LoRA branch's first conv with ``lora_a``, or the base conv with the kernel)."""
    fields = {
        f.name: getattr(module, f.name)
        for f in dataclasses.fields(nn.Conv)
        if f.init and f.name not in ("parent", "name")
    }
    conv = nn.Conv(**{**fields, "features": r, "use_bias": False})

    def apply(x: jax.Array, lora_a: jax.Array) -> jax.Array:
        # flax types apply's result as maybe (output, mutated variables); without mutable=
        # it is the output alone.
        return conv.apply({"params": {"kernel": meta.unbox(lora_a)}}, x)  # type: ignore[return-value]

    return apply
