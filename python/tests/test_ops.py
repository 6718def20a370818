"""deft.ops / deft.nn forward against torchvision on a GPU machine (skipped without torch,
torchvision or a CUDA device; gradients: test_autograd.py). Run: python3 -m pytest python/tests"""
import os
import sys

import pytest

torch = pytest.importorskip("torch")
tv_ops = pytest.importorskip("torchvision.ops")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import deft  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def make(n, c, k, h, w, kh=3, stride=1, pad=1, dil=1, groups=1, og=1, mask=True, bias=True,
         dtype=torch.float32, sigma=2.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ho = (h + 2 * pad - dil * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * pad - dil * (kh - 1) - 1) // stride + 1
    x = torch.rand(n, c, h, w, device="cuda", generator=g) * 2 - 1
    wt = (torch.rand(k, c // groups, kh, kh, device="cuda", generator=g) * 2 - 1) / (c // groups * kh * kh) ** 0.5
    off = torch.randn(n, 2 * og * kh * kh, ho, wo, device="cuda", generator=g) * sigma
    m = torch.rand(n, og * kh * kh, ho, wo, device="cuda", generator=g) if mask else None
    b = torch.rand(k, device="cuda", generator=g) - 0.5 if bias else None
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(x), cast(off), cast(wt), cast(b), cast(m), dict(stride=stride, padding=pad, dilation=dil)


def reference(x, off, wt, b, m, kw):
    # torchvision in float64 on the same (quantised) inputs
    d = lambda t: None if t is None else t.double()
    return tv_ops.deform_conv2d(d(x), d(off), d(wt), d(b), mask=d(m), **kw)


def rel_err(a, ref):
    a = a.double()
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a - ref).norm() / ref.norm()).item()


CASES = [
    dict(n=2, c=32, k=48, h=13, w=17),
    dict(n=1, c=64, k=64, h=16, w=16, groups=2, og=2),
    dict(n=2, c=16, k=24, h=15, w=11, stride=2, pad=2, dil=2, mask=False),
    dict(n=2, c=32, k=32, h=10, w=12, groups=32, og=1),          # depthwise
    dict(n=1, c=8, k=12, h=9, w=9, kh=1, pad=0, bias=False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_matches_torchvision(dtype, case, channels_last):
    torch.backends.cuda.matmul.allow_tf32 = False
    x, off, wt, b, m, kw = make(**CASES[case], dtype=dtype, seed=case)
    ref = reference(x, off, wt, b, m, kw)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = deft.ops.deform_conv2d(x, off, wt, b, mask=m, **kw)
    assert y.dtype == dtype and y.shape == ref.shape
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, ref) <= TOL[dtype]


def test_tf32_follows_torch_switch():
    x, off, wt, b, m, kw = make(2, 64, 64, 12, 12)
    ref = reference(x, off, wt, b, m, kw)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert rel_err(deft.ops.deform_conv2d(x, off, wt, b, mask=m, **kw), ref) <= 5e-3
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def test_module_matches_torchvision_module():
    torch.manual_seed(0)
    ours = deft.nn.DeformConv2d(16, 24, 3, padding=1, groups=2).cuda()
    theirs = tv_ops.DeformConv2d(16, 24, 3, padding=1, groups=2).cuda()
    theirs.load_state_dict(ours.state_dict())
    x, off, _, _, m, _ = make(2, 16, 24, 11, 13)
    assert rel_err(ours(x, off, m), theirs(x, off, m).double()) < 1e-5


def test_pack_starts_as_a_plain_convolution():
    layer = deft.nn.DeformConv2dPack(8, 8, 3, padding=1).cuda()
    x = torch.randn(2, 8, 9, 9, device="cuda")
    # zero offsets, mask sigmoid(0) = 0.5: half a plain convolution (plus the bias)
    expect = torch.nn.functional.conv2d(x, layer.weight, None, 1, 1) * 0.5 + layer.bias[None, :, None, None]
    assert rel_err(layer(x), expect.double()) < 1e-5


def test_torch_compile_fullgraph():
    # Inference (training under torch.compile: test_autograd.py).
    layer = deft.nn.DeformConv2d(16, 16, 3, padding=1).cuda()
    x, off, _, _, m, _ = make(2, 16, 16, 10, 10)
    with torch.no_grad():
        eager = layer(x, off, m)
        compiled = torch.compile(lambda a, o, mm: layer(a, o, mm) * 2, fullgraph=True)
        assert rel_err(compiled(x, off, m), (eager * 2).double()) < 1e-6


def test_jit_trace_records_the_op():
    # The eager route is invisible to torch.jit.trace; under tracing the custom op runs, so the
    # traced graph holds it and replays it.
    layer = deft.nn.DeformConv2d(16, 16, 3, padding=1).cuda()
    x, off, _, _, m, _ = make(2, 16, 16, 10, 10, seed=3)
    with torch.no_grad():
        traced = torch.jit.trace(layer, (x, off, m))
        assert "deft::deform_conv2d" in str(traced.graph)
        x2, off2, _, _, m2, _ = make(2, 16, 16, 10, 10, seed=4)
        assert torch.equal(traced(x2, off2, m2), layer(x2, off2, m2))


def test_autocast_runs_in_half():
    x, off, wt, b, m, kw = make(2, 16, 16, 10, 10)
    with torch.autocast("cuda", dtype=torch.float16):
        y = deft.ops.deform_conv2d(x, off, wt, b, mask=m, **kw)
    assert y.dtype == torch.float16
    assert rel_err(y, reference(x, off, wt, b, m, kw)) < 1e-2


def test_autocast_leaves_float64_alone_and_refuses_the_mix():
    # autocast casts float32 to float16 but not float64: a float64 input with float32 offsets
    # would reach one kernel with two dtypes. It is an error naming the tensor.
    x, off, wt, b, m, kw = make(2, 16, 16, 10, 10)
    with torch.autocast("cuda", dtype=torch.float16):
        with pytest.raises(TypeError, match="offset is torch.float16 but input is torch.float64"):
            deft.ops.deform_conv2d(x.double(), off, wt, b, mask=m, **kw)
        y = deft.ops.deform_conv2d(x.double(), off.double(), wt.double(), b.double(),
                                   mask=m.double(), **kw)
    assert y.dtype == torch.float64
    assert rel_err(y, reference(x, off, wt, b, m, kw)) < 1e-5


def test_runs_on_the_current_stream():
    x, off, wt, b, m, kw = make(2, 16, 16, 10, 10)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = deft.ops.deform_conv2d(x, off, wt, b, mask=m, **kw)
    s.synchronize()
    assert rel_err(y, reference(x, off, wt, b, m, kw)) < 1e-5


def test_workspace_is_kept_until_released():
    # An fp16 nchw layer reads a channels-last copy of its input: a per-call workspace, kept in
    # deft's pool across the synchronisation, handed back by release_workspace().
    x, off, wt, b, m, kw = make(2, 64, 64, 10, 10, dtype=torch.float16)
    y = deft.ops.deform_conv2d(x, off, wt, b, mask=m, **kw)
    torch.cuda.synchronize()
    reserved, used = deft.library().workspace_bytes()
    assert reserved > 0 and used == 0
    deft.release_workspace()
    assert deft.library().workspace_bytes()[0] == 0
    y2 = deft.ops.deform_conv2d(x, off, wt, b, mask=m, **kw)
    assert torch.equal(y, y2)


def test_non_contiguous_inputs():
    x, off, wt, b, m, kw = make(2, 16, 16, 10, 10)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not xt.is_contiguous()
    y = deft.ops.deform_conv2d(xt, off, wt, b, mask=m, **kw)
    assert rel_err(y, reference(x, off, wt, b, m, kw)) < 1e-5


def test_clear_errors():
    x, off, wt, b, m, kw = make(1, 8, 8, 8, 8)
    with pytest.raises(RuntimeError, match="CUDA devices only"):
        deft.ops.deform_conv2d(x.cpu(), off, wt, b, mask=m, **kw)
    with pytest.raises(TypeError, match="one dtype"):
        deft.ops.deform_conv2d(x, off.half(), wt, b, mask=m, **kw)
    with pytest.raises(ValueError, match="offset has shape"):
        deft.ops.deform_conv2d(x, off[:, :, :4], wt, b, mask=m, **kw)
    with pytest.raises(ValueError, match="mask has shape"):
        deft.ops.deform_conv2d(x, off, wt, b, mask=m[:, :3], **kw)
    with pytest.raises(ValueError, match="weight must be 4-D"):
        deft.ops.deform_conv2d(x, off, wt[0], b, mask=m, **kw)
    with pytest.raises(ValueError, match="bias has shape"):
        deft.ops.deform_conv2d(x, off, wt, b[:3], mask=m, **kw)
    with pytest.raises(TypeError, match="mask is torch.float64"):
        deft.ops.deform_conv2d(x, off, wt, b, mask=m.double(), **kw)
    with pytest.raises(TypeError, match="offset is torch.int64"):
        deft.ops.deform_conv2d(x, off.long(), wt, b, mask=m, **kw)
    with pytest.raises(TypeError, match="weight must be a Tensor"):
        deft.ops.deform_conv2d(x, off, wt.tolist(), b, mask=m, **kw)


def test_resnet_block_swap_forward():
    # A DCN layer with zero offsets and no mask is the convolution it replaces: swapping one
    # into a torchvision ResNet leaves the network's output unchanged.
    tvm = pytest.importorskip("torchvision.models")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    net = tvm.resnet18().cuda().eval()
    conv = net.layer3[0].conv2
    pack = deft.nn.DeformConv2dPack(conv.in_channels, conv.out_channels, 3, padding=1,
                                    bias=False, modulated=False).cuda()
    with torch.no_grad():
        pack.weight.copy_(conv.weight)
        x = torch.randn(2, 3, 64, 64, device="cuda")
        ref = net(x)
        net.layer3[0].conv2 = pack
        y = net(x)
    assert rel_err(y, ref.double()) < 1e-4


@pytest.mark.parametrize("channels_last", [False, True])
def test_inputs_off_a_16_byte_boundary(channels_last):
    # input and weight as views that start one element (2 bytes) past an allocation: deft's
    # vector kernels need 16-byte aligned data, so the op copies them and gives the same result
    x, off, wt, b, m, kw = make(n=2, c=64, k=64, h=11, w=13, dtype=torch.float16, seed=5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ref = deft.ops.deform_conv2d(x, off, wt, b, mask=m, **kw)

    def shifted(t):
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = flat[1:].as_strided(t.shape, t.stride())
        view.copy_(t)
        assert view.data_ptr() % 16 != 0
        return view

    got = deft.ops.deform_conv2d(shifted(x), off, shifted(wt), b, mask=m, **kw)
    assert torch.equal(got, ref)
