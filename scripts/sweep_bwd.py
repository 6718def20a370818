#!/usr/bin/env python3
"""Times backward-pass variants (grad input/offset/mask pass and grad weight pass separately)
on bench cases, NCHW (or --layout nhwc), and checks each variant's gradients against the
heuristic default's.
sweep_bwd.py [case,...] [--dtype fp16] [--layout nchw|nhwc]"""
import argparse
import itertools
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import torch  # noqa: E402
import bench  # noqa: E402
from deft_ctypes import DeftLibrary  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("cases", nargs="?", default="resnet_res4,maskrcnn_res4,dense512")
ap.add_argument("--dtype", default="fp16")
ap.add_argument("--shapes", default=os.path.join(os.path.dirname(__file__), "..", "bench", "shapes.json"),
                help="the cases' file (bench/shapes.json; bench/train_layers.json: the training example's layers)")
ap.add_argument("--family", default="tc", choices=["tc", "wgmma", "ws", "batch", "data", "simt", "dw"],
                help="tc: the WMMA tiles of both passes; wgmma, ws: grad-weight variants only, "
                     "the wgmma tiles or the warp-specialised ones (producers=P), with the "
                     "WMMA kernel timed for comparison; data: backward_data variants only, the "
                     "wgmma tiles against the WMMA kernel, each also in deterministic mode; "
                     "simt: the FMA grad-input kernel's tiles, scalar and vector epilogue (vec=4), "
                     "for --dtype fp32; dw: the depthwise grad input, float atomics against gin=gather and "
                     "staging=window (tiles of 8 and 16 pixels, halos 0 to 6)")
ap.add_argument("--layout", default="nchw", choices=["nchw", "nhwc"],
                help="the layers' layout: nhwc passes channels-last tensors (krsc weight) and "
                     "drops the variants' transpose=1")
ap.add_argument("--sigmas", default="2", help="offset spreads (px), comma-separated: each case "
                "is swept once per sigma")
args = ap.parse_args()
lib = DeftLibrary("build/libdeft.so")
spec = bench.load_shapes(args.shapes)
tdt = torch.half if args.dtype == "fp16" else torch.float


def timed(fn, iters=15):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def rel(a, b):
    return float((a.double() - b.double()).norm() / max(b.double().norm().item(), 1e-30))


V = "algo=gemm_tc tm={} tn={} tk={} threads=256 transpose=1"
data_vs = [V.format(*p) for p in itertools.product((64, 128), (32, 64), (32, 64))]
weight_vs = [V.format(*p) for p in itertools.product((64, 128), (32, 64), (32, 64, 128))]
if args.family == "wgmma":
    data_vs = []
    weight_vs = ["algo=gemm_tc tm=128 tn=64 tk=64 threads=256 transpose=1"] + [
        f"algo=gemm_wgmma tm={tm} tn={tn} tk=64 threads={2 * tm} transpose=1"
        for tm in (64, 128, 256) for tn in (64, 128)]
if args.family == "ws":
    data_vs = []
    # tf32: the WMMA kernel's f32 slices (32 pixels) and 32-pixel wgmma chunks (128 bytes of
    # k), no register form (the plan refuses it in tf32)
    tf32 = args.dtype == "fp32_tf32"
    kp = 32 if tf32 else 64
    weight_vs = [f"algo=gemm_tc tm=128 tn=64 tk={kp} threads=256 transpose=1"] + (
        [] if tf32 else ["algo=gemm_wgmma tm=256 tn=128 tk=64 threads=512 transpose=1"]) + [
        f"algo=gemm_wgmma tm={tm} tn={tn} tk={kp} threads={2 * tm + 128 * p} transpose=1 producers={p}"
        for tm, tn, p in ((128, 128, 1), (128, 128, 2), (64, 128, 1), (64, 128, 2),
                          (128, 64, 1), (256, 64, 1), (256, 64, 2), (256, 128, 1))]
if args.family == "batch":
    # the warp-specialised grad weight's producer batch (items a lane keeps in flight, four
    # corner loads each): the generator's rule (no batch field) against batch=4 and 8
    data_vs = []
    tf32 = args.dtype == "fp32_tf32"
    kp = 32 if tf32 else 64
    weight_vs = [
        f"algo=gemm_wgmma tm={tm} tn={tn} tk={kp} threads={2 * tm + 128 * p} transpose=1 producers={p}"
        + (f" batch={b}" if b else "")
        for tm, tn, p in ((256, 128, 1), (256, 64, 2), (128, 128, 2), (128, 64, 1))
        for b in ((0, 4, 8) if tn == 128 else (0, 4))]
