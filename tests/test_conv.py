"""Conv kernels (forward, backward-data, backward-weights): every variant against the float64
reference on small batches with the real channel counts, kernels and strides of DenseNet-121
and ResNet-50 plus sizes that divide no tile; the micro-kernel GEMM against numpy; and real
prologue / epilogue hooks against applying the same math outside the kernel."""
import numpy as np
import pytest

from bnff.kernels.conv import conv_bwd_data as bd
from bnff.kernels.conv import conv_bwd_weights as bw
from bnff.kernels.conv import conv_fwd as fw
from bnff.engine import gemm
from bnff.kernels.conv.conv_common import (bn_grad_prologue, bn_relu_prologue, channel_sums_epilogue,
                                 from_ohwi, out_size, to_ohwi)

STAGES = [fw.ConvForward, bd.ConvBackwardData, bw.ConvBackwardWeights]


def make_stage(cls, ic, oc, k, s, p, hw, mb=2):
    return cls(dict(mb=mb, ic=ic, ih=hw, iw=hw + 1, oc=oc, kh=k, kw=k, sh=s, ph=p))


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.name)
def test_cost_and_descriptor(cls):
    st = make_stage(cls, 128, 32, 3, 2, 1, 9, mb=4)
    oh, ow = out_size(9, 3, 2, 1), out_size(10, 3, 2, 1)
    c = st.cost(st.default)
    assert c.flops == 2 * 4 * oh * ow * 32 * 128 * 9
    sizes = {k: v.nbytes for k, v in st.make_inputs(np.random.default_rng(0)).items()}
    assert c.bytes_read == sum(sizes.values())
    assert c.bytes_written == sum(v.nbytes for v in st.allocate_outputs().values())
    assert st.descriptor() == "mb4ic128ih9iw10oc32kh3kw3sh2ph1"


@pytest.mark.parametrize("m,k,n", [(13, 7, 21), (100, 300, 40), (6, 16, 16), (97, 513, 35)])
def test_sgemm_matches_numpy(m, k, n):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    c = np.full((m, n), np.nan, np.float32)
    gemm.sgemm(a, b, c, gemm.row_blocks(m, 2))
    ref = a.astype(np.float64) @ b
    assert np.max(np.abs(c - ref)) < 1e-5 * np.max(np.abs(ref)) * np.sqrt(k)


def test_weight_layout_roundtrip():
    w = np.random.default_rng(0).standard_normal((8, 3, 5, 7))
    assert np.array_equal(from_ohwi(to_ohwi(w)), w.astype(np.float32))


# --- hooks -------------------------------------------------------------------------------

def bn_coeffs(rng, c):
    return (rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32))


HOOK_SHAPES = [(64, 128, 1, 1, 0, 8), (128, 32, 3, 1, 1, 9), (13, 21, 3, 2, 1, 11),
               (17, 40, 7, 2, 3, 9)]


