#!/usr/bin/env python3
"""Does a deft call slow down the torch calls around it? Host time per iteration of a loop of
torch calls (a convolution, batch norm and ReLU, as in a ResNet block), alone and with one
deform_conv2d call (deft's or torchvision's, forward only, no grad) between its iterations.
If deft's op costs the host only its own time, loop + op = loop + op alone; any excess is
interference (the driver's state after deft's launches, caches).

    python3 scripts/host_interference.py [--iters 3000]   (on a GPU machine; run it with
    DEFT_PDL=0 as well to see whether deft's programmatic launches are the cause)
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import deft  # noqa: E402
from host_overhead import timed  # noqa: E402  (this folder: sys.path[0])


def host_us(fn, iters):
    """Host time per call of ``fn`` over ``iters`` calls back to back (host_overhead.timed)."""
    return timed(fn, iters)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=3000)
    args = ap.parse_args()
    import torchvision

    dev, dt = "cuda", torch.float16
    g = torch.Generator(device=dev).manual_seed(0)
    n, c, h, w = 2, 64, 16, 16
    x = torch.rand(n, c, h, w, device=dev, dtype=dt, generator=g) - 0.5
    off = torch.randn(n, 18, h, w, device=dev, dtype=dt, generator=g) * 2
    m = torch.rand(n, 9, h, w, device=dev, dtype=dt, generator=g)
    wt = (torch.rand(c, c, 3, 3, device=dev, dtype=dt, generator=g) - 0.5) / (9 * c) ** 0.5
    bn_w = torch.ones(c, device=dev, dtype=dt)
    bn_b = torch.zeros(c, device=dev, dtype=dt)
    rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)

    def block():
        y = F.conv2d(x, wt, None, padding=1)
        y = F.batch_norm(y, rm, rv, bn_w.float(), bn_b.float(), training=False)
        return F.relu(y)

    def dft():
        return deft.ops.deform_conv2d(x, off, wt, None, padding=1, mask=m)

    def tv():
        return torchvision.ops.deform_conv2d(x, off, wt, None, padding=1, mask=m)

    rows = []
    with torch.no_grad():
        base = host_us(block, args.iters)
        rows.append(("conv + bn + relu", base, None))
        for name, op in (("deft", dft), ("torchvision", tv)):
            alone = host_us(op, args.iters)

            def both(op=op):
                block()
                op()
            together = host_us(both, args.iters)
            rows.append((f"{name} op alone", alone, None))
            rows.append((f"conv + bn + relu + {name} op", together, together - base - alone))
    print(f"host us per iteration, fp16 n={n} c={c} {h}x{w}, {torch.cuda.get_device_name()}, "
          f"DEFT_PDL={os.environ.get('DEFT_PDL', '(unset: on)')}")
    print(f"{'loop':40s} {'host us':>9s} {'excess us':>10s}")
    for name, t, ex in rows:
        print(f"{name:40s} {t:9.1f} {'' if ex is None else f'{ex:10.1f}'}")


if __name__ == "__main__":
    main()
