#!/usr/bin/env python3
"""Train a ResNet-18 with deformable convolutions (DCNv2) with deft or torchvision, and compare.

Every 3x3 convolution of torchvision's layer2 and layer3 (stages 3-4 of the network, counting
the stem as stage 1) becomes a DCNv2 layer: the same weight, plus one convolution of its input
that predicts the offsets and (through a sigmoid) the mask, 3 * 9 channels -- mmcv's ModulatedDeformConv2dPack and deft.nn.DeformConv2dPack layout
(``--offset-mask separate``: two convolutions, 18 and 9 channels, as before 2026-12-02). The network
(10 classes) trains on synthetic data: random 3x128x128 images whose labels are a fixed linear
function of their coarse colour layout (learnable), a fixed set
of batches cycled, SGD (lr 0.01, momentum 0.9; the offset / mask convolutions at 0.1x that rate,
initialised to zero as in mmcv, so that each DCN layer starts as its plain convolution),
fp16 autocast with a GradScaler by default.

Both ops start from the same weights and see the same batches. Each step is timed with CUDA
events; the first --warmup steps (which include deft's kernel compiles, or their loading from
the cache, and cuDNN's autotuning) are left out of the median.

    python3 examples/train_resnet_dcn.py                       # both ops, 50 steps
    python3 examples/train_resnet_dcn.py --op deft --steps 100 --json /tmp/dcn.json
    python3 examples/train_resnet_dcn.py --no-amp              # float32
    python3 examples/train_resnet_dcn.py --graphs              # model as CUDA graphs
    python3 examples/train_resnet_dcn.py --compile             # model under torch.compile

Needs a CUDA device, torch and torchvision, and deft's Python package (installed, or this
source tree's python/ with libdeft built in build/).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

try:
    import deft
except ImportError:  # run from the source tree
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import deft


class DCNv2(nn.Module):
    """A deformable version of ``conv`` (same weight, stride, padding, dilation, groups) whose
    offsets and mask come from convolutions of its input; ``op`` is deft.ops.deform_conv2d or
    torchvision.ops.deform_conv2d (same signature). ``joint``: one convolution gives both, the
    offsets in its first 2 * taps channels and the mask's logits in the last taps (mmcv's
    ModulatedDeformConv2dPack); else one convolution each."""

    def __init__(self, conv: nn.Conv2d, op, init_std: float, joint: bool = True):
        super().__init__()
        kh, kw = conv.kernel_size
        self.taps = kh * kw
        self.op = op
        self.joint = joint
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        geo = dict(kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                   dilation=conv.dilation)
        if joint:
            self.conv_offset = nn.Conv2d(conv.in_channels, 3 * self.taps, **geo)
            convs = (self.conv_offset,)
        else:
            self.conv_offset = nn.Conv2d(conv.in_channels, 2 * self.taps, **geo)
            self.conv_mask = nn.Conv2d(conv.in_channels, self.taps, **geo)
            convs = (self.conv_offset, self.conv_mask)
        for c in convs:  # zero (the default): the layer starts as its plain convolution
            if init_std > 0:
                nn.init.normal_(c.weight, std=init_std)
            else:
                nn.init.zeros_(c.weight)
            nn.init.zeros_(c.bias)

    def forward(self, x):
        if self.joint:
            out = self.conv_offset(x)
            offset = out[:, :2 * self.taps]
            mask = torch.sigmoid(out[:, 2 * self.taps:])
        else:
            offset = self.conv_offset(x)
            mask = torch.sigmoid(self.conv_mask(x))
        return self.op(x, offset, self.weight, self.bias, stride=self.stride,
                       padding=self.padding, dilation=self.dilation, mask=mask)


def conv_floor(x, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
               mask=None):
    """Not a deformable convolution: cuDNN's convolution of the same weight, the offsets and
    mask computed by the layer but unused (so autograd skips their convolution's backward).
    A step with it costs less than any DCN op's could -- the floor under --floor."""
    return F.conv2d(x, weight, bias, stride, padding, dilation)


def build_model(op, args) -> nn.Module:
    """ResNet-18 with DCNv2 in layer2 and layer3; the same weights for every op given the seed
    (the op creates no parameters)."""
    import torchvision

    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(num_classes=args.classes)
    for stage in (model.layer2, model.layer3):
        for block in stage:
            joint = args.offset_mask == "joint"
            block.conv1 = DCNv2(block.conv1, op, args.offset_init_std, joint)
            block.conv2 = DCNv2(block.conv2, op, args.offset_init_std, joint)
    return model


def make_batches(args, device):
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    proj = torch.randn(3 * 16, args.classes, device=device, generator=g)
    batches = []
    for _ in range(args.batches):
        x = torch.randn(args.batch, 3, args.size, args.size, device=device, generator=g)
        # Learnable labels: the class is a fixed linear function of the image's coarse 4x4
        # colour layout, so the loss falls steadily instead of memorising noise (a chaotic
        # loss curve would make the two ops' curves incomparable).
        feats = F.adaptive_avg_pool2d(x, 4).flatten(1)
        y = (feats @ proj).argmax(1)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append((x, y))
    return batches


def grad_scaler(enabled: bool, init_scale: float):
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", init_scale=init_scale, enabled=enabled)
    return torch.cuda.amp.GradScaler(init_scale=init_scale, enabled=enabled)


def make_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    """SGD with the offset / mask convolutions at args.offset_lr_mult x the rest's rate: at the
    full rate their first steps throw the sampling points out of the image (the DCN layers then
    output zeros and the network stops learning: until 2026-12-02 this example's loss stayed at
    ln 10 for every op, while the same network with plain convolutions learned)."""
    offset_params = [p for n, p in model.named_parameters() if ".conv_offset." in n or
                     ".conv_mask." in n]
    ids = {id(p) for p in offset_params}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids]}]
    if offset_params:
        groups.append({"params": offset_params, "lr": args.lr * args.offset_lr_mult})
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)


