#!/usr/bin/env python3
"""Times the depthwise grad-input pass (grad input, offset and mask) of the float-atomics
default, gin=gather and gin=local at a few radii, for offsets of several spreads (medians of CUDA
events over 50 calls after 5 warm-up calls): time_gin_local.py [--kernels] [CASE ...] (cases of
bench/shapes.json or bench/dw_decision_shapes.json; default dw512 dw1024_16; --sigmas=0.5,2,8 and
--layouts=nchw,nhwc by default). --kernels: also
each variant's per-kernel times (torch.profiler, mean of 10 calls), one line per cell; run it with
DEFT_PDL=0, or a kernel's time includes its wait for the one before it. --flush: the L2 flushed
(a 256 MB buffer written) before every timed and profiled call, as `deft tune` times candidates;
the flush's own kernel is left out of the per-kernel times. --det: the deterministic mode's
forms instead (every variant with det=1: "atomics" is then the default, the f32 gather over
sorted lists, "gather" the fixed-point gather, gin=local the fixed-point local gather).
--radii=1,2,4,6 (default): gin=local's radii; --radii= none. --dtype=fp16 (default) or fp32."""
from collections import defaultdict
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import torch  # noqa: E402
import bench  # noqa: E402
from deft_ctypes import DeftLibrary  # noqa: E402

here = os.path.join(os.path.dirname(__file__), "..", "bench")
cases = {}
for f in ("shapes.json", "dw_decision_shapes.json"):
    for c in bench.load_shapes(os.path.join(here, f))["cases"]:
        cases.setdefault(c["name"], c)
kernels = "--kernels" in sys.argv[1:]
flush = "--flush" in sys.argv[1:]
det = "--det" in sys.argv[1:]
opts = {"--sigmas": "0.5,2,8", "--layouts": "nchw,nhwc", "--radii": "1,2,4,6", "--dtype": "fp16"}
names = []
for a in sys.argv[1:]:
    if a.split("=")[0] in opts:
        opts[a.split("=")[0]] = a.split("=", 1)[1]
    elif a not in ("--kernels", "--flush", "--det"):
        names.append(a)
sigmas = [float(x) for x in opts["--sigmas"].split(",")]
layouts = opts["--layouts"].split(",")
radii = [int(x) for x in opts["--radii"].split(",") if x]
dname = opts["--dtype"]
dtype = {"fp16": torch.half, "fp32": torch.float}[dname]
l2 = torch.empty(256 << 20, dtype=torch.uint8, device="cuda") if flush else None


def flush_l2():
    if l2 is not None:
        l2.zero_()
lib = DeftLibrary("build/libdeft.so")
# nchw layers read the transposed input (and grad_out), as their default does
base = "algo=depthwise tm=8 tn=1 tk=1 threads=256 vec=1 staging=gather halo={} transpose={}"


def variants(layout):
    t = 1 if layout == "nchw" else 0
    d = " det=1" if det else ""
    return [("atomics", base.format(0, t) + d), ("gather", base.format(0, t) + " gin=gather" + d)] + \
        [(f"local R={r}", base.format(r, t) + " gin=local" + d) for r in radii]
print("| case | layout | σ | " + " | ".join(n for n, _ in variants("nhwc")) + " |")
breakdown = []
for name in names or ["dw512", "dw1024_16"]:
    c = cases[name]
    for layout in layouts:
        for sigma in sigmas:
            x, w, off, m, gout = bench.backward_inputs(c, dtype, sigma=sigma)
            if layout == "nhwc":
                x, off, m, gout = (t.permute(0, 2, 3, 1).contiguous() for t in (x, off, m, gout))
                w = w.permute(0, 2, 3, 1).contiguous()
            desc = bench.deft_desc(c, layout, dname)
            row, ref = [], None
            for vname, v in variants(layout):
                try:
                    k = lib.compile_ex(desc, None, None, v, None, deterministic=det)
                except Exception as e:  # noqa: BLE001
                    row.append("n/a")
                    print(f"  {name} {layout} {vname}: {e}", file=sys.stderr)
                    continue
                gx, goff, gm = (torch.full_like(t, float("nan")) for t in (x, off, m))
                call = lambda: k.backward(x, off, m, w, gout, gx, goff, gm, None, None, 1 if det else 0)  # noqa
                for _ in range(5):
                    call()
                ts = []
                for _ in range(50):
                    flush_l2()
                    a, b = torch.cuda.Event(True), torch.cuda.Event(True)
                    a.record(); call(); b.record(); b.synchronize()
                    ts.append(a.elapsed_time(b) * 1000)
                if ref is None:
                    ref = gx.float().clone()
                err = ((gx.float() - ref).abs().max() / ref.abs().max()).item()
                bad = "" if err < 1e-2 and torch.isfinite(gx).all() else f" (DIFF {err:.2e})"
                row.append(f"{statistics.median(ts):.1f}{bad}")
                if kernels:
                    with torch.profiler.profile(
                            activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        for _ in range(10):
                            flush_l2()
                            call()
                        torch.cuda.synchronize()
                    tot = defaultdict(float)
                    for e in prof.events():
                        if e.device_type == torch.autograd.DeviceType.CUDA and \
                                not (flush and "FillFunctor" in e.name):
                            tot[e.name] += e.device_time / 10
                    breakdown.append(f"{name} {layout} σ={sigma} {vname}: " + ", ".join(
                        f"{k} {v:.1f}" for k, v in sorted(tot.items(), key=lambda kv: -kv[1])))
            print(f"| {name} | {layout} | {sigma} | " + " | ".join(row) + " |", flush=True)
for line in breakdown:
    print(line)
