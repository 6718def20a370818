#!/usr/bin/env python3
"""Runs one deft layer a few times on random data (for ncu): profile_one.py '<desc>' [variant]"""
import os, sys
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import torch
from deft_ctypes import DeftLibrary

desc, variant = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
lib = DeftLibrary("build/libdeft.so")
f = dict(kv.split("=") for kv in desc.split()[1:])
n, c, h, w, k = (int(f[x]) for x in "nchwk")
g, og, r = int(f.get("groups", 1)), int(f.get("offset_groups", 1)), int(f.get("r", 3))
dt = torch.half if f["dtype"] == "f16" else torch.float32
nhwc = f["layout"] == "nhwc"
ho, wo = h, w  # stride 1, pad 1 cases only
shape = lambda a, b, cc, d: (a, cc, d, b) if nhwc else (a, b, cc, d)
x = torch.rand(shape(n, c, h, w), device="cuda", dtype=dt)
wt = torch.rand((k, r, r, c // g) if nhwc else (k, c // g, r, r), device="cuda", dtype=dt) / 30
off = (torch.randn(shape(n, 2 * og * r * r, ho, wo), device="cuda") * 2).to(dt)
m = torch.rand(shape(n, og * r * r, ho, wo), device="cuda", dtype=dt)
out = torch.empty(shape(n, k, ho, wo), device="cuda", dtype=dt)
kern = lib.compile(desc, variant, "")
for _ in range(4):
    kern.forward(x, off, m, wt, None, out)
torch.cuda.synchronize()
print("variant:", kern.variant)
