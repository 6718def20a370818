"""Offline tuning from Python: export a model's deft layers for ``deft tune``, and compile
against the tuned database.

    deft.export_layers(model, example_inputs, "model.json")   # one forward, no grad
    #   shell: deft tune model.json --db tuned.db
    deft.load_tuning("tuned.db")                               # later kernels use its records

The JSON file (format "deft-model/1") lists each distinct layer description the model ran, with
how often it ran and statistics of its offsets, which the tuner uses to pick its test data.
"""
from __future__ import annotations

import json
import math
import os
import threading
from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor

from . import nn as _nn
from . import ops as _ops

FORMAT = "deft-model/1"
# At most this many |dy| (and |dx|) values per layer go into the quantiles.
MAX_SAMPLE = 1_000_000
_QUANTILES = (0.5, 0.9, 0.99)


def _subsample(t: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k values of the 1-D tensor t drawn uniformly without replacement (t itself if k >= len)."""
    if k >= t.numel():
        return t
    idx = torch.randperm(t.numel(), generator=gen, device=t.device)[:k]
    return t[idx]


class _CallStats:
    """Offset statistics of one call. The position of sampling point (tap i, j) of output pixel
    (oy, ox) is (oy*sh - ph + i*dh + dy, ox*sw - pw + j*dw + dx); it is outside the image when it
    is not in (-1, h) x (-1, w) (deft and torchvision then sample nothing)."""

    def __init__(self, g, offset: Tensor, seed: int):
        taps = g.kh * g.kw
        dev = offset.device
        # torchvision's offset layout: channel = (group * taps + tap) * 2 + {0: dy, 1: dx}
        off = offset.detach().float().reshape(g.n, g.og, taps, 2, g.ho, g.wo)
        dy, dx = off[:, :, :, 0], off[:, :, :, 1]
        t = torch.arange(taps, device=dev)
        base_y = ((t // g.kw) * g.dh).view(1, 1, taps, 1, 1) + \
            (torch.arange(g.ho, device=dev) * g.sh - g.ph).view(1, 1, 1, g.ho, 1)
        base_x = ((t % g.kw) * g.dw).view(1, 1, taps, 1, 1) + \
            (torch.arange(g.wo, device=dev) * g.sw - g.pw).view(1, 1, 1, 1, g.wo)
        py, px = dy + base_y.float(), dx + base_x.float()
        inside = (py > -1) & (py < g.h) & (px > -1) & (px < g.w)  # False for NaN
        self.samples = dy.numel()
        self.outside = self.samples - int(inside.sum().item())

        vals = off.flatten()
        vals = vals[torch.isfinite(vals)].double()
        self.finite = vals.numel()
        self.sum = float(vals.sum().item()) if self.finite else 0.0
        self.sumsq = float((vals * vals).sum().item()) if self.finite else 0.0

        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
        self.abs = {}
        self.max = {}
        for key, v in (("abs_dy", dy), ("abs_dx", dx)):
            a = v.abs().flatten()
            a = a[torch.isfinite(a)]
            self.max[key] = float(a.max().item()) if a.numel() else 0.0
            if a.numel() > MAX_SAMPLE:
                a = a[torch.randint(a.numel(), (MAX_SAMPLE,), generator=gen, device=dev)]
            self.abs[key] = a.cpu()


class _Layer:
    """One distinct description: calls merged, with a pooled sample that weighs every call
    equally (calls with one description have one shape, so that is the uniform sample)."""

    def __init__(self, name: str, desc: str):
        self.name, self.desc = name, desc
        self.count = 0
        self.samples = self.outside = self.finite = 0
        self.sum = self.sumsq = 0.0
        self.max = {"abs_dy": 0.0, "abs_dx": 0.0}
        self.pool: Dict[str, Tensor] = {}
        self._gen = torch.Generator()
        self._gen.manual_seed(0)

    def add(self, s: _CallStats) -> None:
        self.count += 1
        c = self.count
        self.samples += s.samples
        self.outside += s.outside
        self.finite += s.finite
        self.sum += s.sum
        self.sumsq += s.sumsq
        for key, new in s.abs.items():
            self.max[key] = max(self.max[key], s.max[key])
            old = self.pool.get(key)
            if old is None:
                self.pool[key] = new
                continue
            # Keep (c-1)/c of the pool (which stands for calls 1..c-1) and 1/c from this call.
            target = min(MAX_SAMPLE, old.numel() + new.numel())
            keep_old = min(old.numel(), round(target * (c - 1) / c))
            keep_new = min(new.numel(), target - keep_old)
            self.pool[key] = torch.cat([_subsample(old, keep_old, self._gen),
                                        _subsample(new, keep_new, self._gen)])

    def to_json(self) -> Dict[str, Any]:
        stats: Dict[str, Any] = {"samples": int(self.samples)}
        q = torch.tensor(_QUANTILES, dtype=torch.float32)
        for key in ("abs_dy", "abs_dx"):
            pool = self.pool.get(key)
            if pool is None or pool.numel() == 0:
                p50 = p90 = p99 = 0.0
            else:
                p50, p90, p99 = (float(x) for x in torch.quantile(pool.float(), q).tolist())
            mx = self.max[key]
            # The pool is a subset of all values and max is over all of them: p99 <= max holds;
            # min() only guards against float rounding in the interpolation.
            stats[key] = {"p50": min(p50, mx), "p90": min(p90, mx), "p99": min(p99, mx),
                          "max": mx}
        stats["outside_fraction"] = (self.outside / self.samples) if self.samples else 0.0
        sigma = 0.0
        if self.finite:
            mean = self.sum / self.finite
            sigma = math.sqrt(max(self.sumsq / self.finite - mean * mean, 0.0))
        # The model format wants a positive sigma: when every offset is equal (a freshly
        # initialised offset convolution gives zeros) it is left out, and deft tune derives one
        # from the |dy| and |dx| medians (with its floor).
        if sigma > 0.0:
            stats["sigma"] = sigma
        return {"name": self.name, "desc": self.desc, "count": self.count, "stats": stats}


class _Recorder:
    """Installed in deft.ops (per thread) while export_layers runs the model."""

    def __init__(self):
        self.modules: List[str] = []  # names of the deft.nn modules being called (a stack)
        self.layers: Dict[str, _Layer] = {}
        self.unnamed = 0
        self.calls = 0

    def _unique(self, name: str) -> str:
        # Names are unique in a model file: a module called with two shapes gives two entries,
        # "<path>" and "<path>_1".
        taken = {layer.name for layer in self.layers.values()}
        out, i = name, 0
        while out in taken:
            i += 1
            out = f"{name}_{i}"
        return out

    def record(self, g, desc: str, offset: Tensor) -> None:
        layer = self.layers.get(desc)
        if layer is None:
            if self.modules:
                name = self.modules[-1]
            else:
                name = f"deform_conv2d_{self.unnamed}"
                self.unnamed += 1
            layer = self.layers[desc] = _Layer(self._unique(name), desc)
        layer.add(_CallStats(g, offset, seed=self.calls))
        self.calls += 1


def _run(model, example_inputs):
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def export_layers(model: torch.nn.Module, example_inputs: Any,
                  path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Run ``model`` once on ``example_inputs`` (a tensor, a tuple/list of positional
    arguments, or a dict of keyword arguments) under ``torch.no_grad()`` and write every deft
    layer it called to ``path`` as JSON for ``deft tune``; returns the same data.

    Each distinct description becomes one entry (``count``: how many calls had it), named by its
    module path when it ran in a ``deft.nn`` module, else ``deform_conv2d_<i>``. ``stats`` holds
    the offsets' statistics: p50/p90/p99/max of |dy| and |dx| (quantiles of at most 1e6 values
    drawn at random, seeded), the fraction of sampling points outside the image, the standard
    deviation ``sigma`` of all offset values (left out when it is 0, e.g. all offsets zero: the
    format wants it positive), and ``samples``, the number of sampling points. Names are unique:
    a module called with two different shapes gives ``<path>`` and ``<path>_1``.

    The model runs eagerly and as it is (train/eval mode untouched: call ``model.eval()`` first
    for inference statistics). Calls under ``torch.compile`` are recorded too, but named
    ``deform_conv2d_<i>``.
    """
    rec = _Recorder()
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, _nn.DeformConv2d):
            def enter(m, args, _name=name or type(mod).__name__):
                rec.modules.append(_name)

            def leave(m, args, output):
                if rec.modules:
                    rec.modules.pop()

            hooks.append(mod.register_forward_pre_hook(enter))
            hooks.append(mod.register_forward_hook(leave, always_call=True))
    prev = getattr(_ops._tls, "recorder", None)
    _ops._tls.recorder = rec
    try:
        with torch.no_grad():
            _run(model, example_inputs)
    finally:
        _ops._tls.recorder = prev
        for h in hooks:
            h.remove()
    data = {"format": FORMAT, "model": type(model).__name__,
            "layers": [layer.to_json() for layer in rec.layers.values()]}
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return data


def load_tuning(path: Optional[Union[str, os.PathLike]]) -> None:
    """Compile deft's kernels against the database ``path`` from now on, so that tuning records
    there (written by ``deft tune ... --db path``) choose the variants; compiled cubins are cached
    there too (the file is created if missing). Kernels compiled before are dropped, so the next
    call of each layer compiles (or loads) again. ``None``: back to libdeft's default database
    ($DEFT_CACHE_DIR/deft.db, else $XDG_CACHE_HOME/deft/deft.db, else ~/.cache/deft/deft.db)."""
    _ops._set_cache_path(None if path is None else os.path.abspath(os.fspath(path)))


def tuning_path() -> Optional[str]:
    """The database set by load_tuning, or None for libdeft's default."""
    return _ops._cache_path_now()
