"""Direct conv backward-weights (bnff/kernels/conv/conv_direct_bww.py) against the float64
reference, dw filled with NaN first: every path of the kernel (x read in place or through a
band, dy in place or through a band, full tiles and a tail, several channel blocks, partial
blocks of rows, more tasks than blocks), channel slices of wider buffers, both prologues, and
the other vector width in a child process."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bnff.engine import vec
from bnff.hooks.bnff_hooks import bn_relu_grad_prologue
from bnff.kernels.conv import conv_direct_bww as d
from bnff.kernels.conv.conv_bwd_weights import ConvBackwardWeights, make_conv_backward_weights
from bnff.kernels.conv.conv_common import bn_grad_prologue, bn_relu_prologue, identity_prologue

# (ic, oc, k, stride, pad, spatial), mb = 2, iw = spatial + 1
SHAPES = [
    (128, 32, 3, 1, 1, 9),    # DenseNet 3x3: x band, dy in place, a tail (384 % R)
    (3, 64, 7, 2, 3, 14),     # the stem: run of 21 floats, two channel blocks
    (64, 96, 1, 1, 0, 8),     # 1x1: x and dy in place, three channel blocks
    (40, 32, 1, 2, 0, 9),     # 1x1 stride 2, odd spatial size: x in place with a tail
    (5, 7, 1, 1, 0, 6),       # a run shorter than one tile (J < R), OC < OB: both bands
    (13, 21, 3, 2, 1, 11),    # odd everything
    (16, 40, 3, 1, 1, 40),    # rows in blocks: more than one block per image
]
IDS = ["ic%d-oc%d-k%d-s%d-p%d-hw%d" % s for s in SHAPES]


def stage(ic, oc, k, s, p, hw, mb=2):
    return ConvBackwardWeights(dict(mb=mb, ic=ic, ih=hw, iw=hw + 1, oc=oc, kh=k, kw=k, sh=s,
                                    ph=p))


def hooked(shape, seed, relu_x=True):
    """Inputs, the prologue args and the float64 reference of dw when x goes through BN+ReLU
    (relu_x) and dy through the BN input gradient a2*dy + p*y + q."""
    rng = np.random.default_rng(seed)
    st = stage(*shape)
    ins = st.make_inputs(rng)
    ic, oc = shape[0], shape[1]
    a, b = (rng.standard_normal(ic).astype(np.float32) for _ in range(2))
    y = rng.standard_normal(ins["dy"].shape, dtype=np.float32)
    a2, p, q = (rng.standard_normal(oc).astype(np.float32) for _ in range(3))
    x64 = ins["x"].astype(np.float64)
    z = np.maximum(a * x64 + b, 0) if relu_x else x64
    g = a2 * ins["dy"].astype(np.float64) + p * y.astype(np.float64) + q
    return st, ins, (a, b), (y.reshape(-1), a2, p, q), st.reference({"x": z, "dy": g})


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_default_is_direct_and_matches_reference(shape):
    st = stage(*shape)
    assert st.default == "direct"
    ins = st.make_inputs(np.random.default_rng(0))
    dw = np.full(st.allocate_outputs()["dw"].shape, np.nan, np.float32)
    st.run("direct", ins, {"dw": dw})
    assert st.max_rel_error({"dw": dw}, st.reference(ins)) < st.tolerance


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("ntasks", [1, 3])
def test_both_prologues(shape, ntasks):
    """The recomputing prologue on x and the BN input gradient formed from dy, once each."""
    st, ins, px, pdy, ref = hooked(shape, 1)
    dw = np.full(st.allocate_outputs()["dw"].shape, np.nan, np.float32)
    make_conv_backward_weights(bn_relu_prologue, bn_grad_prologue)(
        ins["x"], ins["dy"], dw, shape[3], shape[4], px, pdy, ntasks)
    assert st.max_rel_error({"dw": dw}, ref) < 1e-4


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[4]], ids=[IDS[0], IDS[3], IDS[4]])
def test_channel_slices(shape):
    """x and dy as channel slices of wider buffers, read in place (pixel strides)."""
    st = stage(*shape)
    ins = st.make_inputs(np.random.default_rng(2))
    ref = st.reference(ins)
    xbuf = np.random.default_rng(3).standard_normal(ins["x"].shape[:3] + (shape[0] + 9,),
                                                    dtype=np.float32)
    ybuf = np.random.default_rng(4).standard_normal(ins["dy"].shape[:3] + (shape[1] + 5,),
                                                    dtype=np.float32)
    xbuf[..., 6:6 + shape[0]] = ins["x"]
    ybuf[..., 2:2 + shape[1]] = ins["dy"]
    dw = np.full(st.allocate_outputs()["dw"].shape, np.nan, np.float32)
    make_conv_backward_weights()(xbuf[..., 6:6 + shape[0]], ybuf[..., 2:2 + shape[1]], dw,
                                 shape[3], shape[4])
    assert st.max_rel_error({"dw": dw}, ref) < st.tolerance


def test_tail_rows_and_blocks():
    """The run split: full tiles then a tail read from J - R; blocks of rows cover the image."""
    assert d.tail(3 * d.R) == (3 * d.R, -1)
    assert d.tail(3 * d.R + 1) == (3 * d.R, 2 * d.R + 1)
    assert d.tail(d.R - 1) == (0, 0)
    assert d.block_rows(56, 56, 1000) == -(-d.PIX // 56)
    assert d.block_rows(14, 14, 1 << 20) == 14  # a large partial: whole images
    assert d.block_rows(3, 500, 10) == 1


# --- the other vector width -----------------------------------------------------------------

CHILD_SHAPES = [SHAPES[0], SHAPES[3], SHAPES[4]]


def run_child():
    """dw errors of the (identity, bn_grad) kernel on CHILD_SHAPES in this process's width."""
    errs = []
    for i, shape in enumerate(CHILD_SHAPES):
        st, ins, _, pdy, ref = hooked(shape, 10 + i, relu_x=False)
        dw = np.full(st.allocate_outputs()["dw"].shape, np.nan, np.float32)
        make_conv_backward_weights(identity_prologue, bn_grad_prologue)(
            ins["x"], ins["dy"], dw, shape[3], shape[4], (), pdy)
        errs.append(st.max_rel_error({"dw": dw}, ref))
    return vec.W, d.R, errs


