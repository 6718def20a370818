#!/usr/bin/env python3
"""deft benchmark: deft's deform_conv2d forward against torchvision.ops.deform_conv2d and a
plain cuDNN convolution of the same shape, with ceilings (HBM bandwidth, matmul peaks) measured
in the same run. See bench/README.md.

    python3 bench/bench.py --lib build/libdeft.so --out /tmp/bench --benchmarks-md BENCHMARKS.md
    python3 bench/bench.py --dry-run --out /tmp/bench-dry      # no GPU, no torch: fake timings

torch/torchvision are imported lazily so that --dry-run (shape parsing, byte/FLOP counting,
report writing) runs anywhere. A failing case is recorded with its error and the run goes on;
if a failure leaves the CUDA context unusable, the remaining work continues in a fresh child
process.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

BEGIN_MARK = "<!-- bench:begin -->"
END_MARK = "<!-- bench:end -->"

# dtype rows: deft description fields, element size, which measured peak is the roofline's,
# whether TF32 is allowed for cuDNN/cuBLAS (torchvision's GEMM) in these rows.
DTYPES = {
    "fp16": {"deft": "dtype=f16", "elem": 2, "peak": "fp16_tc", "tf32": False, "torch": "half"},
    "fp32_tf32": {"deft": "dtype=f32 math=tf32", "elem": 4, "peak": "tf32_tc", "tf32": True,
                  "torch": "float"},
    "fp32": {"deft": "dtype=f32 math=fp32", "elem": 4, "peak": "fp32_fma", "tf32": False,
             "torch": "float"},
}
# Correctness bound on ||deft - ref||_2 / ||ref||_2, ref = torchvision in float64.
TOLERANCE = {"fp16": 1e-2, "fp32_tf32": 5e-3, "fp32": 1e-5}
CHECK_SIGMA = 2.0      # correctness and acceptance targets are measured at this sigma
TV_OVER_DEFT_MIN = 3.0  # torchvision / deft must be at least this everywhere
LAYOUTS = ("nchw", "nhwc")
BILINEAR_FLOPS_PER_SAMPLE = 8  # 4 corner weights x (mul + add), per sample per channel


def deft_cudnn_target(case: dict, dtype: str) -> float:
    """Acceptance bound on deft_ms / cuDNN_ms at sigma=2."""
    if dtype == "fp32":
        return 2.0  # strict fp32 against cuDNN without TF32
    return 2.0 if case["depthwise"] else 1.5


# ------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------
CASE_FIELDS = ("n", "c", "k", "h", "w", "r", "s", "stride", "pad", "dilation", "groups",
               "offset_groups", "mask")
CASE_DEFAULTS = {"stride": 1, "pad": 0, "dilation": 1, "groups": 1, "offset_groups": 1,
                 "mask": 1}


def out_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def parse_case(raw: dict) -> dict:
    """Validate one case of shapes.json and add derived fields (ho, wo, depthwise)."""
    if "name" not in raw:
        raise ValueError(f"case without a name: {raw}")
    case = {"name": str(raw["name"])}
    for f in CASE_FIELDS:
        v = raw.get(f, CASE_DEFAULTS.get(f))
        if v is None:
            raise ValueError(f"case {case['name']}: missing field '{f}'")
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"case {case['name']}: {f}={v!r} must be an integer")
        case[f] = v
    unknown = set(raw) - set(CASE_FIELDS) - {"name", "comment"}
    if unknown:
        raise ValueError(f"case {case['name']}: unknown field(s) {sorted(unknown)}")
    n = case["name"]
    for f in ("n", "c", "k", "h", "w", "r", "s", "stride", "dilation", "groups",
              "offset_groups"):
        if case[f] < 1:
            raise ValueError(f"case {n}: {f}={case[f]} must be >= 1")
    if case["pad"] < 0:
        raise ValueError(f"case {n}: pad must be >= 0")
    if case["mask"] not in (0, 1):
        raise ValueError(f"case {n}: mask must be 0 or 1")
    if case["c"] % case["groups"] or case["k"] % case["groups"]:
        raise ValueError(f"case {n}: groups={case['groups']} must divide c and k")
    if case["c"] % case["offset_groups"]:
        raise ValueError(f"case {n}: offset_groups must divide c")
    case["ho"] = out_size(case["h"], case["r"], case["stride"], case["pad"], case["dilation"])
    case["wo"] = out_size(case["w"], case["s"], case["stride"], case["pad"], case["dilation"])
    if case["ho"] < 1 or case["wo"] < 1:
        raise ValueError(f"case {n}: empty output {case['ho']}x{case['wo']}")
    case["depthwise"] = case["groups"] > 1 and case["groups"] == case["c"]
    return case


def load_shapes(path: str) -> dict:
    """shapes.json: either a list of cases, or {"cases": [...], "layouts", "sigmas", "dtypes"}."""
    with open(path) as f:
        raw = json.load(f)
    if isinstance(raw, list):
        raw = {"cases": raw}
    cases = [parse_case(c) for c in raw.get("cases", [])]
    names = [c["name"] for c in cases]
    if len(set(names)) != len(names):
        raise ValueError("duplicate case names in " + path)
    spec = {
        "cases": cases,
        "layouts": list(raw.get("layouts", LAYOUTS)),
        "sigmas": [float(s) for s in raw.get("sigmas", [0.5, 2, 8])],
        "dtypes": list(raw.get("dtypes", DTYPES)),
    }
    for l in spec["layouts"]:
        if l not in LAYOUTS:
            raise ValueError(f"unknown layout {l!r}")
    for d in spec["dtypes"]:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r} (known: {', '.join(DTYPES)})")
    return spec


def deft_desc(case: dict, layout: str, dtype: str) -> str:
    """deft's text form for one (case, layout, dtype)."""
    c = case
    return (f"deform_conv2d n={c['n']} c={c['c']} h={c['h']} w={c['w']} k={c['k']} "
            f"r={c['r']} s={c['s']} stride={c['stride']} pad={c['pad']} "
            f"dilation={c['dilation']} groups={c['groups']} offset_groups={c['offset_groups']} "
            f"mask={c['mask']} {DTYPES[dtype]['deft']} layout={layout}")


