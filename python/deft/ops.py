"""deft.ops.deform_conv2d: torchvision.ops.deform_conv2d's signature and semantics, run by
deft's JIT-compiled kernels through the C API (no link to libtorch).

Registered as the torch custom op ``deft::deform_conv2d`` with a fake (meta) implementation,
so it traces under torch.compile without graph breaks, and with an autocast rule. Forward only
for now: the backward passes are not implemented yet and raise a clear error.
"""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._library import library

_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16",
           torch.float64: "f64"}

_kernels: Dict[Tuple[str, int], object] = {}
_kernels_lock = threading.Lock()


def _pair(v: Union[int, Sequence[int]], name: str) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"deform_conv2d: {name} must be an int or a pair, got {v}")
    return v


class _Geometry:
    """Everything derived from the argument shapes, checked once."""

    def __init__(self, input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor],
                 mask: Optional[Tensor], stride, padding, dilation):
        for name, t in (("input", input), ("offset", offset), ("weight", weight)):
            if t.dim() != 4:
                raise ValueError(f"deform_conv2d: {name} must be 4-D, got shape "
                                 f"{tuple(t.shape)}")
        self.n, self.c, self.h, self.w = input.shape
        self.k, cg, self.kh, self.kw = weight.shape
        self.sh, self.sw = stride
        self.ph, self.pw = padding
        self.dh, self.dw = dilation
        if min(self.sh, self.sw, self.dh, self.dw) < 1 or min(self.ph, self.pw) < 0:
            raise ValueError(f"deform_conv2d: stride {stride} and dilation {dilation} must be "
                             f"positive, padding {padding} non-negative")
        if cg < 1 or self.c % cg != 0:
            raise ValueError(f"deform_conv2d: weight.shape[1]={cg} does not divide the input "
                             f"channels {self.c}")
        self.groups = self.c // cg
        if self.k % self.groups != 0:
            raise ValueError(f"deform_conv2d: groups={self.groups} (from the weight) does not "
                             f"divide the output channels {self.k}")
        taps = self.kh * self.kw
        if offset.shape[1] == 0 or offset.shape[1] % (2 * taps) != 0:
            raise ValueError(f"deform_conv2d: offset.shape[1]={offset.shape[1]} is not a "
                             f"multiple of 2*kh*kw={2 * taps}")
        self.og = offset.shape[1] // (2 * taps)
        if self.c % self.og != 0:
            raise ValueError(f"deform_conv2d: {self.og} offset groups do not divide the input "
                             f"channels {self.c}")
        self.ho = (self.h + 2 * self.ph - self.dh * (self.kh - 1) - 1) // self.sh + 1
        self.wo = (self.w + 2 * self.pw - self.dw * (self.kw - 1) - 1) // self.sw + 1
        if self.ho < 1 or self.wo < 1:
            raise ValueError(f"deform_conv2d: the output would be {self.ho}x{self.wo}")
        if offset.shape[0] != self.n or tuple(offset.shape[2:]) != (self.ho, self.wo):
            raise ValueError(f"deform_conv2d: offset has shape {tuple(offset.shape)}, expected "
                             f"({self.n}, {offset.shape[1]}, {self.ho}, {self.wo})")
        if mask is not None and tuple(mask.shape) != (self.n, self.og * taps, self.ho, self.wo):
            raise ValueError(f"deform_conv2d: mask has shape {tuple(mask.shape)}, expected "
                             f"{(self.n, self.og * taps, self.ho, self.wo)}")
        if bias is not None and tuple(bias.shape) != (self.k,):
            raise ValueError(f"deform_conv2d: bias has shape {tuple(bias.shape)}, expected "
                             f"({self.k},)")
        # channels-last input (and not also plainly contiguous, as 1x1 images are): nhwc kernels
        self.nhwc = (input.is_contiguous(memory_format=torch.channels_last)
                     and not input.is_contiguous())

    def out_size_stride(self):
        size = (self.n, self.k, self.ho, self.wo)
        if self.nhwc:
            return size, (self.ho * self.wo * self.k, 1, self.wo * self.k, self.k)
        return size, (self.k * self.ho * self.wo, self.ho * self.wo, self.wo, 1)


def _describe(g: _Geometry, dtype: torch.dtype, has_mask: bool, has_bias: bool) -> str:
    math = ""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        math = " math=tf32"  # torchvision's GEMM (cuBLAS) follows the same switch
    return (f"deform_conv2d n={g.n} c={g.c} h={g.h} w={g.w} k={g.k} r={g.kh} s={g.kw} "
            f"stride={g.sh}x{g.sw} pad={g.ph}x{g.pw} dilation={g.dh}x{g.dw} groups={g.groups} "
            f"offset_groups={g.og} mask={int(has_mask)} dtype={_DTYPES[dtype]}{math} "
            f"layout={'nhwc' if g.nhwc else 'nchw'} bias={int(has_bias)}")


