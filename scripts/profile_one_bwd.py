#!/usr/bin/env python3
"""Runs one bench case's grad-weight pass (NCHW) a few times with a given weight variant, for
ncu: profile_one_bwd.py CASE [DTYPE] [WEIGHT_VARIANT]; with DEFT_PROFILE_PASS=data the
backward_data pass instead (grad input, offset and mask), the variant then that pass's;
DEFT_PROFILE_SIGMA: the offsets' spread in pixels (default 2); DEFT_PROFILE_SHAPES: the shape
list the case is looked up in (default bench/shapes.json)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import torch  # noqa: E402
import bench  # noqa: E402
from deft_ctypes import DeftLibrary  # noqa: E402

name = sys.argv[1]
dtype = sys.argv[2] if len(sys.argv) > 2 else "fp16"
variant = sys.argv[3] if len(sys.argv) > 3 else None
spec = bench.load_shapes(os.environ.get("DEFT_PROFILE_SHAPES") or
                         os.path.join(os.path.dirname(__file__), "..", "bench", "shapes.json"))
c = next((x for x in spec["cases"] if x["name"] == name), None)
if c is None:
    sys.exit(f"profile_one_bwd.py: no case {name!r} in the shape list")
tdt = torch.half if dtype == "fp16" else torch.float
lib = DeftLibrary("build/libdeft.so")
x, w, off, m, gout = bench.backward_inputs(c, tdt, sigma=float(os.environ.get("DEFT_PROFILE_SIGMA", "2")))
data = os.environ.get("DEFT_PROFILE_PASS", "weight") == "data"
desc = bench.deft_desc(c, "nchw", dtype)
k = lib.compile_ex(desc, None, None, variant if data else None, None if data else variant)
gx, goff, gm, gw = (torch.empty_like(v) for v in (x, off, m, w))
for _ in range(4):
    if data:
        k.backward(x, off, m, w, gout, gx, goff, gm, None, None, 0)
    else:
        k.backward(x, off, m, w, gout, None, None, None, gw, None, 0)
torch.cuda.synchronize()
print("data" if data else "weight", "variant:", variant or "default")
