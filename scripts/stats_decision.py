#!/usr/bin/env python3
"""Do offset statistics change the tuner's decision? (issue 5) For each case, `deft tune`
(with --window unless --no-window) once per offset spread sigma (each run its own statistics
bucket), then each sigma's pick timed on the offsets of every sigma, in one process; prints a
markdown table: a pick should win on its own distribution, then `deft inspect` of each case (every
candidate's time or error). --pass backward_data tunes and
times the grad-input pass (grad input, offset and mask) instead of the forward.

On the GPU machine, from the repo root:
  python3 scripts/stats_decision.py [--cases dense512,resnet_res4] [--sigmas 0.5,8]
      [--layout nhwc] [--dtype fp16] [--pass forward|backward_data] [--no-window]
      [--shapes bench/shapes.json] [--cli build/tools/deft] [--lib build/libdeft.so]
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from deft_ctypes import DeftLibrary  # noqa: E402
from sweep import case_desc, case_geometry, time_us  # noqa: E402


def tuned_winners(cli, desc, sigmas, db, seconds, pass_="forward", window=True, inspect=None):
    """{sigma: winner variant text} from one `deft tune` run per sigma (of pass_). inspect (a
    list): receives `deft inspect`'s report of the pass's records (every candidate's time or
    error) once all sigmas are tuned."""
    out = {}
    for s in sigmas:
        r = subprocess.run([cli, "tune", desc, "--sigma", str(s), "--db", db, "--passes", pass_,
                            "--seconds", str(seconds)] + (["--window"] if window else []),
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"deft tune --sigma {s} failed:\n{r.stdout}\n{r.stderr}")
        dump = db + ".jsonl"
        subprocess.run([cli, "cache", "export", dump, "--db", db], check=True, capture_output=True)
        # deft's bucket of sigma (stats_bucket): the nearest power of two, 2^-3 .. 2^6
        want = f"v1:sigma~{2.0 ** min(6, max(-3, round(math.log2(s)))):g}"
        for line in open(dump).read().splitlines()[1:]:
            rec = json.loads(line)
            if rec["stats_bucket"] == want and \
                    ("pass=backward_data" in rec["desc"]) == (pass_ == "backward_data"):
                out[s] = rec["winner"]
    if inspect is not None:
        pdesc = desc if pass_ == "forward" else f"{desc} pass={pass_}"
        r = subprocess.run([cli, "inspect", pdesc, "--db", db], capture_output=True, text=True)
        inspect.append(r.stdout + r.stderr)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cli", default="build/tools/deft")
    ap.add_argument("--lib", default="build/libdeft.so")
    ap.add_argument("--shapes", default="bench/shapes.json")
    ap.add_argument("--cases", default="dense512,resnet_res4")
    ap.add_argument("--sigmas", default="0.5,8")
    ap.add_argument("--layout", default="nhwc")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--seconds", type=float, default=0.1, help="deft tune --seconds")
    ap.add_argument("--pass", dest="pass_", default="forward", choices=["forward", "backward_data"])
    ap.add_argument("--no-window", dest="window", action="store_false",
                    help="tune without --window (the staging=window variants)")
    a = ap.parse_args()
    sigmas = [float(s) for s in a.sigmas.split(",")]
    lib = DeftLibrary(a.lib)
    cases = {c["name"]: c for c in json.load(open(a.shapes))["cases"]}
    tdt = torch.half if a.dtype == "fp16" else torch.float32
    rows = []
    reports = []  # deft inspect per case: the candidates' times and errors, printed last
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.cases.split(","):
            c = cases[name]
            desc = lib.canonical(case_desc(c, a.dtype, a.layout))
            picks = tuned_winners(a.cli, desc, sigmas, os.path.join(tmp, name + ".db"), a.seconds,
                                  a.pass_, a.window, reports)
            n, ci, k, h, w, r, s_, st, pad, g, og, ho, wo = case_geometry(c)
            torch.manual_seed(0)
            x = torch.rand(n, ci, h, w, device="cuda", dtype=tdt) * 2 - 1
            wt = (torch.rand(k, ci // g, r, s_, device="cuda", dtype=tdt) * 2 - 1) / (ci // g * r * s_) ** 0.5
            m = torch.rand(n, og * r * s_, ho, wo, device="cuda", dtype=tdt)
            nhwc = a.layout == "nhwc"
            cl = (lambda t: t.permute(0, 2, 3, 1).contiguous()) if nhwc else (lambda t: t)
            out = torch.empty((n, ho, wo, k) if nhwc else (n, k, ho, wo), device="cuda", dtype=tdt)
            bwd = a.pass_ == "backward_data"
            kernels = {s: (lib.compile_ex(desc, None, None, picks[s], None) if bwd
                           else lib.compile(desc, picks[s], "")) for s in sigmas}
            X, M, W = cl(x), cl(m), cl(wt)
            gout = torch.rand_like(out) * 2 - 1
            for dist in sigmas:
                off = cl((torch.randn(n, 2 * og * r * s_, ho, wo, device="cuda") * dist).to(tdt))
                gin, goff, gm = torch.empty_like(X), torch.empty_like(off), torch.empty_like(M)
                if bwd:  # grad input, offset and mask (the grad-input pass alone)
                    run = lambda kk: kk.backward(X, off, M, W, gout, gin, goff, gm, None, None, 0)  # noqa
                else:
                    run = lambda kk: kk.forward(X, off, M, W, None, out)  # noqa
                times = {s: time_us(lambda kk=kernels[s]: run(kk)) for s in sigmas}
                rows.append((name, dist, times, picks))
    print(f"| case ({a.layout}, {a.dtype}, {a.pass_}) | offsets σ | " +
          " | ".join(f"pick for σ={s} (µs)" for s in sigmas) + " | own pick's margin |")
    print("|---|--:|" + "--:|" * len(sigmas) + "--:|")
    for name, dist, times, picks in rows:
        own = times[dist]
        best_other = min(t for s, t in times.items() if s != dist)
        print(f"| {name} | {dist:g} | " + " | ".join(f"{times[s]:.1f}" for s in sigmas) +
              f" | {best_other / own:.2f}× |")
    print()
    for name in dict.fromkeys(r[0] for r in rows):
        picks = next(r[3] for r in rows if r[0] == name)
        for s in sigmas:
            print(f"{name} σ={s:g}: {picks[s]}")
    for report in reports:  # every candidate's time (or why it did not run), per case
        print()
        print(report.rstrip())


if __name__ == "__main__":
    main()
