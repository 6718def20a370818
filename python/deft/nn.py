"""Modules: DeformConv2d (torchvision's constructor and forward) and DeformConv2dPack, which
owns the convolution that predicts its offsets and mask (mmcv's ModulatedDeformConv2dPack
convention), for one line per layer. Both train: deft.ops.deform_conv2d has autograd for the
input, offset, mask, weight and bias. deft.export_layers names their layers by module path."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from . import ops


class DeformConv2d(nn.Module):
    """Same constructor, parameters and forward(input, offset, mask=None) as
    torchvision.ops.DeformConv2d, so a state dict moves between the two."""

    def __init__(self, in_channels: int, out_channels: int,
                 kernel_size: Union[int, Tuple[int, int]],
                 stride: Union[int, Tuple[int, int]] = 1,
                 padding: Union[int, Tuple[int, int]] = 0,
                 dilation: Union[int, Tuple[int, int]] = 1, groups: int = 1, bias: bool = True):
        super().__init__()
        if in_channels % groups != 0:
            raise ValueError("in_channels must be divisible by groups")
        if out_channels % groups != 0:
            raise ValueError("out_channels must be divisible by groups")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return ops.deform_conv2d(input, offset, self.weight, self.bias, stride=self.stride,
                                 padding=self.padding, dilation=self.dilation, mask=mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")


class DeformConv2dPack(DeformConv2d):
    """A DCN layer that predicts its own offsets (and, with ``modulated=True``, its DCNv2 mask)
    with a plain convolution of the input, initialised to zero so that it starts as a regular
    convolution: forward(input)."""

    def __init__(self, in_channels: int, out_channels: int,
                 kernel_size: Union[int, Tuple[int, int]],
                 stride: Union[int, Tuple[int, int]] = 1,
                 padding: Union[int, Tuple[int, int]] = 0,
                 dilation: Union[int, Tuple[int, int]] = 1, groups: int = 1, bias: bool = True,
                 offset_groups: int = 1, modulated: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias)
        self.offset_groups = offset_groups
        self.modulated = modulated
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = nn.Conv2d(in_channels, (3 if modulated else 2) * offset_groups * taps,
                                     self.kernel_size, self.stride, self.padding, self.dilation,
                                     bias=True)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]
        out = self.conv_offset(input)
        taps = self.kernel_size[0] * self.kernel_size[1]
        n_off = 2 * self.offset_groups * taps
        offset = out[:, :n_off]
        mask = torch.sigmoid(out[:, n_off:]) if self.modulated else None
        return super().forward(input, offset, mask)
