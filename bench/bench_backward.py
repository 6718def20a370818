#!/usr/bin/env python3
"""deft benchmark, forward + backward: deft's forward and backward passes (through the C API,
no autograd overhead) against torchvision.ops.deform_conv2d's and a cuDNN convolution's
forward + backward (torch.autograd.grad for input, offset, mask and weight) on the shapes of
bench/shapes.json at sigma = 2 px, NCHW (``--layouts nchw,nhwc`` adds NHWC rows: deft's NHWC
kernels and cuDNN on channels-last tensors; torchvision runs NCHW either way, its time shared by
both rows). Also deft's deterministic mode, and the gradients of deft against torchvision's
(float64 torchvision as the reference where it fits in memory).

    python3 bench/bench_backward.py --lib build/libdeft.so --out /tmp/bwd \
        --benchmarks-md BENCHMARKS.md

Writes results.json and a section between <!-- bench-bwd:begin --> / <!-- bench-bwd:end -->,
with each row's roofline: the minimum bytes of forward + backward (every tensor read and
written once per pass: 3 x (input, offset, mask, weight) + 2 x output, grad_output included)
against the HBM bandwidth and 3 x the forward's GEMM FLOPs (forward, grad input, grad weight)
against the dtype's peak, both ceilings measured in the same run (bench.Gpu.measure_ceilings).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402  (shapes, timing, ceilings)
from deft_ctypes import DeftLibrary  # noqa: E402

BEGIN, END = "<!-- bench-bwd:begin -->", "<!-- bench-bwd:end -->"
SIGMA = 2.0
DTYPES = ("fp16", "fp32_tf32", "fp32")
# Gradient tolerance (relative L2 vs the float64 reference), as the acceptance.
GRAD_TOL = {"fp16": 2e-2, "fp32_tf32": 2e-2, "fp32": 1e-5}
TARGET_DENSE, TARGET_DW, TV_MIN = 2.0, 3.0, 3.0


def update_md(path, section):
    old = open(path).read() if os.path.exists(path) else ""
    b, e = old.find(BEGIN), old.find(END)
    if b != -1 and e > b:
        new = old[:b] + section.rstrip("\n") + old[e + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    with open(path + ".tmp", "w") as f:
        f.write(new)
    os.replace(path + ".tmp", path)


def modified_variant(lib, pass_desc, mods, cache_path):
    """The variant deft picks for pass_desc on this GPU, with the fields of `mods`
    ('field=value ...') set to those values."""
    fields = {}
    for tok in lib.compile(pass_desc, None, cache_path).variant.split():
        key, _, val = tok.partition("=")
        fields[key] = val
    for tok in mods.split():
        key, _, val = tok.partition("=")
        fields[key] = val
    return " ".join(f"{k}={v}" for k, v in fields.items())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", default=os.path.join(HERE, "..", "build", "libdeft.so"))
    ap.add_argument("--shapes", default=os.path.join(HERE, "shapes.json"))
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--layouts", default="nchw",
                    help="comma-separated: nchw, nhwc (default nchw; a run replaces the "
                         "BENCHMARKS.md section when it has every nchw row)")
    ap.add_argument("--out", default="/tmp/deft-bench-bwd")
    ap.add_argument("--benchmarks-md", default=None,
                    help="replace the forward + backward section of this file; only a run of every "
                         "case and dtype (or with --partial-md) does, since the section is one "
                         "run's table and a subset would drop the other rows")
    ap.add_argument("--partial-md", action="store_true",
                    help="let a run of some cases or dtypes replace the section all the same")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--max-measure-s", type=float, default=1.5)
    ap.add_argument("--cache-path", default=None)
    ap.add_argument("--backward-data-variant", default=None,
                    help="deft's backward_data variant for every case instead of its own choice "
                         "(e.g. 'algo=gemm_wgmma tm=64 tn=64 tk=64 threads=256 stages=3 "
                         "transpose=1'); a case it cannot run is reported as an error; "
                         "'+field=value ...': each case's own choice with those fields changed "
                         "(e.g. '+gw=separate')")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU, no torch: fake timings through the whole report (tests it)")
    ap.add_argument("--pre-sleep-us", type=float, default=None,
                    help="GPU sleep queued before each timed call (default 2000; 0: none)")
    args = ap.parse_args(argv)
    # A forward + backward through autograd takes the host 0.2-0.6 ms to enqueue (more than the
    # GPU needs for the small cases): a 2 ms GPU sleep queued before each timed call keeps the
    # host's time out of the events, for deft, torchvision and cuDNN alike.
    args.flush_l2 = True
    args.pre_sleep_us = 2000.0 if args.pre_sleep_us is None else args.pre_sleep_us

    layouts = args.layouts.split(",")
    bad = [lay for lay in layouts if lay not in bench.LAYOUTS]
    if bad or not layouts:
        ap.error(f"--layouts: {','.join(bad) or '(none)'} not among {','.join(bench.LAYOUTS)}")
    args.layout_list = layouts
    spec = bench.load_shapes(args.shapes)
    cases = [c for c in spec["cases"] if not args.cases or c["name"] in args.cases.split(",")]
    os.makedirs(args.out, exist_ok=True)
    if args.dry_run:
        return write_results(args, dry_results(args, cases))
    gpu = bench.Gpu(args)
    torch = gpu.torch
    lib = DeftLibrary(args.lib)
    stream = torch.cuda.current_stream().cuda_stream
    ceilings = gpu.measure_ceilings(True)  # for the roofline column, in this run
    rows = []
    for case in cases:
        base = gpu.make_inputs(case, SIGMA, 7)
        g = torch.Generator(device=gpu.dev)
        g.manual_seed(11)
        gout0 = torch.rand(case["n"], case["k"], case["ho"], case["wo"], device=gpu.dev,
                           generator=g).mul_(2).sub_(1)
        for dtype in args.dtypes.split(","):
            gpu.set_dtype(dtype)
            tdt = gpu.torch_dtype(dtype)
            t = {k: (None if v is None else v.to(tdt).contiguous()) for k, v in base.items()}
            gout = gout0.to(tdt)
            # shared by the layouts' rows: torchvision's time and gradients (NCHW), and the
            # float64 reference gradients
            shared = {}
            for layout in args.layout_list:
                run_row(gpu, lib, args, ceilings, case, dtype, layout, t, gout, shared, stream,
                        rows)
            del t, gout, shared
            torch.cuda.empty_cache()
    res = {"date": datetime.date.today().isoformat(), "env": gpu.env(), "sigma": SIGMA,
           "layouts": args.layout_list, "pre_sleep_us": args.pre_sleep_us, "ceilings": ceilings,
           "backward_data_variant": args.backward_data_variant, "rows": rows}
    return write_results(args, res)


def run_row(gpu, lib, args, ceilings, case, dtype, layout, t, gout, shared, stream, rows):
    """One (case, dtype, layout) row: deft's forward + backward (fast, deterministic) and
    forward, cuDNN's forward + backward in this layout, torchvision's (NCHW, measured for the
    first row of the (case, dtype) and shared), and deft's gradients against float64."""
    torch = gpu.torch
    strd, pad, dil, grp = case["stride"], case["pad"], case["dilation"], case["groups"]
    row = {"case": case["name"], "layout": layout, "dtype": dtype, "errors": {},
           "roofline": fb_roofline(case, dtype, ceilings)}
    rows.append(row)
    desc = bench.deft_desc(case, layout, dtype)
    row["desc"] = desc
    nhwc = layout == "nhwc"
    to_l = bench.nchw_to_nhwc if nhwc else (lambda v: v)
    x, off, m, w, gy = (to_l(v) for v in (t["x"], t["off"], t["m"], t["w"], gout))
    # deft's tensors back as logical NCHW (views) for cuDNN and the check
    as_nchw = (lambda v: None if v is None else v.permute(0, 3, 1, 2)) if nhwc else (lambda v: v)
    osize = ((case["n"], case["ho"], case["wo"], case["k"]) if nhwc else
             (case["n"], case["k"], case["ho"], case["wo"]))
    out = torch.empty(osize, dtype=gout.dtype, device=gpu.dev)
    gx, goff, gw = torch.empty_like(x), torch.empty_like(off), torch.empty_like(w)
    gm = torch.empty_like(m) if m is not None else None

    def deft_fb(det):
        kern.forward(x, off, m, w, None, out, stream)
        kern.backward(x, off, m, w, gy, gx, goff, gm, gw, None, det, stream)

    kern = None
    try:
        data_variant = args.backward_data_variant
        if data_variant and data_variant.startswith("+"):
            data_variant = modified_variant(lib, desc + " pass=backward_data", data_variant[1:],
                                            args.cache_path)
        kern = (lib.compile_ex(desc, None, args.cache_path, data_variant)
                if data_variant else lib.compile(desc, None, args.cache_path))
        row["data_variant"] = data_variant
        row["variant"] = kern.variant
        deft_fb(0)  # compiles the backward kernels
        deft_fb(1)
        torch.cuda.synchronize()
        row["deft_fb_ms"] = gpu.time_fn(lambda: deft_fb(0), args.warmup, args.iters,
                                        args.max_measure_s)["median_ms"]
        row["deft_fb_det_ms"] = gpu.time_fn(lambda: deft_fb(1), args.warmup, args.iters,
                                            args.max_measure_s)["median_ms"]
        row["deft_fwd_ms"] = gpu.time_fn(lambda: kern.forward(x, off, m, w, None, out, stream),
                                         args.warmup, args.iters, args.max_measure_s)["median_ms"]
    except Exception as e:  # noqa: BLE001
        row["errors"]["deft"] = str(e)
    # torchvision forward + backward (autograd, NCHW), and its gradients for the check
    if "tv" not in shared:
        tv = shared["tv"] = {}
        xr, offr, wr = (t[k].detach().clone().requires_grad_() for k in ("x", "off", "w"))
        mr = t["m"].detach().clone().requires_grad_() if t["m"] is not None else None
        leaves = [v for v in (xr, offr, mr, wr) if v is not None]

        def tv_fb():
            y = torchvision_call(gpu, case, xr, offr, mr, wr)
            return torch.autograd.grad(y, leaves, gout)

        try:
            tv["grads"] = tv_fb()
            tv["ms"] = gpu.time_fn(tv_fb, args.warmup, args.iters,
                                   args.max_measure_s)["median_ms"]
        except Exception as e:  # noqa: BLE001
            tv["error"] = repr(e)
        del xr, offr, mr, wr, leaves
    tv = shared["tv"]
    if "ms" in tv:
        row["tv_fb_ms"] = tv["ms"]
    if "error" in tv:
        row["errors"]["torchvision"] = tv["error"]
    # cuDNN forward + backward of the plain convolution, in this row's layout (channels-last
    # strides for nhwc: cuDNN's NHWC kernels)
    xc = as_nchw(x).detach().clone().requires_grad_()
    wc = as_nchw(w).detach().clone().requires_grad_()
    gyc = as_nchw(gy)

    def cudnn_fb():
        y = torch.nn.functional.conv2d(xc, wc, None, strd, pad, dil, grp)
        return torch.autograd.grad(y, (xc, wc), gyc)

    try:
        row["cudnn_fb_ms"] = gpu.time_fn(cudnn_fb, args.warmup, args.iters,
                                         args.max_measure_s)["median_ms"]
    except Exception as e:  # noqa: BLE001
        row["errors"]["cudnn"] = repr(e)
    # gradient check: deft against float64 torchvision (fits: these shapes are small), the
    # reference computed once per (case, dtype)
    if "deft_fb_ms" in row:
        try:
            for v in (gx, goff, gm, gw):  # poisoned: a gradient left unwritten gives a NaN
                if v is not None:                # error, over any tolerance (finish)
                    v.fill_(float("nan"))
            deft_fb(0)
            torch.cuda.synchronize()
            if "ref" not in shared:
                x64, off64, w64 = (t[k].double().requires_grad_() for k in ("x", "off", "w"))
                m64 = t["m"].double().requires_grad_() if t["m"] is not None else None
                l64 = [v for v in (x64, off64, m64, w64) if v is not None]
                y64 = torchvision_call(gpu, case, x64, off64, m64, w64)
                shared["ref"] = torch.autograd.grad(y64, l64, gout.double())
                del x64, off64, m64, w64, y64, l64
            ref = shared["ref"]
            mine = [as_nchw(v) for v in (gx, goff, gm, gw) if v is not None]
            row["grad_rel_err"] = max(bench.rel_err(gpu, a, r) for a, r in zip(mine, ref))
            if "grads" in tv:
                row["tv_grad_rel_err"] = max(bench.rel_err(gpu, a, r)
                                             for a, r in zip(tv["grads"], ref))
        except Exception as e:  # noqa: BLE001
            row["errors"]["check"] = repr(e)
    finish(row, case)
    print(line(row), flush=True)
    del x, off, m, w, gy, out, gx, goff, gm, gw, xc, wc, gyc


