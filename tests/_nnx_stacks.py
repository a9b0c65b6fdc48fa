"""NNX layer stacks shared by the scan tests: ``length`` layers of one block class, either
made by ``nnx.vmap`` and run by ``nnx.scan`` or held in an ``nnx.List`` and run one by one
(the unrolled twin). A test subclasses each and names ``block`` and ``length``."""

from __future__ import annotations

from typing import Any, ClassVar

from flax import nnx


class ScannedLayers(nnx.Module):
    """The layers stacked on ``out_axes`` by ``nnx.vmap``; the call scans them on axis 0."""

    block: ClassVar[Any]  # a class taking ``rngs``
    length: ClassVar[int]

    def __init__(self, rngs: nnx.Rngs, out_axes: int = 0):
        block = type(self).block

        @nnx.split_rngs(splits=type(self).length)
        @nnx.vmap(in_axes=(0,), out_axes=out_axes)
        def make(rngs):
            return block(rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.layers)


class UnrolledLayers(nnx.Module):
    """The same layers, each its own module (all drawn from one ``rngs``), run in order."""

    block: ClassVar[Any]
    length: ClassVar[int]

    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([type(self).block(rngs) for _ in range(type(self).length)])

    def __call__(self, x):
        for block in self.layers:
            x = block(x)
        return x