def test_other_width_in_child():
    other = 8 if vec.W == 16 else 16
    env = dict(os.environ, BNFF_VEC_WIDTH=str(other), NUMBA_NUM_THREADS="2")
    code = ("import sys, json; sys.path.insert(0, %r); import test_conv_direct_bww as t; "
            "print(json.dumps(t.run_child()))" % os.path.dirname(__file__))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    w, rows, errs = json.loads(r.stdout.strip().splitlines()[-1])
    assert w == other and rows >= 1
    assert max(errs) < 1e-4, errs


def test_masked_gradient_prologue():
    """bnff's masked form (bn_relu_grad_prologue) through the dy band."""
    shape = SHAPES[0]
    st, ins, px, _, _ = hooked(shape, 5)
    rng = np.random.default_rng(6)
    oc = shape[1]
    xg = rng.standard_normal(ins["dy"].shape, dtype=np.float32)
    af, bf, a2, p, q = (rng.standard_normal(oc).astype(np.float32) for _ in range(5))
    x64, xg64 = ins["x"].astype(np.float64), xg.astype(np.float64)
    g = a2 * ins["dy"] * (af * xg64 + bf > 0) + p * xg64 + q
    ref = st.reference({"x": np.maximum(px[0] * x64 + px[1], 0), "dy": g})
    dw = np.full(st.allocate_outputs()["dw"].shape, np.nan, np.float32)
    make_conv_backward_weights(bn_relu_prologue, bn_relu_grad_prologue)(
        ins["x"], ins["dy"], dw, shape[3], shape[4], px, (xg.reshape(-1), af, bf, a2, p, q))
    assert st.max_rel_error({"dw": dw}, ref) < 1e-4
