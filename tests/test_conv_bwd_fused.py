"""One-pass 1x1 conv backward (bnff/kernels/conv/conv_bwd_fused.py): both gradients against the float64
reference on DenseNet-121 / ResNet-50 1x1 shapes and odd sizes, stride 1 and 2; with the bnff
hooks against the composition of the hooked backward-data and backward-weights kernels; x as a
channel slice of a wider buffer. Outputs start as NaN, so unwritten elements fail."""
import numpy as np
import pytest

from bnff.kernels.conv import conv_bwd_fused as bf
from bnff.hooks.bnff_hooks import bn_relu_grad_prologue, relu_sums_epilogue
from bnff.kernels.conv.conv_bwd_data import make_conv_backward_data
from bnff.kernels.conv.conv_bwd_weights import make_conv_backward_weights
from bnff.kernels.conv.conv_common import bn_relu_prologue, pixels

def stage(ic, oc, s, hw, hooks=False):
    return bf.ConvBackward1x1(dict(mb=2, ic=ic, ih=hw, iw=hw + 2, oc=oc, kh=1, kw=1, sh=s, ph=0),
                              hooks)


def nan_outputs(st):
    return {k: np.full_like(v, np.nan) for k, v in st.allocate_outputs().items()}


@pytest.mark.parametrize("shape", [(64, 128, 1, 7), (13, 40, 2, 9)],
                         ids=lambda s: "ic%d-oc%d-s%d-hw%d" % s)
@pytest.mark.parametrize("ntasks", [2, 3])
@pytest.mark.parametrize("accumulate", [False, True])
def test_hooks_match_two_hooked_kernels(shape, ntasks, accumulate):
    """bn_relu_grad on dy, bn_relu on x, relu_sums on dx: one pass = bwd-data + bwd-weights.
    With accumulate, dx starts nonzero, so the sums also see whether the epilogue ran on the
    dx pixels a stride-2 conv does not reach."""
    ic, oc, s, _ = shape
    st = stage(*shape)
    rng = np.random.default_rng(2)
    ins = st.make_inputs(rng)
    x, dz, w = ins["x"], ins["dy"], ins["w"]
    vec = lambda c: rng.standard_normal(c).astype(np.float32)
    xg = rng.standard_normal(dz.shape, dtype=np.float32)
    pdy = (xg.reshape(-1), vec(oc), vec(oc), vec(oc), vec(oc), vec(oc))
    px = (vec(ic), vec(ic))
    xd = rng.standard_normal(x.shape, dtype=np.float32)  # pre-BN tensor of the layer below
    ad, bd = vec(ic), vec(ic)
    dx0 = rng.standard_normal(x.shape, dtype=np.float32)

    def run(fused):
        out = nan_outputs(st)
        if accumulate:
            out["dx"][...] = dx0
        s1, s2 = np.zeros((ntasks, ic)), np.zeros((ntasks, ic))
        epi = pixels(xd) + (ad, bd, s1, s2)
        if fused:
            conv = bf.make_conv_backward_1x1(bn_relu_grad_prologue, bn_relu_prologue,
                                             relu_sums_epilogue)
            conv(x, dz, w, out["dx"], out["dw"], s, pdy, px, epi, ntasks, accumulate)
        else:
            make_conv_backward_data(bn_relu_grad_prologue, relu_sums_epilogue)(
                dz, w, out["dx"], s, 0, pdy, epi, ntasks, accumulate)
            make_conv_backward_weights(bn_relu_prologue, bn_relu_grad_prologue)(
                x, dz, out["dw"], s, 0, px, pdy, ntasks)
        return out, s1.sum(0), s2.sum(0)

    (got, g1, g2), (want, w1, w2) = run(True), run(False)
    assert st.max_rel_error(got, want) < 1e-5
    np.testing.assert_allclose(g1, w1, rtol=1e-5, atol=1e-4 * np.abs(w1).max())
    np.testing.assert_allclose(g2, w2, rtol=1e-5, atol=1e-4 * np.abs(w2).max())
    # the sums are over the masked dx the kernel wrote, every pixel of it
    mask = (ad * xd.astype(np.float64) + bd > 0)
    np.testing.assert_allclose(g1, (got["dx"] * mask).sum((0, 1, 2)), rtol=1e-6,
                               atol=1e-6 * np.abs(w1).max())


@pytest.mark.parametrize("stride", [1, 2])
def test_channel_slices_and_accumulate(stride):
    """x, dy and dx as channel slices of wider buffers (the neighbours' channels untouched);
    accumulate adds the result to dx."""
    st = stage(40, 24, stride, 7)
    rng = np.random.default_rng(3)
    ins = st.make_inputs(rng)
    ref = st.reference(ins)
    out = nan_outputs(st)

    def widened(a, c0=8, extra=16):
        buf = rng.standard_normal(a.shape[:3] + (a.shape[3] + extra,), dtype=np.float32)
        buf[..., c0:c0 + a.shape[3]] = a
        return buf, buf[..., c0:c0 + a.shape[3]]

    (_, x), (_, dy) = widened(ins["x"]), widened(ins["dy"])
    dx0 = rng.standard_normal(out["dx"].shape, dtype=np.float32)
    db, dx = widened(dx0)
    before = db.copy()
    conv = bf.make_conv_backward_1x1()
    conv(x, dy, ins["w"], dx, out["dw"], stride)
    out["dx"] = dx
    assert st.max_rel_error(out, ref) < st.tolerance
    keep = np.ones(db.shape[3], bool)
    keep[8:48] = False
    assert np.array_equal(db[..., keep], before[..., keep])
    dx[...] = dx0
    conv(x, dy, ins["w"], dx, out["dw"], stride, accumulate=True)
    assert st.max_rel_error({"dx": dx - dx0.astype(np.float64)}, {"dx": ref["dx"]}) < 1e-4


def test_cost_reads_dy_once_in_one_pass():
    for hooks, per in ((False, 1), (True, 2)):
        st = stage(64, 32, 2, 9, hooks)
        dy = 4 * 2 * 5 * 6 * 32  # bytes of dy (and of x' when hooked)
        one, two = st.cost("one_pass"), st.cost("two_kernels")
        assert two.bytes_read - one.bytes_read == per * dy
        assert one.flops == two.flops == 2 * 2 * (2 * 5 * 6) * 32 * 64
        sizes = st.make_inputs(np.random.default_rng(0))
        assert one.bytes_read == sum(sizes[k].nbytes for k in ("x", "w", "dy") + ("xg",) * hooks)
        assert one.bytes_written == sum(v.nbytes for v in st.allocate_outputs().values())


def test_rejects_other_convs():
    with pytest.raises(ValueError):
        bf.ConvBackward1x1(dict(mb=1, ic=4, ih=5, iw=5, oc=4, kh=3, kw=3, sh=1, ph=1))
    st = stage(8, 16, 2, 5)
    ins, out = st.make_inputs(np.random.default_rng(0)), st.allocate_outputs()
    with pytest.raises(ValueError):
        bf.one_pass(ins["x"], ins["dy"], ins["w"], out["dx"], out["dw"], 1)
