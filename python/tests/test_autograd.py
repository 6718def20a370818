"""Gradients of deft.ops.deform_conv2d against torchvision on a GPU machine: every gradient
(input, offset, weight, bias, mask) per dtype and layout, determinism, gradcheck, torch.compile
with backward, autocast, and a deformable layer trained inside a torchvision ResNet-18.
Skipped without torch, torchvision or a CUDA device. Run: python3 -m pytest python/tests

Offsets are drawn as integer + U(0.1, 0.9): every sampling position then lies well inside a
bilinear cell (the offset gradient jumps at integer positions, so a position that rounds onto
an integer in one implementation and not in the other would compare two different one-sided
derivatives), and no position lies on the image border."""
import copy
import os
import sys

import pytest

torch = pytest.importorskip("torch")
tv_ops = pytest.importorskip("torchvision.ops")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import deft  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# max |ours - reference| / max |reference|, reference = torchvision in float64 on the same
# (rounded) values
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
NAMES = ("input", "offset", "weight", "bias", "mask")


@pytest.fixture(autouse=True)
def strict_fp32():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def off_grid(shape, gen, spread=2):
    """integer in [-spread, spread] + U(0.1, 0.9), float64 on the GPU."""
    ints = torch.randint(-spread, spread + 1, shape, device="cuda", generator=gen)
    frac = torch.rand(shape, device="cuda", generator=gen, dtype=torch.float64) * 0.8 + 0.1
    return ints.double() + frac