def write_results(args, res) -> int:
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = render(res)
    with open(os.path.join(args.out, "backward.md"), "w") as f:
        f.write(md)
    if args.benchmarks_md:
        # the section is one run's table: replaced by a run with every nchw row (nhwc rows
        # are extra), or with --partial-md
        ran = {(r["case"], r.get("layout", "nchw"), r["dtype"]) for r in res["rows"]}
        every = {(c["name"], "nchw", dt) for c in bench.load_shapes(args.shapes)["cases"]
                 for dt in DTYPES}
        if ran >= every or args.partial_md:
            update_md(args.benchmarks_md, md)
        else:
            print(f"note: {args.benchmarks_md} left as it was: this run has {len(ran)} of the "
                  f"{len(every)} nchw (case, dtype) rows (--partial-md to replace the section "
                  f"anyway)",
                  file=sys.stderr)
    print(md)
    return 0


def dry_results(args, cases) -> dict:
    """Fake rows (a few times the roofline, made-up ceilings) for every case and dtype: the
    report's code runs without a GPU or torch."""
    ceilings = {"hbm_bytes_per_s": 4.0e12, "fp16_tc_flops_per_s": 7.0e14,
                "tf32_tc_flops_per_s": 3.5e14, "fp32_fma_flops_per_s": 5.0e13}
    rows = []
    for case in cases:
        for dtype in args.dtypes.split(","):
            for layout in args.layout_list:
                row = {"case": case["name"], "layout": layout, "dtype": dtype, "errors": {},
                       "variant": "dry run", "desc": bench.deft_desc(case, layout, dtype),
                       "roofline": fb_roofline(case, dtype, ceilings)}
                roof = row["roofline"]["roofline_ms"]
                row.update(deft_fb_ms=4 * roof + 0.05, deft_fb_det_ms=6 * roof + 0.07,
                           cudnn_fb_ms=1.5 * roof + 0.02, tv_fb_ms=12 * roof + 0.5,
                           grad_rel_err=1e-3 if dtype != "fp32" else 1e-6,
                           tv_grad_rel_err=1e-2)
                finish(row, case)
                rows.append(row)
    return {"date": datetime.date.today().isoformat(), "dry_run": True,
            "env": {"device": "FAKE GPU (dry run)", "torch": "-", "torchvision": "-",
                    "cudnn": "-"},
            "sigma": SIGMA, "layouts": args.layout_list, "pre_sleep_us": args.pre_sleep_us,
            "ceilings": ceilings, "backward_data_variant": args.backward_data_variant,
            "rows": rows}


