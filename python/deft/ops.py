"""deft.ops.deform_conv2d: torchvision.ops.deform_conv2d's signature and semantics, run by
deft's JIT-compiled kernels through the C API (no link to libtorch).

Registered as the torch custom op ``deft::deform_conv2d`` with a fake (meta) implementation,
an autocast rule and autograd: the gradients come from the custom op
``deft::deform_conv2d_backward`` (also with a fake implementation), so the op traces under
torch.compile without graph breaks for training as well as inference. Called eagerly (nothing
tracing, no tensor subclass or mode active), deform_conv2d() skips the dispatcher and runs the
same forward and backward through an autograd.Function, which costs less host time per call;
the two routes give bitwise the same results. Only the gradients that autograd asks for are
computed. Under ``torch.use_deterministic_algorithms(True)`` the backward pass is bitwise
reproducible. The gradients are not themselves differentiable (no double backward): that
raises an error.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._library import library

_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16",
           torch.float64: "f64"}

_kernels: Dict[Tuple[str, int, Optional[str]], object] = {}
_kernels_lock = threading.Lock()
# Database the kernels compile against (deft.load_tuning); None: libdeft's default
# ($DEFT_CACHE_DIR/deft.db, else $XDG_CACHE_HOME/deft/deft.db, else ~/.cache/deft/deft.db).
_cache_path: Optional[str] = None
# Per-thread hook for deft.export_layers: an object with record(geometry, desc, offset).
_tls = threading.local()

# The current stream of a device as a cudaStream_t integer, without building a torch.cuda.Stream
# object (the call torch's own generated kernels use); torch.cuda.current_stream() where absent.
try:
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # pragma: no cover - a torch without it
    def _raw_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream


_NO_GUARD = contextlib.nullcontext()


def _on_device(device: torch.device):
    """A device guard for ``device``: none where it is the current device already (the common
    case; torch.cuda.device() costs microseconds per call)."""
    if device.index is None or device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device)


def _set_cache_path(path: Optional[str]) -> None:
    """Compile later kernels against ``path`` (None: the library default) and forget the kernels
    compiled so far."""
    global _cache_path
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Kernels still queued must not lose their module when the last reference goes.
        for d in range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)
    with _kernels_lock:
        _cache_path = path
        _kernels.clear()


def _cache_path_now() -> Optional[str]:
    return _cache_path


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
        self.nhwc = _is_nhwc(input)

    def out_size_stride(self):
        size = (self.n, self.k, self.ho, self.wo)
        if self.nhwc:
            return size, (self.ho * self.wo * self.k, 1, self.wo * self.k, self.k)
        return size, (self.k * self.ho * self.wo, self.ho * self.wo, self.wo, 1)


def _is_nhwc(input: Tensor) -> bool:
    # channels-last input (and not also plainly contiguous, as 1x1 images are): nhwc kernels
    return input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()


# (shapes, stride, padding, dilation, layout, dtype, tf32) -> (geometry, description, output size
# and strides): a layer called again (every training step) skips the checks and the formatting.
_plans: Dict[tuple, tuple] = {}
_PLANS_MAX = 4096


def _plan(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor],
          mask: Optional[Tensor], stride, padding, dilation,
          backward_bias: Optional[bool] = None):
    """The checked geometry of a call, its description and output size and strides; raises
    ValueError for shapes that do not fit together (see _Geometry). The backward pass has no
    bias tensor: it passes ``backward_bias`` (whether the forward had one) instead."""
    dtype = input.dtype
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    if backward_bias is None:
        has_bias, bias_key = bias is not None, None if bias is None else bias.shape
    else:
        has_bias, bias_key = backward_bias, ("backward", backward_bias)
    key = (input.shape, offset.shape, weight.shape, bias_key,
           None if mask is None else mask.shape, tuple(stride), tuple(padding), tuple(dilation),
           _is_nhwc(input), dtype, tf32)
    hit = _plans.get(key)
    if hit is None:
        g = _Geometry(input, offset, weight, bias, mask, stride, padding, dilation)
        size, stride_out = g.out_size_stride()
        hit = (g, _describe(g, dtype, tf32, mask is not None, has_bias), size, stride_out)
        if len(_plans) >= _PLANS_MAX:
            _plans.clear()
        _plans[key] = hit
    return hit


def _describe(g: _Geometry, dtype: torch.dtype, tf32: bool, has_mask: bool,
              has_bias: bool) -> str:
    # tf32: float32 with torch.backends.cuda.matmul.allow_tf32, the switch torchvision's GEMM
    # (cuBLAS) follows
    math = " math=tf32" if tf32 else ""
    return (f"deform_conv2d n={g.n} c={g.c} h={g.h} w={g.w} k={g.k} r={g.kh} s={g.kw} "
            f"stride={g.sh}x{g.sw} pad={g.ph}x{g.pw} dilation={g.dh}x{g.dw} groups={g.groups} "
            f"offset_groups={g.og} mask={int(has_mask)} dtype={_DTYPES[dtype]}{math} "
            f"layout={'nhwc' if g.nhwc else 'nchw'} bias={int(has_bias)}")


def _kernel(desc: str, device: torch.device):
    with _kernels_lock:
        path = _cache_path
        key = (desc, device.index, path)
        k = _kernels.get(key)
    if k is None:
        with torch.cuda.device(device):
            k = library().compile(desc, cache_path=path)
        with _kernels_lock:
            k = _kernels.setdefault(key, k)
    return k


def _channels_last(t: Tensor) -> Tensor:
    return t.permute(0, 2, 3, 1).contiguous()


def _check_devices(**tensors: Optional[Tensor]) -> None:
    """The op's own guard (deform_conv2d() gives the friendlier messages first): every tensor on
    the CUDA device of the first one."""
    device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cuda":
            raise RuntimeError(f"deform_conv2d: {name} is on {t.device}; deft runs on CUDA "
                               f"devices only")
        if device is None:
            device = t.device
        elif t.device != device:
            raise RuntimeError(f"deform_conv2d: {name} is on {t.device}, the other tensors on "
                               f"{device}")


def _aligned(t: Tensor) -> Tensor:
    """t, or a copy of it where its data does not start on a 16-byte boundary (a view with a
    storage offset): deft's vector kernels read input and weight in 16-byte vectors."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _operands(g: _Geometry, input: Tensor, offset: Tensor, weight: Tensor,
              mask: Optional[Tensor]):
    """input, offset, mask and weight as the kernels read them: NCHW-contiguous, or for an
    NHWC description channels-last (weight as [k][r][s][c/groups]); input and weight 16-byte
    aligned."""
    if g.nhwc:
        x = input.permute(0, 2, 3, 1)  # already contiguous in this order
        return (_aligned(x), _channels_last(offset),
                None if mask is None else _channels_last(mask), _aligned(_channels_last(weight)))
    return (_aligned(input.contiguous()), offset.contiguous(),
            None if mask is None else mask.contiguous(), _aligned(weight.contiguous()))


