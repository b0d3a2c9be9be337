"""The vector width of bnff/engine/vec.py: chosen from the host, forced by BNFF_VEC_WIDTH, and
every width gives the same convolutions and GEMM. Each width runs in its own process (W is
fixed when vec.py loads); both are checked against the float64 reference and against each
other, on shapes that leave partial tiles and (backward-weights) more pixels than one KC
block at either width."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bnff.engine import vec
from bnff.measure.machine import machine_info

# (stage, ic, oc, k, stride, pad, spatial): the DenseNet 3x3, the stem, odd everything
SHAPES = [("fwd", 128, 32, 3, 1, 1, 9), ("fwd", 3, 64, 7, 2, 3, 14), ("fwd", 13, 21, 3, 2, 1, 11),
          ("bwd_data", 128, 32, 3, 1, 1, 9), ("bwd_data", 13, 21, 3, 2, 1, 11),
          ("bwd_weights", 48, 40, 3, 1, 1, 24), ("bwd_weights", 13, 21, 3, 2, 1, 11)]


def run_all(out_dir):
    """Every shape's default kernel and one sgemm into out_dir/<i>.npy; returns the width."""
    from bnff.engine import gemm
    from bnff.kernels.conv import conv_bwd_data as bd, conv_bwd_weights as bw, conv_fwd as fw
    cls = {"fwd": fw.ConvForward, "bwd_data": bd.ConvBackwardData,
           "bwd_weights": bw.ConvBackwardWeights}
    for i, (stage, ic, oc, k, s, p, hw) in enumerate(SHAPES):
        st = cls[stage](dict(mb=2, ic=ic, ih=hw, iw=hw + 1, oc=oc, kh=k, kw=k, sh=s, ph=p))
        ins = st.make_inputs(np.random.default_rng(i))
        out = {n: np.full_like(v, np.nan) for n, v in st.allocate_outputs().items()}
        st.run(st.default, ins, out)
        np.save(os.path.join(out_dir, f"{i}.npy"), next(iter(out.values())))
    rng = np.random.default_rng(9)
    a = rng.standard_normal((97, 513), dtype=np.float32)
    b = rng.standard_normal((513, 35), dtype=np.float32)
    c = np.full((97, 35), np.nan, np.float32)
    gemm.sgemm(a, b, c, gemm.row_blocks(97, 2))
    np.save(os.path.join(out_dir, "gemm.npy"), c)
    return vec.W


def in_child(width, out_dir):
    env = dict(os.environ, BNFF_VEC_WIDTH=str(width), NUMBA_NUM_THREADS="2")
    code = ("import sys, json; sys.path.insert(0, %r); import test_vec_width as t; "
            "from bnff.measure.machine import machine_info; "
            "print(json.dumps([t.run_all(%r), machine_info()['vec_width']]))"
            % (os.path.dirname(__file__), str(out_dir)))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_host_width_and_registers():
    assert vec.W in vec.WIDTHS and machine_info()["vec_width"] == vec.W
    if "BNFF_VEC_WIDTH" not in os.environ:
        assert vec.W == vec.host_width()
    assert vec.VREGS >= 8


def test_bad_width_is_refused():
    env = dict(os.environ, BNFF_VEC_WIDTH="12")
    r = subprocess.run([sys.executable, "-c", "import bnff.engine.vec"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "BNFF_VEC_WIDTH='12'" in r.stderr


def test_every_width_matches_reference_and_each_other(tmp_path):
    from bnff.kernels.conv import conv_bwd_data as bd, conv_bwd_weights as bw, conv_fwd as fw
    cls = {"fwd": fw.ConvForward, "bwd_data": bd.ConvBackwardData,
           "bwd_weights": bw.ConvBackwardWeights}
    outs = {}
    for width in vec.WIDTHS:
        d = tmp_path / f"w{width}"
        d.mkdir()
        assert in_child(width, d) == [width, width]
        outs[width] = d
    for i, (stage, ic, oc, k, s, p, hw) in enumerate(SHAPES):
        st = cls[stage](dict(mb=2, ic=ic, ih=hw, iw=hw + 1, oc=oc, kh=k, kw=k, sh=s, ph=p))
        ref = st.reference(st.make_inputs(np.random.default_rng(i)))
        name = next(iter(ref))
        got = {w: np.load(outs[w] / f"{i}.npy") for w in vec.WIDTHS}
        for w in vec.WIDTHS:
            assert st.max_rel_error({name: got[w]}, ref) < st.tolerance, (stage, w)
        assert st.max_rel_error({name: got[8]}, {name: got[16]}) < 1e-5, stage
    rng = np.random.default_rng(9)
    a = rng.standard_normal((97, 513), dtype=np.float32)
    b = rng.standard_normal((513, 35), dtype=np.float32)
    ref = a.astype(np.float64) @ b
    for w in vec.WIDTHS:
        c = np.load(outs[w] / "gemm.npy")
        assert np.max(np.abs(c - ref)) < 1e-5 * np.max(np.abs(ref)) * np.sqrt(513), w