def fb_roofline(case: dict, dtype: str, ceilings: dict) -> dict:
    """Minimum bytes and FLOPs of forward + backward and the time they take at the measured
    ceilings: max(bytes / HBM bandwidth, FLOPs / the dtype's peak); no time where a ceiling is
    missing. Bytes: the forward reads input, offset, mask and weight and writes the output; the
    backward reads them and grad_output again and writes a gradient of each input."""
    e = bench.tensor_elems(case)
    ins = e["input"] + e["offset"] + e["mask"] + e["weight"]
    nbytes = (3 * ins + 2 * e["output"]) * bench.DTYPES[dtype]["elem"]
    flops = 3 * bench.gemm_flops(case)
    out = {"bytes": nbytes, "flops": flops, "peak": bench.DTYPES[dtype]["peak"]}
    bw = ceilings.get("hbm_bytes_per_s")
    peak = ceilings.get(bench.DTYPES[dtype]["peak"] + "_flops_per_s")
    if bw and peak:
        t_mem, t_cmp = nbytes / bw, flops / peak
        out.update(roofline_ms=max(t_mem, t_cmp) * 1e3,
                   bound="memory" if t_mem >= t_cmp else "compute")
    return out


def torchvision_call(gpu, case, x, off, m, w):
    return gpu.tv.ops.deform_conv2d(x, off, w, None, stride=(case["stride"],) * 2,
                                    padding=(case["pad"],) * 2,
                                    dilation=(case["dilation"],) * 2, mask=m)


