#!/usr/bin/env python3
"""Host time per call of deft's PyTorch op, layer by layer of its stack, against torchvision and
a cuDNN convolution, on a layer small enough that the GPU never limits the loop.

Each row: N calls back to back (no synchronisation in between), wall time / N, and the GPU's
time for one call (CUDA events around calls queued while the GPU was kept busy). Where the host
time is the larger, a loop of such calls is host-bound, and the host time is what one call
costs. A training step of small layers is host-bound, so this
is the cost that decides it (perf notes round 12).

    python3 scripts/host_overhead.py [--calls 2000] [--profile]   (on a GPU machine)

--profile adds cProfile's top functions (by own time) for deft's forward+backward.
"""
import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import deft  # noqa: E402
from deft import ops as dops  # noqa: E402


def timed(fn, calls):
    """(host us, GPU us) per call. Host: wall time of `calls` calls back to back. GPU: 50 calls
    queued behind a sleeping kernel, so that the GPU runs them without waiting for the host."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    queued = 50
    torch.cuda._sleep(200_000_000)  # ~0.1 s at H100/H200 clocks: more than 50 calls take to queue
    start.record()
    for _ in range(queued):
        fn()
    end.record()
    torch.cuda.synchronize()
    return host / calls * 1e6, start.elapsed_time(end) / queued * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--shape", default="2,64,16,16", help="n,c,h,w (k = c, 3x3, pad 1)")
    args = ap.parse_args()
    n, c, h, w = (int(v) for v in args.shape.split(","))
    dev, dt = "cuda", torch.float16
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.rand(n, c, h, w, device=dev, dtype=dt, generator=g) - 0.5
    off = torch.randn(n, 18, h, w, device=dev, dtype=dt, generator=g) * 2
    m = torch.rand(n, 9, h, w, device=dev, dtype=dt, generator=g)
    wt = (torch.rand(c, c, 3, 3, device=dev, dtype=dt, generator=g) - 0.5) / (9 * c) ** 0.5
    b = torch.rand(c, device=dev, dtype=dt, generator=g) - 0.5
    y = torch.empty(n, c, h, w, device=dev, dtype=dt)
    kw = dict(padding=(1, 1), mask=m)
    one = [1, 1]  # stride, padding and dilation
    desc = dops._plan(x, off, wt, b, m, one, one, one)[1]
    kern = dops._kernel(desc, x.device)
    stream = torch.cuda.current_stream().cuda_stream
    ptrs = kern.pointer_args(x, off, m, wt, b, y, stream)

    def train(fn, leaves):
        def step():
            out = fn(*leaves)
            out.backward(gy)
        return step

    gy = torch.rand(n, c, h, w, device=dev, dtype=dt, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (x, off, wt, b, m)]
    lx, loff, lwt, lb, lm = leaves
    rows = [
        ("ctypes: deft_forward, pointers ready", lambda: kern.forward_ptrs(ptrs)),
        ("DeftKernel.forward(tensors)", lambda: kern.forward(x, off, m, wt, b, y, stream)),
        ("deft.ops._forward (checks, plan, launch)", lambda: dops._forward(x, off, wt, b, m, one, one, one)),
        ("torch.ops.deft.deform_conv2d, no grad", lambda: torch.ops.deft.deform_conv2d(x, off, wt, b, m, one, one, one)),
        ("deft.ops.deform_conv2d, no grad", lambda: deft.ops.deform_conv2d(x, off, wt, b, **kw)),
        ("torchvision deform_conv2d, no grad", lambda: torchvision.ops.deform_conv2d(x, off, wt, b, **kw)),
        ("F.conv2d (cuDNN), no grad", lambda: F.conv2d(x, wt, b, padding=1)),
        ("fwd+bwd torch.ops.deft (custom op)", train(lambda a, o, ww, bb, mm: torch.ops.deft.deform_conv2d(a, o, ww, bb, mm, one, one, one), leaves)),
        ("fwd+bwd deft.ops.deform_conv2d", train(lambda a, o, ww, bb, mm: deft.ops.deform_conv2d(a, o, ww, bb, padding=1, mask=mm), leaves)),
        ("fwd+bwd torchvision", train(lambda a, o, ww, bb, mm: torchvision.ops.deform_conv2d(a, o, ww, bb, padding=1, mask=mm), leaves)),
        ("fwd+bwd F.conv2d (cuDNN)", train(lambda a, o, ww, bb, mm: F.conv2d(a, ww, bb, padding=1), leaves)),
    ]
    with torch.no_grad():
        no_grad_rows = [(name, fn) for name, fn in rows if "fwd+bwd" not in name]
        results = [(name, *timed(fn, args.calls)) for name, fn in no_grad_rows]
    for name, fn in rows:
        if "fwd+bwd" in name:
            results.append((name, *timed(fn, args.calls // 4)))
    leaves32 = [t.float().clone().requires_grad_(True) for t in (x, off, wt, b, m)]

    def amp(fn):
        def step():
            with torch.autocast("cuda", dtype=torch.float16):
                out = fn(*leaves32)
            out.float().backward(gy.float())
        return step
    results.append(("fwd+bwd autocast, custom op", *timed(amp(lambda a, o, ww, bb, mm: torch.ops.deft.deform_conv2d(a, o, ww, bb, mm, one, one, one)), args.calls // 4)))
    results.append(("fwd+bwd autocast, deft.ops.deform_conv2d", *timed(amp(lambda a, o, ww, bb, mm: deft.ops.deform_conv2d(a, o, ww, bb, padding=1, mask=mm)), args.calls // 4)))
    results.append(("fwd+bwd autocast, torchvision", *timed(amp(lambda a, o, ww, bb, mm: torchvision.ops.deform_conv2d(a, o, ww, bb, padding=1, mask=mm)), args.calls // 4)))
    # As in a training step under autocast: the activations (input, offset, mask) are already
    # float16, the weight is a float32 parameter, no bias (a ResNet's convolutions).
    mixed = [x.clone().requires_grad_(True), off.clone().requires_grad_(True),
             wt.float().clone().requires_grad_(True), None, m.clone().requires_grad_(True)]

    def amp_mixed(fn):
        def step():
            with torch.autocast("cuda", dtype=torch.float16):
                out = fn(*mixed)
            out.backward(gy)
        return step
    results.append(("fwd+bwd autocast, fp16 act + fp32 weight, deft", *timed(amp_mixed(lambda a, o, ww, bb, mm: deft.ops.deform_conv2d(a, o, ww, bb, padding=1, mask=mm)), args.calls // 4)))
    results.append(("fwd+bwd autocast, fp16 act + fp32 weight, tv", *timed(amp_mixed(lambda a, o, ww, bb, mm: torchvision.ops.deform_conv2d(a, o, ww, bb, padding=1, mask=mm)), args.calls // 4)))
    results.append(("fwd+bwd autocast, fp16 act + fp32 weight, cuDNN", *timed(amp_mixed(lambda a, o, ww, bb, mm: F.conv2d(a, ww, bb, padding=1)), args.calls // 4)))

    print(f"host time per call, fp16 n={n} c={c} {h}x{w} 3x3 (k={c}), {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")
    print(f"{'call':50s} {'host us':>9s} {'GPU us':>8s}  bound by")
    for name, host, gpu in results:
        print(f"{name:50s} {host:9.1f} {gpu:8.1f}  {'host' if host > 1.1 * gpu else 'GPU'}")

    if args.profile:
        step = train(lambda a, o, ww, bb, mm: deft.ops.deform_conv2d(a, o, ww, bb, padding=1, mask=mm), leaves)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(500):
            step()
        pr.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
        print("\ncProfile, 500 x fwd+bwd deft.ops.deform_conv2d (own time):")
        print("\n".join(line for line in s.getvalue().splitlines() if line.strip())[:6000])


if __name__ == "__main__":
    main()