@pytest.mark.parametrize("shape", HOOK_SHAPES, ids=lambda s: "ic%d-oc%d-k%d-s%d-p%d-hw%d" % s)
@pytest.mark.parametrize("ntasks", [2, 3])
def test_forward_bn_relu_prologue_and_stats_epilogue(shape, ntasks):
    """conv(relu(a*x+b)) with per-channel sums of the output, fused = unfused."""
    rng = np.random.default_rng(2)
    st = make_stage(fw.ConvForward, *shape)
    ins = st.make_inputs(rng)
    a, b = bn_coeffs(rng, shape[0])
    z = np.maximum(a * ins["x"].astype(np.float64) + b, 0)
    ref = st.reference({"x": z, "w": ins["w"]})["y"]
    y = np.full(st.allocate_outputs()["y"].shape, np.nan, np.float32)
    s1 = np.zeros((ntasks, shape[1]))
    s2 = np.zeros((ntasks, shape[1]))
    conv = fw.make_conv_forward(bn_relu_prologue, channel_sums_epilogue)
    conv(ins["x"], ins["w"], y, shape[3], shape[4], (a, b), (s1, s2), ntasks)
    assert st.max_rel_error({"y": y}, {"y": ref}) < 1e-4
    y64 = y.astype(np.float64)
    np.testing.assert_allclose(s1.sum(0), y64.sum((0, 1, 2)), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(s2.sum(0), (y64 ** 2).sum((0, 1, 2)), rtol=1e-9)


@pytest.mark.parametrize("shape", HOOK_SHAPES, ids=lambda s: "ic%d-oc%d-k%d-s%d-p%d-hw%d" % s)
def test_backward_data_grad_prologue_and_stats_epilogue(shape):
    """bwd-data of g = a*dy + p*x + q formed on the fly, with per-channel sums of dx."""
    rng = np.random.default_rng(3)
    st = make_stage(bd.ConvBackwardData, *shape)
    ins = st.make_inputs(rng)
    oc = shape[1]
    x = rng.standard_normal(ins["dy"].shape, dtype=np.float32)
    a, p = bn_coeffs(rng, oc)
    q = rng.standard_normal(oc).astype(np.float32)
    g = a * ins["dy"].astype(np.float64) + p * x.astype(np.float64) + q
    ref = st.reference({"dy": g, "w": ins["w"]})["dx"]
    dx = np.full(st.allocate_outputs()["dx"].shape, np.nan, np.float32)
    s1 = np.zeros((2, shape[0]))
    s2 = np.zeros((2, shape[0]))
    conv = bd.make_conv_backward_data(bn_grad_prologue, channel_sums_epilogue)
    conv(ins["dy"], ins["w"], dx, shape[3], shape[4], (x.reshape(-1), a, p, q), (s1, s2), 2)
    assert st.max_rel_error({"dx": dx}, {"dx": ref}) < 1e-4
    dx64 = dx.astype(np.float64)
    np.testing.assert_allclose(s1.sum(0), dx64.sum((0, 1, 2)), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(s2.sum(0), (dx64 ** 2).sum((0, 1, 2)), rtol=1e-9)


# more pixels per task than one KC block (the last pixel of a full block is packed apart),
# more columns than one NCB block, more output channels than one MC block, the stem's 3 channels
BIG_BW_SHAPES = [(48, 40, 3, 1, 1, 24), (40, 160, 1, 1, 0, 24), (3, 20, 7, 2, 3, 40)]


@pytest.mark.parametrize("shape", HOOK_SHAPES + BIG_BW_SHAPES,
                         ids=lambda s: "ic%d-oc%d-k%d-s%d-p%d-hw%d" % s)
@pytest.mark.parametrize("ntasks", [1, 3])
def test_backward_weights_both_prologues(shape, ntasks):
    """dw of conv(relu(a*x+b)) against the gradient a2*dy + p*y + q, both formed on the fly."""
    rng = np.random.default_rng(4)
    st = make_stage(bw.ConvBackwardWeights, *shape)
    ins = st.make_inputs(rng)
    ic, oc = shape[0], shape[1]
    a, b = bn_coeffs(rng, ic)
    y = rng.standard_normal(ins["dy"].shape, dtype=np.float32)
    a2, p = bn_coeffs(rng, oc)
    q = rng.standard_normal(oc).astype(np.float32)
    z = np.maximum(a * ins["x"].astype(np.float64) + b, 0)
    g = a2 * ins["dy"].astype(np.float64) + p * y.astype(np.float64) + q
    ref = st.reference({"x": z, "dy": g})
    dw = np.full(st.allocate_outputs()["dw"].shape, np.nan, np.float32)
    conv = bw.make_conv_backward_weights(bn_relu_prologue, bn_grad_prologue)
    conv(ins["x"], ins["dy"], dw, shape[3], shape[4], (a, b), (y.reshape(-1), a2, p, q), ntasks)
    assert st.max_rel_error({"dw": dw}, ref) < 1e-4


@pytest.mark.parametrize("shape", BIG_BW_SHAPES, ids=lambda s: "ic%d-oc%d-k%d-s%d-p%d-hw%d" % s)
def test_backward_weights_default_on_full_blocks(shape):
    st = make_stage(bw.ConvBackwardWeights, *shape)
    ins = st.make_inputs(np.random.default_rng(5))
    dw = np.full(st.allocate_outputs()["dw"].shape, np.nan, np.float32)
    st.run(st.default, ins, {"dw": dw})
    assert st.max_rel_error({"dw": dw}, st.reference(ins)) < st.tolerance


def test_factories_memoize():
    assert fw.make_conv_forward() is fw.make_conv_forward()
    assert (bw.make_conv_backward_weights(bn_relu_prologue)
            is bw.make_conv_backward_weights(bn_relu_prologue))