if args.family == "data":
    weight_vs = []
    # tf32: 32-channel weight slices (128 bytes of k), and the WMMA default's 32-pixel tile
    tf32 = args.dtype == "fp32_tf32"
    data_vs = [f"algo=gemm_tc tm={32 if tf32 else 64} tn=64 tk=32 threads=256 transpose=1"] + [
        f"algo=gemm_wgmma tm={tm} tn={tn} tk={32 if tf32 else 64} threads={128 * wgs} transpose=1"
        + (f" stages={st}" if st else "")
        for tm, tn, wgs, st in ((64, 64, 1, 0), (64, 64, 2, 0), (64, 64, 2, 3), (64, 64, 4, 3),
                                (64, 128, 1, 3), (64, 128, 2, 3), (128, 64, 2, 0),
                                (128, 64, 4, 3), (128, 128, 2, 3))]
if args.family == "simt":
    weight_vs = []
    data_vs = [f"algo=gemm_simt tm=64 tn={tn} tk={tk} threads=256 transpose=1 vec={vec}"
               for tn, tk, vec in itertools.product((32, 64), (16, 32), (1, 4))]
if args.family == "dw":  # the depthwise grad input: float atomics against the f32 gather
    weight_vs = []
    data_vs = ["algo=depthwise tm=8 tn=1 tk=1 threads=256 transpose=1",
               "algo=depthwise tm=8 tn=1 tk=1 threads=256 transpose=1 gin=gather"] + [
        f"algo=depthwise tm={tm} tn=1 tk=1 threads={32 * tm} transpose=1 staging=window halo={h}"
        for tm in (8, 16) for h in (0, 1, 2, 4, 6)]
for case, sigma in itertools.product(spec["cases"], [float(s) for s in args.sigmas.split(",")]):
    if case["name"] not in args.cases.split(","):
        continue
    c = case
    x, w, off, m, gout = bench.backward_inputs(c, tdt, sigma=sigma)
    if args.layout == "nhwc":  # every tensor channels-last, the weight [k][r][s][c/groups]
        x, w, off, m, gout = (t.permute(0, 2, 3, 1).contiguous() for t in (x, w, off, m, gout))
    desc = bench.deft_desc(case, args.layout, args.dtype)
    ref = lib.compile(desc)
    bufs = [torch.empty_like(v) for v in (x, off, m, w)]
    ref.backward(x, off, m, w, gout, *bufs, None, 0)
    torch.cuda.synchronize()
    for kind, vs in (("data", data_vs), ("weight", weight_vs)):
        for v in vs:
            if args.layout == "nhwc":
                v = v.replace(" transpose=1", "")
            try:
                k = lib.compile_ex(desc, None, None, v if kind == "data" else None,
                                   v if kind == "weight" else None)
                out = [torch.empty_like(b) for b in bufs]
                if kind == "data":
                    fn = lambda: k.backward(x, off, m, w, gout, out[0], out[1], out[2], None, None, 0)  # noqa
                    idx = (0, 1, 2)
                else:
                    fn = lambda: k.backward(x, off, m, w, gout, None, None, None, out[3], None, 0)  # noqa
                    idx = (3,)
                ms = timed(fn)
                err = max(rel(out[i], bufs[i]) for i in idx)
                det = ""
                if args.family in ("data", "simt", "dw"):  # the same variant in deterministic mode
                    try:
                        dfn = lambda: k.backward(x, off, m, w, gout, out[0], out[1], out[2], None, None, 1)  # noqa
                        dms = timed(dfn)
                        derr = max(rel(out[i], bufs[i]) for i in idx)
                        det = f"  det {dms:8.3f} ms ({dms / ms:4.2f}x) err {derr:.1e}"
                    except Exception as e:  # noqa: BLE001 (e.g. refused: 128-pixel tiles)
                        det = f"  det refused: {str(e)[:60]}"
                print(f"{c['name']:<14} s={sigma:<3g} {kind:<6} {ms:8.3f} ms  err {err:.1e}{det}  {v}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{c['name']:<14} s={sigma:<3g} {kind:<6}  invalid: {str(e)[:100]}  {v}", flush=True)
