"""Which weights a model reads outside the layer that holds them (Linen and NNX).

LoRA on a layer changes what its own calls compute; a weight that the model also reads
directly elsewhere (transformers' ``FlaxGPT2LMHeadModel`` ties its head to the embedding table
with ``lm_head.apply({"params": {"kernel": wte.T}})``) is seen there without the adapter, and
merging would write the delta into that read as well: the merged model would compute something
else than the adapted one. ``foreign_reads`` finds such reads in the jaxpr of the model's
``apply``: every module call is traced inside a named scope of its path (the interceptor
below), so a use of the weight's input variable that lies in no scope of its own layer is a
read by someone else. Layout-only ops (transposes, reshapes, casts, slices) on the way are
followed to the op that uses the result; calls, scans, remats, conds and loops are followed into
their bodies (Flax's ``nn.jit``, ``nn.scan``, ``nn.remat`` and their variable plumbing).
NNX has no method interceptors: ``scoped_modules`` gives the layers to check a subclass whose
methods open the scope, for the one trace ``jaxlora.nnx.inject(..., inputs=)`` makes.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
from flax import linen as nn
from flax import nnx
from flax.core import meta
from jax.extend import core as jcore

_OWN = "jaxlora-own:"  # the scope a module's calls run in: _OWN + its '.'-joined path
# Ops that only lay out the weight (or read a part of it): followed to what uses their result.
_LAYOUT = frozenset(
    (
        "transpose",
        "reshape",
        "squeeze",
        "expand_dims",
        "broadcast_in_dim",
        "convert_element_type",
        "copy",
        "copy_p",
        "sharding_constraint",
        "slice",
        "dynamic_slice",
        "rev",
        "reduce_precision",
        "device_put",
        "name",  # checkpoint_name, for remat policies
    )
)


def _scoped(next_fun, args, kwargs, context):
    module = context.module
    if module.scope is None:
        return next_fun(*args, **kwargs)
    with jax.named_scope(_OWN + ".".join(module.path)):
        return next_fun(*args, **kwargs)


@contextlib.contextmanager
def scoped() -> Iterator[None]:
    """Within this context, every Linen module call is traced in a named scope of its path."""
    with nn.intercept_methods(_scoped):
        yield


def scoped_class(cls: type, path: str) -> type:
    """A subclass of the NNX module class ``cls`` whose methods run in the named scope of
    ``path`` (NNX has no method interceptors: ``scoped_modules`` swaps an instance's class)."""
    body: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    for klass in reversed(cls.__mro__):
        if not issubclass(klass, nnx.Module) or klass is nnx.Module:
            continue
        for name, value in vars(klass).items():
            if inspect.isfunction(value) and (name == "__call__" or not name.startswith("_")):
                body[name] = _in_scope(value, _OWN + path)
    return type(cls)(cls.__name__, (cls,), body)


def _in_scope(method, scope: str):
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with jax.named_scope(scope):
            return method(self, *args, **kwargs)

    return run


@contextlib.contextmanager
def scoped_modules(modules: Mapping[str, nnx.Module]) -> Iterator[None]:
    """Within this context, each of ``modules`` ({path: NNX module}) is of its
    ``scoped_class`` (a module reachable at several paths: its first); put back after."""
    swapped: dict[int, tuple[nnx.Module, type]] = {}
    try:
        for path, module in modules.items():
            if id(module) not in swapped:
                swapped[id(module)] = (module, type(module))
                module.__class__ = scoped_class(type(module), path)
        yield
    finally:
        for module, cls in swapped.values():
            module.__class__ = cls


def foreign_reads(apply: Callable[[Any], Any], variables: Mapping) -> dict[str, dict[str, str]]:
    """{'.'-joined module path: {param name: where it is read outside the module's own calls}}
    for ``apply(variables)`` (a Linen model's ``apply``, traced abstractly inside ``scoped``)."""
    plain = meta.unbox(variables)
    leaves, _ = jax.tree_util.tree_flatten_with_path(plain)
    with scoped():
        closed = jax.make_jaxpr(apply)(plain)
    owners = {}
    for var, (path, _) in zip(closed.jaxpr.invars, leaves, strict=True):
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys[0] == "params" and len(keys) > 2:
            owners[var] = (".".join(keys[1:-1]), keys[-1])
    return reads_outside(closed.jaxpr, owners)


def reads_outside(jaxpr: jcore.Jaxpr, owners: Mapping) -> dict[str, dict[str, str]]:
    """{module path: {weight: where it is read}} for the input variables ``owners`` maps to
    (module path, weight name): each use outside the scope ``_OWN + path``, followed as the
    module docstring says."""
    found: dict[str, dict[str, str]] = {}
    _walk(jaxpr, dict(owners), (), found)
    return found


def refusal(read: Mapping[str, str]) -> str:
    """Why a layer whose weights ``read`` ({weight: where}) are read outside it is refused."""
    said = ", ".join(f"its {w} {where}" for w, where in sorted(read.items()))
    return (
        f"the model also reads its weight outside it ({said}; as a head tied to an embedding "
        "table does): that read would not see the adapter, and merging would change it too, "
        "so the merged model would compute something else than the adapted one"
    )


def _walk(jaxpr: jcore.Jaxpr, owners: dict, prefix: tuple[str, ...], found: dict) -> None:
    owners = dict(owners)
    for eqn in jaxpr.eqns:
        scopes = (*prefix, *_scopes(eqn))
        foreign = {
            v: owners[v]
            for v in eqn.invars
            if isinstance(v, jcore.Var) and v in owners and _OWN + owners[v][0] not in scopes
        }
        if not foreign:
            continue
        bodies = _bodies(eqn)
        if bodies is not None:
            for body, outer in bodies:
                inner = {
                    iv: foreign[ov]
                    for ov, iv in zip(outer, body.invars, strict=True)
                    if ov in foreign
                }
                _walk(body, inner, scopes, found)
        elif eqn.primitive.name in _LAYOUT and eqn.invars[0] in foreign:
            owners.update({out: foreign[eqn.invars[0]] for out in eqn.outvars})
        else:
            for path, name in foreign.values():
                reads = found.setdefault(path, {})
                reads.setdefault(name, f"by {eqn.primitive.name} {_where(scopes)}")


def _bodies(eqn) -> list[tuple[jcore.Jaxpr, list]] | None:
    """The jaxprs ``eqn`` runs, each with the outer variables its inputs are bound to, or None
    where it runs none (or in a way not followed: counted as a read)."""
    params, name = eqn.params, eqn.primitive.name
    if name == "cond":
        return [(b.jaxpr, eqn.invars[1:]) for b in params["branches"]]
    if name == "while":
        nc, nb = params["cond_nconsts"], params["body_nconsts"]
        carry = eqn.invars[nc + nb :]
        return [
            (params["cond_jaxpr"].jaxpr, [*eqn.invars[:nc], *carry]),
            (params["body_jaxpr"].jaxpr, [*eqn.invars[nc : nc + nb], *carry]),
        ]
    subs = [p for p in params.values() if isinstance(p, jcore.Jaxpr | jcore.ClosedJaxpr)]
    if len(subs) != 1:
        return None
    body = subs[0].jaxpr if isinstance(subs[0], jcore.ClosedJaxpr) else subs[0]
    return [(body, eqn.invars)] if len(body.invars) == len(eqn.invars) else None


def _scopes(eqn) -> tuple[str, ...]:
    return tuple(str(getattr(s, "name", s)) for s in eqn.source_info.name_stack.stack)


def _where(scopes: tuple[str, ...]) -> str:
    """Where a read is: the innermost module among ``scopes``, by its path, or where it has
    none (the root, or a module applied on its own, as a tied head is) the name Flax gave its
    scope; NNX modules other than the adapted ones have no scope."""
    own = [s.removeprefix(_OWN) for s in scopes if s.startswith(_OWN)]
    named = [s for s in scopes if not s.startswith(_OWN)]
    where = own[-1] if own and own[-1] else named[-1] if named else ""
    return f"at '{where}'" if where else "in the model's own code"
