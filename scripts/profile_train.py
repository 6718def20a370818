#!/usr/bin/env python3
"""Where a training step of examples/train_resnet_dcn.py spends its time: the top CUDA kernels
(torch.profiler) over two windows, early steps and later ones; with --cpu also the host side
(CPU activities: the ops by their own CPU time, and the GPU-idle question: wall time of the two
steps against their CUDA kernel time).
Usage (on the device, from the repo root):
  python3 scripts/profile_train.py [--op deft|torchvision] [--batch 128] [--cpu]"""
import argparse, os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import torch
import torch.nn.functional as F
import train_resnet_dcn as ex

p = argparse.ArgumentParser()
p.add_argument("--op", default="deft", choices=["deft", "torchvision"])
p.add_argument("--batch", type=int, default=128)
p.add_argument("--steps", type=int, default=14)
p.add_argument("--cpu", action="store_true", help="also profile the host (CPU activities)")
a = p.parse_args()

ns = argparse.Namespace(seed=0, classes=10, batch=a.batch, size=128, batches=8, channels_last=False,
                        offset_init_std=0.0, offset_mask="joint", lr=0.01, momentum=0.9,
                        offset_lr_mult=0.1, amp=True, init_scale=2.0 ** 10)
import torchvision.ops
op = ex.deft.ops.deform_conv2d if a.op == "deft" else torchvision.ops.deform_conv2d
torch.backends.cudnn.benchmark = True
model = ex.build_model(op, ns).cuda().train()
opt = ex.make_optimizer(model, ns)  # the example's (offset convolutions at 0.1x the rate)
scaler = ex.grad_scaler(True, ns.init_scale)
batches = ex.make_batches(ns, "cuda")
windows = {(1, 3): "steps 2-3", (10, 12): "steps 11-12"}

def step(i):
    x, y = batches[i % len(batches)]
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()

i = 0
while i < a.steps:
    w = next((k for k in windows if k[0] == i), None)
    if w is None:
        step(i); i += 1; continue
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    if a.cpu:
        acts.append(torch.profiler.ProfilerActivity.CPU)
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        for j in range(w[0], w[1]):
            step(j)
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    i = w[1]
    avg = prof.key_averages()
    # each kernel once: with CPU activities a kernel's time is also the self device time of the
    # op that launched it, so only the CPU-side entries are summed (the table's "Self CUDA time
    # total"); without them the entries are the kernels. (Until session 15 the --cpu figure
    # summed both, twice the kernels' time.)
    from torch.autograd import DeviceType
    evs = [e for e in avg if e.device_type == DeviceType.CPU] if a.cpu else list(avg)
    cuda_ms = sum(e.self_device_time_total if hasattr(e, "self_device_time_total") else e.self_cuda_time_total
                  for e in evs) / 1e3
    print(f"=== {a.op}, batch {a.batch}, {windows[w]} (2 steps), scale {scaler.get_scale()}: "
          f"wall {wall_ms:.1f} ms (under the profiler), CUDA kernels {cuda_ms:.1f} ms")
    print(avg.table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
    if a.cpu:
        print(avg.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