def make(n, c, k, h, w, kh=3, kw=3, stride=1, pad=1, dil=1, groups=1, og=1, mask=True,
         bias=True, dtype=torch.float32, seed=0):
    """Leaves (input, offset, weight, bias, mask) and grad_output in `dtype`, plus the keyword
    arguments (stride, padding, dilation)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    ho = (h + 2 * pad - dil * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * pad - dil * (kw - 1) - 1) // stride + 1
    taps = kh * kw
    rnd = lambda *s: torch.rand(*s, device="cuda", generator=g, dtype=torch.float64)
    t = {
        "input": rnd(n, c, h, w) * 2 - 1,
        "offset": off_grid((n, 2 * og * taps, ho, wo), g),
        "weight": (rnd(k, c // groups, kh, kw) * 2 - 1) / (c // groups * taps) ** 0.5,
        "bias": rnd(k) - 0.5 if bias else None,
        "mask": rnd(n, og * taps, ho, wo) if mask else None,
    }
    t = {name: None if v is None else v.to(dtype) for name, v in t.items()}
    grad = (rnd(n, k, ho, wo) * 2 - 1).to(dtype)
    return t, grad, dict(stride=stride, padding=pad, dilation=dil)


def run(fn, tensors, grad, kw, channels_last=False):
    """fn(input, offset, weight, bias, mask=..., **kw) and the gradients of <out, grad> with
    respect to every tensor given, as {name: grad}."""
    leaves = {}
    for name, v in tensors.items():
        if v is None:
            continue
        v = v.detach().clone()
        if name == "input" and channels_last:
            v = v.contiguous(memory_format=torch.channels_last)
        leaves[name] = v.requires_grad_(True)
    out = fn(leaves["input"], leaves["offset"], leaves["weight"], leaves.get("bias"),
             mask=leaves.get("mask"), **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), grad)
    return out, dict(zip(leaves.keys(), grads))


def reference(tensors, grad, kw):
    as64 = {name: None if v is None else v.double() for name, v in tensors.items()}
    return run(tv_ops.deform_conv2d, as64, grad.double(), kw)


def max_rel(a, ref):
    a = a.detach().double()
    assert a.shape == ref.shape
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_all(tensors, grad, kw, dtype, channels_last=False, tol=None):
    tol = TOL[dtype] if tol is None else tol
    ref_out, ref_grads = reference(tensors, grad, kw)
    out, grads = run(deft.ops.deform_conv2d, tensors, grad, kw, channels_last)
    assert out.dtype == dtype
    errs = {"output": max_rel(out, ref_out.detach())}
    for name, g in grads.items():
        assert g.dtype == dtype, name
        errs[name] = max_rel(g, ref_grads[name])
    bad = {name: e for name, e in errs.items() if not e <= tol}
    assert not bad, f"errors above {tol}: {bad} (all: {errs})"


CASES = {
    "dcnv2": dict(n=2, c=16, k=24, h=9, w=11),
    "groups2_og2": dict(n=2, c=16, k=16, h=10, w=8, groups=2, og=2),
    "stride2_dil2_nomask": dict(n=2, c=8, k=12, h=11, w=9, stride=2, pad=2, dil=2, mask=False),
    "groups4_og4_nobias_nomask": dict(n=1, c=16, k=8, h=7, w=9, groups=4, og=4, mask=False,
                                      bias=False),
    "depthwise": dict(n=2, c=16, k=16, h=9, w=9, groups=16),
}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", ["dcnv2", "groups2_og2", "stride2_dil2_nomask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_gradients_match_torchvision(dtype, case, channels_last):
    tensors, grad, kw = make(**CASES[case], dtype=dtype, seed=1)
    check_all(tensors, grad, kw, dtype, channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", ["groups4_og4_nobias_nomask", "depthwise"])
def test_gradients_match_torchvision_more_shapes(case, channels_last):
    tensors, grad, kw = make(**CASES[case], dtype=torch.float32, seed=2)
    check_all(tensors, grad, kw, torch.float32, channels_last)


def test_only_requested_gradients():
    tensors, grad, kw = make(**CASES["dcnv2"], seed=3)
    ref_out, ref_grads = reference(tensors, grad, kw)
    x = tensors["input"].clone().requires_grad_(True)
    w = tensors["weight"].clone().requires_grad_(True)
    out = deft.ops.deform_conv2d(x, tensors["offset"], w, tensors["bias"], mask=tensors["mask"],
                                 **kw)
    gx, gw = torch.autograd.grad(out, [x, w], grad)
    assert max_rel(gx, ref_grads["input"]) <= TOL[torch.float32]
    assert max_rel(gw, ref_grads["weight"]) <= TOL[torch.float32]
    # .backward() accumulates into .grad of the leaves that require it, nothing else
    out = deft.ops.deform_conv2d(x, tensors["offset"], w, tensors["bias"], mask=tensors["mask"],
                                 **kw)
    out.backward(grad)
    assert tensors["offset"].grad is None and tensors["mask"].grad is None
    assert max_rel(w.grad, ref_grads["weight"]) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_deterministic_mode_is_bitwise_reproducible(dtype):
    tensors, grad, kw = make(**CASES["dcnv2"], dtype=dtype, seed=4)
    was = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [run(deft.ops.deform_conv2d, tensors, grad, kw)[1] for _ in range(10)]
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
    for name in runs[0]:
        for r in runs[1:]:
            assert torch.equal(r[name], runs[0][name]), f"{name} differs between runs"
    # and still right
    _, ref_grads = reference(tensors, grad, kw)
    for name, g in runs[0].items():
        assert max_rel(g, ref_grads[name]) <= TOL[dtype], name


def _via_custom_op(input, offset, weight, bias=None, stride=1, padding=0, dilation=1,
                   mask=None):
    """deform_conv2d through the custom op torch.compile traces (the public function runs an
    eager autograd.Function instead when nothing is tracing)."""
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    return torch.ops.deft.deform_conv2d(input, offset, weight, bias, mask, pair(stride),
                                        pair(padding), pair(dilation))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_eager_path_and_custom_op_agree_bitwise(dtype, channels_last):
    tensors, grad, kw = make(**CASES["groups2_og2"], dtype=dtype, seed=11)
    was = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out_e, grads_e = run(deft.ops.deform_conv2d, tensors, grad, kw, channels_last)
        out_c, grads_c = run(_via_custom_op, tensors, grad, kw, channels_last)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
    assert "DeformConv2dFunction" in type(out_e.grad_fn).__name__  # the eager path ran
    assert "DeformConv2dFunction" not in type(out_c.grad_fn).__name__
    assert out_e.stride() == out_c.stride()
    assert torch.equal(out_e, out_c)
    for name in grads_e:
        assert grads_e[name].stride() == grads_c[name].stride(), name
        assert torch.equal(grads_e[name], grads_c[name]), name
    _, ref_grads = reference(tensors, grad, kw)
    for name, g in grads_e.items():
        assert max_rel(g, ref_grads[name]) <= TOL[dtype], name


def test_sliced_offset_and_mask_as_from_one_convolution():
    # mmcv's layout: offsets and mask are channel slices of one tensor (not contiguous); the
    # eager path saves the contiguous copies its kernels read for the backward
    tensors, grad, kw = make(**CASES["dcnv2"], dtype=torch.float32, seed=13)
    _, ref_grads = reference(tensors, grad, kw)
    joint = torch.cat([tensors["offset"], tensors["mask"]], 1).detach().requires_grad_(True)
    n_off = tensors["offset"].shape[1]
    offset, mask = joint[:, :n_off], joint[:, n_off:]
    assert not offset.is_contiguous() and not mask.is_contiguous()
    x = tensors["input"].clone().requires_grad_(True)
    wt = tensors["weight"].clone().requires_grad_(True)
    out = deft.ops.deform_conv2d(x, offset, wt, tensors["bias"], mask=mask, **kw)
    assert "DeformConv2dFunction" in type(out.grad_fn).__name__  # the eager path ran
    out.backward(grad)
    assert max_rel(x.grad, ref_grads["input"]) <= TOL[torch.float32]
    assert max_rel(wt.grad, ref_grads["weight"]) <= TOL[torch.float32]
    assert max_rel(joint.grad[:, :n_off], ref_grads["offset"]) <= TOL[torch.float32]
    assert max_rel(joint.grad[:, n_off:], ref_grads["mask"]) <= TOL[torch.float32]


def test_double_backward_is_refused():
    # The backward kernels are not themselves differentiable: a second derivative must fail
    # loudly, not come back as zero.
    # (grad input depends on the weight: d(grad input)/d(weight) is not zero.)
    tensors, grad, kw = make(**CASES["dcnv2"], dtype=torch.float64, seed=12)
    x = tensors["input"].clone().requires_grad_(True)
    wt = tensors["weight"].clone().requires_grad_(True)
    out = deft.ops.deform_conv2d(x, tensors["offset"], wt, tensors["bias"],
                                 mask=tensors["mask"], **kw)
    gx, gw = torch.autograd.grad(out, (x, wt), grad, create_graph=True)
    assert gx.requires_grad
    _, ref_grads = reference(tensors, grad, kw)
    assert max_rel(gx, ref_grads["input"]) <= TOL[torch.float64]  # still the right values
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gx.square().sum(), wt)
    with pytest.raises(RuntimeError, match="double backward"):
        gw.square().sum().backward()


def test_gradcheck_float64():
    g = torch.Generator(device="cuda").manual_seed(5)
    n, c, k, h, w = 1, 2, 2, 4, 4
    x = torch.rand(n, c, h, w, device="cuda", dtype=torch.float64, generator=g) * 2 - 1
    off = off_grid((n, 2 * 9, h, w), g)
    wt = torch.rand(k, c, 3, 3, device="cuda", dtype=torch.float64, generator=g) - 0.5
    b = torch.rand(k, device="cuda", dtype=torch.float64, generator=g) - 0.5
    m = torch.rand(n, 9, h, w, device="cuda", dtype=torch.float64, generator=g)
    inputs = tuple(t.requires_grad_(True) for t in (x, off, wt, b, m))

    def f(x, off, wt, b, m):
        return deft.ops.deform_conv2d(x, off, wt, b, padding=1, mask=m)

    # grad input uses float64 atomics outside deterministic mode: allow rounding-level
    # differences between two backward runs
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4,
                                    nondet_tol=1e-10)


class _SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dcn = deft.nn.DeformConv2d(8, 8, 3, padding=1)
        self.proj = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x, offset, mask_logits):
        y = self.dcn(x, offset, torch.sigmoid(mask_logits))
        return self.proj(torch.tanh(y))


def test_torch_compile_fullgraph_training_matches_eager():
    torch.manual_seed(0)
    net = _SmallNet().cuda()
    g = torch.Generator(device="cuda").manual_seed(6)
    x = torch.rand(2, 8, 10, 10, device="cuda", generator=g) * 2 - 1
    off = off_grid((2, 18, 10, 10), g).float()
    ml = torch.randn(2, 9, 10, 10, device="cuda", generator=g)
    inputs = [t.requires_grad_(True) for t in (x, off, ml)]
    wrt = list(net.parameters()) + inputs

    def loss_and_grads(model):
        loss = model(*inputs).square().mean()
        return loss, torch.autograd.grad(loss, wrt)

    eager_loss, eager_grads = loss_and_grads(net)
    compiled = torch.compile(net, fullgraph=True)
    comp_loss, comp_grads = loss_and_grads(compiled)
    comp_loss, comp_grads = loss_and_grads(compiled)  # second call: the cached graph
    assert max_rel(comp_loss, eager_loss.double()) <= 1e-4
    for i, (a, b) in enumerate(zip(comp_grads, eager_grads)):
        assert max_rel(a, b.double()) <= 1e-4, f"gradient {i}"


def test_autocast_forward_and_backward_in_half():
    tensors, grad, kw = make(**CASES["dcnv2"], dtype=torch.float32, seed=7)
    # the values autocast feeds the kernels: float16 roundings of the float32 leaves
    halves = {name: None if v is None else v.half() for name, v in tensors.items()}
    grad = grad.half()
    _, ref_grads = reference(halves, grad, kw)
    leaves = {name: v.clone().requires_grad_(True) for name, v in tensors.items()}
    with torch.autocast("cuda", dtype=torch.float16):
        out = deft.ops.deform_conv2d(leaves["input"], leaves["offset"], leaves["weight"],
                                     leaves["bias"], mask=leaves["mask"], **kw)
    assert out.dtype == torch.float16
    loss = (out.float() * grad.float()).sum()
    loss.backward()
    for name, v in leaves.items():
        assert v.grad is not None and v.grad.dtype == torch.float32, name
        assert max_rel(v.grad, ref_grads[name]) <= TOL[torch.float16], name


def test_autocast_mixed_dtypes_give_each_gradient_in_its_argument_dtype():
    # as in a training step: float16 activations, a float32 weight and bias under autocast; the
    # op casts inside its one autograd node and hands each gradient back in its argument's dtype
    tensors, grad, kw = make(**CASES["dcnv2"], dtype=torch.float32, seed=8)
    dtypes = {"input": torch.float16, "offset": torch.float16, "mask": torch.float16,
              "weight": torch.float32, "bias": torch.float32}
    leaves = {name: v.to(dtypes[name]).requires_grad_(True) for name, v in tensors.items()}
    halves = {name: v.detach().half() for name, v in leaves.items()}
    _, ref_grads = reference(halves, grad.half(), kw)
    with torch.autocast("cuda", dtype=torch.float16):
        out = deft.ops.deform_conv2d(leaves["input"], leaves["offset"], leaves["weight"],
                                     leaves["bias"], mask=leaves["mask"], **kw)
    assert out.dtype == torch.float16
    out.backward(grad.half())
    for name, v in leaves.items():
        assert v.grad is not None and v.grad.dtype == dtypes[name], name
        assert max_rel(v.grad, ref_grads[name]) <= TOL[torch.float16], name


class _TorchvisionPack(torch.nn.Module):
    """deft.nn.DeformConv2dPack's computation with torchvision's op (same parameters)."""

    def __init__(self, pack):
        super().__init__()
        self.pack = pack

    def forward(self, x):
        p = self.pack
        out = p.conv_offset(x)
        n_off = 2 * p.offset_groups * p.kernel_size[0] * p.kernel_size[1]
        return tv_ops.deform_conv2d(x, out[:, :n_off], p.weight, p.bias, stride=p.stride,
                                    padding=p.padding, dilation=p.dilation,
                                    mask=torch.sigmoid(out[:, n_off:]))


def test_resnet18_with_a_deformable_layer3_conv_trains():
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    net = tvm.resnet18(num_classes=10)
    conv = net.layer3[0].conv2
    pack = deft.nn.DeformConv2dPack(conv.in_channels, conv.out_channels, 3, padding=1,
                                    bias=False)
    with torch.no_grad():
        pack.weight.copy_(conv.weight)
        # small offsets so that the sampling leaves the grid
        torch.nn.init.normal_(pack.conv_offset.weight, std=0.01)
    net.layer3[0].conv2 = pack
    net = net.cuda().train()
    ref_net = copy.deepcopy(net)
    ref_net.layer3[0].conv2 = _TorchvisionPack(ref_net.layer3[0].conv2)

    g = torch.Generator(device="cuda").manual_seed(8)
    x = torch.randn(2, 3, 64, 64, device="cuda", generator=g)
    labels = torch.tensor([1, 7], device="cuda")
    losses = []
    for model in (net, ref_net):
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        losses.append(loss.detach())
    assert max_rel(losses[0], losses[1].double()) <= 1e-4
    ours = dict(net.named_parameters())
    theirs = dict(ref_net.named_parameters())
    checked = 0
    for name, p in ours.items():
        q = theirs[name.replace("layer3.0.conv2.", "layer3.0.conv2.pack.")]
        assert p.grad is not None, name
        assert max_rel(p.grad, q.grad.double()) <= 1e-3, name
        checked += 1
    assert checked == len(theirs)
    # the offset branch gets a gradient
    assert pack.conv_offset.weight.grad.abs().max() > 0
