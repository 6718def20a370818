"""Thin ctypes binding of deft's C API (include/deft/deft_c.h), shared by the package and the benchmark.

No torch import here: pointers are plain integers (or any object with a ``data_ptr()`` method,
e.g. a torch tensor), the stream is a ``cudaStream_t`` as an integer (``0``/``None`` = the legacy
default stream). Every C call that returns -1 raises ``RuntimeError(deft_last_error())``.

    lib = DeftLibrary("build/libdeft.so")
    kern = lib.compile("deform_conv2d n=8 c=64 h=64 w=64 k=64 r=3 s=3 pad=1 groups=1 "
                       "offset_groups=1 mask=1 dtype=f16 layout=nchw")
    kern.forward(x, offset, mask, weight, None, out, torch.cuda.current_stream().cuda_stream)
    kern.release()
"""
from __future__ import annotations

import ctypes
import os
from typing import Any, Optional

_c_kernel_p = ctypes.c_void_p  # opaque deft_kernel*


def _ptr(x: Any) -> Optional[int]:
    """A device pointer as an int (None for NULL). Accepts ints, None and objects with
    data_ptr() (torch tensors)."""
    if x is None:
        return None
    if hasattr(x, "data_ptr"):
        x = x.data_ptr()
    x = int(x)
    return x or None


class DeftLibrary:
    """The loaded libdeft.so with typed entry points."""

    def __init__(self, path: str):
        path = os.path.abspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"deft library not found: {path}")
        self.path = path
        self._lib = lib = ctypes.CDLL(path)

        def fn(name, restype, *argtypes):
            f = getattr(lib, name)
            f.restype = restype
            f.argtypes = list(argtypes)
            return f

        self._version = fn("deft_version", ctypes.c_char_p)
        self._last_error = fn("deft_last_error", ctypes.c_char_p)
        self._gpu_available = fn("deft_gpu_available", ctypes.c_int)
        self._canonical = fn("deft_canonical", ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
                             ctypes.c_int64)
        self._compile = fn("deft_compile", ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
                           ctypes.c_char_p, ctypes.POINTER(_c_kernel_p))
        self._forward = fn("deft_forward", ctypes.c_int, _c_kernel_p, ctypes.c_void_p,
                           ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                           ctypes.c_void_p, ctypes.c_void_p)
        # deft_backward is newer than the rest: a library built before it still loads (forward
        # works) and backward() says to rebuild.
        self._compile_ex = None
        if hasattr(lib, "deft_compile_ex"):
            self._compile_ex = fn("deft_compile_ex", ctypes.c_int, ctypes.c_char_p,
                                  ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                  ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(_c_kernel_p))
        self._backward = None
        if hasattr(lib, "deft_backward"):
            self._backward = fn("deft_backward", ctypes.c_int, _c_kernel_p, ctypes.c_void_p,
                                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_int, ctypes.c_void_p)
        self._kernel_variant = fn("deft_kernel_variant", ctypes.c_char_p, _c_kernel_p)
        self._kernel_from_cache = fn("deft_kernel_from_cache", ctypes.c_int, _c_kernel_p)
        self._kernel_release = fn("deft_kernel_release", None, _c_kernel_p)
        self._nvrtc_compiles = fn("deft_nvrtc_compiles", ctypes.c_int64)
        self._cache_hits = fn("deft_cache_hits", ctypes.c_int64)
        self._workspace_bytes = self._release_workspace = None
        if hasattr(lib, "deft_release_workspace"):
            self._workspace_bytes = fn("deft_workspace_bytes", ctypes.c_int,
                                       ctypes.POINTER(ctypes.c_uint64),
                                       ctypes.POINTER(ctypes.c_uint64))
            self._release_workspace = fn("deft_release_workspace", ctypes.c_int)

    # --- helpers -------------------------------------------------------------------------------
    def last_error(self) -> str:
        msg = self._last_error()
        return msg.decode("utf-8", "replace") if msg else ""

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(self.last_error() or f"{what} failed (no message)")

    # --- API -----------------------------------------------------------------------------------
    def version(self) -> str:
        v = self._version()
        return v.decode() if v else ""

    def gpu_available(self) -> bool:
        return bool(self._gpu_available())

    def workspace_bytes(self) -> "tuple[int, int]":
        """(reserved, used): bytes deft's workspace pools hold from the driver, and of those
        in use by calls not yet completed."""
        if self._workspace_bytes is None:
            raise RuntimeError(f"{self.path} predates the workspace pool: rebuild libdeft")
        reserved, used = ctypes.c_uint64(), ctypes.c_uint64()
        self._check(self._workspace_bytes(ctypes.byref(reserved), ctypes.byref(used)),
                    "deft_workspace_bytes")
        return reserved.value, used.value

    def release_workspace(self) -> None:
        """Returns the workspace pools' unused memory to the driver."""
        if self._release_workspace is None:
            raise RuntimeError(f"{self.path} predates the workspace pool: rebuild libdeft")
        self._check(self._release_workspace(), "deft_release_workspace")

    def canonical(self, desc: str) -> str:
        """deft's canonical text form of a description; raises on an invalid one."""
        buf = ctypes.create_string_buffer(4096)
        self._check(self._canonical(desc.encode(), buf, len(buf)), "deft_canonical")
        return buf.value.decode()

    def compile(self, desc: str, variant: Optional[str] = None,
                cache_path: Optional[str] = None) -> "DeftKernel":
        """Compile (or load from the cache) the kernel for ``desc`` in the current CUDA context.
        variant None: tuned/heuristic choice. cache_path None: default database; "": none."""
        out = _c_kernel_p()
        rc = self._compile(desc.encode(), variant.encode() if variant else None,
                           None if cache_path is None else cache_path.encode(),
                           ctypes.byref(out))
        self._check(rc, "deft_compile")
        if not out.value:
            raise RuntimeError("deft_compile returned a null kernel")
        return DeftKernel(self, out.value, desc)

    def compile_ex(self, desc: str, variant: Optional[str] = None,
                   cache_path: Optional[str] = None, backward_data_variant: Optional[str] = None,
                   backward_weight_variant: Optional[str] = None,
                   deterministic: bool = False) -> "DeftKernel":
        """compile() that also fixes the backward passes' variants (None: tuned/heuristic) and
        the kernel's default determinism."""
        if self._compile_ex is None:
            raise RuntimeError(f"deft: {self.path} has no deft_compile_ex: rebuild libdeft")
        enc = lambda v: v.encode() if v else None  # noqa: E731
        out = _c_kernel_p()
        rc = self._compile_ex(desc.encode(), enc(variant),
                              None if cache_path is None else cache_path.encode(),
                              enc(backward_data_variant), enc(backward_weight_variant),
                              1 if deterministic else 0, ctypes.byref(out))
        self._check(rc, "deft_compile_ex")
        if not out.value:
            raise RuntimeError("deft_compile_ex returned a null kernel")
        return DeftKernel(self, out.value, desc)

    def nvrtc_compiles(self) -> int:
        return int(self._nvrtc_compiles())

    def cache_hits(self) -> int:
        return int(self._cache_hits())


