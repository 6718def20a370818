#!/usr/bin/env python3
"""Times several deft variants of a few layers on the GPU (for docs/perf-notes.md).

python3 scripts/sweep.py --lib build/libdeft.so [--cases deft_64,dense512] [--dtypes fp16]
Each line: case, layout, dtype, variant, median us per call (over 20-call batches), the ratio
to cuDNN, and the relative error against the default variant's output.
"""
import argparse, json, os, sys
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import torch
from deft_ctypes import DeftLibrary

VARIANTS = {
    "gemm": [
        "algo=gemm_tc tm=64 tn=64 tk=32 threads=256 transpose={t}",
        "algo=gemm_tc tm=128 tn=64 tk=32 threads=256 transpose={t}",
        "algo=gemm_tc tm=64 tn=128 tk=32 threads=256 transpose={t}",
        "algo=gemm_tc tm=128 tn=128 tk=32 threads=256 transpose={t}",
        "algo=gemm_tc tm=128 tn=64 tk=64 threads=256 transpose={t}",
        "algo=gemm_tc tm=64 tn=64 tk=64 threads=128 transpose={t}",
        "algo=gemm_tc tm=128 tn=128 tk=32 threads=512 transpose={t}",
    ],
    # Hopper only (sm_90); the first line is the old default for comparison.
    "wgmma": [
        "algo=gemm_tc tm=64 tn=128 tk=32 threads=256 transpose={t}",
        "algo=gemm_wgmma tm=128 tn=256 tk={tk} threads=256 transpose={t}",
        "algo=gemm_wgmma tm=128 tn=128 tk={tk} threads=256 transpose={t}",
        "algo=gemm_wgmma tm=128 tn=64 tk={tk} threads=256 transpose={t}",
        "algo=gemm_wgmma tm=64 tn=256 tk={tk} threads=128 transpose={t}",
        "algo=gemm_wgmma tm=64 tn=128 tk={tk} threads=128 transpose={t}",
        "algo=gemm_wgmma tm=64 tn=64 tk={tk} threads=128 transpose={t}",
        "algo=gemm_wgmma tm=64 tn=256 tk={tk} threads=128 transpose={t} stages=3",
        "algo=gemm_wgmma tm=64 tn=256 tk={tk} threads=128 transpose={t} stages=2",
        "algo=gemm_wgmma tm=64 tn=128 tk={tk} threads=128 transpose={t} stages=2",
        "algo=gemm_wgmma tm=128 tn=64 tk={tk} threads=256 transpose={t} stages=2",
    ],
    # the warp-specialised wgmma kernel (producer warpgroups sample A into shared memory); the
    # first line is the register-A kernel's usual tile for comparison
    "ws": [
        "algo=gemm_wgmma tm=64 tn=256 tk={tk} threads=128 transpose={t}",
        "algo=gemm_wgmma tm=64 tn=256 tk={tk} threads=256 transpose={t} producers=1",
        "algo=gemm_wgmma tm=64 tn=256 tk={tk} threads=384 transpose={t} producers=2",
        "algo=gemm_wgmma tm=64 tn=512 tk={tk} threads=384 transpose={t} producers=1",
        "algo=gemm_wgmma tm=128 tn=256 tk={tk} threads=384 transpose={t} producers=1",
        "algo=gemm_wgmma tm=64 tn=128 tk={tk} threads=256 transpose={t} producers=1",
        "algo=gemm_wgmma tm=64 tn=128 tk={tk} threads=384 transpose={t} producers=2",
        "algo=gemm_wgmma tm=128 tn=128 tk={tk} threads=512 transpose={t} producers=2",
        "algo=gemm_wgmma tm=128 tn=128 tk={tk} threads=384 transpose={t} producers=1",
        "algo=gemm_wgmma tm=64 tn=64 tk={tk} threads=256 transpose={t} producers=1",
        "algo=gemm_wgmma tm=128 tn=64 tk={tk} threads=384 transpose={t} producers=1",
    ],
    # the wgmma kernel with the block's input window in shared memory (staging=window, halo r)
    "window": [
        "algo=gemm_wgmma tm=64 tn=256 tk={tk} threads=128 transpose={t}",
        "algo=gemm_wgmma tm=64 tn=128 tk={tk} threads=128 transpose={t}",
        "algo=gemm_wgmma tm=128 tn=64 tk={tk} threads=256 transpose={t}",
        "algo=gemm_wgmma tm=64 tn=256 tk={tk} threads=128 transpose={t} staging=window halo=1",
        "algo=gemm_wgmma tm=64 tn=128 tk={tk} threads=128 transpose={t} staging=window halo=0",
        "algo=gemm_wgmma tm=64 tn=128 tk={tk} threads=128 transpose={t} staging=window halo=2",
        "algo=gemm_wgmma tm=64 tn=128 tk={tk} threads=128 transpose={t} staging=window halo=4",
        "algo=gemm_wgmma tm=128 tn=64 tk={tk} threads=256 transpose={t} staging=window halo=1",
        "algo=gemm_wgmma tm=128 tn=64 tk={tk} threads=256 transpose={t} staging=window halo=3",
    ],
    "simt": [
        "algo=gemm_simt tm=64 tn=64 tk=16 threads=256 transpose={t}",
        "algo=gemm_simt tm=128 tn=64 tk=16 threads=256 transpose={t}",
        "algo=gemm_simt tm=64 tn=128 tk=16 threads=256 transpose={t}",
        "algo=gemm_simt tm=128 tn=128 tk=8 threads=256 transpose={t}",
        "algo=gemm_simt tm=128 tn=128 tk=16 threads=256 transpose={t}",
        "algo=gemm_simt tm=128 tn=64 tk=8 threads=128 transpose={t}",
        "algo=gemm_simt tm=64 tn=64 tk=16 threads=128 transpose={t}",
        "algo=gemm_simt tm=128 tn=128 tk=8 threads=512 transpose={t}",
    ],
    "dw": [
        "algo=depthwise tm=32 tn=64 tk=1 threads=256 vec=8",
        "algo=depthwise tm=64 tn=32 tk=1 threads=256 vec=8",
        "algo=depthwise tm=64 tn=16 tk=1 threads=256 vec=4",
        "algo=depthwise tm=32 tn=32 tk=1 threads=256 vec=4",
        "algo=depthwise tm=256 tn=4 tk=1 threads=256 vec=4",
        "algo=depthwise tm=128 tn=4 tk=1 threads=128 vec=4",
        "algo=depthwise tm=256 tn=8 tk=1 threads=256 vec=8",
    ],
}