def _kernel(desc: str, device: torch.device):
    key = (desc, device.index)
    with _kernels_lock:
        k = _kernels.get(key)
    if k is None:
        with torch.cuda.device(device):
            k = library().compile(desc)
        with _kernels_lock:
            k = _kernels.setdefault(key, k)
    return k


def _channels_last(t: Tensor) -> Tensor:
    return t.permute(0, 2, 3, 1).contiguous()


def _forward(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor],
             mask: Optional[Tensor], stride: List[int], padding: List[int],
             dilation: List[int]) -> Tensor:
    g = _Geometry(input, offset, weight, bias, mask, stride, padding, dilation)
    size, stride_out = g.out_size_stride()
    out = torch.empty_strided(size, stride_out, dtype=input.dtype, device=input.device)
    if g.n == 0 or g.k == 0:
        return out
    with torch.cuda.device(input.device):
        if g.nhwc:
            x = input.permute(0, 2, 3, 1)  # already contiguous in this order
            off, msk, wt = _channels_last(offset), None if mask is None else _channels_last(mask), \
                _channels_last(weight)
            y = out.permute(0, 2, 3, 1)
        else:
            x, off, wt = input.contiguous(), offset.contiguous(), weight.contiguous()
            msk = None if mask is None else mask.contiguous()
            y = out
        b = None if bias is None else bias.contiguous()
        kern = _kernel(_describe(g, input.dtype, mask is not None, bias is not None),
                       input.device)
        kern.forward(x, off, msk, wt, b, y, torch.cuda.current_stream(input.device).cuda_stream)
    return out


@torch.library.custom_op("deft::deform_conv2d", mutates_args=())
def _deform_conv2d_op(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor],
                      mask: Optional[Tensor], stride: List[int], padding: List[int],
                      dilation: List[int]) -> Tensor:
    return _forward(input, offset, weight, bias, mask, stride, padding, dilation)


@_deform_conv2d_op.register_fake
def _(input, offset, weight, bias, mask, stride, padding, dilation):
    g = _Geometry(input, offset, weight, bias, mask, stride, padding, dilation)
    size, stride_out = g.out_size_stride()
    return input.new_empty_strided(size, stride_out)


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad):
    raise NotImplementedError(
        "deft.ops.deform_conv2d: the backward pass is not implemented yet (forward only). "
        "Train with torchvision.ops.deform_conv2d for now.")


_deform_conv2d_op.register_autograd(_backward, setup_context=_setup_context)

if hasattr(torch.library, "register_autocast"):
    # Under autocast, run in the autocast dtype like convolutions do.
    torch.library.register_autocast("deft::deform_conv2d", "cuda", torch.float16)


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  stride: Union[int, Tuple[int, int]] = (1, 1),
                  padding: Union[int, Tuple[int, int]] = (0, 0),
                  dilation: Union[int, Tuple[int, int]] = (1, 1),
                  mask: Optional[Tensor] = None) -> Tensor:
    """Deformable convolution v1 / v2 (with ``mask``), as torchvision.ops.deform_conv2d.

    CUDA tensors of one dtype (float32, float16, bfloat16, float64) on one device. A
    channels-last ``input`` runs deft's NHWC kernels and gives a channels-last output. float32
    uses TF32 tensor cores when ``torch.backends.cuda.matmul.allow_tf32`` is set, as
    torchvision's GEMM does.
    """
    tensors = {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"deform_conv2d: {name} must be a Tensor, got {type(t).__name__}")
        if t.device.type != "cuda":
            raise RuntimeError(f"deform_conv2d: {name} is on {t.device}; deft runs on CUDA "
                               f"devices only (use torchvision.ops.deform_conv2d on the CPU)")
        if t.device != input.device:
            raise RuntimeError(f"deform_conv2d: {name} is on {t.device} but input is on "
                               f"{input.device}")
        if t.dtype != input.dtype and not torch.is_autocast_enabled():
            raise TypeError(f"deform_conv2d: {name} is {t.dtype} but input is {input.dtype}; "
                            f"all tensors must have one dtype")
    if input.dtype not in _DTYPES:
        raise TypeError(f"deform_conv2d: dtype {input.dtype} is not supported (float32, "
                        f"float16, bfloat16, float64)")
    return torch.ops.deft.deform_conv2d(input, offset, weight, bias, mask,
                                        list(_pair(stride, "stride")),
                                        list(_pair(padding, "padding")),
                                        list(_pair(dilation, "dilation")))
