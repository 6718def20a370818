"""deft.export_layers and deft.load_tuning on a GPU machine (skipped without torch or a CUDA
device). Run: python3 -m pytest python/tests"""
import json
import os
import sys

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import deft  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.a = deft.nn.DeformConv2dPack(8, 8, 3, padding=1)
        self.b = torch.nn.Sequential(deft.nn.DeformConv2dPack(8, 16, 3, padding=1, stride=2,
                                                              modulated=False))
        for pack in (self.a, self.b[0]):
            torch.nn.init.normal_(pack.conv_offset.weight, std=0.3)
        self.w = torch.nn.Parameter(torch.randn(4, 16, 1, 1))

    def forward(self, x):
        x = self.stem(x)
        x = self.a(x)
        x = self.a(x)  # the same layer twice: one entry, count 2
        x = self.b(x)
        # a direct call (no deft.nn module): 1x1, every offset (3.5, -0.5)
        n, _, h, w = x.shape
        off = torch.empty(n, 2, h, w, device=x.device)
        off[:, 0], off[:, 1] = 3.5, -0.5
        return deft.ops.deform_conv2d(x, off, self.w)


def test_export_layers_writes_the_model_file(tmp_path):
    torch.manual_seed(0)
    model = _Model().cuda()
    x = torch.randn(2, 3, 16, 16, device="cuda")
    path = tmp_path / "model.json"
    data = deft.export_layers(model, x, path)
    with open(path) as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(data))
    assert on_disk["format"] == "deft-model/1"
    assert on_disk["model"] == "_Model"
    layers = on_disk["layers"]
    assert [l["name"] for l in layers] == ["a", "b.0", "deform_conv2d_0"]
    assert [l["count"] for l in layers] == [2, 1, 1]
    for l in layers:
        assert set(l) == {"name", "desc", "count", "stats"}
        assert l["desc"].startswith("deform_conv2d ")
        deft.library().canonical(l["desc"])  # a valid description
        st = l["stats"]
        assert set(st) == {"samples", "abs_dy", "abs_dx", "outside_fraction", "sigma"}
        assert isinstance(st["samples"], int) and st["samples"] > 0
        for key in ("abs_dy", "abs_dx"):
            q = st[key]
            assert set(q) == {"p50", "p90", "p99", "max"}
            assert 0 <= q["p50"] <= q["p90"] <= q["p99"] <= q["max"]
        assert 0.0 <= st["outside_fraction"] <= 1.0
        assert st["sigma"] >= 0.0
    a, b, direct = layers
    assert "mask=1" in a["desc"] and "mask=0" in b["desc"]
    assert "stride=2x2" in b["desc"]
    assert a["stats"]["sigma"] > 0
    # the two calls of `a`: 2 images x 9 taps x 16x16 pixels each
    assert a["stats"]["samples"] == 2 * (2 * 9 * 16 * 16)
    # direct call on 8x8: positions (oy + 3.5, ox - 0.5); ox - 0.5 > -1 for every ox and
    # oy + 3.5 < 8 only for oy <= 4, so 3 of the 8 rows are outside
    st = direct["stats"]
    assert st["samples"] == 2 * 8 * 8
    assert st["outside_fraction"] == pytest.approx(3 / 8)
    assert st["abs_dy"]["p50"] == pytest.approx(3.5) and st["abs_dx"]["max"] == pytest.approx(0.5)
    # export leaves no hooks and no recorder behind
    assert not model.a._forward_hooks and not model.a._forward_pre_hooks
    assert getattr(deft.ops._tls, "recorder", None) is None


def test_load_tuning_compiles_against_the_given_database(tmp_path):
    path = tmp_path / "sub" / "tuned.db"
    x = torch.randn(1, 4, 6, 7, device="cuda")
    off = torch.randn(1, 18, 6, 7, device="cuda")
    w = torch.randn(5, 4, 3, 3, device="cuda")
    before = deft.ops.deform_conv2d(x, off, w, padding=1)
    deft.load_tuning(path)
    try:
        assert deft.tuning_path() == str(path.resolve())
        after = deft.ops.deform_conv2d(x, off, w, padding=1)  # compiles again, into `path`
        torch.cuda.synchronize()
        assert path.is_file() and path.stat().st_size > 0
        assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)
    finally:
        deft.load_tuning(None)
    assert deft.tuning_path() is None