def finish(row, case):
    d, c, t = row.get("deft_fb_ms"), row.get("cudnn_fb_ms"), row.get("tv_fb_ms")
    row["deft_over_cudnn"] = d / c if d and c else None
    row["tv_over_deft"] = t / d if d and t else None
    row["det_over_fast"] = (row["deft_fb_det_ms"] / d) if d and row.get("deft_fb_det_ms") else None
    roof = (row.get("roofline") or {}).get("roofline_ms")
    row["roofline_fraction"] = roof / d if d and roof else None
    dw = case["groups"] == case["c"] and case["groups"] > 1
    tgt = TARGET_DW if dw else TARGET_DENSE
    row["target"] = None if row["dtype"] == "fp32" else tgt
    # Positions are computed in the storage precision (as torchvision does), so in fp32 a few
    # points within rounding distance of a pixel boundary flip cell against the float64
    # reference and move grad offset by O(1): torchvision's own fp32 error shows that floor.
    # A row fails when deft is over the tolerance and also worse than 1.5x torchvision.
    err, tv_err = row.get("grad_rel_err"), row.get("tv_grad_rel_err")
    ok = err is not None and (err <= GRAD_TOL[row["dtype"]] or
                              (tv_err is not None and err <= 1.5 * tv_err))
    row["grad_ok"] = ok


