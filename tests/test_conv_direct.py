"""The direct conv engine (bnff/kernels/conv/conv_direct.py) against the float64 reference, with
outputs filled with NaN first: stride 2, odd sizes, the 3-channel stem, 1x1 with widths a
multiple of the register tile and not, channel slices of wider buffers, backward-data accumulating, and the fused hooks of bnff / bnff+: the
normalize+ReLU prologue applied once per source element, statistics and mask-and-sums
epilogues. Both vector widths: tests/test_vec_width.py runs the default (direct) kernels at
every width."""
import numpy as np
import pytest
from numba import njit

from bnff.hooks.bnff_hooks import relu_sums_epilogue
from bnff.kernels.conv import conv_bwd_data as bd
from bnff.kernels.conv import conv_fwd as fw
from bnff.kernels.conv.conv_common import (bn_grad_prologue, bn_relu_prologue,
                                           channel_sums_epilogue, identity_epilogue, out_size)
from bnff.kernels.conv.conv_direct import RP

# (ic, oc, k, stride, pad, h, w): w = 2 RP, whole register tiles along each row
SHAPES = [(128, 32, 3, 1, 1, 5, 9),        # DenseNet 3x3, a partial tile per row
          (3, 64, 7, 2, 3, 12, 13),        # the stem
          (13, 21, 3, 2, 1, 11, 10),       # odd everything, a partial channel panel
          (40, 40, 1, 1, 0, 3, 2 * RP),    # 1x1, whole tiles
          (24, 36, 1, 2, 0, 5, 2 * RP),    # 1x1 stride 2: rows no tap reads are skipped
          (9, 70, 5, 1, 2, 6, 7)]          # 5x5, three panels, one of them partial
IDS = ["ic%d-oc%d-k%d-s%d-p%d-%dx%d" % s for s in SHAPES]


def _stage(cls, shape, mb=2):
    ic, oc, k, s, p, h, w = shape
    return cls(dict(mb=mb, ic=ic, ih=h, iw=w, oc=oc, kh=k, kw=k, sh=s, ph=p))


@pytest.mark.parametrize("cls", [fw.ConvForward, bd.ConvBackwardData], ids=lambda c: c.name)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_direct_matches_reference(shape, cls):
    st = _stage(cls, shape)
    ins = st.make_inputs(np.random.default_rng(0))
    out = {k: np.full_like(v, np.nan) for k, v in st.allocate_outputs().items()}
    st.run("direct", ins, out)
    assert st.max_rel_error(out, st.reference(ins)) < st.tolerance


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[4]], ids=[IDS[0], IDS[3], IDS[4]])
def test_direct_on_channel_slices(shape):
    """x read from, y written into channel slices of wider buffers, as bnff+ does; dx
    accumulated into a slice by backward-data (stride 1)."""
    ic, oc, k, s, p, h, w = shape
    rng = np.random.default_rng(1)
    st = _stage(fw.ConvForward, shape)
    ins = st.make_inputs(rng)
    xbuf = rng.standard_normal((2, h, w, ic + 11), dtype=np.float32)
    xbuf[..., 5:5 + ic] = ins["x"]
    ys = st.allocate_outputs()["y"].shape
    ybuf = np.full(ys[:3] + (oc + 7,), np.nan, np.float32)
    fw.conv_forward(xbuf[..., 5:5 + ic], ins["w"], ybuf[..., 3:3 + oc], s, p)
    assert st.max_rel_error({"y": ybuf[..., 3:3 + oc]}, st.reference(ins)) < st.tolerance
    assert np.isnan(ybuf[..., :3]).all() and np.isnan(ybuf[..., 3 + oc:]).all()
    if s == 1:
        sb = _stage(bd.ConvBackwardData, shape)
        bins = sb.make_inputs(rng)
        gbuf = rng.standard_normal((2, h, w, ic + 9), dtype=np.float32)
        keep = gbuf.copy()
        dybuf = np.zeros(ys[:3] + (oc + 4,), np.float32)
        dybuf[..., 4:] = bins["dy"]
        bd.make_conv_backward_data()(dybuf[..., 4:], bins["w"], gbuf[..., 4:4 + ic], s, p,
                                     accumulate=True)
        ref = sb.reference(bins)["dx"] + keep[..., 4:4 + ic]
        assert sb.max_rel_error({"dx": gbuf[..., 4:4 + ic]}, {"dx": ref}) < sb.tolerance
        np.testing.assert_array_equal(gbuf[..., :4], keep[..., :4])
        np.testing.assert_array_equal(gbuf[..., 4 + ic:], keep[..., 4 + ic:])