# ------------------------------------------------------------------------------------------------
# Bytes, FLOPs, roofline
# ------------------------------------------------------------------------------------------------
def tensor_elems(case: dict) -> dict:
    c = case
    taps = c["r"] * c["s"]
    pix = c["n"] * c["ho"] * c["wo"]
    return {
        "input": c["n"] * c["c"] * c["h"] * c["w"],
        "offset": pix * 2 * c["offset_groups"] * taps,
        "mask": pix * c["offset_groups"] * taps if c["mask"] else 0,
        "weight": c["k"] * (c["c"] // c["groups"]) * taps,
        "output": pix * c["k"],
    }


def min_bytes(case: dict, dtype: str) -> int:
    """Each tensor read once, the output written once, in the dtype's element size."""
    return sum(tensor_elems(case).values()) * DTYPES[dtype]["elem"]


def gemm_flops(case: dict) -> int:
    """2 * N*Ho*Wo * K * (C/groups) * R*S: the implicit GEMM's multiply-adds (roofline FLOPs)."""
    c = case
    return 2 * c["n"] * c["ho"] * c["wo"] * c["k"] * (c["c"] // c["groups"]) * c["r"] * c["s"]


def bilinear_flops(case: dict) -> int:
    """Sampling cost, reported separately and not counted in the roofline: ~8 flops per
    bilinear sample per channel (one sample per output pixel, tap and input channel)."""
    c = case
    return BILINEAR_FLOPS_PER_SAMPLE * c["n"] * c["ho"] * c["wo"] * c["r"] * c["s"] * c["c"]


def roofline(case: dict, dtype: str, ceilings: dict) -> dict:
    """max(bytes/BW, flops/peak) with the dtype's measured peak; None where a ceiling is
    missing."""
    b, f = min_bytes(case, dtype), gemm_flops(case)
    bw = ceilings.get("hbm_bytes_per_s")
    peak = ceilings.get(DTYPES[dtype]["peak"] + "_flops_per_s")
    out = {"bytes": b, "flops": f, "bilinear_flops": bilinear_flops(case),
           "arith_intensity": f / b, "peak": DTYPES[dtype]["peak"]}
    if bw and peak:
        t_mem, t_cmp = b / bw, f / peak
        out.update(mem_ms=t_mem * 1e3, compute_ms=t_cmp * 1e3,
                   roofline_ms=max(t_mem, t_cmp) * 1e3,
                   bound="memory" if t_mem >= t_cmp else "compute")
    return out


# ------------------------------------------------------------------------------------------------
# Rows: ratios and targets
# ------------------------------------------------------------------------------------------------
def _div(a, b):
    return a / b if (a is not None and b) else None


def finish_row(row: dict, case: dict) -> dict:
    """Ratios, roofline fraction, correctness verdict and acceptance targets of a row."""
    d, cu, tv = row.get("deft_ms"), row.get("cudnn_ms"), row.get("tv_ms")
    row["deft_over_cudnn"] = _div(d, cu)
    row["tv_over_deft"] = _div(tv, d)
    row["tv_over_cudnn"] = _div(tv, cu)
    rl = row.get("roofline", {})
    row["roofline_frac"] = _div(rl.get("roofline_ms"), d)
    if row.get("rel_err") is not None:
        row["err_ok"] = bool(row.get("finite", True)) and row["rel_err"] <= row["tolerance"]
    elif row.get("finite") is False:
        row["err_ok"] = False
    target = deft_cudnn_target(case, row["dtype"])
    row["targets"] = {
        "deft_over_cudnn_max": target,
        "deft_over_cudnn_pass": (row["deft_over_cudnn"] <= target
                                 if row["deft_over_cudnn"] is not None else None),
        "tv_over_deft_min": TV_OVER_DEFT_MIN,
        "tv_over_deft_pass": (row["tv_over_deft"] >= TV_OVER_DEFT_MIN
                              if row["tv_over_deft"] is not None else None),
    }
    return row


def new_row(case: dict, layout: str, dtype: str, sigma: float) -> dict:
    return {
        "case": case["name"], "layout": layout, "dtype": dtype, "sigma": sigma,
        "desc": deft_desc(case, layout, dtype), "depthwise": case["depthwise"],
        "tolerance": TOLERANCE[dtype], "tv_layout": "nchw",
        "cudnn_layout": "channels_last" if layout == "nhwc" else "nchw",
        "errors": {},
    }


# ------------------------------------------------------------------------------------------------
# Report: markdown, stdout table, plot
# ------------------------------------------------------------------------------------------------
def fmt_ms(v):
    if v is None:
        return "—"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def fmt_ratio(v):
    if v is None:
        return "—"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def fmt_err(v):
    return "—" if v is None else f"{v:.1e}"


def fmt_pct(v):
    return "—" if v is None else f"{100 * v:.0f}%"


def verdict(p, yes="PASS", no="MISS"):
    return "—" if p is None else (yes if p else no)


def kernel_text(variant) -> str:
    """'algo=gemm_wgmma tm=64 tn=256 ...' -> 'gemm_wgmma 64×256' (depthwise: its vector width)."""
    if not variant:
        return "—"
    f = dict(kv.split("=", 1) for kv in variant.split() if "=" in kv)
    algo = f.get("algo", "?")
    if algo == "depthwise":
        return f"depthwise vec {f.get('vec', '?')}"
    return (f"{algo} {f.get('tm', '?')}×{f.get('tn', '?')}"
            + (f" P{f['producers']}" if f.get("producers", "0") != "0" else "")
            + (" +T" if f.get("transpose") == "1" else ""))


def md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def sort_key(row, case_order):
    return (case_order.get(row["case"], 1 << 30), LAYOUTS.index(row["layout"]),
            list(DTYPES).index(row["dtype"]), row["sigma"])


def check_rows(rows):
    return [r for r in rows if r["sigma"] == CHECK_SIGMA]


def summary_counts(rows) -> dict:
    chk = check_rows(rows)
    t1 = [r["targets"]["deft_over_cudnn_pass"] for r in chk]
    t2 = [r["targets"]["tv_over_deft_pass"] for r in chk]
    ok = [r.get("err_ok") for r in chk]
    return {
        "rows": len(rows), "check_rows": len(chk),
        "deft_over_cudnn_pass": sum(1 for p in t1 if p is True),
        "deft_over_cudnn_miss": sum(1 for p in t1 if p is False),
        "tv_over_deft_pass": sum(1 for p in t2 if p is True),
        "tv_over_deft_miss": sum(1 for p in t2 if p is False),
        "correct": sum(1 for p in ok if p is True),
        "incorrect": sum(1 for p in ok if p is False),
        "not_measured": sum(1 for r in chk if r.get("deft_ms") is None),
        "rows_with_errors": sum(1 for r in rows if r.get("errors")),
    }


def render_markdown(res: dict) -> str:
    env, ceil, rows = res["env"], res["ceilings"], res["rows"]
    order = {c["name"]: i for i, c in enumerate(res["cases"])}
    rows = sorted(rows, key=lambda r: sort_key(r, order))
    cnt = summary_counts(rows)
    L = [BEGIN_MARK, "## Benchmarks: deform_conv2d forward", ""]
    if res.get("dry_run"):
        L += ["> **DRY RUN — every number below is fake** (generated without a GPU to test the "
              "report).", ""]
    L.append(f"Measured {env.get('date', '?')} on **{env.get('device', '?')}** "
             f"({env.get('sm_count', '?')} SMs, cc {env.get('capability', '?')}); "
             f"torch {env.get('torch', '?')} (CUDA {env.get('cuda', '?')}, cuDNN "
             f"{env.get('cudnn', '?')}), torchvision {env.get('torchvision', '?')}, deft "
             f"{env.get('deft', '?')}. Wall time {res.get('wall_s', 0):.0f} s.")
    p = res["protocol"]
    L += ["", f"Command: `{md_escape(res.get('command', ''))}`", "",
          f"Timing: each call timed alone with CUDA events; median of up to {p['iters']} calls "
          f"after {p['warmup']} warm-up calls (fewer for slow calls, at most "
          f"~{p['max_measure_s']} s per measurement); L2 "
          f"{'flushed' if p['flush_l2'] else 'not flushed'} between calls; "
          + (f"a {p.get('pre_sleep_us', 0):g} µs GPU sleep queued before each timed call keeps "
             f"the host's launch time out of the events. "
             if p.get("pre_sleep_us") else "launch time included. ")
          + f"Inputs fresh per "
          f"(case, σ): input ~ U(−1,1), weight ~ U(−1,1)/√fan_in, offsets ~ N(0, σ²) px, "
          f"mask ~ U(0,1). deft kernels compiled once per (case, layout, dtype), compile time "
          f"excluded. cuDNN: `F.conv2d` of the same shape without deformation "
          f"(`cudnn.benchmark=True`; channels-last tensors for nhwc rows; depthwise conv for "
          f"the depthwise cases). torchvision has no channels-last path: it always runs NCHW "
          f"tensors, and the nhwc rows show that NCHW time.", ""]
    L += ["| ceiling (measured now) | how | value |", "|---|---|---|"]
    for key, label, unit, scale in (
            ("hbm", "HBM bandwidth", "GB/s", 1e9),
            ("fp16_tc", "fp16 tensor-core peak (fp16 rows)", "TFLOP/s", 1e12),
            ("tf32_tc", "tf32 tensor-core peak (fp32_tf32 rows)", "TFLOP/s", 1e12),
            ("fp32_fma", "fp32 peak, TF32 off (fp32 rows)", "TFLOP/s", 1e12)):
        v = ceil.get(key + ("_bytes_per_s" if key == "hbm" else "_flops_per_s"))
        val = "—" if v is None else f"{v / scale:.0f} {unit}"
        L.append(f"| {label} | {ceil.get(key + '_how', '')} | {val} |")
    if ceil.get("errors"):
        L += ["", "Ceiling errors: " + "; ".join(f"{k}: {md_escape(v)}"
                                                 for k, v in ceil["errors"].items())]
    L += ["", f"### Acceptance targets (σ = {CHECK_SIGMA:g})", "",
          "deft/cuDNN ≤ 1.5 (fp16, fp32_tf32; dense) or ≤ 2.0 (depthwise); strict fp32 against "
          "cuDNN without TF32 ≤ 2.0; torchvision/deft ≥ 3 everywhere. Correct: "
          "‖deft − ref‖₂/‖ref‖₂ against torchvision in float64 on the same inputs, ≤ 1e-2 fp16, "
          "≤ 5e-3 tf32, ≤ 1e-5 fp32, and no non-finite value left in a NaN-poisoned output.", "",
          f"Summary: deft/cuDNN {cnt['deft_over_cudnn_pass']} PASS, "
          f"{cnt['deft_over_cudnn_miss']} MISS; tv/deft {cnt['tv_over_deft_pass']} PASS, "
          f"{cnt['tv_over_deft_miss']} MISS; correctness {cnt['correct']} ok, "
          f"{cnt['incorrect']} FAIL; {cnt['not_measured']} rows without a deft time.", "",
          "| case | layout | dtype | deft ms | cuDNN ms | torchvision ms | deft/cuDNN | target "
          "| deft/cuDNN ok | tv/deft | tv/deft ≥ 3 | rel err | correct | tv rel err | %roofline "
          "| deft kernel |",
          "|---|---|---|--:|--:|--:|--:|--:|---|--:|---|--:|---|--:|--:|---|"]
    for r in check_rows(rows):
        t = r["targets"]
        L.append(f"| {r['case']} | {r['layout']} | {r['dtype']} | {fmt_ms(r.get('deft_ms'))} | "
                 f"{fmt_ms(r.get('cudnn_ms'))} | {fmt_ms(r.get('tv_ms'))} | "
                 f"{fmt_ratio(r['deft_over_cudnn'])} | ≤ {t['deft_over_cudnn_max']:g} | "
                 f"{verdict(t['deft_over_cudnn_pass'])} | {fmt_ratio(r['tv_over_deft'])} | "
                 f"{verdict(t['tv_over_deft_pass'])} | {fmt_err(r.get('rel_err'))} | "
                 f"{verdict(r.get('err_ok'), 'ok', 'FAIL')} | {fmt_err(r.get('tv_rel_err'))} | "
                 f"{fmt_pct(r['roofline_frac'])} | {kernel_text(r.get('variant'))} |")
    L += ["", "### All rows", "",
          "| case | layout | dtype | σ | deft ms | cuDNN ms | torchvision ms | deft/cuDNN | "
          "tv/deft | tv/cuDNN | rel err | %roofline | bound |",
          "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        L.append(f"| {r['case']} | {r['layout']} | {r['dtype']} | {r['sigma']:g} | "
                 f"{fmt_ms(r.get('deft_ms'))} | {fmt_ms(r.get('cudnn_ms'))} | "
                 f"{fmt_ms(r.get('tv_ms'))} | {fmt_ratio(r['deft_over_cudnn'])} | "
                 f"{fmt_ratio(r['tv_over_deft'])} | {fmt_ratio(r['tv_over_cudnn'])} | "
                 f"{fmt_err(r.get('rel_err'))} | {fmt_pct(r['roofline_frac'])} | "
                 f"{r.get('roofline', {}).get('bound', '—')} |")
    L += ["", "%roofline = max(min bytes / HBM BW, GEMM FLOPs / peak) ÷ deft time; min bytes = "
          "input + offset + mask + weight + output, each once, in the row's dtype; GEMM FLOPs = "
          "2·N·Ho·Wo·K·(C/groups)·R·S (bilinear sampling, ~8 flops per sample per channel, not "
          "counted); peak = fp16 tensor (fp16), tf32 tensor (fp32_tf32), fp32 FMA (fp32). "
          "Cases in L2 (50 MB on H100) can exceed 100%.", ""]
    cases = {c["name"]: c for c in res["cases"]}
    L += ["### Shapes", "", "| case | N | C→K | H×W → Ho×Wo | kernel | stride | groups | "
          "offset groups | GEMM GFLOP | MB (fp16) |", "|---|--:|---|---|---|--:|--:|--:|--:|--:|"]
    for c in res["cases"]:
        L.append(f"| {c['name']} | {c['n']} | {c['c']}→{c['k']} | {c['h']}×{c['w']} → "
                 f"{c['ho']}×{c['wo']} | {c['r']}×{c['s']} | {c['stride']} | {c['groups']} | "
                 f"{c['offset_groups']} | {gemm_flops(c) / 1e9:.2f} | "
                 f"{min_bytes(c, 'fp16') / 1e6:.1f} |")
    if res.get("compiles"):
        L += ["", "### deft compiles (once per case, layout, dtype; not in the timings)", "",
              "| case | layout | dtype | compile s | from cache | variant |",
              "|---|---|---|--:|---|---|"]
        seen_keys = set()
        for k in sorted(res["compiles"], key=lambda k: sort_key(dict(k, sigma=0), order)):
            key = (k["case"], k["layout"], k["dtype"])
            if key in seen_keys:  # recompiled in a continuation process
                continue
            seen_keys.add(key)
            cs = "—" if k.get("compile_s") is None else f"{k['compile_s']:.2f}"
            fc = "—" if k.get("from_cache") is None else ("yes" if k["from_cache"] else "no")
            var = (f"`{md_escape(k['variant'])}`" if k.get("variant")
                   else md_escape(k.get("error", "—"))[:300])
            L.append(f"| {k['case']} | {k['layout']} | {k['dtype']} | {cs} | {fc} | {var} |")
    errs = [(r, k, v) for r in rows for k, v in sorted(r.get("errors", {}).items())]
    if errs:
        L += ["", "### Errors", ""]
        seen = set()
        for r, k, v in errs:
            msg = md_escape(v)[:300]
            key = (r["case"], r["layout"], r["dtype"], k, msg)
            if key in seen:
                continue
            seen.add(key)
            L.append(f"- {r['case']} {r['layout']} {r['dtype']} σ={r['sigma']:g} [{k}]: {msg}")
    if res.get("skipped"):
        L += ["", "Skipped (time budget or lost CUDA context): " +
              ", ".join(res["skipped"])]
    if res.get("plot"):
        L += ["", f"Plot: `{os.path.basename(res['plot'])}` (deft/cuDNN and torchvision/cuDNN "
              f"at σ = {CHECK_SIGMA:g}, log scale)."]
    L += ["", END_MARK, ""]
    return "\n".join(L)


def update_benchmarks_md(path: str, section: str) -> None:
    """Replace the text between the bench markers (inclusive) in `path`, or append it."""
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    b, e = old.find(BEGIN_MARK), old.find(END_MARK)
    section = section.rstrip("\n")
    if b != -1 and e != -1 and e > b:
        new = old[:b] + section + old[e + len(END_MARK):]
    else:
        sep = "" if not old else ("\n" if old.endswith("\n") else "\n\n")
        if old and not old.endswith("\n\n"):
            sep = "\n" if old.endswith("\n") else "\n\n"
        new = old + sep + section + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def short_table(res: dict) -> str:
    order = {c["name"]: i for i, c in enumerate(res["cases"])}
    rows = sorted(check_rows(res["rows"]), key=lambda r: sort_key(r, order))
    out = [f"{'case':<14}{'layout':<7}{'dtype':<10}{'deft/cuDNN':>12}{'tv/deft':>10}"
           f"{'rel err':>10}  notes"]
    for r in rows:
        t = r["targets"]
        notes = []
        if t["deft_over_cudnn_pass"] is False:
            notes.append(f"MISS>{t['deft_over_cudnn_max']:g}")
        if t["tv_over_deft_pass"] is False:
            notes.append("tv<3")
        if r.get("err_ok") is False:
            notes.append("WRONG")
        if r.get("errors"):
            notes.append("ERR:" + ",".join(sorted(r["errors"])))
        out.append(f"{r['case']:<14}{r['layout']:<7}{r['dtype']:<10}"
                   f"{fmt_ratio(r['deft_over_cudnn']):>12}{fmt_ratio(r['tv_over_deft']):>10}"
                   f"{fmt_err(r.get('rel_err')):>10}  {' '.join(notes)}")
    return "\n".join(out)


def make_plot(res: dict, path: str) -> str | None:
    """Grouped bars (log y) of deft/cuDNN and torchvision/cuDNN per case at sigma=2, one panel
    per dtype. Returns None (and notes why) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        res.setdefault("notes", []).append(f"no plot: {e}")
        return None
    rows = check_rows(res["rows"])
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in rows)]
    if not dtypes:
        return None
    order = [c["name"] for c in res["cases"]]
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(max(8, 1.1 * len(order) * 2), 3.6 * len(dtypes)),
                             squeeze=False)
    for ax, dt in zip(axes[:, 0], dtypes):
        groups = [(c, l) for c in order for l in LAYOUTS
                  if any(r["case"] == c and r["layout"] == l and r["dtype"] == dt for r in rows)]
        by = {(r["case"], r["layout"]): r for r in rows if r["dtype"] == dt}
        x = list(range(len(groups)))
        dv = [by[g]["deft_over_cudnn"] or float("nan") for g in groups]
        tv = [by[g]["tv_over_cudnn"] or float("nan") for g in groups]
        wdt = 0.38
        ax.bar([i - wdt / 2 for i in x], dv, wdt, label="deft / cuDNN", color="#1f77b4")
        ax.bar([i + wdt / 2 for i in x], tv, wdt, label="torchvision / cuDNN", color="#d62728")
        ax.axhline(1.0, color="black", lw=0.8)
        dense_t = 2.0 if dt == "fp32" else 1.5
        ax.axhline(dense_t, color="#1f77b4", lw=0.8, ls="--",
                   label=f"deft target {dense_t:g}" + (" (dense)" if dt != "fp32" else ""))
        if dt != "fp32":
            ax.axhline(2.0, color="#1f77b4", lw=0.8, ls=":", label="deft target 2 (depthwise)")
        ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{c}\n{l}" for c, l in groups], fontsize=7)
        ax.set_ylabel("time / cuDNN time")
        ax.set_title(f"{dt}, σ = {CHECK_SIGMA:g} (lower is better)", fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    dev = res["env"].get("device", "?")
    fig.suptitle(f"deft deform_conv2d forward vs cuDNN conv2d — {dev}"
                 + (" (DRY RUN: fake numbers)" if res.get("dry_run") else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(res: dict, out_dir: str, final: bool, benchmarks_md: str | None) -> None:
    os.makedirs(out_dir, exist_ok=True)
    res["summary"] = summary_counts(res["rows"])
    if final:
        try:
            res["plot"] = make_plot(res, os.path.join(out_dir, "bench.png"))
        except Exception as e:  # noqa: BLE001
            res.setdefault("notes", []).append(f"plot failed: {e!r}")
            res["plot"] = None
    md = render_markdown(res)
    with open(os.path.join(out_dir, "BENCHMARKS.section.md"), "w") as f:
        f.write(md)
    tmp = os.path.join(out_dir, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, default=str)
    os.replace(tmp, os.path.join(out_dir, "results.json"))
    if final and benchmarks_md:
        update_benchmarks_md(benchmarks_md, md)


# ------------------------------------------------------------------------------------------------
# GPU side (torch imported lazily)
# ------------------------------------------------------------------------------------------------
class Gpu:
    """torch, torchvision and the timing helpers."""

    def __init__(self, args):
        warnings.filterwarnings("ignore", message=".*TF32.*")
        warnings.filterwarnings("ignore", message=".*fp32_precision.*")
        import torch
        import torchvision
        import torchvision.ops  # noqa: F401
        self.torch, self.tv = torch, torchvision
        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is False")
        self.dev = torch.device("cuda")
        torch.cuda.init()
        torch.empty(1, device=self.dev)  # make the primary context current for deft too
        torch.backends.cudnn.enabled = True
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
        self.args = args
        self.flush_buf = None
        if args.flush_l2:
            self.flush_buf = torch.empty(256 << 20, dtype=torch.uint8, device=self.dev)
        self.precision_notes: list[str] = []
        self.sleep_cycles = self._calibrate_sleep(args.pre_sleep_us)

    def _calibrate_sleep(self, us: float) -> int:
        """Cycles for torch.cuda._sleep to keep the GPU busy ~`us` microseconds (0: off)."""
        torch = self.torch
        if us <= 0 or not hasattr(torch.cuda, "_sleep"):
            return 0
        try:
            ms = 0.0
            for _ in range(3):  # the first runs at idle clocks
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                torch.cuda._sleep(1_000_000)
                b.record()
                b.synchronize()
                ms = a.elapsed_time(b)
            return max(1, int(1_000_000 * (us * 1e-3) / ms)) if ms > 0 else 0
        except Exception as e:  # noqa: BLE001
            self.precision_notes.append(f"torch.cuda._sleep unusable, no launch shield: {e!r}")
            return 0

    def env(self) -> dict:
        torch = self.torch
        p = torch.cuda.get_device_properties(self.dev)
        return {
            "device": torch.cuda.get_device_name(self.dev),
            "sm_count": p.multi_processor_count,
            "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1),
            "torch": torch.__version__, "torchvision": self.tv.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        }

    def set_tf32(self, enabled: bool) -> None:
        """TF32 for cuBLAS (torchvision's GEMM, matmul peaks) and cuDNN convolutions. Uses the
        fp32_precision API when present (torch >= 2.9; mixing it with allow_tf32 can raise),
        else allow_tf32."""
        torch = self.torch
        mode = "tf32" if enabled else "ieee"
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            for obj in (torch.backends, torch.backends.cuda.matmul, torch.backends.cudnn,
                        getattr(torch.backends.cudnn, "conv", None),
                        getattr(torch.backends.cudnn, "rnn", None)):
                if obj is None or not hasattr(obj, "fp32_precision"):
                    continue
                try:
                    obj.fp32_precision = mode
                except Exception as e:  # noqa: BLE001
                    note = f"fp32_precision on {obj!r}: {e}"
                    if note not in self.precision_notes:
                        self.precision_notes.append(note)
        else:
            torch.backends.cuda.matmul.allow_tf32 = enabled
            torch.backends.cudnn.allow_tf32 = enabled

    def set_dtype(self, dtype: str) -> None:
        self.set_tf32(DTYPES[dtype]["tf32"])

    def torch_dtype(self, dtype: str):
        return getattr(self.torch, DTYPES[dtype]["torch"])

    def healthy(self) -> bool:
        try:
            self.torch.cuda.synchronize()
            t = self.torch.ones(4, device=self.dev)
            return float((t + 1).sum().item()) == 8.0
        except Exception:  # noqa: BLE001
            return False

    def time_fn(self, fn, warmup: int, iters: int, max_s: float) -> dict:
        """Median of `iters` separately CUDA-event-timed calls after `warmup` calls; iters (and
        warmup) shrink for slow calls so that one measurement stays near max_s seconds."""
        torch = self.torch
        Ev = torch.cuda.Event
        fn()  # first call: cuDNN autotuning, lazy init
        torch.cuda.synchronize()
        a, b = Ev(enable_timing=True), Ev(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        est_ms = max(a.elapsed_time(b), 1e-3)
        budget_calls = int(max_s * 1e3 / est_ms)
        warm = max(0, min(warmup - 2, budget_calls // 4))
        n = max(min(5, iters), min(iters, budget_calls))
        for _ in range(warm):
            fn()
        starts = [Ev(enable_timing=True) for _ in range(n)]
        ends = [Ev(enable_timing=True) for _ in range(n)]
        flush, sleep = self.flush_buf, self.sleep_cycles
        for i in range(n):
            if flush is not None:
                flush.zero_()
            if sleep:  # GPU busy while the CPU enqueues: no launch gap inside the events
                torch.cuda._sleep(sleep)
            starts[i].record()
            fn()
            ends[i].record()
        ends[-1].synchronize()
        ts = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        return {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts),
                "iters": n, "warmup": warm + 2}

    # --- ceilings ------------------------------------------------------------------------------
    def measure_ceilings(self, quick: bool) -> dict:
        torch = self.torch
        ceil: dict = {"errors": {}}
        it = 10 if quick else 20
        try:
            nbytes = (1 << 30) if quick else (2 << 30)
            src = torch.empty(nbytes, dtype=torch.uint8, device=self.dev).fill_(1)
            dst = torch.empty_like(src)
            t = self.time_fn(lambda: dst.copy_(src), 3, it, 1e9)
            ceil["hbm_bytes_per_s"] = 2 * nbytes / (t["median_ms"] * 1e-3)
            ceil["hbm_how"] = f"{nbytes >> 30} GiB device-to-device copy, read + write"
            ceil["hbm_timing"] = t
            del src, dst
        except Exception as e:  # noqa: BLE001
            ceil["errors"]["hbm"] = repr(e)
        torch.cuda.empty_cache()
        for key, dt, size, tf32 in (("fp16_tc", torch.half, 8192, False),
                                    ("tf32_tc", torch.float, 8192, True),
                                    ("fp32_fma", torch.float, 4096, False)):
            try:
                self.set_tf32(tf32)
                g = torch.Generator(device=self.dev)
                g.manual_seed(1)
                A = torch.rand(size, size, device=self.dev, dtype=dt, generator=g) - 0.5
                B = torch.rand(size, size, device=self.dev, dtype=dt, generator=g) - 0.5
                C = torch.empty(size, size, device=self.dev, dtype=dt)
                t = self.time_fn(lambda: torch.mm(A, B, out=C), 3, it, 1e9)
                ceil[key + "_flops_per_s"] = 2 * size**3 / (t["median_ms"] * 1e-3)
                ceil[key + "_how"] = (f"{size}³ {'fp16' if dt == torch.half else 'fp32'} matmul"
                                      + (", TF32 on" if tf32 else
                                         (", TF32 off" if dt == torch.float else "")))
                ceil[key + "_timing"] = t
                del A, B, C
            except Exception as e:  # noqa: BLE001
                ceil["errors"][key] = repr(e)
            torch.cuda.empty_cache()
        self.set_tf32(False)
        return ceil

    # --- inputs --------------------------------------------------------------------------------
    def make_inputs(self, case: dict, sigma: float, seed: int) -> dict:
        """Fresh random fp32 NCHW tensors for one (case, sigma)."""
        torch = self.torch
        g = torch.Generator(device=self.dev)
        g.manual_seed(seed ^ zlib.crc32(f"{case['name']}:{sigma}".encode()))
        c = case
        og, taps = c["offset_groups"], c["r"] * c["s"]
        fan_in = (c["c"] // c["groups"]) * taps

        def rand(*shape):
            return torch.rand(*shape, device=self.dev, dtype=torch.float, generator=g)

        x = rand(c["n"], c["c"], c["h"], c["w"]).mul_(2).sub_(1)
        w = rand(c["k"], c["c"] // c["groups"], c["r"], c["s"]).mul_(2).sub_(1)
        w.div_(math.sqrt(fan_in))
        off = torch.randn(c["n"], 2 * og * taps, c["ho"], c["wo"], device=self.dev,
                          dtype=torch.float, generator=g).mul_(sigma)
        m = rand(c["n"], og * taps, c["ho"], c["wo"]).clamp_(min=1e-3) if c["mask"] else None
        return {"x": x, "off": off, "m": m, "w": w}

    def tv_call(self, case, x, off, m, w):
        return self.tv.ops.deform_conv2d(
            x, off, w, None, stride=(case["stride"],) * 2, padding=(case["pad"],) * 2,
            dilation=(case["dilation"],) * 2, mask=m)


def nchw_to_nhwc(t):
    return None if t is None else t.permute(0, 2, 3, 1).contiguous()


def backward_inputs(case: dict, tdt, seed: int = 3, sigma: float = 2.0):
    """Random NCHW input, weight, offsets (σ = ``sigma`` px, default 2), mask and grad_out of a 3×3 case, as the
    backward sweeps and profiles use them (scripts/sweep_bwd.py, scripts/profile_one_bwd.py)."""
    import torch
    c = case
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.rand(c["n"], c["c"], c["h"], c["w"], device="cuda", generator=g).to(tdt)
    w = ((torch.rand(c["k"], c["c"] // c["groups"], 3, 3, device="cuda", generator=g) - .5) / 30).to(tdt)
    off = (torch.randn(c["n"], 18, c["ho"], c["wo"], device="cuda", generator=g) * sigma).to(tdt)
    m = torch.rand(c["n"], 9, c["ho"], c["wo"], device="cuda", generator=g).to(tdt)
    gout = (torch.rand(c["n"], c["k"], c["ho"], c["wo"], device="cuda", generator=g) - .5).to(tdt)
    return x, w, off, m, gout


def rel_err(gpu: Gpu, a, ref) -> float:
    a = a.double()
    return float((a - ref).norm().item() / max(ref.norm().item(), 1e-300))


def run_unit(gpu: Gpu, lib, case: dict, sigma: float, spec: dict, args, state: dict,
             rows: list) -> None:
    """All (dtype, layout) rows of one (case, sigma), appended to `rows` as they start (the
    caller finishes them if this raises). Records errors per step; raises ContextLost when CUDA
    stops working."""
    torch = gpu.torch
    base = gpu.make_inputs(case, sigma, args.seed)
    is_check = sigma == CHECK_SIGMA
    strd, pad, dil, grp = case["stride"], case["pad"], case["dilation"], case["groups"]
    stream = torch.cuda.current_stream().cuda_stream
    for dtype in spec["dtypes"]:
        gpu.set_dtype(dtype)
        tdt = gpu.torch_dtype(dtype)
        t = {k: (None if v is None else v.to(tdt).contiguous()) for k, v in base.items()}
        tv_res, tv_err, ref, tv_rel = None, None, None, None
        state.pop("ref_error", None)
        if is_check:
            try:
                d64 = {k: (None if v is None else v.double()) for k, v in t.items()}
                ref = gpu.tv_call(case, d64["x"], d64["off"], d64["m"], d64["w"])
                del d64
            except Exception as e:  # noqa: BLE001
                ref = None
                state["ref_error"] = f"reference (torchvision float64): {e!r}"
        for layout in spec["layouts"]:
            row = new_row(case, layout, dtype, sigma)
            row["roofline"] = roofline(case, dtype, state["ceilings"])
            rows.append(row)
            err = row["errors"]
            # deft: compile once per (case, layout, dtype)
            kkey = (case["name"], layout, dtype)
            kern = state["kernels"].get(kkey)
            if kkey not in state["kernels"]:
                crec = {"case": case["name"], "layout": layout, "dtype": dtype,
                        "desc": row["desc"]}
                try:
                    if lib is None:
                        raise RuntimeError(state.get("lib_error", "deft library not loaded"))
                    crec["canonical"] = lib.canonical(row["desc"])
                    n0 = lib.nvrtc_compiles()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    kern = lib.compile(row["desc"], args.variant, args.cache_path)
                    torch.cuda.synchronize()
                    crec["compile_s"] = time.perf_counter() - t0
                    crec["nvrtc_compiles"] = lib.nvrtc_compiles() - n0
                    crec["from_cache"] = kern.from_cache
                    crec["variant"] = kern.variant
                except Exception as e:  # noqa: BLE001
                    kern = None
                    crec["error"] = str(e)
                state["kernels"][kkey] = kern
                state["compiles"].append(crec)
            crec = next(c for c in state["compiles"] if (c["case"], c["layout"], c["dtype"]) == kkey)
            row["variant"] = crec.get("variant")
            row["compile_s"] = crec.get("compile_s")
            if key_text(kkey) in state["poisoned"]:
                kern = None
                err["deft"] = ("not run: this kernel lost the CUDA context earlier ("
                               + state["poisoned"][key_text(kkey)] + ")")
            elif kern is None:
                err["deft"] = "compile: " + crec.get("error", "?")
            # tensors in this layout
            if layout == "nchw":
                x, off, m, w = t["x"], t["off"], t["m"], t["w"]
                x_cu, w_cu = x, w
                out = torch.empty(case["n"], case["k"], case["ho"], case["wo"], dtype=tdt,
                                  device=gpu.dev)
                out_nchw = out
            else:
                x, off, m, w = (nchw_to_nhwc(t["x"]), nchw_to_nhwc(t["off"]),
                                nchw_to_nhwc(t["m"]), nchw_to_nhwc(t["w"]))
                # the same storage seen as logical NCHW with channels-last strides, for cuDNN
                x_cu, w_cu = x.permute(0, 3, 1, 2), w.permute(0, 3, 1, 2)
                out = torch.empty(case["n"], case["ho"], case["wo"], case["k"], dtype=tdt,
                                  device=gpu.dev)
                out_nchw = out.permute(0, 3, 1, 2)
            ptrs = None
            if kern is not None:
                ptrs = kern.pointer_args(x, off, m, w, None, out, stream)
            if kern is not None and os.environ.get("DEFT_BENCH_SIMULATE_LOST") == key_text(kkey):
                raise ContextLost("simulated (DEFT_BENCH_SIMULATE_LOST)", kkey)  # test hook
            # correctness at the check sigma
            if kern is not None and is_check:
                try:
                    out.fill_(float("nan"))
                    kern.forward_ptrs(ptrs)
                    torch.cuda.synchronize()
                    row["finite"] = bool(torch.isfinite(out).all().item())
                    if not row["finite"]:
                        err["check"] = (f"{int((~torch.isfinite(out)).sum().item())} non-finite "
                                        f"values in the NaN-poisoned output")
                    if ref is not None:
                        row["rel_err"] = rel_err(gpu, out_nchw, ref)
                    else:
                        err["check"] = state.get("ref_error", "no reference")
                except Exception as e:  # noqa: BLE001
                    err["check"] = str(e)
                    if not gpu.healthy():
                        raise ContextLost(f"deft check {kkey}: {e}", kkey)
            # timings
            if kern is not None:
                try:
                    r = gpu.time_fn(lambda: kern.forward_ptrs(ptrs), args.warmup, args.iters,
                                    args.max_measure_s)
                    row["deft_ms"], row["deft_timing"] = r["median_ms"], r
                except Exception as e:  # noqa: BLE001
                    err["deft"] = str(e)
                    if not gpu.healthy():
                        raise ContextLost(f"deft timing {kkey}: {e}", kkey)
            try:
                r = gpu.time_fn(lambda: torch.nn.functional.conv2d(x_cu, w_cu, None, strd, pad, dil,
                                                                   grp),
                                args.warmup, args.iters, args.max_measure_s)
                row["cudnn_ms"], row["cudnn_timing"] = r["median_ms"], r
            except Exception as e:  # noqa: BLE001
                err["cudnn"] = repr(e)
                if not gpu.healthy():
                    raise ContextLost(f"cuDNN {kkey}: {e}")
            # torchvision: NCHW only; measured once per (case, dtype, sigma), shared by layouts
            if tv_res is None and tv_err is None and not args.no_torchvision:
                try:
                    xt, ot, mt, wt = t["x"], t["off"], t["m"], t["w"]
                    if is_check:
                        tv_rel = rel_err(gpu, gpu.tv_call(case, xt, ot, mt, wt), ref) \
                            if ref is not None else None
                    tv_res = gpu.time_fn(lambda: gpu.tv_call(case, xt, ot, mt, wt), args.warmup,
                                         args.iters, args.max_measure_s)
                except Exception as e:  # noqa: BLE001
                    tv_err = repr(e)
                    if not gpu.healthy():
                        raise ContextLost(f"torchvision {kkey}: {e}")
            if tv_res is not None:
                row["tv_ms"], row["tv_timing"] = tv_res["median_ms"], tv_res
                row["tv_rel_err"] = tv_rel
            elif tv_err is not None:
                err["torchvision"] = tv_err
            finish_row(row, case)
            del x, off, m, w, x_cu, w_cu, out, out_nchw, ptrs
        del t, ref
    del base


class ContextLost(RuntimeError):
    """CUDA stopped working; `deft_key` names the deft kernel that was running, if any."""

    def __init__(self, msg: str, deft_key: tuple | None = None):
        super().__init__(msg)
        self.deft_key = deft_key


def key_text(k: tuple) -> str:
    return ":".join(k)


def log(state, msg):
    print(f"[{time.time() - state['t0']:6.1f}s] {msg}", flush=True)


def row_line(r) -> str:
    e = f" ERR[{','.join(sorted(r['errors']))}]" if r.get("errors") else ""
    return (f"{r['case']} {r['layout']} {r['dtype']} σ={r['sigma']:g}: deft {fmt_ms(r.get('deft_ms'))}"
            f" cuDNN {fmt_ms(r.get('cudnn_ms'))} tv {fmt_ms(r.get('tv_ms'))} "
            f"err {fmt_err(r.get('rel_err'))}{e}")


def order_sigmas(sigmas):
    """The check sigma first, so the acceptance rows are measured before the budget runs out."""
    return sorted(sigmas, key=lambda s: (s != CHECK_SIGMA, sigmas.index(s)))


def run_gpu(args, spec, res, state) -> None:
    gpu = Gpu(args)
    res["env"].update(gpu.env())
    lib = None
    try:
        from deft_ctypes import DeftLibrary
        lib = DeftLibrary(args.lib)
        res["env"]["deft"] = lib.version()
        res["env"]["deft_lib"] = lib.path
        if not lib.gpu_available():
            res.setdefault("notes", []).append("deft_gpu_available() returned 0")
    except Exception as e:  # noqa: BLE001
        state["lib_error"] = f"cannot load {args.lib}: {e}"
        res.setdefault("notes", []).append(state["lib_error"])
        log(state, state["lib_error"])
    if args.ceilings_from:
        with open(args.ceilings_from) as f:
            res["ceilings"] = json.load(f)
        log(state, "ceilings from parent")
    else:
        res["ceilings"] = gpu.measure_ceilings(args.quick)
        c = res["ceilings"]
        log(state, "ceilings: HBM {} GB/s, fp16 {} / tf32 {} / fp32 {} TFLOP/s".format(
            *(("—" if c.get(k) is None else f"{c[k] / s:.0f}") for k, s in (
                ("hbm_bytes_per_s", 1e9), ("fp16_tc_flops_per_s", 1e12),
                ("tf32_tc_flops_per_s", 1e12), ("fp32_fma_flops_per_s", 1e12)))))
    state["ceilings"] = res["ceilings"]
    cases = {c["name"]: c for c in spec["cases"]}
    units = state["units"]
    try:
        for i, (sigma, name) in enumerate(units):
            case = cases[name]
            if time.time() - state["t0"] > args.time_budget:
                res["skipped"] = [f"{n}@σ={s:g}" for s, n in units[i:]]
                log(state, f"time budget {args.time_budget:.0f}s spent; skipping {len(units) - i}"
                           " units")
                break
            rows: list = []
            fatal = None
            try:
                run_unit(gpu, lib, case, sigma, spec, args, state, rows)
            except ContextLost as e:
                fatal = f"CUDA context lost: {e}"
                res["lost_context"] = f"{name} σ={sigma:g}: {e}"
                if e.deft_key:
                    state["poisoned"][key_text(e.deft_key)] = f"σ={sigma:g}: {e}"[:200]
            except Exception as e:  # noqa: BLE001
                fatal = f"{e!r} {traceback.format_exc(limit=3)[-400:]}"
                if not gpu.healthy():
                    res["lost_context"] = f"{name} σ={sigma:g}: {e!r}"
            if fatal is not None:
                log(state, f"{name} σ={sigma:g} failed: {fatal[:300]}")
                if rows:  # the row in progress carries the error
                    rows[-1]["errors"]["fatal"] = fatal
                else:
                    rows.append(dict(new_row(case, spec["layouts"][0], spec["dtypes"][0], sigma),
                                     roofline={}, errors={"fatal": fatal}))
                for r in rows:
                    if "targets" not in r:
                        finish_row(r, case)
            for r in rows:
                log(state, row_line(r))
            res["rows"].extend(rows)
            res["compiles"] = state["compiles"]
            if res.get("lost_context"):
                state["remaining"] = units[i + 1:]
                break
            gpu.torch.cuda.empty_cache()
            write_outputs(res, args.out, final=False, benchmarks_md=None)
    finally:
        if not res.get("lost_context"):
            for k in state["kernels"].values():
                if k is not None:
                    k.release()
        state["kernels"].clear()
        res["compiles"] = state["compiles"]
        res["precision_notes"] = gpu.precision_notes


# ------------------------------------------------------------------------------------------------
# Dry run: fake timings, no torch
# ------------------------------------------------------------------------------------------------
def run_dry(args, spec, res, state) -> None:
    rng = random.Random(args.seed)
    res["env"].update({"device": "FAKE GPU (dry run)", "sm_count": 132, "capability": "9.0",
                       "torch": "n/a", "torchvision": "n/a", "cuda": "n/a", "cudnn": "n/a"})
    lib = None
    try:
        from deft_ctypes import DeftLibrary
        lib = DeftLibrary(args.lib)
        res["env"]["deft"] = lib.version()
    except Exception as e:  # noqa: BLE001
        res.setdefault("notes", []).append(f"dry run without the deft library: {e}")
    res["ceilings"] = {
        "errors": {},
        "hbm_bytes_per_s": 3.0e12, "hbm_how": "FAKE",
        "fp16_tc_flops_per_s": 700e12, "fp16_tc_how": "FAKE",
        "tf32_tc_flops_per_s": 350e12, "tf32_tc_how": "FAKE",
        "fp32_fma_flops_per_s": 50e12, "fp32_fma_how": "FAKE",
    }
    state["ceilings"] = res["ceilings"]
    cases = {c["name"]: c for c in spec["cases"]}
    for sigma, name in state["units"]:
        case = cases[name]
        for dtype in spec["dtypes"]:
            for layout in spec["layouts"]:
                row = new_row(case, layout, dtype, sigma)
                row["roofline"] = rl = roofline(case, dtype, res["ceilings"])
                key = (name, layout, dtype)
                if not any((c["case"], c["layout"], c["dtype"]) == key for c in state["compiles"]):
                    crec = {"case": name, "layout": layout, "dtype": dtype, "desc": row["desc"],
                            "compile_s": rng.uniform(0.1, 0.4), "from_cache": False,
                            "variant": "FAKE"}
                    if lib is not None:  # the real parser checks the description text
                        try:
                            crec["canonical"] = lib.canonical(row["desc"])
                        except Exception as e:  # noqa: BLE001
                            crec["error"] = f"canonical: {e}"
                            crec.pop("variant")
                    state["compiles"].append(crec)
                if name == "dw512_n1" and dtype == "fp32" and layout == "nhwc" and sigma != CHECK_SIGMA:
                    row["errors"]["deft"] = "FAKE error to exercise the report"
                else:
                    row["deft_ms"] = rl["roofline_ms"] / rng.uniform(0.2, 0.9) * (1 + sigma / 20)
                row["cudnn_ms"] = rl["roofline_ms"] / rng.uniform(0.3, 1.0)
                row["tv_ms"] = row["cudnn_ms"] * rng.uniform(2, 30)
                if sigma == CHECK_SIGMA and "deft_ms" in row:
                    row["finite"] = True
                    row["rel_err"] = TOLERANCE[dtype] * 10 ** rng.uniform(-3, 0.2)
                finish_row(row, case)
                res["rows"].append(row)
    res["compiles"] = state["compiles"]


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def split_list(values):
    out = []
    for v in values or []:
        out += [x for x in str(v).split(",") if x]
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lib", default="build/libdeft.so", help="deft shared library")
    p.add_argument("--shapes", default=os.path.join(HERE, "shapes.json"))
    p.add_argument("--out", default="bench_out",
                   help="directory for results.json, BENCHMARKS.section.md, bench.png")
    p.add_argument("--cases", nargs="*", help="case names (space or comma separated)")
    p.add_argument("--layouts", nargs="*", help="subset of nchw,nhwc")
    p.add_argument("--dtypes", nargs="*", help="subset of fp32_tf32,fp32,fp16")
    p.add_argument("--sigmas", nargs="*", help="offset std devs in pixels")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--max-measure-s", type=float, default=0.3,
                   help="cap on one measurement's timed calls (slow calls get fewer iters)")
    p.add_argument("--quick", action="store_true",
                   help=f"only sigma={CHECK_SIGMA:g}, warmup 5, iters 20, 1 GiB copy")
    p.add_argument("--dry-run", action="store_true", help="no GPU/torch: fake timings")
    p.add_argument("--benchmarks-md", help="replace/append the bench section in this file (a run "
                   "of part of the shape file leaves it alone, unless --partial-md)")
    p.add_argument("--partial-md", action="store_true",
                   help="let a run of some cases, layouts, dtypes or sigmas replace the section")
    p.add_argument("--time-budget", type=float, default=200,
                   help="seconds; remaining (case, sigma) units are skipped after this")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cache", default="default",
                   help="deft database: 'default' (the library's), 'none', or a path")
    p.add_argument("--variant", default=None, help="force one deft variant text for every case")
    p.add_argument("--flush-l2", action="store_true",
                   help="clear a 256 MiB buffer before each timed call (outside the events)")
    p.add_argument("--no-torchvision", action="store_true", help="skip torchvision timings")
    p.add_argument("--pre-sleep-us", type=float, default=100,
                   help="GPU sleep queued before each timed call so the host's launch time "
                        "falls outside the events (0: off)")
    # internal: continuation in a fresh process after a lost CUDA context
    p.add_argument("--units", help=argparse.SUPPRESS)
    p.add_argument("--ceilings-from", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    p.add_argument("--poisoned", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.cache_path = {"default": None, "none": ""}.get(args.cache, args.cache)
    if args.quick:
        args.warmup = min(args.warmup, 5)
        args.iters = min(args.iters, 20)
    return args


def select(args, spec) -> dict:
    cases = spec["cases"]
    if args.cases:
        want = split_list(args.cases)
        unknown = [n for n in want if n not in {c["name"] for c in cases}]
        if unknown:
            raise SystemExit(f"unknown case(s): {', '.join(unknown)}; known: "
                             f"{', '.join(c['name'] for c in cases)}")
        cases = [c for c in cases if c["name"] in want]
    layouts = split_list(args.layouts) or spec["layouts"]
    dtypes = split_list(args.dtypes) or spec["dtypes"]
    sigmas = [float(s) for s in split_list(args.sigmas)] or spec["sigmas"]
    if args.quick:
        sigmas = [CHECK_SIGMA]
    for l in layouts:
        if l not in LAYOUTS:
            raise SystemExit(f"unknown layout {l}")
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d}")
    return {"cases": cases, "layouts": layouts, "dtypes": dtypes, "sigmas": sigmas}


def continue_in_child(args, state, res) -> None:
    """After a lost CUDA context: run the remaining units in a fresh process and merge."""
    remaining = state.get("remaining") or []
    if not remaining:
        return
    with tempfile.TemporaryDirectory(prefix="deft-bench-") as tmp:
        cpath, wpath = os.path.join(tmp, "ceilings.json"), os.path.join(tmp, "worker.json")
        with open(cpath, "w") as f:
            json.dump(res["ceilings"], f)
        argv = [sys.executable, os.path.abspath(__file__), "--lib", args.lib, "--shapes",
                args.shapes, "--out", os.path.join(tmp, "out"),
                "--layouts", *state["spec"]["layouts"], "--dtypes", *state["spec"]["dtypes"],
                "--warmup", str(args.warmup), "--iters", str(args.iters),
                "--max-measure-s", str(args.max_measure_s), "--pre-sleep-us",
                str(args.pre_sleep_us), "--time-budget",
                str(args.time_budget), "--seed", str(args.seed), "--cache", args.cache,
                "--units", ",".join(f"{s!r}:{n}" for s, n in remaining),
                "--ceilings-from", cpath, "--worker-out", wpath, "--t0", str(state["t0"]),
                "--poisoned", json.dumps(state["poisoned"])]
        if args.variant:
            argv += ["--variant", args.variant]
        if args.flush_l2:
            argv.append("--flush-l2")
        if args.no_torchvision:
            argv.append("--no-torchvision")
        log(state, f"continuing {len(remaining)} units in a fresh process")
        subprocess.run(argv, check=False)
        try:
            with open(wpath) as f:
                sub = json.load(f)
            res["rows"].extend(sub.get("rows", []))
            res["compiles"] = res.get("compiles", []) + sub.get("compiles", [])
            if sub.get("skipped"):
                res["skipped"] = res.get("skipped", []) + sub["skipped"]
            if sub.get("lost_context"):
                res.setdefault("notes", []).append("lost CUDA context again: "
                                                   + sub["lost_context"])
        except Exception as e:  # noqa: BLE001
            res.setdefault("notes", []).append(f"child process gave no results: {e!r}")
            res["skipped"] = res.get("skipped", []) + [f"{n}@σ={s:g}" for s, n in remaining]


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = select(args, load_shapes(args.shapes))
    t0 = args.t0 or time.time()
    if args.units:  # child: explicit (sigma, case) list
        units = []
        for u in args.units.split(","):
            s, n = u.split(":", 1)
            units.append((float(s), n))
    else:
        units = [(s, c["name"]) for s in order_sigmas(spec["sigmas"]) for c in spec["cases"]]
    poisoned = json.loads(args.poisoned) if args.poisoned else {}
    state = {"t0": t0, "units": units, "kernels": {}, "compiles": [], "spec": spec,
             "poisoned": poisoned}
    res = {
        "dry_run": bool(args.dry_run),
        "command": " ".join(["python3"] + [os.path.relpath(__file__)] + (argv or sys.argv[1:])),
        "env": {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                "host": platform.node(), "python": platform.python_version()},
        "protocol": {"warmup": args.warmup, "iters": args.iters,
                     "max_measure_s": args.max_measure_s, "flush_l2": args.flush_l2,
                     "pre_sleep_us": args.pre_sleep_us,
                     "seed": args.seed, "cache": args.cache, "variant": args.variant,
                     "check_sigma": CHECK_SIGMA, "tolerance": TOLERANCE,
                     "time_budget_s": args.time_budget},
        "selection": {k: spec[k] for k in ("layouts", "dtypes", "sigmas")},
        "cases": spec["cases"], "rows": [], "compiles": [], "ceilings": {},
    }
    os.makedirs(args.out, exist_ok=True)
    if args.dry_run:
        run_dry(args, spec, res, state)
    else:
        try:
            run_gpu(args, spec, res, state)
        except Exception as e:  # noqa: BLE001  (torch missing, no GPU, ...)
            res.setdefault("notes", []).append(f"fatal: {e!r}")
            log(state, f"fatal: {e!r}\n{traceback.format_exc()}")
        if args.worker_out:
            res["wall_s"] = time.time() - t0
            with open(args.worker_out, "w") as f:
                json.dump(res, f, default=str)
            if res.get("lost_context"):
                continue_in_child(args, state, res)
                with open(args.worker_out, "w") as f:
                    json.dump(res, f, default=str)
            return 0
        if res.get("lost_context"):
            continue_in_child(args, state, res)
    res["wall_s"] = time.time() - t0
    # The section is one run's table: a run of a subset of the shape file would drop the other
    # rows, so it leaves the file alone unless asked (--partial-md).
    full = load_shapes(args.shapes)
    partial = ({c["name"] for c in spec["cases"]} != {c["name"] for c in full["cases"]} or
               any(set(spec[k]) != set(full[k]) for k in ("layouts", "dtypes", "sigmas")))
    md_path = args.benchmarks_md
    if md_path and partial and not args.partial_md:
        print(f"note: {md_path} left as it was: this run covers part of {args.shapes} "
              f"(--partial-md to replace the section anyway)", file=sys.stderr)
        md_path = None
    write_outputs(res, args.out, final=True, benchmarks_md=md_path)
    s = res["summary"]
    print(f"\nwrote {os.path.join(args.out, 'results.json')}, BENCHMARKS.section.md"
          + (", bench.png" if res.get("plot") else "")
          + (f"; updated {md_path}" if md_path else ""))
    for n in res.get("notes", []):
        print("note:", n[:300])
    print(f"{res['env'].get('device', '?')} | wall {res['wall_s']:.0f}s | σ={CHECK_SIGMA:g}: "
          f"deft/cuDNN {s['deft_over_cudnn_pass']} PASS {s['deft_over_cudnn_miss']} MISS; "
          f"tv/deft {s['tv_over_deft_pass']} PASS {s['tv_over_deft_miss']} MISS; "
          f"correct {s['correct']} ok {s['incorrect']} FAIL; rows with errors "
          f"{s['rows_with_errors']}" + (" | DRY RUN (fake numbers)" if args.dry_run else ""))
    print(short_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