def f(v, spec="{:.3f}"):
    return "—" if v is None else spec.format(v)


def line(r):
    return (f"{r['case']:<14} {r.get('layout', 'nchw'):<5} {r['dtype']:<9} "
            f"deft {f(r.get('deft_fb_ms'))} ms "
            f"(det {f(r.get('deft_fb_det_ms'))}) cudnn {f(r.get('cudnn_fb_ms'))} "
            f"tv {f(r.get('tv_fb_ms'))}  deft/cudnn {f(r.get('deft_over_cudnn'), '{:.2f}')} "
            f"tv/deft {f(r.get('tv_over_deft'), '{:.2f}')} err {f(r.get('grad_rel_err'), '{:.1e}')}"
            + (f"  errors: {r['errors']}" if r["errors"] else ""))


def ceilings_text(ceil: dict) -> str:
    parts = []
    if ceil.get("hbm_bytes_per_s"):
        parts.append(f"HBM {ceil['hbm_bytes_per_s'] / 1e12:.2f} TB/s")
    for key, name in (("fp16_tc", "fp16 tensor"), ("tf32_tc", "tf32 tensor"),
                      ("fp32_fma", "fp32 FMA")):
        v = ceil.get(key + "_flops_per_s")
        if v:
            parts.append(f"{name} {v / 1e12:.0f} TFLOP/s")
    return ", ".join(parts) if parts else "none (no roofline)"


def layouts_text(layouts) -> str:
    if list(layouts) == ["nchw"]:
        return "NCHW"
    return (", ".join(lay.upper() for lay in layouts) + " (NHWC rows: deft's NHWC kernels and "
            "cuDNN on channels-last tensors; torchvision runs NCHW, its time and error shared "
            "by a case's two rows)")