class DeftKernel:
    """A compiled deft kernel. Call release() (or use as a context manager) when done."""

    def __init__(self, lib: DeftLibrary, handle: int, desc: str):
        self._lib = lib
        self._handle: Optional[int] = handle
        self.desc = desc

    @property
    def handle(self) -> int:
        if not self._handle:
            raise RuntimeError("deft kernel already released")
        return self._handle

    @property
    def variant(self) -> str:
        v = self._lib._kernel_variant(self.handle)
        return v.decode() if v else ""

    @property
    def from_cache(self) -> bool:
        return bool(self._lib._kernel_from_cache(self.handle))

    def forward(self, input, offset, mask, weight, bias, output, stream=None) -> None:
        """Launch forward on ``stream`` (cudaStream_t as int; None/0 = legacy default stream).
        Tensor arguments: ints, None, or objects with data_ptr()."""
        rc = self._lib._forward(self.handle, _ptr(input), _ptr(offset), _ptr(mask),
                                _ptr(weight), _ptr(bias), _ptr(output),
                                int(stream) if stream else None)
        self._lib._check(rc, "deft_forward")

    def backward(self, input, offset, mask, weight, grad_output, grad_input=None,
                 grad_offset=None, grad_mask=None, grad_weight=None, grad_bias=None,
                 deterministic: int = -1, stream=None) -> None:
        """Launch the gradients of forward on ``stream``. Each grad_* may be None to skip it;
        the others are written whole, in the layout and dtype of their tensors (grad_bias:
        [k]). deterministic: 1 bitwise reproducible, 0 fast, -1 as compiled."""
        fn = self._lib._backward
        if fn is None:
            raise RuntimeError(f"deft: {self._lib.path} has no deft_backward (built before the "
                               f"backward passes): rebuild libdeft")
        rc = fn(self.handle, _ptr(input), _ptr(offset), _ptr(mask), _ptr(weight),
                _ptr(grad_output), _ptr(grad_input), _ptr(grad_offset), _ptr(grad_mask),
                _ptr(grad_weight), _ptr(grad_bias), int(deterministic),
                int(stream) if stream else None)
        self._lib._check(rc, "deft_backward")

    def forward_ptrs(self, ptrs: tuple) -> None:
        """forward() with pre-converted arguments (see pointer_args): the lowest-overhead call,
        for timing loops."""
        rc = self._lib._forward(self.handle, *ptrs)
        self._lib._check(rc, "deft_forward")

    @staticmethod
    def pointer_args(input, offset, mask, weight, bias, output, stream=None) -> tuple:
        return (_ptr(input), _ptr(offset), _ptr(mask), _ptr(weight), _ptr(bias), _ptr(output),
                int(stream) if stream else None)

    def release(self) -> None:
        if self._handle:
            self._lib._kernel_release(self._handle)
            self._handle = None

    def __enter__(self) -> "DeftKernel":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass
