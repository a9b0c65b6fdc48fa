"""How an op-level adapted weight (``jaxlora.oplevel``) is written as Hugging Face ``nn.Linear``
module(s) in a PEFT file, and read back.

A weight W whose product contracts its axes C and keeps its free axes F is, for torch, a
Linear with weight (out, in) = (prod F, prod C): x's contracted axes are flattened into the
Linear's input and the free axes come out flattened. The flattening order is the torch
model's business, so a ``path_map`` value may be an ``HFLinear`` saying it:

- ``HFLinear("model.layers.0.self_attn.q_proj")``: one Linear, C and F each flattened in the
  order the module's code flattens them (``oplevel.torch_order``, from the trace's record
  ``Roles.operands``): where a reshape of W on its way to the product merges all of them into
  one axis, in that reshape's order (``x @ w.transpose(0, 2, 1).reshape(D, H·N)`` on ``w``
  (D, N, H) is ``nn.Linear(D, H·N)``, its outputs in (H, N) order), what a torch port of the
  same code computes; where no reshape merges them, in W's own axis order (tunix Llama's q
  ``w`` (D, N, H) ↔ ``nn.Linear(D, N·H)`` with ``weight = w.reshape(D, N·H).T``). Where the
  trace gives no single order (a reshape merging only some of them, slice views flattening
  them differently) a file is refused, naming the layer, the weight and what was seen, unless
  ``in_axes``/``out_axes`` say it.
- ``in_axes=`` / ``out_axes=``: W's contracted / free axes (indices into W's shape) in the
  order the Linear flattens them, used as given, over the trace's order (a W (H, N, D) used
  as 'BTNH,HND->BTD' read by a torch ``o_proj`` whose input is (N, H) flattened:
  ``in_axes=(1, 0)``).
- ``HFLinear(("…k_proj", "…v_proj"), split=0)``: one fused W whose free axis ``split`` is
  several torch modules, one per index along it (Gemma's ``kv_einsum`` w (2, K, D, H) used as
  'BSD,CKDH->CBSKH'). The adapter has one ``lora_a`` shared by all of them, written as every
  module's ``lora_A``, and ``lora_b`` split along that axis into each module's ``lora_B``: PEFT
  then computes, module by module, exactly the fused branch. Reading back requires the
  modules' ``lora_A`` to be identical (a shared A), else it is refused naming the modules.

- ``HFLinear("transformer.h.0.attn.c_attn", conv1d=True)``: the torch module is
  transformers' ``Conv1D`` (GPT-2; weight (in, out)). Its PEFT ``lora_A`` (r, in) and
  ``lora_B`` (out, r) are a Linear's (peft 0.21 builds both from (in_features, out_features)
  and transposes only the merged delta, ``fan_in_fan_out``), so the tensors are the same; the
  file says ``fan_in_fan_out: true`` when all its modules are Conv1D (PEFT then loads it with
  no warning), and a file that says so is read only for modules given as Conv1D.

- ``HFLinear(…, experts="model.layers.0.mlp.experts.{}.gate_proj")``: a W with one batch
  axis (one adapter per MoE expert: a batched product 'EBD,EDF->EBF' or the slice views of a
  per-expert loop, ``jaxlora.oplevel``) is one torch Linear per index along that axis, the
  template's ``{}`` being the index (transformers 4.x's ``experts.{e}.gate_proj``). Each
  expert's module gets its own ``lora_A`` / ``lora_B`` (the adapter's ``[e]`` slices, laid
  out as above). Equivalently ``HFLinear((path_0, …, path_E-1), split=<the batch axis>)``.
  ``experts`` is used only for a weight with a batch axis, so one spec serves a model whose
  MLP is dense in some configurations and MoE in others (tunix's Qwen3). A weight with batch
  axes and no such spec, or with several batch axes, is refused.

A plain string value (or no entry) is ``HFLinear(that path)``.

Ready maps: ``path_map`` may also be one of the names in ``NAMED_MAPS`` (``save_adapter`` /
``load_adapter`` / ``read_adapter_config`` resolve it with ``resolve``), for models nobody
here wrote against transformers' torch classes. A named map is a function of the path
(layer indices are read from it: any number of layers); a path it does not know is its own
torch path, as with a dict.

- ``"tunix.llama3"``, ``"tunix.qwen3"``: tunix 0.1.7's NNX ``Llama3`` / ``Qwen3`` (dense MLP)
  ↔ ``LlamaForCausalLM`` / ``Qwen3ForCausalLM``: ``layers.{i}.attn.{q,k,v,o}_proj`` (Einsum
  ``w`` (D, N, H) / (N, H, D), torch's (N, H) flattening) → ``model.layers.{i}.self_attn.…``,
  ``layers.{i}.mlp.{gate,up,down}_proj`` → ``model.layers.{i}.mlp.…``, ``lm_head`` →
  ``lm_head``. ``"tunix.qwen3"`` also maps tunix's Qwen3-MoE (``num_experts``) ↔
  ``Qwen3MoeForCausalLM``: the ``MoELayer``'s weights ``layers.{i}.mlp.{gate,up,down}_proj``
  (E, D, F) / (E, F, D) → ``model.layers.{i}.mlp.experts.{e}.…_proj`` (one module per
  expert), its ``router`` → ``model.layers.{i}.mlp.gate``.
- ``"tunix.gemma3"``: tunix's ``Gemma3`` ↔ ``Gemma3ForCausalLM``: ``q_einsum`` → ``q_proj``,
  the fused ``kv_einsum`` (2, K, D, H) → ``k_proj`` and ``v_proj`` (split on axis 0, one
  shared A), the fused ``qkv_einsum`` (3, N, D, H) → ``q_proj``, ``k_proj``, ``v_proj``,
  ``attn_vec_einsum`` → ``o_proj``, the MLP as for Llama, and the ``embedder``'s tied weight
  (adapted at its ``decode`` product only: ``inject(..., tied_products={"embedder":
  "decode"})``) → ``lm_head`` (PEFT's LoRA on the tied lm_head: A (r, D), B (V, r)).
- ``"transformers.flax_llama"``: transformers 4.x's Linen ``FlaxLlamaForCausalLM``, whose
  param paths already are ``LlamaForCausalLM``'s module paths (the identity, ``None``).
- ``"transformers.flax_gpt2"``: transformers 4.x's Linen ``FlaxGPT2LMHeadModel`` ↔
  ``GPT2LMHeadModel``: the same paths; ``c_attn``, ``q_attn``, ``c_proj`` and ``c_fc`` of
  each block are ``Conv1D`` modules (``HFLinear(path, conv1d=True)``).

>>> resolve("tunix.gemma3")("layers.3.attn.kv_einsum")
HFLinear(path=('model.layers.3.self_attn.k_proj', 'model.layers.3.self_attn.v_proj'), \
in_axes=None, out_axes=None, split=0, conv1d=False, experts=None)
>>> resolve("tunix.llama3")("layers.0.mlp.down_proj")
'model.layers.0.mlp.down_proj'
>>> resolve("tunix.qwen3").for_product("layers.1.mlp.up_proj").experts
'model.layers.1.mlp.experts.{}.up_proj'
>>> resolve("transformers.flax_gpt2")("transformer.h.1.mlp.c_fc")
HFLinear(path='transformer.h.1.mlp.c_fc', in_axes=None, out_axes=None, split=None, conv1d=True, \
experts=None)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import cast

import numpy as np

from _loracore.config import WEIGHT_INITS, LoRAConfig
from _loracore.peft_format import map_path, tensor_keys
from jaxlora.oplevel import Roles, flax_factors, torch_factors, torch_order


@dataclasses.dataclass(frozen=True)
class HFLinear:
    """The torch ``nn.Linear`` module(s) an op-level weight is (see the module docstring).

    ``path``: the torch module path, or a tuple of them with ``split``. ``in_axes`` /
    ``out_axes``: W's contracted / free axes (free axes other than ``split``) in the torch
    Linear's flattening order; ``None``: the order the module's code flattens them in (one
    reshape merging them all), else W's own. ``split``: W's free axis whose indices are the
    modules of ``path`` (``None``: one module; a batch axis: one module per expert, each its
    own A). ``conv1d``: the module(s) are transformers ``Conv1D`` (PEFT's
    ``fan_in_fan_out``), not ``nn.Linear``. ``experts``: for a weight with one batch axis, the
    torch path of expert i with ``{}`` for i (then ``path`` is unused)."""

    path: str | tuple[str, ...]
    in_axes: tuple[int, ...] | None = None
    out_axes: tuple[int, ...] | None = None
    split: int | None = None
    conv1d: bool = False
    experts: str | None = None


@dataclasses.dataclass(frozen=True)
class HFLayout:
    """An ``HFLinear`` checked against a weight's roles: everything explicit."""

    paths: tuple[str, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    split: int | None
    roles: Roles
    conv1d: bool = False


def layout(spec: str | HFLinear, roles: Roles, where: str) -> HFLayout:
    """``spec`` (a path or an ``HFLinear``) checked against ``roles``; a ``ValueError`` naming
    ``where`` (the layer and its weight) and what was expected otherwise."""
    if isinstance(spec, str):
        spec = HFLinear(spec)
    if not isinstance(spec, HFLinear):
        raise TypeError(
            f"{where}: path_map gives {spec!r}; expected a torch module path (str) or an HFLinear"
        )
    if roles.batch:
        return _experts_layout(spec, roles, where)
    paths = (spec.path,) if isinstance(spec.path, str) else tuple(spec.path)
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise ValueError(f"{where}: HFLinear.path must be a module path or a tuple of them")
    free = roles.free
    if spec.split is None:
        if len(paths) != 1:
            raise ValueError(
                f"{where}: HFLinear names {len(paths)} modules {list(paths)} but no split= "
                f"axis (one of the free axes {list(free)}) to divide the weight among them"
            )
    else:
        if spec.split not in free:
            raise ValueError(
                f"{where}: HFLinear split={spec.split} is not a free axis of the weight "
                f"(free axes: {list(free)}, shape {roles.shape})"
            )
        if roles.shape[spec.split] != len(paths):
            raise ValueError(
                f"{where}: HFLinear splits axis {spec.split} of size "
                f"{roles.shape[spec.split]} into {len(paths)} modules {list(paths)}; "
                "expected one module per index"
            )
    rest = tuple(a for a in free if a != spec.split)
    in_axes = _axes(spec.in_axes, _traced(roles, "c"), roles.contracted, "in_axes", where)
    out_axes = _axes(spec.out_axes, _traced(roles, "f"), rest, "out_axes", where)
    if not isinstance(spec.conv1d, bool):
        raise TypeError(f"{where}: HFLinear conv1d must be True or False, got {spec.conv1d!r}")
    return HFLayout(paths, in_axes, out_axes, spec.split, roles, spec.conv1d)


def _experts_layout(spec: HFLinear, roles: Roles, where: str) -> HFLayout:
    """The layout of a weight with a batch (expert) axis: one torch Linear per expert."""
    if len(roles.batch) != 1:
        raise ValueError(
            f"{where}: its axes {list(roles.batch)} are batch axes of its product; a PEFT file "
            "holds one torch Linear per index of ONE batch (expert) axis, not several"
        )
    axis, n = roles.batch[0], roles.shape[roles.batch[0]]
    if spec.experts is not None:
        if not isinstance(spec.experts, str) or spec.experts.count("{}") != 1:
            raise ValueError(
                f"{where}: HFLinear experts={spec.experts!r} must be a torch path with one "
                "'{}' for the expert's index"
            )
        paths = tuple(spec.experts.format(i) for i in range(n))
    elif spec.split == axis and not isinstance(spec.path, str) and len(spec.path) == n:
        paths = tuple(spec.path)
    else:
        raise ValueError(
            f"{where}: its axis {axis} (size {n}) is a batch axis of its product (one adapter "
            f"per expert), so it is {n} torch Linear modules: give path_map an "
            "HFLinear(..., experts='<torch path with {} for the expert>') or "
            f"HFLinear(<{n} torch paths>, split={axis}); got {spec!r}"
        )
    if not all(isinstance(p, str) and p for p in paths):
        raise ValueError(f"{where}: HFLinear paths must be module paths, got {paths}")
    in_axes = _axes(spec.in_axes, _traced(roles, "c"), roles.contracted, "in_axes", where)
    out_axes = _axes(spec.out_axes, _traced(roles, "f"), roles.free, "out_axes", where)
    if not isinstance(spec.conv1d, bool):
        raise TypeError(f"{where}: HFLinear conv1d must be True or False, got {spec.conv1d!r}")
    return HFLayout(paths, in_axes, out_axes, axis, roles, spec.conv1d)


def _expert(lay: HFLayout, path: str) -> HFLayout:
    """One expert's module of a layout with a batch axis, as a layout of its own."""
    roles = dataclasses.replace(lay.roles, batch=())
    return dataclasses.replace(lay, paths=(path,), split=None, roles=roles)


def _traced(roles: Roles, side: str) -> tuple[int, ...] | str | None:
    """``torch_order`` of the weight's contracted (``side`` "c") or free ("f") axes."""
    return torch_order(roles, roles.contracted if side == "c" else roles.free)


def _axes(given, traced, own: tuple[int, ...], name: str, where: str) -> tuple[int, ...]:
    """The torch flattening order of the weight's axes ``own`` (contracted, or free but a
    split one): ``given`` (an ``HFLinear``'s ``in_axes``/``out_axes``) if any, else the order
    the traced computation flattens them in (``traced``, from ``_traced``: one reshape merging
    them all), else W's own; where the trace's evidence is ambiguous (``traced`` a str), a
    ``ValueError`` naming ``where``, what was seen and the fix."""
    role = "contracted" if name == "in_axes" else "free"
    if given is None:
        if isinstance(traced, str):
            raise ValueError(
                f"{where}: {traced}, so the order in which the torch nn.Linear flattens them is "
                f"not known; give path_map an HFLinear(..., {name}=<its {role} axes {list(own)} "
                "in the torch module's flattening order>)"
            )
        return own if traced is None else tuple(a for a in traced if a in own)
    given = tuple(given)
    if sorted(given) != sorted(own):
        raise ValueError(
            f"{where}: HFLinear {name}={given} must order the weight's {role} axes {list(own)}"
        )
    return given


def to_peft(lay: HFLayout, lora_a: np.ndarray, lora_b: np.ndarray) -> dict[str, tuple]:
    """{torch path: (lora_A (r, in), lora_B (out, r))} for the adapter ``lora_a`` (C…, r),
    ``lora_b`` (r, F…) (W's own axis orders); with a batch axis (E, …), expert e's module
    gets ``lora_a[e]``, ``lora_b[e]``."""
    if lay.split in lay.roles.batch:
        out = {}
        for e, path in enumerate(lay.paths):
            out.update(to_peft(_expert(lay, path), lora_a[e], lora_b[e]))
        return out
    pieces = [lora_b] if lay.split is None else _split(lay, lora_b)
    # a split weight's pieces have its free axes other than the split one
    roles = dataclasses.replace(lay.roles, free=tuple(w for w in lay.roles.free if w != lay.split))
    return {
        path: torch_factors(roles, lora_a, b, lay.in_axes, lay.out_axes)
        for path, b in zip(lay.paths, pieces, strict=True)
    }


def _split(lay: HFLayout, lora_b: np.ndarray) -> list[np.ndarray]:
    axis = lay.roles.free.index(lay.split) + 1
    return [np.take(lora_b, i, axis=axis) for i in range(lora_b.shape[axis])]


def torch_shapes(lay: HFLayout, r: int) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """{torch path: (lora_A shape, lora_B shape)} expected for rank ``r``."""
    shape = lay.roles.shape
    n_out = math.prod(shape[w] for w in lay.out_axes)
    return {p: ((r, lay.roles.in_features), (n_out, r)) for p in lay.paths}


def from_peft(lay: HFLayout, pairs: dict[str, tuple], where: str) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of ``to_peft``: (lora_a, lora_b) in W's own axis orders from {torch path:
    (lora_A, lora_B)} (shapes already checked). A fused weight's modules must share one
    lora_A; else a ``ValueError`` names them. Experts (a batch axis): each module its own."""
    if lay.split in lay.roles.batch:
        experts = [from_peft(_expert(lay, p), {p: pairs[p]}, where) for p in lay.paths]
        return np.stack([a for a, _ in experts]), np.stack([b for _, b in experts])
    roles = lay.roles
    first = lay.paths[0]
    big_a = np.asarray(pairs[first][0])
    for path in lay.paths[1:]:
        if not np.array_equal(np.asarray(pairs[path][0]), big_a):
            raise ValueError(
                f"{where}: the file's lora_A of '{first}' and '{path}' differ, but they are "
                "one fused weight with one shared A: PEFT adapters for its modules can only "
                "be loaded when their lora_A are identical"
            )
    roles = dataclasses.replace(roles, free=tuple(w for w in roles.free if w != lay.split))
    pieces = []
    for path in lay.paths:
        a, b = flax_factors(roles, big_a, np.asarray(pairs[path][1]), lay.in_axes, lay.out_axes)
        pieces.append(b)
    if lay.split is None:
        return a, pieces[0]
    return a, np.stack(pieces, axis=lay.roles.free.index(lay.split) + 1)


def conv1d_paths(layouts: Iterable[HFLayout]) -> frozenset[str]:
    """The torch module paths of ``layouts`` that are transformers ``Conv1D``."""
    return frozenset(p for lay in layouts if lay.conv1d for p in lay.paths)


def conv1d_of(specs: Iterable) -> frozenset[str]:
    """The torch paths that ``path_map`` values (``specs``: paths or ``HFLinear``) give as
    transformers ``Conv1D``: what a reader passes to ``read_adapter(conv1d=)``, for every
    layer of the model, adapted or not (a Conv1D not adapted at its product is then refused
    by the reader with its own reason)."""
    return frozenset(
        p
        for s in specs
        if isinstance(s, HFLinear) and s.conv1d
        for p in ((s.path,) if isinstance(s.path, str) else s.path)
    )


def fan_in_fan_out(layouts: list[HFLayout], n_modules: int) -> bool:
    """The file's ``fan_in_fan_out``: true when all ``n_modules`` modules it writes are the
    ``Conv1D`` modules of ``layouts``. A file mixing Conv1D and Linear modules says false (PEFT
    then sets the flag per module, with a warning; the tensors are the same either way)."""
    conv1d = conv1d_paths(layouts)
    return bool(conv1d) and len(conv1d) == n_modules


def check_op_init(init: str | None, config: LoRAConfig, where: str, action: str) -> None:
    """A ``ValueError`` naming ``where`` for a file of an op-level adapter made with PiSSA/OLoRA
    (``init``: the layer's own, ``None`` for kaiming/gaussian) or saved with a config that says
    so: its weight is the residual W − scaling·B₀A₀, and a PEFT file pairs the factors with a
    residual PEFT rebuilds from its torch Linear(s), which a layout (fused modules, permuted
    axes, ``Conv1D``) need not reproduce; and a plain file would be applied to the residual.
    The one rule for NNX op-level layers and Linen product adapters."""
    made = init if init in WEIGHT_INITS else None
    said = config.init if config.init in WEIGHT_INITS else None
    if made or (said and action == "save"):
        raise ValueError(
            f"{where}: an op-level adapter {'made' if made else 'saved'} with "
            f"init={made or said!r} cannot be {'saved to' if action == 'save' else 'loaded from'} "
            "a PEFT file (files of op-level PiSSA/OLoRA adapters are not supported: the weight "
            "is the residual W − scaling·B₀A₀, which PEFT would rebuild from its torch Linear "
            "by its own rule); merge the adapter into the weight instead, or inject with "
            "init='kaiming' or 'gaussian'"
        )


def read_op(lay: HFLayout, r: int, tensors: Mapping, config: LoRAConfig, where: str) -> tuple:
    """(lora_a, lora_b, alpha) of an op-level adapter of rank ``r`` from a file's
    {torch path: (A, B, kind)}, everything checked first: the torch modules' kind and shapes,
    one alpha per weight (a fused weight's modules share it), no PiSSA/OLoRA (their residual
    base is defined on a torch weight, not on W); a ``ValueError`` naming the key otherwise.
    The one reader of such adapters (NNX op-level layers and Linen product adapters)."""
    where = f"{where} (torch {', '.join(lay.paths)})"
    if config.init in WEIGHT_INITS:
        raise ValueError(
            f"{where}: an init={config.init!r} adapter cannot be loaded into an adapter made "
            "at a weight's product (its residual base is defined on the torch weight); load it "
            "into a plain Dense model or use a kaiming/gaussian adapter"
        )
    want = torch_shapes(lay, r)
    for path in lay.paths:
        a, b, kind = tensors[path]
        if kind != "linear":
            raise ValueError(f"{where}: the file holds a {kind} adapter for '{path}'")
        for key, got, shape in zip(
            tensor_keys(path, kind), (a.shape, b.shape), want[path], strict=True
        ):
            if tuple(got) != shape:
                raise ValueError(
                    f"{where}: '{key}' has shape {tuple(got)}, expected {shape} (rank {r} of "
                    "the adapter in the model)"
                )
    alphas = {config.alpha_for(p) for p in lay.paths}
    if len(alphas) > 1:
        raise ValueError(
            f"{where}: the file gives its modules different alphas {sorted(alphas)}; one "
            "fused weight has one alpha"
        )
    pairs = {
        p: (np.asarray(tensors[p][0], np.float32), np.asarray(tensors[p][1], np.float32))
        for p in lay.paths
    }
    lora_a, lora_b = from_peft(lay, pairs, where)
    return lora_a, lora_b, alphas.pop()


@dataclasses.dataclass(frozen=True)
class NamedMap:
    """A ready ``path_map``: the first rule whose pattern matches the whole '.'-joined JAX path
    gives its torch path (a template) or, for a fused weight, an ``HFLinear`` of several
    templates split along the weight's axis 0; an unmatched path is its own torch path.
    ``conv1d``: the matched modules are transformers ``Conv1D``. ``product_rules``: rules
    (pattern, ``HFLinear`` of templates) tried first for a weight adapted at its product
    (``product_spec``), where one JAX path is a Linear in one model and an expert weight in
    another (tunix Qwen3's dense ``mlp.gate_proj`` Linear, its MoE ``mlp`` weight ``gate_proj``)."""

    name: str
    rules: tuple[tuple[str, str | tuple[str, ...]], ...]
    conv1d: bool = False
    # Templates: ``path`` one module path, ``experts`` the expert's.
    product_rules: tuple[tuple[str, HFLinear], ...] = ()

    def __call__(self, path: str) -> str | HFLinear:
        for pattern, target in self.rules:
            match = re.fullmatch(pattern, path)
            if match is None:
                continue
            if isinstance(target, str) and not self.conv1d:
                return match.expand(target)
            if isinstance(target, str):
                return HFLinear(match.expand(target), conv1d=True)
            return HFLinear(tuple(match.expand(t) for t in target), split=0, conv1d=self.conv1d)
        return path

    def for_product(self, path: str) -> str | HFLinear:
        """The spec of ``path`` adapted at its weight's product."""
        for pattern, target in self.product_rules:
            match = re.fullmatch(pattern, path)
            if match is not None:
                experts = target.experts and match.expand(target.experts)
                path_template = cast(str, target.path)
                return dataclasses.replace(
                    target, path=match.expand(path_template), experts=experts
                )
        return self(path)

    def __repr__(self) -> str:
        return f"path_map {self.name!r}"


def product_spec(path_map: SpecMap, key: str) -> str | HFLinear:
    """The ``path_map`` value for ``key``, a weight adapted at its product (a named map's
    ``product_rules`` first)."""
    if isinstance(path_map, NamedMap):
        return path_map.for_product(key)
    return map_path(path_map, key)


_LAYER = r"layers\.(\d+)\."
_TORCH = r"model.layers.\1."
_MLP = (_LAYER + r"mlp\.(gate|up|down)_proj", _TORCH + r"mlp.\2_proj")
_TUNIX_LLAMA = (
    (_LAYER + r"attn\.([qkvo])_proj", _TORCH + r"self_attn.\2_proj"),
    _MLP,
    (r"lm_head", "lm_head"),
)
_ATTN = _TORCH + "self_attn."
_TUNIX_GEMMA3 = (
    (_LAYER + r"attn\.q_einsum", _ATTN + "q_proj"),
    (_LAYER + r"attn\.kv_einsum", (_ATTN + "k_proj", _ATTN + "v_proj")),
    (_LAYER + r"attn\.qkv_einsum", (_ATTN + "q_proj", _ATTN + "k_proj", _ATTN + "v_proj")),
    (_LAYER + r"attn\.attn_vec_einsum", _ATTN + "o_proj"),
    _MLP,
    # The tied embedding's product (its decode: logits = x @ W.T) is the tied lm_head Linear.
    (r"embedder", "lm_head"),
)
_FLAX_GPT2 = (
    (
        r"(transformer\.h\.\d+\.(?:(?:attn|crossattention)\.(?:c_attn|q_attn|c_proj)"
        r"|mlp\.(?:c_fc|c_proj)))",
        r"\1",
    ),
)
# tunix's Qwen3 MLP weights are Linear modules (dense) or the MoELayer's (E, …) weights, which
# share their JAX paths: the expert template applies only to a weight with a batch axis.
_QWEN3_EXPERTS = ((_MLP[0], HFLinear(_MLP[1], experts=_TORCH + r"mlp.experts.{}.\2_proj")),)
_ROUTER = (_LAYER + r"mlp\.router", _TORCH + "mlp.gate")
NAMED_MAPS: dict[str, NamedMap | None] = {
    "tunix.llama3": NamedMap("tunix.llama3", _TUNIX_LLAMA),
    "tunix.qwen3": NamedMap("tunix.qwen3", (*_TUNIX_LLAMA, _ROUTER), False, _QWEN3_EXPERTS),
    "tunix.gemma3": NamedMap("tunix.gemma3", _TUNIX_GEMMA3),
    "transformers.flax_llama": None,
    "transformers.flax_gpt2": NamedMap("transformers.flax_gpt2", _FLAX_GPT2, conv1d=True),
}


# A path_map once resolved: a dict or a function from a '.'-joined JAX path to a torch module
# path or an HFLinear, or None (the same paths).
SpecMap = Mapping[str, "str | HFLinear"] | Callable[[str], "str | HFLinear"] | None
# What save_adapter, load_adapter and read_adapter_config take: that, or a name in NAMED_MAPS.
PathMapArg = SpecMap | str


def resolve(path_map: PathMapArg) -> SpecMap:
    """``path_map`` itself, or the ready map a name in ``NAMED_MAPS`` stands for; a
    ``ValueError`` naming the known names for any other string."""
    if not isinstance(path_map, str):
        return path_map
    if path_map not in NAMED_MAPS:
        raise ValueError(
            f"path_map={path_map!r} is not a known map name; known names: "
            f"{sorted(NAMED_MAPS)} (or pass a dict or a function from a '.'-joined JAX path "
            "to the torch module path)"
        )
    return NAMED_MAPS[path_map]
