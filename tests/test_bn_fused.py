"""Fused BN stages (bnff/kernels/bn/bn_fused.py) against the float64 composition of the unfused ops;
BN statistics from conv-epilogue sums at mean 1000; the fused-schedule conv hooks
(bnff/hooks/bnff_hooks.py and conv_common's) through the real conv kernels against the unfused
kernels; and the bytes each fused stage moves against the unfused stages it replaces."""
import numpy as np
import pytest

from bnff.kernels.bn import bn_fused as F
from bnff.kernels.elementwise.add import Add
from bnff.kernels.bn.bn_backward import BNBackward
from bnff.kernels.bn.bn_normalize import BNNormalize, normalize_affine
from bnff.kernels.bn.bn_stats import BNStats
from bnff.hooks.bnff_hooks import (bn_prologue, bn_relu_grad_prologue, relu_sums_epilogue,
                                 sums_epilogue)
from bnff.kernels.conv.conv_bwd_data import conv_backward_data, make_conv_backward_data
from bnff.kernels.conv.conv_bwd_weights import conv_backward_weights, make_conv_backward_weights
from bnff.kernels.conv.conv_common import (bn_grad_prologue, bn_relu_prologue, channel_sums_epilogue,
                                 identity_epilogue, identity_prologue, out_size, pixels)
from bnff.kernels.conv.conv_fwd import conv_forward, make_conv_forward
from bnff.kernels.elementwise.relu import ReLUBackward, ReLUForward

def _coeffs(rng, c):
    """Per-channel BN coefficients of either sign, |a| in [0.5, 1.5]."""
    a = rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c)
    return a.astype(np.float32), rng.uniform(-1, 1, c).astype(np.float32)


def _off_kink(x, a, b):
    """x moved so that |a*x + b| >= 1e-3: float32 and float64 then agree on every ReLU mask."""
    y = a * x.astype(np.float64) + b
    return np.where(np.abs(y) < 1e-3, x + np.float32(0.01) / a, x).astype(np.float32)