def render(res):
    env = res["env"]
    out = [BEGIN, "## Benchmarks: deform_conv2d forward + backward",
           ""]
    if res.get("dry_run"):
        out += ["> **DRY RUN — every number below is fake** (generated without a GPU to test the "
                "report).", ""]
    out += [
           f"Measured {res['date']} on {env['device']} (torch {env['torch']}, torchvision "
           f"{env['torchvision']}, cuDNN {env['cudnn']}) by `bench/bench_backward.py`: "
           + layouts_text(res.get("layouts") or ["nchw"]) +
           f", offsets ~ N(0, {res['sigma']:g}²) px, mask ~ U(0,1), medians of CUDA-event "
           "timings after warm-up, L2 flushed before each run"
           + (f", a {res.get('pre_sleep_us'):g} µs GPU sleep queued before each timed call "
              "(keeps the host's enqueue time out of the events)"
              if res.get("pre_sleep_us") else ", host enqueue time included")
           + ". deft = forward + backward "
           + (f"(backward_data forced to `{res['backward_data_variant']}`) "
              if res.get("backward_data_variant") else "")
           + "(grad input, offset, mask, weight) through the C API; torchvision = its op's "
           "forward + autograd backward; cuDNN = conv2d forward + backward (grad input, weight). "
           "fp32_tf32 lets cuDNN, torchvision's GEMMs and deft's tensor-core tiles use TF32; "
           "fp32 is strict FMA for deft. Gradient error: max over the four gradients of "
           "‖deft − ref‖₂/‖ref‖₂, ref = torchvision in float64 (torchvision's own error in "
           "brackets; fp16 torchvision accumulates in fp16, deft in f32). Tolerance 2e-2 "
           "(fp16, tf32), 1e-5 (fp32) — or within 1.5× torchvision's own error, because both "
           "compute sampling positions in fp32 and a few points next to pixel boundaries "
           "flip cell against the float64 reference. Roofline: the minimum bytes of forward + "
           "backward (3 × input, offset, mask, weight + 2 × output, grad_output included) at the "
           "HBM bandwidth, or 3 × the forward's GEMM FLOPs at the dtype's peak, whichever is "
           "longer; the fraction is roofline ÷ deft. Ceilings measured in this run: "
           + ceilings_text(res.get("ceilings") or {}) + ".",
           "",
           "| case | layout | dtype | deft fwd+bwd ms | deterministic ms (÷fast) | cuDNN ms "
           "| torchvision ms | deft ÷ cuDNN (target) | tv ÷ deft (≥ 3) | roofline ms (of deft) "
           "| grad error (tv) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        tgt = r.get("target")
        ratio = r.get("deft_over_cudnn")
        rs = f(ratio, "{:.2f}")
        if tgt and ratio is not None:
            rs += f" ({'≤' if ratio <= tgt else '>'} {tgt:g} {'PASS' if ratio <= tgt else 'MISS'})"
        tv = r.get("tv_over_deft")
        tvs = f(tv, "{:.2f}")
        if tv is not None:
            tvs += " PASS" if tv >= TV_MIN else " MISS"
        err = f(r.get("grad_rel_err"), "{:.1e}") + f" ({f(r.get('tv_grad_rel_err'), '{:.1e}')})"
        err += "" if r.get("grad_ok") else " **over tolerance**"
        roof = r.get("roofline") or {}
        frac = r.get("roofline_fraction")
        roofs = f(roof.get("roofline_ms")) + (f" ({100 * frac:.0f} %, {roof.get('bound')})"
                                               if frac is not None else "")
        out.append(f"| {r['case']} | {r.get('layout', 'nchw')} | {r['dtype']} | "
                   f"{f(r.get('deft_fb_ms'))} | "
                   f"{f(r.get('deft_fb_det_ms'))} ({f(r.get('det_over_fast'), '{:.2f}')}) | "
                   f"{f(r.get('cudnn_fb_ms'))} | {f(r.get('tv_fb_ms'))} | {rs} | {tvs} | "
                   f"{roofs} | {err} |")
        if r["errors"]:
            out.append(f"| | | | errors: {json.dumps(r['errors'])[:300]} | | | | | | | |")
    out.append("")
    out.append(END)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
