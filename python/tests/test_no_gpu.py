"""What works without a GPU (and without libdeft): importing, the clear error for CPU tensors,
load_tuning's bookkeeping and export_layers' offset statistics. Needs torch only.
Run: python3 -m pytest python/tests"""
import os
import sys
import types

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import deft  # noqa: E402
from deft import tuning  # noqa: E402


def test_cpu_tensors_raise_a_clear_error():
    x = torch.zeros(1, 2, 4, 4)
    off = torch.zeros(1, 18, 4, 4)
    w = torch.zeros(2, 2, 3, 3)
    with pytest.raises(RuntimeError, match="CUDA devices only"):
        deft.ops.deform_conv2d(x, off, w, padding=1)
    layer = deft.nn.DeformConv2dPack(2, 2, 3, padding=1)
    with pytest.raises(RuntimeError, match="CUDA devices only"):
        layer(x)


def test_load_tuning_sets_and_resets_the_database(tmp_path):
    path = tmp_path / "tuned.db"
    try:
        deft.load_tuning(path)
        assert deft.tuning_path() == str(path.resolve())
    finally:
        deft.load_tuning(None)
    assert deft.tuning_path() is None


def geometry(**kw):
    g = dict(n=1, c=1, h=4, w=4, k=1, kh=1, kw=1, sh=1, sw=1, ph=0, pw=0, dh=1, dw=1, og=1,
             ho=4, wo=4)
    g.update(kw)
    return types.SimpleNamespace(**g)


def test_offset_statistics_known_values():
    # 1x1 kernel on a 4x4 image, every offset (dy, dx) = (3.5, -0.5): the position of output
    # pixel (oy, ox) is (oy + 3.5, ox - 0.5), inside (-1, 4) x (-1, 4) only for oy = 0.
    g = geometry()
    off = torch.empty(1, 2, 4, 4)
    off[:, 0] = 3.5
    off[:, 1] = -0.5
    s = tuning._CallStats(g, off, seed=0)
    assert s.samples == 16
    assert s.outside == 12
    layer = tuning._Layer("l", "deform_conv2d n=1")
    layer.add(s)
    j = layer.to_json()
    st = j["stats"]
    assert j["count"] == 1 and st["samples"] == 16
    assert st["outside_fraction"] == pytest.approx(12 / 16)
    assert st["abs_dy"] == pytest.approx({"p50": 3.5, "p90": 3.5, "p99": 3.5, "max": 3.5})
    assert st["abs_dx"] == pytest.approx({"p50": 0.5, "p90": 0.5, "p99": 0.5, "max": 0.5})
    assert st["sigma"] == pytest.approx(2.0)  # values 3.5 and -0.5 in equal numbers


def test_offset_statistics_taps_stride_padding_and_merging():
    # 3x3 kernel, stride 2, pad 1, dilation 1 on 5x5: 3x3 outputs. Zero offsets: the tap
    # positions are oy*2 - 1 + i, outside exactly when they equal -1 or 5.
    g = geometry(n=2, h=5, w=5, kh=3, kw=3, sh=2, sw=2, ph=1, pw=1, ho=3, wo=3)
    off = torch.zeros(2, 18, 3, 3)
    s = tuning._CallStats(g, off, seed=0)
    pos = [oy * 2 - 1 + i for oy in range(3) for i in range(3)]  # 9 (oy, i) pairs per axis
    inside_1d = sum(1 for p in pos if -1 < p < 5)
    assert s.samples == 2 * 9 * 9
    assert s.outside == s.samples - 2 * inside_1d * inside_1d
    layer = tuning._Layer("l", "d")
    layer.add(s)
    off2 = torch.randn(2, 18, 3, 3)
    layer.add(tuning._CallStats(g, off2, seed=1))
    st = layer.to_json()["stats"]
    assert layer.count == 2 and st["samples"] == 2 * s.samples
    for key in ("abs_dy", "abs_dx"):
        q = st[key]
        assert 0 <= q["p50"] <= q["p90"] <= q["p99"] <= q["max"]
    assert st["abs_dy"]["max"] == pytest.approx(off2[:, 0::2].abs().max().item())
    both = torch.cat([off.flatten(), off2.flatten()]).double()
    assert st["sigma"] == pytest.approx(both.std(unbiased=False).item(), rel=1e-6)
    assert 0.0 <= st["outside_fraction"] <= 1.0


def test_pooled_sample_stays_bounded(monkeypatch):
    monkeypatch.setattr(tuning, "MAX_SAMPLE", 100)
    g = geometry(h=16, w=16, ho=16, wo=16)
    layer = tuning._Layer("l", "d")
    for i in range(5):
        layer.add(tuning._CallStats(g, torch.randn(1, 2, 16, 16) + 10 * i, seed=i))
        assert layer.pool["abs_dy"].numel() <= 100
    # every call weighs about equally: the median of |dy| sits near the middle call's values
    st = layer.to_json()["stats"]
    assert 15 < st["abs_dy"]["p50"] < 25
    assert st["abs_dy"]["p99"] <= st["abs_dy"]["max"]


def test_zero_offsets_leave_sigma_out():
    # deft tune wants a positive sigma; with none it derives one from the medians
    layer = tuning._Layer("l", "d")
    layer.add(tuning._CallStats(geometry(), torch.zeros(1, 2, 4, 4), seed=0))
    st = layer.to_json()["stats"]
    assert "sigma" not in st
    assert st["abs_dy"] == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}


def test_recorder_merges_descriptions_and_keeps_names_unique():
    rec = tuning._Recorder()
    g = geometry()
    off = torch.randn(1, 2, 4, 4)
    rec.modules.append("block.conv")
    rec.record(g, "deform_conv2d n=1 h=4", off)
    rec.record(g, "deform_conv2d n=1 h=4", off)  # same description: merged
    rec.record(g, "deform_conv2d n=1 h=8", off)  # same module, other shape: new name
    rec.modules.pop()
    rec.record(g, "deform_conv2d n=2", off)
    rec.record(g, "deform_conv2d n=3", off)
    got = [(l.name, l.count) for l in rec.layers.values()]
    assert got == [("block.conv", 2), ("block.conv_1", 1), ("deform_conv2d_0", 1),
                   ("deform_conv2d_1", 1)]