def test_kernels_on_channel_slices():
    """DenseNet passes channel slices of a block-wide buffer: X[r, j] strided by the buffer."""
    rng = np.random.default_rng(5)
    m, c, ctot = 150, 40, 96
    bufs = [rng.standard_normal((m, ctot), dtype=np.float32) for _ in range(3)]
    dz, x, dx = (b[:, :c] for b in bufs)
    a, b = _coeffs(rng, c)
    p, q = _coeffs(rng, c)
    x[:] = _off_kink(x, a, b)
    before = bufs[2].copy()
    y, dy = np.empty((m, c), np.float32), np.empty((m, c), np.float32)
    s1, s2 = np.empty(c), np.empty(c)
    F.normalize_relu(x, a, b, y)
    F.relu_mask_sums(dz, x, a, b, dy, s1, s2)
    F.bn_dx_add(dz, x, a, p, q, dx)
    x64, dz64 = x.astype(np.float64), dz.astype(np.float64)
    want_dy = dz64 * (a * x64 + b > 0)
    np.testing.assert_allclose(y, np.maximum(a * x64 + b, 0), rtol=1e-6, atol=1e-6)
    assert np.array_equal(dy, want_dy)
    np.testing.assert_allclose(s1, want_dy.sum(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(s2, (want_dy * x64).sum(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx, before[:, :c] + a * dz64 + p * x64 + q, rtol=1e-5, atol=1e-5)
    assert np.array_equal(bufs[2][:, c:], before[:, c:])  # untouched outside the slice


# --- statistics from conv-epilogue sums, mean 1000 std 1 ------------------------------------


def _var_error(mean, var, y):
    y64 = y.reshape(-1, y.shape[-1]).astype(np.float64)
    return np.abs(var / y64.var(0) - 1).max(), np.abs(mean - y64.mean(0)).max()


def test_stats_from_sums_mean_1000():
    """float64 per-task sums (as channel_sums_epilogue keeps them) give the variance of
    mean-1000 std-1 data to 1e-4 of a float64 two-pass; float32 sums would not."""
    st = F.StatsFromSums(dict(mb=2, ic=128, ih=14, iw=14, tasks=3))
    ins = st.make_inputs(np.random.default_rng(1))
    out = st.allocate_outputs()
    st.run(st.default, ins, out)
    rel, dmean = _var_error(out["mean"], out["var"], ins["x"])
    assert rel < 1e-4 and dmean < 1e-3, (rel, dmean)
    x = ins["x"].reshape(-1, 128)
    mean32 = x.sum(0, dtype=np.float32) / np.float32(x.shape[0])
    var32 = (x * x).sum(0, dtype=np.float32) / np.float32(x.shape[0]) - mean32 * mean32
    assert _var_error(mean32, var32, ins["x"])[0] > 1e-2  # the data does break float32


@pytest.mark.parametrize("ntasks", [2, 3])
def test_stats_from_sums_through_conv_epilogue(ntasks):
    """conv forward with channel_sums_epilogue on an output of mean ~1000, std ~1, then
    stats_from_sums: variance to 1e-4 of a float64 two-pass over the same float32 output."""
    rng = np.random.default_rng(6)
    ic, oc = 64, 32
    x = rng.standard_normal((2, 8, 8, ic + 1), dtype=np.float32)
    x[..., ic] = 1.0  # a constant input channel with weight 1000 / 9 per tap
    w = (rng.standard_normal((oc, 3, 3, ic + 1)) / np.sqrt(9 * ic)).astype(np.float32)
    w[..., ic] = 1000.0 / 9
    y = np.empty((2, 8, 8, oc), np.float32)
    s1, s2 = np.zeros((ntasks, oc)), np.zeros((ntasks, oc))
    make_conv_forward(identity_prologue, channel_sums_epilogue)(x, w, y, 1, 1, (), (s1, s2),
                                                                ntasks)
    mean, var = np.empty(oc, np.float32), np.empty(oc, np.float32)
    F.stats_from_sums(s1, s2, y.size // oc, mean, var)
    inner = y[:, 1:-1, 1:-1].reshape(-1, oc)  # the border sees fewer taps of the constant
    assert abs(inner.mean() - 1000) < 1 and 0.5 < inner.std(0).min() < inner.std(0).max() < 2
    rel, dmean = _var_error(mean, var, y)
    assert rel < 1e-4 and dmean < 1e-3, (rel, dmean)


def test_dgamma_stable_at_mean_1000():
    """dgamma = inv * (s2 - mean * s1) from dy_sums on mean-1000 std-1 x matches float64
    sum(dy * (x - mean)) * inv to 1e-5 (unshifted float32 tiles of dy * x miss by ~1e-4)."""
    rng = np.random.default_rng(10)
    m, c = 2 * 28 * 28, 64
    x = rng.standard_normal((m, c), dtype=np.float32) + np.float32(1000.0)
    dy = rng.standard_normal((m, c), dtype=np.float32)
    s1, s2 = np.empty(c), np.empty(c)
    F.dy_sums(dy, x, s1, s2)
    xd = x.astype(np.float64)
    mean, var = xd.mean(0).astype(np.float32), xd.var(0).astype(np.float32)
    dgamma, dbeta, a, p, q = (np.empty(c, np.float32) for _ in range(5))
    F.bn_backward_coefficients(s1, s2, mean, var, np.ones(c, np.float32), 1e-5, m,
                               dgamma, dbeta, a, p, q)
    inv = 1 / np.sqrt(var.astype(np.float64) + 1e-5)
    _close(dgamma, (dy * (xd - mean)).sum(0) * inv, 1e-5)
    _close(dbeta, dy.astype(np.float64).sum(0), 1e-6)


# --- conv hooks through the real kernels against the unfused kernels --------------------------

# (ic, oc, k, stride, pad, spatial): a 3x3, a strided 1x1 (empty backward-data stride phases),
# a strided 3x3 with odd sizes
HOOK_SHAPES = [(64, 32, 3, 1, 1, 8), (64, 32, 1, 2, 0, 8), (13, 21, 3, 2, 1, 9)]
HOOK_IDS = ["ic%d-oc%d-k%d-s%d-p%d-hw%d" % s for s in HOOK_SHAPES]


def _conv_case(shape, seed):
    """x [2, hw, hw+1, ic] (pre-BN, BN coefficients a, b), w OHWI, and the output shape."""
    ic, oc, k, s, p, hw = shape
    rng = np.random.default_rng(seed)
    a, b = _coeffs(rng, ic)
    x = _off_kink(rng.standard_normal((2, hw, hw + 1, ic), dtype=np.float32), a, b)
    w = (rng.standard_normal((oc, k, k, ic)) / np.sqrt(ic * k * k)).astype(np.float32)
    yshape = (2, out_size(hw, k, s, p), out_size(hw + 1, k, s, p), oc)
    return rng, x, a, b, w, yshape


def _flat(t):
    return t.reshape(-1, t.shape[-1])


def _unfused_input(x, a, b, relu, mean, var, gamma, beta):
    """The conv input as the unfused kernels make it: normalize_relu, or bn_normalize."""
    z = np.empty_like(x)
    if relu:
        F.normalize_relu(_flat(x), a, b, _flat(z))
    else:
        normalize_affine(_flat(x), mean, var, gamma, beta, 1e-5, _flat(z))
    return z


def _bn_params(rng, x, eps=1e-5):
    """Batch statistics of x, gamma, beta and their a, b from bn_coefficients."""
    c = x.shape[-1]
    xd = _flat(x).astype(np.float64)
    mean, var = xd.mean(0).astype(np.float32), xd.var(0).astype(np.float32)
    gamma = (rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c)).astype(np.float32)
    beta = rng.uniform(-1, 1, c).astype(np.float32)
    a, b = np.empty(c, np.float32), np.empty(c, np.float32)
    F.bn_coefficients(mean, var, gamma, beta, eps, a, b)
    return a, b, (mean, var, gamma, beta)


def _close(got, want, tol=1e-4):
    err = np.max(np.abs(got.astype(np.float64) - want)) / np.max(np.abs(want))
    assert err < tol, err


@pytest.mark.parametrize("relu", [True, False], ids=["bn_relu_prologue", "bn_prologue"])
@pytest.mark.parametrize("shape", HOOK_SHAPES, ids=HOOK_IDS)
def test_forward_prologue_and_stats(shape, relu):
    """conv(prologue(x)) with channel_sums_epilogue + stats_from_sums == conv(normalize(x))
    followed by BN statistics of its output."""
    rng, x, _, _, w, yshape = _conv_case(shape, 7)
    a, b, params = _bn_params(rng, x)
    x = _off_kink(x, a, b)
    want = np.empty(yshape, np.float32)
    conv_forward(_unfused_input(x, a, b, relu, *params), w, want, shape[3], shape[4])
    y = np.full(yshape, np.nan, np.float32)
    s1, s2 = np.zeros((2, shape[1])), np.zeros((2, shape[1]))
    conv = make_conv_forward(bn_relu_prologue if relu else bn_prologue, channel_sums_epilogue)
    conv(x, w, y, shape[3], shape[4], (a, b), (s1, s2), 2)
    _close(y, want)
    mean, var = np.empty(shape[1], np.float32), np.empty(shape[1], np.float32)
    F.stats_from_sums(s1, s2, y.size // shape[1], mean, var)
    y64 = _flat(y).astype(np.float64)
    _close(mean, y64.mean(0), 1e-5)
    _close(var, y64.var(0), 1e-5)


@pytest.mark.parametrize("relu", [True, False], ids=["relu_sums", "sums"])
@pytest.mark.parametrize("ntasks", [2, 3])
@pytest.mark.parametrize("shape", HOOK_SHAPES, ids=HOOK_IDS)
def test_backward_data_epilogue(shape, ntasks, relu):
    """conv_bwd_data with bn_grad_prologue (the next BN's dx formed from its dy2, x2) and
    relu_sums_epilogue / sums_epilogue == bn_dx, conv_bwd_data, then the sums of relu_mask_sums
    / dy_sums (the output itself stays dz)."""
    rng, x, a, b, w, yshape = _conv_case(shape, 8)
    ic, oc = shape[0], shape[1]
    dy2 = rng.standard_normal(yshape, dtype=np.float32)
    x2 = rng.standard_normal(yshape, dtype=np.float32)
    a2, p2 = _coeffs(rng, oc)
    q2 = rng.uniform(-1, 1, oc).astype(np.float32)
    g = np.empty(yshape, np.float32)
    F.bn_dx(_flat(dy2), _flat(x2), a2, p2, q2, _flat(g))
    dz = np.empty(x.shape, np.float32)
    conv_backward_data(g, w, dz, shape[3], shape[4])
    want, w1, w2 = np.empty_like(dz), np.empty(ic), np.empty(ic)
    if relu:
        F.relu_mask_sums(_flat(dz), _flat(x), a, b, _flat(want), w1, w2)
    else:
        F.dy_sums(_flat(dz), _flat(x), w1, w2)
    want = dz
    dy = np.full(x.shape, np.nan, np.float32)
    s1, s2 = np.zeros((ntasks, ic)), np.zeros((ntasks, ic))
    epi, epi_args = ((relu_sums_epilogue, pixels(x) + (a, b, s1, s2)) if relu
                     else (sums_epilogue, pixels(x) + (s1, s2)))
    conv = make_conv_backward_data(bn_grad_prologue, epi)
    conv(dy2, w, dy, shape[3], shape[4], (x2.reshape(-1), a2, p2, q2), epi_args, ntasks)
    _close(dy, want)
    _close(s1.sum(0), w1)
    _close(s2.sum(0), w2)


@pytest.mark.parametrize("shape", HOOK_SHAPES, ids=HOOK_IDS)
def test_store_free_backward(shape):
    """bnff's store-free pair: conv_bwd_data with relu_sums_epilogue leaves dz unmasked and
    sums dz*mask; bn_relu_grad_prologue in the producer's backward (and bn_relu_dx where the
    producer is no conv) applies the mask: both == relu_mask_sums then bn_dx."""
    rng, x, a, b, w, yshape = _conv_case(shape, 9)
    ic = shape[0]
    dy2 = rng.standard_normal(yshape, dtype=np.float32)
    dz = np.empty(x.shape, np.float32)
    conv_backward_data(dy2, w, dz, shape[3], shape[4])
    dy, w1, w2 = np.empty_like(dz), np.empty(ic), np.empty(ic)
    F.relu_mask_sums(_flat(dz), _flat(x), a, b, _flat(dy), w1, w2)
    got = np.full(x.shape, np.nan, np.float32)
    s1, s2 = np.zeros((2, ic)), np.zeros((2, ic))
    make_conv_backward_data(identity_prologue, relu_sums_epilogue)(
        dy2, w, got, shape[3], shape[4], (), pixels(x) + (a, b, s1, s2), 2)
    np.testing.assert_array_equal(got, dz)
    _close(s1.sum(0), w1)
    _close(s2.sum(0), w2)
    ga, gp = _coeffs(rng, ic)
    gq = rng.uniform(-1, 1, ic).astype(np.float32)
    want_dx = np.empty_like(dz)
    F.bn_dx(_flat(dy), _flat(x), ga, gp, gq, _flat(want_dx))
    dx = np.full(x.shape, np.nan, np.float32)
    F.bn_relu_dx(_flat(dz), _flat(x), a, b, ga, gp, gq, _flat(dx))
    _close(dx, want_dx)
    # the producer's backward-data with the masking prologue == with the plain one on dx
    w0 = (rng.standard_normal((ic, 3, 3, 5)) / np.sqrt(ic * 9)).astype(np.float32)
    xin = np.empty(x.shape[:3] + (5,), np.float32)
    want_in = np.empty_like(xin)
    conv_backward_data(want_dx, w0, want_in, 1, 1)
    make_conv_backward_data(bn_relu_grad_prologue, identity_epilogue)(
        dz, w0, xin, 1, 1, (x.reshape(-1), a, b, ga, gp, gq), (), 2)
    _close(xin, want_in)


@pytest.mark.parametrize("relu", [True, False], ids=["relu_sums", "sums"])
def test_backward_data_epilogue_on_channel_slice(relu):
    """DenseNet: the pre-BN x of the epilogues is the channel prefix of the block buffer."""
    shape = HOOK_SHAPES[0]
    rng, x, a, b, w, yshape = _conv_case(shape, 11)
    ic = shape[0]
    buf = rng.standard_normal(x.shape[:3] + (ic + 32,), dtype=np.float32)
    buf[..., :ic] = x
    xs = pixels(buf[..., :ic])
    g = rng.standard_normal(yshape, dtype=np.float32)
    dz = np.empty(x.shape, np.float32)
    conv_backward_data(g, w, dz, shape[3], shape[4])
    dy = np.full(x.shape, np.nan, np.float32)
    s1, s2 = np.zeros((2, ic)), np.zeros((2, ic))
    epi, epi_args = ((relu_sums_epilogue, xs + (a, b, s1, s2)) if relu
                     else (sums_epilogue, xs + (s1, s2)))
    make_conv_backward_data(identity_prologue, epi)(g, w, dy, shape[3], shape[4], (), epi_args,
                                                    2)
    np.testing.assert_array_equal(dy, dz)
    want = dz.astype(np.float64) * ((a * x.astype(np.float64) + b > 0) if relu else 1)
    _close(s1.sum(0), _flat(want).sum(0), 1e-6)
    _close(s2.sum(0), (_flat(want) * _flat(x)).sum(0), 1e-6)


@pytest.mark.parametrize("relu", [True, False], ids=["bn_relu_prologue", "bn_prologue"])
@pytest.mark.parametrize("shape", HOOK_SHAPES, ids=HOOK_IDS)
def test_backward_weights_prologues(shape, relu):
    """conv_bwd_weights(prologue_x(x), bn_grad_prologue(dy)) ==
    conv_bwd_weights(normalize_relu(x) or bn_normalize(x), bn_dx(dy, x2, a, p, q))."""
    rng, x, _, _, w, yshape = _conv_case(shape, 9)
    a, b, params = _bn_params(rng, x)
    x = _off_kink(x, a, b)
    oc = shape[1]
    dy = rng.standard_normal(yshape, dtype=np.float32)
    x2 = rng.standard_normal(yshape, dtype=np.float32)
    a2, p2 = _coeffs(rng, oc)
    q2 = rng.uniform(-1, 1, oc).astype(np.float32)
    g = np.empty(yshape, np.float32)
    F.bn_dx(_flat(dy), _flat(x2), a2, p2, q2, _flat(g))
    want = np.empty_like(w)
    conv_backward_weights(_unfused_input(x, a, b, relu, *params), g, want, shape[3], shape[4])
    dw = np.full(w.shape, np.nan, np.float32)
    conv = make_conv_backward_weights(bn_relu_prologue if relu else bn_prologue,
                                      bn_grad_prologue)
    conv(x, dy, dw, shape[3], shape[4], (a, b), (x2.reshape(-1), a2, p2, q2), 2)
    _close(dw, want)


# --- bytes: each fused stage against the unfused stages it replaces ---------------------------

BYTES_SHAPE = dict(mb=2, ic=64, ih=8, iw=8)
S = 2 * 8 * 8 * 64 * 4  # one activation tensor
V = 64 * 4  # one float32 [C] vector


def _cost(cls):
    st = cls(BYTES_SHAPE)
    return st.cost(st.default)


def _passes(*costs):
    """Activation passes (multiples of S) of a sequence of stages; the O(C) rest is < S."""
    return sum(c.bytes for c in costs) // S


def test_fused_stage_bytes_exact():
    want = {  # (read, written)
        F.BNReLU: (S + 4 * V, S),
        F.BNAddReLU: (2 * S + 4 * V, S),
        F.BN2AddReLU: (2 * S + 8 * V, S),
        F.StatsFromSums: (2 * 2 * 64 * 8, 2 * V),
        F.ReLUMaskSums: (2 * S + 4 * V, S + 2 * 64 * 8),
        F.ReLUMaskSumsZ: (3 * S, S + 2 * 64 * 8),
        F.DYSums: (2 * S, 2 * 64 * 8),
        F.BNDx: (2 * S + 3 * V + 2 * 64 * 8, S + 5 * V),
        F.BNDxAdd: (3 * S + 3 * V + 2 * 64 * 8, S + 5 * V),
        F.BNReLUDx: (2 * S + 5 * V + 2 * 64 * 8, S + 5 * V),
    }
    assert set(want) == set(F.STAGES)
    for cls, (r, w) in want.items():
        c = _cost(cls)
        assert (c.bytes_read, c.bytes_written) == (r, w), cls.name


def test_fused_bytes_against_unfused():
    """Forward: bn_relu 2S vs bn_normalize + relu 4S; bn_add_relu 3S vs bn_normalize + add +
    relu 7S; bn2_add_relu 3S vs 2 bn_normalize + add + relu 9S; statistics from sums 0S vs
    bn_stats 1S. Backward: relu_mask_sums 3S vs relu backward 3S + BN reduce 2S; with bn_dx 6S
    vs relu backward + BN backward 8S; bn_dx_add 4S vs bn_dx + add 6S."""
    norm, relu, add = _cost(BNNormalize), _cost(ReLUForward), _cost(Add)
    relu_bwd = _cost(ReLUBackward)
    bn_bwd = BNBackward(BYTES_SHAPE).cost("two_pass")
    bn_reduce = bn_bwd.bytes_read - 2 * S  # two_pass = fused reduce (dy, x) + dx pass
    assert _passes(_cost(F.BNReLU)) == 2 and _passes(norm, relu) == 4
    assert _passes(_cost(F.BNAddReLU)) == 3 and _passes(norm, add, relu) == 7
    assert _passes(_cost(F.BN2AddReLU)) == 3 and _passes(norm, norm, add, relu) == 9
    assert _passes(_cost(F.StatsFromSums)) == 0 and _passes(_cost(BNStats)) == 1
    assert _passes(_cost(F.ReLUMaskSums)) == 3 and relu_bwd.bytes == 3 * S
    assert bn_reduce // S == 2
    assert _passes(_cost(F.ReLUMaskSumsZ)) == 4 and _passes(_cost(F.DYSums)) == 2
    assert _passes(_cost(F.ReLUMaskSums), _cost(F.BNDx)) == 6 and _passes(relu_bwd, bn_bwd) == 8
    assert _passes(_cost(F.BNDxAdd)) == 4 and _passes(_cost(F.BNDx), add) == 6