def case_geometry(c):
    """n, c, k, h, w, r, s, stride, pad, groups, offset_groups, ho, wo of a bench/shapes.json case."""
    n, ci, k, h, w = c["n"], c["c"], c["k"], c["h"], c["w"]
    r, s_, st, pad = c.get("r", 3), c.get("s", 3), c.get("stride", 1), c.get("pad", 1)
    g, og = c.get("groups", 1), c.get("offset_groups", 1)
    ho = (h + 2 * pad - (r - 1) - 1) // st + 1
    wo = (w + 2 * pad - (s_ - 1) - 1) // st + 1
    return n, ci, k, h, w, r, s_, st, pad, g, og, ho, wo


def case_desc(c, dt, layout):
    """deft's description of a case in dtype dt (fp16, fp32_tf32, fp32) and layout."""
    n, ci, k, h, w, r, s_, st, pad, g, og, _, _ = case_geometry(c)
    return (f"deform_conv2d n={n} c={ci} h={h} w={w} k={k} r={r} s={s_} stride={st} "
            f"pad={pad} groups={g} offset_groups={og} mask=1 "
            f"dtype={'f16' if dt == 'fp16' else 'f32'}"
            f"{' math=tf32' if dt == 'fp32_tf32' else ''} layout={layout}")


def time_us(fn, reps=15, batch=20):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        s.record()
        for _ in range(batch):
            fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) * 1000 / batch)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default="build/libdeft.so")
    ap.add_argument("--shapes", default="bench/shapes.json")
    ap.add_argument("--cases", default="deft_64,resnet_res4,dense512,dw512")
    ap.add_argument("--dtypes", default="fp16,fp32_tf32")
    ap.add_argument("--layouts", default="nchw,nhwc")
    ap.add_argument("--family", default="", help="variant family for the dense cases "
                    "(gemm, wgmma, ws, window, simt); default: gemm, simt for strict fp32")
    ap.add_argument("--sigmas", default="2", help="offset standard deviations (px), comma-separated")
    a = ap.parse_args()
    lib = DeftLibrary(a.lib)
    spec = json.load(open(a.shapes))
    cases = {c["name"]: c for c in spec["cases"]}
    torch.manual_seed(0)
    dev = "cuda"
    for name in a.cases.split(","):
        c = cases[name]
        n, ci, k, h, w, r, s_, st, pad, g, og, ho, wo = case_geometry(c)
        for dt in a.dtypes.split(","):
            tdt = torch.half if dt == "fp16" else torch.float32
            torch.backends.cudnn.allow_tf32 = dt == "fp32_tf32"
            x = torch.rand(n, ci, h, w, device=dev, dtype=tdt) * 2 - 1
            wt = (torch.rand(k, ci // g, r, s_, device=dev, dtype=tdt) * 2 - 1) / (ci // g * r * s_) ** 0.5
            msk = torch.rand(n, og * r * s_, ho, wo, device=dev, dtype=tdt)
            for sigma in (float(x) for x in a.sigmas.split(",")):
                off = (torch.randn(n, 2 * og * r * s_, ho, wo, device=dev) * sigma).to(tdt)
                for layout in a.layouts.split(","):
                    if layout == "nhwc":
                        X, Wt, O, M = [t.permute(0, 2, 3, 1).contiguous() for t in (x, wt, off, msk)]
                        xc = x.to(memory_format=torch.channels_last)
                        wc = wt.to(memory_format=torch.channels_last)
                        out = torch.empty(n, ho, wo, k, device=dev, dtype=tdt)
                    else:
                        X, Wt, O, M = x, wt, off, msk
                        xc, wc = x, wt
                        out = torch.empty(n, k, ho, wo, device=dev, dtype=tdt)
                    cud = time_us(lambda: torch.nn.functional.conv2d(xc, wc, None, st, pad, 1, g))
                    desc = case_desc(c, dt, layout)
                    ref = None
                    fam = "dw" if g == ci and k == ci else (a.family or ("gemm" if dt != "fp32" else "simt"))
                    vs = [None]
                    for v in VARIANTS[fam]:
                        for t in ([1] if layout == "nchw" and fam != "dw" else [0]):
                            vs.append(v.format(t=t, tk=32 if dt == "fp16" else 16))  # wgmma: 64-byte chunks
                    for v in vs:
                        try:
                            kern = lib.compile(lib.canonical(desc), v, None)
                            fn = lambda: kern.forward(X, O, M, Wt, None, out)
                            out.fill_(float("nan"))
                            fn()
                            torch.cuda.synchronize()
                            if ref is None:
                                ref = out.clone().double()
                            err = ((out.double() - ref).norm() / ref.norm()).item()
                            us = time_us(fn)
                            print(f"{name:14s} {layout} {dt:9s} s{sigma:<3g} {us:9.1f} us  x{us / cud:6.2f} cuDNN({cud:.1f})"
                                  f"  err {err:.1e}  {v or 'default: ' + kern.variant}", flush=True)
                        except Exception as ex:  # report and go on
                            print(f"{name:14s} {layout} {dt:9s} s{sigma:<3g} FAILED {v}: {str(ex)[:200]}", flush=True)


if __name__ == "__main__":
    main()
