#!/usr/bin/env python3
"""Per-kernel CUDA times of deft's forward + backward (torch.profiler), per bench case and
dtype: which pass costs what, and the CUDA-event time of the whole call (after a GPU sleep, as
the bench times it), whose excess over the kernels' sum is the gaps between them.
profile_bwd.py [case,...] [--dtypes fp16,fp32] [--layout nchw] [--forward-only]"""
import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import torch  # noqa: E402
import bench  # noqa: E402
from deft_ctypes import DeftLibrary  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("cases", nargs="?", default="")
ap.add_argument("--dtypes", default="fp16,fp32")
ap.add_argument("--layout", default="nchw")
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--forward-only", action="store_true", help="profile the forward call alone")
args = ap.parse_args()
lib = DeftLibrary("build/libdeft.so")
spec = bench.load_shapes(os.path.join(os.path.dirname(__file__), "..", "bench", "shapes.json"))
for case in spec["cases"]:
    if args.cases and case["name"] not in args.cases.split(","):
        continue
    for dtype in args.dtypes.split(","):
        tdt = torch.half if dtype == "fp16" else torch.float
        c = case
        nhwc = args.layout == "nhwc"
        shp = (lambda a, b, h, w: (a, h, w, b)) if nhwc else (lambda a, b, h, w: (a, b, h, w))
        x = torch.rand(shp(c["n"], c["c"], c["h"], c["w"]), device="cuda", dtype=tdt)
        cg, t = c["c"] // c["groups"], c["r"] * c["s"]
        w = (torch.rand((c["k"], c["r"], c["s"], cg) if nhwc else (c["k"], cg, c["r"], c["s"]),
                        device="cuda", dtype=tdt) - 0.5) / 30
        off = (torch.randn(shp(c["n"], 2 * t, c["ho"], c["wo"]), device="cuda") * 2).to(tdt)
        m = torch.rand(shp(c["n"], t, c["ho"], c["wo"]), device="cuda", dtype=tdt)
        out = torch.empty(shp(c["n"], c["k"], c["ho"], c["wo"]), device="cuda", dtype=tdt)
        gout = torch.rand_like(out)
        gx, goff, gm, gw = (torch.empty_like(v) for v in (x, off, m, w))
        kern = lib.compile(bench.deft_desc(case, args.layout, dtype), None, None)

        def step(det=0):
            kern.forward(x, off, m, w, None, out)
            if not args.forward_only:
                kern.backward(x, off, m, w, gout, gx, goff, gm, gw, None, det)

        def event_ms(det):
            times = []
            for _ in range(20):
                torch.cuda._sleep(200000)  # ~100 us of GPU time: the host's enqueue stays out
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                step(det)
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            return sorted(times)[len(times) // 2]

        step(), step(1)
        torch.cuda.synchronize()
        for det in ((0,) if args.forward_only else (0, 1)):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(args.reps):
                    step(det)
                torch.cuda.synchronize()
            tot = defaultdict(float)
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    tot[e.name] += e.device_time / args.reps / 1000.0
            parts = ", ".join(f"{k.replace('deft_deform_conv2d_', '')} {v:.3f}"
                              for k, v in sorted(tot.items(), key=lambda kv: -kv[1]))
            what = "fwd" if args.forward_only else f"det={det}"
            print(f"{case['name']:<14} {dtype:<9} {args.layout} {what} kernels {sum(tot.values()):.3f} ms, "
                  f"events {event_ms(det):.3f} ms: {parts}", flush=True)