def _check_dtypes(dtype: torch.dtype, **tensors: Optional[Tensor]) -> None:
    """Every tensor in ``dtype`` (the op's guard: under autocast a float64 tensor is not cast,
    and a mix would reach a kernel compiled for one dtype)."""
    for name, t in tensors.items():
        if t is not None and t.dtype != dtype:
            raise TypeError(f"deform_conv2d: {name} is {t.dtype} but input is {dtype}; all "
                            f"tensors must have one dtype")


def _forward(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor],
             mask: Optional[Tensor], stride: List[int], padding: List[int],
             dilation: List[int], operands: Optional[list] = None) -> Tensor:
    """The forward op's work. ``operands`` (a list, eager autograd path): receives (input,
    offset, weight, mask) as the kernels read them where those are the same tensors in the
    layout the backward reads them again (NCHW layers: the contiguous copies), so the backward
    need not copy them a second time; else the arguments."""
    _check_devices(input=input, offset=offset, weight=weight, bias=bias, mask=mask)
    _check_dtypes(input.dtype, offset=offset, weight=weight, bias=bias, mask=mask)
    g, desc, size, stride_out = _plan(input, offset, weight, bias, mask, stride, padding,
                                      dilation)
    out = torch.empty_strided(size, stride_out, dtype=input.dtype, device=input.device)
    if g.n != 0 and g.k != 0:
        device = input.device
        with _on_device(device):
            x, off, msk, wt = _operands(g, input, offset, weight, mask)
            y = out.permute(0, 2, 3, 1) if g.nhwc else out
            b = None if bias is None else bias.contiguous()
            kern = _kernel(desc, device)
            kern.forward(x, off, msk, wt, b, y, _raw_stream(device.index))
            if operands is not None and not g.nhwc:
                operands.extend((x, off, wt, msk))
    if operands is not None and not operands:
        operands.extend((input, offset, weight, mask))
    recorder = getattr(_tls, "recorder", None)
    if recorder is not None:
        recorder.record(g, desc, offset)
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