@njit(inline="always", cache=True)
def counting_prologue(v, idx, c, args):
    """The identity that counts, per source element, how often the kernel applied it."""
    args[0][idx] += 1.0
    return v


def test_prologue_runs_once_per_element():
    """A 3x3 conv applies its prologue once per source element (im2col applies it per tap)."""
    st = _stage(fw.ConvForward, SHAPES[0])
    ins = st.make_inputs(np.random.default_rng(2))
    y = np.full(st.allocate_outputs()["y"].shape, np.nan, np.float32)
    count = np.zeros(ins["x"].size)
    fw.make_conv_forward(counting_prologue, identity_epilogue)(ins["x"], ins["w"], y, 1, 1,
                                                               (count,), (), 1)
    assert st.max_rel_error({"y": y}, st.reference(ins)) < st.tolerance
    np.testing.assert_array_equal(count, 1.0)


@pytest.mark.parametrize("ntasks", [1, 3])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3]], ids=[IDS[0], IDS[2], IDS[3]])
def test_fused_forward_and_backward_data(shape, ntasks):
    """bnff's convs on the direct engine: forward conv(relu(a*x + b)) with the statistics of y
    in the epilogue; backward-data of g = a2*dy + p*y + q formed in the prologue, with the
    mask-and-sums epilogue s1 += dz*[af*x + bf > 0], s2 += that*x."""
    ic, oc, k, s, p, h, w = shape
    rng = np.random.default_rng(3)
    st = _stage(fw.ConvForward, shape)
    ins = st.make_inputs(rng)
    a = rng.uniform(0.5, 1.5, ic).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, ic).astype(np.float32)
    z = np.maximum(a * ins["x"].astype(np.float64) + b, 0)
    y = np.full(st.allocate_outputs()["y"].shape, np.nan, np.float32)
    s1, s2 = np.zeros((ntasks, oc)), np.zeros((ntasks, oc))
    fw.make_conv_forward(bn_relu_prologue, channel_sums_epilogue)(
        ins["x"], ins["w"], y, s, p, (a, b), (s1, s2), ntasks)
    assert st.max_rel_error({"y": y}, st.reference({"x": z, "w": ins["w"]})) < 1e-4
    y64 = y.astype(np.float64)
    np.testing.assert_allclose(s1.sum(0), y64.sum((0, 1, 2)), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(s2.sum(0), (y64 ** 2).sum((0, 1, 2)), rtol=1e-9)

    dy = rng.standard_normal(y.shape, dtype=np.float32)
    a2 = rng.uniform(0.5, 1.5, oc).astype(np.float32)
    p2, q2 = rng.standard_normal((2, oc)).astype(np.float32)
    g = a2 * dy.astype(np.float64) + p2 * y.astype(np.float64) + q2
    sb = _stage(bd.ConvBackwardData, shape)
    dz_ref = sb.reference({"dy": g, "w": ins["w"]})["dx"]
    dz = np.full(ins["x"].shape, np.nan, np.float32)
    t1, t2 = np.zeros((ntasks, ic)), np.zeros((ntasks, ic))
    x1 = ins["x"].reshape(-1)
    bd.make_conv_backward_data(bn_grad_prologue, relu_sums_epilogue)(
        dy, ins["w"], dz, s, p, (y.reshape(-1), a2, p2, q2), (x1, ic, a, b, t1, t2), ntasks)
    assert sb.max_rel_error({"dx": dz}, {"dx": dz_ref}) < 1e-4
    mask = (a * ins["x"] + b > 0)
    gz = np.where(mask, dz.astype(np.float64), 0.0)
    np.testing.assert_allclose(t1.sum(0), gz.sum((0, 1, 2)), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(t2.sum(0), (gz * ins["x"]).sum((0, 1, 2)), rtol=1e-9, atol=1e-9)


def test_engines_are_named_variants():
    for cls in (fw.ConvForward, bd.ConvBackwardData):
        assert cls.default == "direct" and {"direct", "im2col"} <= set(cls.variants)
    assert fw.make_conv_forward() is fw.make_conv_forward()
    assert fw.make_conv_forward(engine="im2col") is not fw.make_conv_forward()
