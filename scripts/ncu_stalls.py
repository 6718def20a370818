#!/usr/bin/env python3
"""Summarises a per-SASS-instruction ncu export (ncu -i REPORT --page source --print-source sass
--csv, as scripts/device_session.sh ncu and ncubwd write it): the kernel's stall reasons in
percent of all samples, the instructions with the most samples and their top reasons, and,
with --regions, the share of samples and of executed warp instructions between the given
SASS addresses (the low 20 bits, hex, as the listing prints them: a region runs from each
address to the next).

  ncu_stalls.py ncu-bwd-sass-dense512.csv [--top 30] [--regions b2ae0,b39b0,b3f20]"""
import argparse
import csv


def num(x: str) -> int:
    try:
        return int(x)
    except ValueError:
        return 0


ap = argparse.ArgumentParser()
ap.add_argument("csv")
ap.add_argument("--top", type=int, default=25)
ap.add_argument("--regions", default="", help="comma-separated start addresses (hex)")
args = ap.parse_args()

with open(args.csv, newline="") as f:
    rows = list(csv.reader(f))
# row 0 names the kernel, row 1 is the header, the rest are instructions
header, data = rows[1], rows[2:]
col = {h: i for i, h in enumerate(header)}
samples = col["Warp Stall Sampling (All Samples)"]
executed = col["Instructions Executed"]
reasons = [i for i, h in enumerate(header) if h.startswith("stall_") and "Not Issued" not in h]

totals = {header[i][6:]: sum(num(r[i]) for r in data) for i in reasons}
all_samples = sum(totals.values()) or 1
print(f"kernel: {rows[0][1] if len(rows[0]) > 1 else '?'}; {sum(num(r[samples]) for r in data)} samples")
print("stall reasons: " + ", ".join(
    f"{k} {100 * v / all_samples:.1f} %" for k, v in sorted(totals.items(), key=lambda kv: -kv[1])
    if v > 0.005 * all_samples))

print(f"\ntop {args.top} instructions (samples, address, instruction, top reasons):")
for r in sorted(data, key=lambda r: -num(r[samples]))[:args.top]:
    top = sorted(((header[i][6:], num(r[i])) for i in reasons if num(r[i]) > 0), key=lambda kv: -kv[1])[:3]
    print(f"{r[samples]:>7} {r[0][-5:]} {r[1].strip()[:60]:<60} {top}")

if args.regions:
    starts = [int(a, 16) for a in args.regions.split(",")]
    names = ["(before)"] + args.regions.split(",")
    s_acc = [0] * (len(starts) + 1)
    e_acc = [0] * (len(starts) + 1)
    for r in data:
        a = int(r[0], 16) & 0xFFFFF
        i = sum(1 for b in starts if a >= b)
        s_acc[i] += num(r[samples])
        e_acc[i] += num(r[executed])
    st, et = sum(s_acc) or 1, sum(e_acc) or 1
    print("\nregion      samples  executed warp instructions")
    for n, s, e in zip(names, s_acc, e_acc):
        print(f"{n:<10} {100 * s / st:6.1f} %  {100 * e / et:6.1f} %  ({e})")