# --- backward -------------------------------------------------------------------------------------

def _layout_strides(size: Sequence[int], nhwc: bool) -> Tuple[int, int, int, int]:
    """Strides of a 4-D tensor stored NCHW- or NHWC-contiguous."""
    a, b, c, d = size
    if nhwc:
        return (b * c * d, 1, d * b, b)
    return (b * c * d, c * d, d, 1)


def _grad_buffers(g: _Geometry, need_input: bool, need_offset: bool, need_weight: bool,
                  need_bias: bool, need_mask: bool, new_empty_strided):
    """The backward op's five results (grad input, offset, weight, bias, mask), in the layout the
    kernels write (that of the forward's operands); a gradient not asked for is an empty [0]
    tensor. ``new_empty_strided(size, stride)`` allocates; shared by the real and the fake
    implementation so that both give the same strides."""
    taps = g.kh * g.kw
    shapes = [(g.n, g.c, g.h, g.w), (g.n, 2 * g.og * taps, g.ho, g.wo),
              (g.k, g.c // g.groups, g.kh, g.kw), None, (g.n, g.og * taps, g.ho, g.wo)]
    out = []
    for need, shape in zip((need_input, need_offset, need_weight, need_bias, need_mask), shapes):
        if not need:
            out.append(new_empty_strided((0,), (1,)))
        elif shape is None:  # bias
            out.append(new_empty_strided((g.k,), (1,)))
        else:
            out.append(new_empty_strided(shape, _layout_strides(shape, g.nhwc)))
    return tuple(out)


def _check_grad_output(grad_output: Tensor, g: _Geometry) -> None:
    if tuple(grad_output.shape) != (g.n, g.k, g.ho, g.wo):
        raise ValueError(f"deform_conv2d backward: grad_output has shape "
                         f"{tuple(grad_output.shape)}, expected {(g.n, g.k, g.ho, g.wo)}")


def _backward_impl(grad_output: Tensor, input: Tensor, offset: Tensor, weight: Tensor,
                   mask: Optional[Tensor], stride: List[int], padding: List[int],
                   dilation: List[int], has_bias: bool, need_input: bool, need_offset: bool,
                   need_weight: bool, need_bias: bool, need_mask: bool):
    """The gradients (input, offset, weight, bias, mask) of _forward; see the backward op."""
    _check_devices(grad_output=grad_output, input=input, offset=offset, weight=weight,
                   mask=mask)
    dtype, device = input.dtype, input.device
    _check_dtypes(dtype, offset=offset, weight=weight, mask=mask)
    g, desc, _, _ = _plan(input, offset, weight, None, mask, stride, padding, dilation,
                          backward_bias=has_bias)
    _check_grad_output(grad_output, g)
    need_bias = need_bias and has_bias
    need_mask = need_mask and mask is not None
    grads = _grad_buffers(
        g, need_input, need_offset, need_weight, need_bias, need_mask,
        lambda size, st: torch.empty_strided(size, st, dtype=dtype, device=device))
    gi, goff, gw, gb, gm = grads
    needs = (need_input, need_offset, need_weight, need_bias, need_mask)
    if not any(needs):
        return grads
    if g.n == 0 or g.k == 0:  # nothing flows: every requested gradient is zero
        for t, need in zip(grads, needs):
            if need:
                t.zero_()
        return grads
    if grad_output.dtype != dtype:
        grad_output = grad_output.to(dtype)
    with _on_device(device):
        x, off, msk, wt = _operands(g, input, offset, weight, mask)
        gy = _channels_last(grad_output) if g.nhwc else grad_output.contiguous()
        kern = _kernel(desc, device)
        deterministic = 1 if torch.are_deterministic_algorithms_enabled() else 0
        kern.backward(x, off, msk, wt, gy,
                      gi if need_input else None, goff if need_offset else None,
                      gm if need_mask else None, gw if need_weight else None,
                      gb if need_bias else None, deterministic, _raw_stream(device.index))
    return grads


@torch.library.custom_op("deft::deform_conv2d_backward", mutates_args=())
def _deform_conv2d_backward_op(grad_output: Tensor, input: Tensor, offset: Tensor,
                               weight: Tensor, mask: Optional[Tensor], stride: List[int],
                               padding: List[int], dilation: List[int], has_bias: bool,
                               need_input: bool, need_offset: bool, need_weight: bool,
                               need_bias: bool, need_mask: bool
                               ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of deft::deform_conv2d for (input, offset, weight, bias, mask). ``has_bias``:
    the forward had a bias (it selects the same compiled kernel). A gradient whose need_* is
    False comes back as an empty [0] tensor and is not computed."""
    return _backward_impl(grad_output, input, offset, weight, mask, stride, padding, dilation,
                          has_bias, need_input, need_offset, need_weight, need_bias, need_mask)


@_deform_conv2d_backward_op.register_fake
def _(grad_output, input, offset, weight, mask, stride, padding, dilation, has_bias, need_input,
      need_offset, need_weight, need_bias, need_mask):
    # (uncached: under torch.compile the shapes may be symbolic)
    g = _Geometry(input, offset, weight, None, mask, stride, padding, dilation)
    _check_grad_output(grad_output, g)
    return _grad_buffers(g, need_input, need_offset, need_weight, need_bias and has_bias,
                         need_mask and mask is not None, input.new_empty_strided)


def _setup_context(ctx, inputs, output):
    input, offset, weight, bias, mask, stride, padding, dilation = inputs
    ctx.save_for_backward(input, offset, weight, mask)
    ctx.has_bias = bias is not None
    ctx.conv = (list(stride), list(padding), list(dilation))


def _backward_with(backward_fn, ctx, grad):
    """The gradients of the forward's eight arguments, computed by ``backward_fn`` (the backward
    op, or _backward_impl; same arguments) for those autograd needs."""
    input, offset, weight, mask = ctx.saved_tensors
    need = ctx.needs_input_grad  # per forward argument: input, offset, weight, bias, mask, ...
    needs = (bool(need[0]), bool(need[1]), bool(need[2]), bool(need[3]) and ctx.has_bias,
             bool(need[4]) and mask is not None)
    if not any(needs):
        return (None,) * 8
    # The kernels run in the forward's dtype (under autocast: the autocast dtype the forward
    # ran in, which is what was saved).
    stride, padding, dilation = ctx.conv
    if grad.dtype != input.dtype:
        grad = grad.to(input.dtype)
    grads = backward_fn(grad, input, offset, weight, mask, stride, padding,
                        dilation, ctx.has_bias, *needs)
    return tuple(t if n else None for t, n in zip(grads, needs)) + (None, None, None)


def _backward(ctx, grad):
    return _backward_with(torch.ops.deft.deform_conv2d_backward, ctx, grad)


_deform_conv2d_op.register_autograd(_backward, setup_context=_setup_context)

# Under autocast the op runs in float16 (the custom op's rule below, and _autocast_cast on the
# eager path, inside its autograd node). The backward op has no rule: it runs in the dtype the
# forward ran in.
_AUTOCAST_DTYPE = torch.float16
if hasattr(torch.library, "register_autocast"):
    torch.library.register_autocast("deft::deform_conv2d", "cuda", _AUTOCAST_DTYPE)


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cuda")
    except TypeError:  # older torch: no device argument (meant CUDA)
        return torch.is_autocast_enabled()


# --- eager path -----------------------------------------------------------------------------------
# Called eagerly (not traced by torch.compile, no tensor subclass or mode in play), the op runs
# through the autograd.Function below instead of the custom ops: the same _forward and
# _backward_impl, without the dispatcher's round trips into Python (the custom op with its
# autograd and autocast rules costs tens of microseconds of host time per call, and a training
# step of a small layer is host-bound). Anything else takes the custom ops, which torch.compile,
# torch.jit.trace, FakeTensor, torch.func and __torch_function__/__torch_dispatch__ modes
# understand.

_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
_torch_function_mode = getattr(torch._C, "_is_torch_function_mode_enabled", None)
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_jit_tracing = getattr(torch._C, "_get_tracing_state", None)  # torch.jit.trace records ops only
_EAGER_OK = None not in (_is_compiling, _torch_function_mode, _dispatch_modes, _functorch_active,
                         _jit_tracing)
_PLAIN = (Tensor, torch.nn.Parameter)


def _eager(tensors) -> bool:
    if not _EAGER_OK or _is_compiling() or _torch_function_mode() or _dispatch_modes() \
            or _functorch_active() or _jit_tracing() is not None:
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False
    return True


class _DeformConv2dFunction(torch.autograd.Function):
    """deft::deform_conv2d's forward and autograd (the same functions), called eagerly.

    ``autocast``: the op was called under autocast, whose rule (_autocast_cast) is applied here,
    inside this one autograd node, and the gradients go back in each argument's own dtype. A
    ``.to()`` per argument before the node would put a cast node of its own into the graph for
    each float32 argument (the weight, the bias), each costing host time forward and backward
    (docs/perf-notes.md, session 15)."""

    @staticmethod
    def forward(ctx, input, offset, weight, bias, mask, stride, padding, dilation,
                autocast=False):
        ctx.arg_dtypes = None
        if autocast:
            args5 = (input, offset, weight, bias, mask)
            ctx.arg_dtypes = tuple(None if t is None else t.dtype for t in args5)
            input, offset, weight, bias, mask = (_autocast_cast(t) for t in args5)
        operands = []
        out = _forward(input, offset, weight, bias, mask, stride, padding, dilation, operands)
        # saved as the kernels read them (bitwise the same values): NCHW layers' backward then
        # finds them contiguous and copies nothing (a sliced offset would be copied again)
        x, off, wt, msk = operands
        _setup_context(ctx, (x, off, wt, bias, msk, stride, padding, dilation), out)
        return out

    @staticmethod
    def backward(ctx, grad):
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            grads = _backward_with(_backward_impl, ctx, grad)
            if ctx.arg_dtypes is not None:  # each gradient in its argument's dtype
                grads = tuple(t if t is None or dt is None or t.dtype == dt else t.to(dt)
                              for t, dt in zip(grads[:5], ctx.arg_dtypes)) + tuple(grads[5:])
        if create_graph:  # backward(create_graph=True): these gradients are not differentiable
            deps = (grad,) + tuple(t for t in ctx.saved_tensors if t is not None)
            grads = tuple(None if t is None else _NotTwice.apply(t, *deps) for t in grads)
        return tuple(grads) + (None,)  # (nothing for the autocast flag)


class _NotTwice(torch.autograd.Function):
    """Identity on its first argument whose backward refuses: marks a gradient deft computed
    under create_graph=True as depending on what it does depend on (the incoming gradient and
    the forward's tensors, ``deps``), so that differentiating it again fails loudly instead of
    passing it as a constant."""

    @staticmethod
    def forward(ctx, t, *deps):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError("deform_conv2d: deft's gradients are not differentiable themselves "
                           "(double backward through deft is not supported)")


def _autocast_cast(t: Optional[Tensor]) -> Optional[Tensor]:
    """The autocast rule of deft::deform_conv2d, for the eager path: floating-point tensors
    other than float64 in _AUTOCAST_DTYPE."""
    if t is None or t.dtype in (_AUTOCAST_DTYPE, torch.float64):
        return t
    return t.to(_AUTOCAST_DTYPE)


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  stride: Union[int, Tuple[int, int]] = (1, 1),
                  padding: Union[int, Tuple[int, int]] = (0, 0),
                  dilation: Union[int, Tuple[int, int]] = (1, 1),
                  mask: Optional[Tensor] = None) -> Tensor:
    """Deformable convolution v1 / v2 (with ``mask``), as torchvision.ops.deform_conv2d.

    CUDA tensors of one dtype (float32, float16, bfloat16, float64) on one device. A
    channels-last ``input`` runs deft's NHWC kernels and gives a channels-last output (and
    channels-last gradients). float32 uses TF32 tensor cores when
    ``torch.backends.cuda.matmul.allow_tf32`` is set, as torchvision's GEMM does.

    Differentiable with respect to input, offset, weight, bias and mask (only the gradients
    autograd needs are computed); bitwise reproducible gradients under
    ``torch.use_deterministic_algorithms(True)``. Under ``torch.autocast("cuda")`` it runs in
    float16, forward and backward.

    Raises TypeError for a non-tensor argument, mixed or unsupported dtypes, ValueError for
    shapes that do not fit together (the message names the tensor), RuntimeError for tensors
    not on one CUDA device.
    """
    tensors = {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    for name, t in tensors.items():
        if t is None:
            if name in ("input", "offset", "weight"):
                raise TypeError(f"deform_conv2d: {name} must be a Tensor, got None")
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"deform_conv2d: {name} must be a Tensor, got {type(t).__name__}")
        if t.device.type != "cuda":
            why = ("" if torch.cuda.is_available() else
                   "; this machine has no usable CUDA device (torch.cuda.is_available() is "
                   "False)")
            raise RuntimeError(f"deform_conv2d: {name} is on {t.device}; deft runs on CUDA "
                               f"devices only (use torchvision.ops.deform_conv2d on the "
                               f"CPU){why}")
        if t.device != input.device:
            raise RuntimeError(f"deform_conv2d: {name} is on {t.device} but input is on "
                               f"{input.device}")
        if not t.is_floating_point():
            raise TypeError(f"deform_conv2d: {name} is {t.dtype}; deft needs floating-point "
                            f"tensors (float32, float16, bfloat16, float64)")
        if t.dtype != input.dtype and not _autocast_on():
            raise TypeError(f"deform_conv2d: {name} is {t.dtype} but input is {input.dtype}; "
                            f"all tensors must have one dtype")
    if input.dtype not in _DTYPES:
        raise TypeError(f"deform_conv2d: dtype {input.dtype} is not supported (float32, "
                        f"float16, bfloat16, float64)")
    stride = list(_pair(stride, "stride"))
    padding = list(_pair(padding, "padding"))
    dilation = list(_pair(dilation, "dilation"))
    if not _eager((input, offset, weight, bias, mask)):
        return torch.ops.deft.deform_conv2d(input, offset, weight, bias, mask, stride, padding,
                                            dilation)
    autocast = _autocast_on()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in
                                       (input, offset, weight, bias, mask)):
        # (under autocast the node casts: one graph node instead of one more per cast)
        return _DeformConv2dFunction.apply(input, offset, weight, bias, mask, stride, padding,
                                           dilation, autocast)
    if autocast:
        input, offset, weight, bias, mask = (_autocast_cast(t) for t in
                                             (input, offset, weight, bias, mask))
    return _forward(input, offset, weight, bias, mask, stride, padding, dilation)
