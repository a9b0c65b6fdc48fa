"""LoRA Conv1d/Conv2d/Conv3d in PyTorch, in PEFT's layout: A a conv like the base's, B a 1×1
conv. One class does the work (``_ConvNd``); the three differ only in their number of
spatial dimensions."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _ntuple

from torchlora import core
from torchlora.base import LoRALayer

# The torch layers a torchlora conv wraps (its ``base_type``).
TorchConv = nn.Conv1d | nn.Conv2d | nn.Conv3d


class _ConvNd(LoRALayer):
    """A convolution with a frozen ``weight`` (out, in, *window) and ``bias`` and a trainable
    low-rank update: ``conv(x, W) + b + scaling · conv1x1(conv(dropout(x), A), B)``.

    ``lora_a`` (r, in, *window) is a convolution with the base layer's kernel size, stride,
    padding and dilation; ``lora_b`` (out, r, 1, …) a 1×1 convolution: PEFT's ``lora_A`` /
    ``lora_B`` weights. Merging folds ``scaling · B A`` (an (out, in, *window) kernel) into the
    weight. Only ``groups=1`` and ``padding_mode="zeros"`` are supported (PEFT cannot merge
    grouped convolutions either). PEFT builds ``lora_A`` without the base's dilation; this
    layer applies it, so that the unmerged and merged layers agree (PEFT's unmerged output
    differs from its own merge for a dilated base).
    """

    base_type: ClassVar[type[TorchConv]]
    dims: int
    kind = "conv"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        r: int,
        alpha: float | None = None,
        *,
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        bias: bool = True,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        use_dora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        tup = _ntuple(self.dims)
        window = tup(kernel_size)
        core.check_hparams(
            r=r,
            alpha=alpha,
            dropout=dropout,
            in_features=in_channels * math.prod(window),
            out_features=out_channels,
            where=f"torchlora.{type(self).__name__}({in_channels}, {out_channels}, {window})",
        )
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, window
        self.stride, self.dilation = tup(stride), tup(dilation)
        self.padding = padding if isinstance(padding, str) else tup(padding)
        self._setup_lora(r, alpha, use_rslora, init, ("kaiming", "gaussian"))
        self._setup_dora(use_dora, init, f"torchlora.{type(self).__name__}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels, *window, **factory), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.lora_a = nn.Parameter(torch.empty(r, in_channels, *window, **factory))
        self.lora_b = nn.Parameter(torch.empty(out_channels, r, *(1,) * self.dims, **factory))
        if use_dora:
            self.lora_magnitude = nn.Parameter(torch.empty(out_channels, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    @classmethod
    def from_conv(
        cls,
        conv: TorchConv,
        r: int,
        alpha: float | None = None,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        use_dora: bool = False,
        copy: bool = False,
    ) -> _ConvNd:
        """Wraps a pretrained ``nn.Conv1d``/``Conv2d``/``Conv3d`` (this class's base type),
        sharing its weight and bias unless ``copy=True``."""
        if not isinstance(conv, cls.base_type):
            raise TypeError(
                f"{cls.__name__}.from_conv expects an {cls.base_type.__name__}, "
                f"got {type(conv).__name__}"
            )
        reason = cls.unsupported(conv)
        if reason:
            raise ValueError(f"torchlora.{cls.__name__}: {reason}")
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            r,
            alpha,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            dropout=dropout,
            use_rslora=use_rslora,
            init=init,
            use_dora=use_dora,
            device="meta",
            dtype=conv.weight.dtype,
        )
        layer._share(conv.weight, conv.bias, copy)
        layer.reset_lora_parameters()
        return layer

    @staticmethod
    def unsupported(conv: nn.Module) -> str | None:
        """Why ``conv`` cannot be adapted, or ``None``."""
        if conv.groups != 1 or conv.padding_mode != "zeros":
            return (
                f"a conv with groups={conv.groups}, padding_mode={conv.padding_mode!r} cannot "
                "be adapted (expected groups=1, padding_mode='zeros')"
            )
        return None

    def reset_parameters(self) -> None:
        """Initialises ``weight`` and ``bias`` as torch's conv layers do, then the adapter."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * math.prod(self.kernel_size)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A ~ kaiming_uniform(a=√5) (U(±1/√(in·prod(window)))) or N(0, 1/r) ("gaussian");
        B = 0."""
        if self.lora_a.is_meta:
            return
        if self.init == "gaussian":
            nn.init.normal_(self.lora_a, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)
        self._reset_magnitude()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dims
        if x.ndim not in (d + 1, d + 2) or x.shape[-d - 1] != self.in_channels:
            raise ValueError(
                f"{self._name()}: expected input (N, {self.in_channels}, {d} spatial dims), "
                f"got shape {tuple(x.shape)}"
            )
        y = self._conv(x, self.weight, self.bias)
        if self._merged:
            return y
        dropped = self.lora_dropout(x)
        lora = self._function(self._conv(dropped, self.lora_a, None), self.lora_b) * self.scaling
        if self.use_dora:
            plain = lambda h: self._conv(h, self.weight, None)  # noqa: E731
            return y + self._dora_output(dropped, y, lora, plain)
        return y + lora

    def to_base(self) -> nn.Module:
        """A new plain conv of the base type holding the merged weight (and a copy of the
        bias)."""
        return self._filled(
            self.base_type(
                self.in_channels,
                self.out_channels,
                self.kernel_size,
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                bias=self.bias is not None,
                device=self.weight.device,
                dtype=self.weight.dtype,
            )
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}, {self._adapter_repr()}"
        )

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        return self._function(x, weight, bias, self.stride, self.padding, self.dilation)

    @property
    def _function(self):
        return (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]


class Conv1d(_ConvNd):
    """``_ConvNd`` over one spatial dimension (the base is an ``nn.Conv1d``).

    Examples:
        >>> Conv1d(3, 8, 5, 2, padding=2).lora_a.shape
        torch.Size([2, 3, 5])
    """

    base_type = nn.Conv1d
    dims = 1


class Conv2d(_ConvNd):
    """``_ConvNd`` over two spatial dimensions (the base is an ``nn.Conv2d``).

    Examples:
        >>> layer = Conv2d(3, 8, 3, 2, padding=1)
        >>> layer(torch.ones(1, 3, 5, 5)).shape
        torch.Size([1, 8, 5, 5])
        >>> layer.lora_a.shape, layer.lora_b.shape
        (torch.Size([2, 3, 3, 3]), torch.Size([8, 2, 1, 1]))
    """

    base_type = nn.Conv2d
    dims = 2


class Conv3d(_ConvNd):
    """``_ConvNd`` over three spatial dimensions (the base is an ``nn.Conv3d``).

    Examples:
        >>> Conv3d(3, 8, (1, 3, 3), 2).lora_b.shape
        torch.Size([8, 2, 1, 1, 1])
    """

    base_type = nn.Conv3d
    dims = 3