def train(op, init_state, batches, args) -> dict:
    model = build_model(op, args)
    model.load_state_dict(init_state)
    model = model.cuda().train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, args)
    scaler = grad_scaler(args.amp, args.init_scale)
    if args.graphs:
        # The model's forward and backward each become one CUDA graph
        # (torch.cuda.make_graphed_callables; its warm-up runs also compile deft's kernels), so
        # the host launches a step's network with two calls and the step costs what the GPU
        # does. The optimizer and the GradScaler stay eager. Autocast's weight cache must be off
        # around graphs.
        with torch.autocast("cuda", dtype=torch.float16, enabled=args.amp, cache_enabled=False):
            model = torch.cuda.make_graphed_callables(model, (batches[0][0],))
    if args.compile:
        # TorchInductor for the whole model (both ops: deft's through its custom ops, which
        # trace without graph breaks); the first steps compile, inside the warm-up.
        model = torch.compile(model)
    events = []
    losses = []
    # Host time of each phase of a step (perf_counter; the host runs ahead of the GPU except at
    # the GradScaler's check for infs in scaler.step, a synchronisation): the forward and the
    # backward phases are the host's time to queue their work, what bounds a host-bound step.
    phases = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    first_step_s = None
    prof = None
    for step in range(args.steps):
        if args.cprofile and step == args.warmup:
            import cProfile
            prof = cProfile.Profile()
            prof.enable()
        x, y = batches[step % len(batches)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        h0 = time.perf_counter()
        start.record()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=args.amp,
                            cache_enabled=not args.graphs):
            loss = F.cross_entropy(model(x), y)
        h1 = time.perf_counter()
        scaler.scale(loss).backward()
        h2 = time.perf_counter()
        scaler.step(opt)
        scaler.update()
        end.record()
        phases.append((h1 - h0, h2 - h1, time.perf_counter() - h2))
        events.append((start, end))
        losses.append(loss.detach().float())
        if step == 0:
            torch.cuda.synchronize()
            first_step_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall_s = time.perf_counter() - t0
    if prof is not None:
        import io
        import pstats
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.cprofile)
        print(f"cProfile of steps {args.warmup + 1}-{args.steps}, {op.__module__}.{op.__name__}"
              f" (own time; the step times above include the profiler's cost):")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip()))
    step_ms = [s.elapsed_time(e) for s, e in events]
    timed = step_ms[args.warmup:]
    host_ms = {name: statistics.median(p[i] * 1e3 for p in phases[args.warmup:])
               for i, name in enumerate(("forward", "backward", "optimizer"))}
    loss_values = torch.stack(losses).tolist()
    return {
        "median_step_ms": statistics.median(timed),
        "mean_step_ms": statistics.fmean(timed),
        "first_step_s": first_step_s,
        "wall_s": wall_s,
        "final_loss_scale": float(scaler.get_scale()) if args.amp else None,
        "host_phase_ms": host_ms,
        "step_ms": step_ms,
        "losses": loss_values,
        "finite": all(v == v and abs(v) != float("inf") for v in loss_values),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", choices=["torchvision", "deft", "both", "conv"], default="both",
                   help="conv: cuDNN convolutions in place of the DCN ops (see --floor)")
    p.add_argument("--floor", action="store_true",
                   help="with --op both, also time the model with cuDNN convolutions in place "
                        "of the DCN ops (offsets and mask unused): the step no DCN op can beat")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=128, help="image height and width")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batches", type=int, default=8, help="distinct synthetic batches, cycled")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--offset-lr-mult", type=float, default=0.1,
                   help="learning rate of the offset / mask convolutions, times --lr")
    p.add_argument("--offset-init-std", type=float, default=0.0,
                   help="std of the offset and mask convolutions' initial weights (0: zeros)")
    p.add_argument("--no-amp", dest="amp", action="store_false",
                   help="train in float32 (default: fp16 autocast + GradScaler)")
    p.add_argument("--init-scale", type=float, default=2.0 ** 10, help="GradScaler's first scale")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last model and images (deft runs its NHWC kernels)")
    p.add_argument("--graphs", action="store_true",
                   help="run the model's forward and backward as CUDA graphs (both ops), so "
                        "that the step time is the GPU's, not the host's")
    p.add_argument("--compile", action="store_true",
                   help="run the model under torch.compile (both ops); its compile time falls in "
                        "the warm-up steps")
    p.add_argument("--offset-mask", choices=["joint", "separate"], default="joint",
                   help="joint: one convolution predicts offsets and mask (mmcv's layout, the "
                        "default); separate: one convolution each")
    p.add_argument("--cprofile", type=int, metavar="N", default=0,
                   help="profile the timed steps with cProfile and print the N functions with "
                        "the most own time (host time; slows the step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write a JSON summary here")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error("--steps must be larger than --warmup")
    if args.graphs and args.compile:
        p.error("--graphs and --compile are two ways to cut the host's work: pick one")
    if not torch.cuda.is_available():
        print("train_resnet_dcn: needs a CUDA device (torch.cuda.is_available() is False)")
        return 0
    import torchvision.ops

    torch.backends.cudnn.benchmark = True
    ops = {"torchvision": torchvision.ops.deform_conv2d, "deft": deft.ops.deform_conv2d,
           "conv": conv_floor}
    names = ["torchvision", "deft"] if args.op == "both" else [args.op]
    init_state = {k: v.clone() for k, v in build_model(ops[names[0]], args).state_dict().items()}
    batches = make_batches(args, "cuda")

    results = {}
    for name in names:
        results[name] = train(ops[name], init_state, batches, args)
        torch.cuda.empty_cache()
    if len(names) == 2:
        # Each op a second time, in the same alternating order: how far two runs of the *same*
        # op drift apart (atomics in the backward, cuDNN algorithm choice) is the yardstick for
        # deft-vs-torchvision, and the step time of each op is its better run (the first run
        # of a process also pays for clocks ramping up and caches warming).
        for name in names:
            results[name + "_rerun"] = train(ops[name], init_state, batches, args)
            torch.cuda.empty_cache()
    if args.floor and "conv" not in names:
        results["conv"] = train(ops["conv"], init_state, batches, args)

    summary = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "deft": deft.version() if "deft" in names else None,
        "args": vars(args),
        "results": results,
    }
    if len(names) == 2:
        tv, df = results["torchvision"], results["deft"]
        best = {n: min(results[n]["median_step_ms"], results[n + "_rerun"]["median_step_ms"])
                for n in names}
        summary["speedup"] = best["torchvision"] / best["deft"]
        summary["speedup_per_run"] = [
            tv["median_step_ms"] / df["median_step_ms"],
            results["torchvision_rerun"]["median_step_ms"] / results["deft_rerun"]["median_step_ms"]]

        def rel(a_list, b_list):
            return [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(a_list, b_list)]

        pairs = {"deft_vs_torchvision": (df, tv),
                 "torchvision_vs_itself": (results["torchvision_rerun"], tv),
                 "deft_vs_itself": (results["deft_rerun"], df)}
        summary["loss_diff"] = {k: {"max": max(rel(a["losses"], b["losses"])),
                                    "mean": statistics.fmean(rel(a["losses"], b["losses"]))}
                                for k, (a, b) in pairs.items()}
        summary["max_rel_loss_diff"] = summary["loss_diff"]["deft_vs_torchvision"]["max"]
        summary["baseline_rel_loss_diff"] = summary["loss_diff"]["torchvision_vs_itself"]["max"]
        if "conv" in results:  # the most any DCN op could gain over torchvision here
            summary["floor_speedup"] = best["torchvision"] / results["conv"]["median_step_ms"]

    print(f"\nResNet-18 with DCNv2 in layer2+layer3, batch {args.batch}, "
          f"{args.size}x{args.size}, {'fp16 autocast' if args.amp else 'float32'}"
          f"{', channels-last' if args.channels_last else ''}"
          f"{', CUDA graphs' if args.graphs else ', torch.compile' if args.compile else ', eager'}"
          f", offsets and mask from {'one convolution' if args.offset_mask == 'joint' else 'two convolutions'}"
          f", {args.steps} steps "
          f"(median over steps {args.warmup + 1}-{args.steps}), {summary['device']}")
    print(f"{'op':<18} {'median step ms':>15} {'mean step ms':>13} {'first step s':>13} "
          f"{'loss first':>11} {'loss last':>10}   host ms: {'fwd':>6} {'bwd':>6} {'opt':>6}")
    for name in results:
        r = results[name]
        hp = r["host_phase_ms"]
        print(f"{name:<18} {r['median_step_ms']:>15.2f} {r['mean_step_ms']:>13.2f} "
              f"{r['first_step_s']:>13.2f} {r['losses'][0]:>11.4f} {r['losses'][-1]:>10.4f}"
              f"            {hp['forward']:>6.2f} {hp['backward']:>6.2f} {hp['optimizer']:>6.2f}")
    print("(host ms: the host's median time per phase of a step; the optimizer phase waits for "
          "the GPU, at the GradScaler's check for infs)")
    if "speedup" in summary:
        print(f"speedup (torchvision / deft, the better median step of two runs each): "
              f"{summary['speedup']:.2f}x (run by run: "
              f"{', '.join(f'{x:.2f}x' for x in summary['speedup_per_run'])})")
        if "floor_speedup" in summary:
            print(f"floor (cuDNN convolutions in place of the DCN ops, offsets unused): "
                  f"torchvision / conv = {summary['floor_speedup']:.2f}x, the most any DCN op "
                  f"could reach in this configuration")
        print(f"relative difference of the loss curves over {args.steps} steps (max / mean):")
        for k, v in summary["loss_diff"].items():
            print(f"  {k.replace('_', ' '):<24} {v['max']:.3e} / {v['mean']:.3e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        print(f"summary: {args.json}")
    if not all(r["finite"] for r in results.values()):
        print("train_resnet_dcn: a loss was not finite", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
