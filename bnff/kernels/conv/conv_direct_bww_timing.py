"""`python -m bnff.kernels.conv.conv_direct_bww_timing`: direct backward-weights
(conv_direct_bww) against im2col and numpy sgemm on real shapes, validated, then timed."""
from __future__ import annotations

import numpy as np
from numba import get_num_threads

from bnff.engine.vec import W
from bnff.kernels.conv.conv_direct_bww import OB, R, make_direct_backward_weights


BENCH = {  # name: (ic, spatial, oc, kernel, stride, pad) of real convs at 224x224
    "dn-3x3-56": (128, 56, 32, 3, 1, 1),
    "dn-3x3-28": (128, 28, 32, 3, 1, 1),
    "dn-3x3-14": (128, 14, 32, 3, 1, 1),
    "stem": (3, 224, 64, 7, 2, 3),
    "dn-1x1-160": (160, 56, 128, 1, 1, 0),
    "dn-1x1-256": (256, 56, 128, 1, 1, 0),
    "dn-1x1-1024": (1024, 14, 512, 1, 1, 0),
    "rn-3x3-64": (64, 56, 64, 3, 1, 1),
    "rn-1x1-256": (256, 56, 64, 1, 1, 0),
    "rn-1x1-512": (512, 28, 128, 1, 1, 0),
}


def main(argv=None):
    """Per BENCH shape: the direct and the im2col kernel validated against the float64
    reference (batch 1), then timed interleaved at --batch (median of --reps after a warm-up
    call) with the direct kernel fused with bnff's two prologues (BN+ReLU of x, masked BN
    gradient of dy: tests/test_conv_direct_bww.py validates it); GFLOP/s, % of numpy sgemm
    (2048^3) of the same process, and the fused time over the plain direct one. Threads: NUMBA_NUM_THREADS
    and OPENBLAS_NUM_THREADS of the environment."""
    import argparse
    import statistics
    import time

    from bnff.kernels.conv.conv_bwd_weights import ConvBackwardWeights, make_im2col_backward_weights

    ap = argparse.ArgumentParser(prog="python -m bnff.kernels.conv.conv_direct_bww_timing",
                                 description=main.__doc__)
    ap.add_argument("shapes", nargs="*", help=f"some of {', '.join(BENCH)} (default: all)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    if set(args.shapes) - set(BENCH):
        ap.error(f"unknown shapes {sorted(set(args.shapes) - set(BENCH))}")
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    c = a @ a
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.matmul(a, a, out=c)
        ts.append(time.perf_counter() - t0)
    sg = 2 * 2048 ** 3 / statistics.median(ts) / 1e9
    print(f"{get_num_threads()} threads, W {W}, tile {R} x {OB}, sgemm {sg:.1f} GFLOP/s, "
          f"batch {args.batch}, median of {args.reps}", flush=True)
    from bnff.hooks.bnff_hooks import bn_relu_grad_prologue
    from bnff.kernels.conv.conv_common import bn_relu_prologue

    fused = make_direct_backward_weights(bn_relu_prologue, bn_relu_grad_prologue)
    plain = {"direct": make_direct_backward_weights(), "im2col": make_im2col_backward_weights()}
    for name in args.shapes or BENCH:
        ic, hw, oc, k, s, p = BENCH[name]
        for mb in (1, args.batch):
            st = ConvBackwardWeights(dict(mb=mb, ic=ic, ih=hw, iw=hw, oc=oc, kh=k, kw=k, sh=s,
                                          ph=p))
            rng = np.random.default_rng(0)
            ins = st.make_inputs(rng)
            xg = rng.standard_normal(ins["dy"].shape, dtype=np.float32)
            pro_x = tuple(rng.standard_normal(ic).astype(np.float32) for _ in range(2))
            pro_dy = (xg.reshape(-1),) + tuple(rng.standard_normal(oc).astype(np.float32)
                                               for _ in range(5))
            calls = {v: (lambda f=f, o=np.empty((oc, k, k, ic), np.float32):
                         (f(ins["x"], ins["dy"], o, s, p), o)[1]) for v, f in plain.items()}
            calls["fused"] = lambda o=np.empty((oc, k, k, ic), np.float32): (
                fused(ins["x"], ins["dy"], o, s, p, pro_x, pro_dy), o)[1]
            outs = {v: f() for v, f in calls.items()}
            if mb == 1:
                errs = {v: st.max_rel_error({"dw": outs[v]}, st.reference(ins)) for v in plain}
                if max(errs.values()) > st.tolerance:
                    raise SystemExit(f"{name}: wrong result, max rel error {errs}")
                continue
            times = {v: [] for v in calls}
            for _ in range(args.reps):  # interleaved, so drift hits all alike
                for v, f in calls.items():
                    t0 = time.perf_counter()
                    f()
                    times[v].append(time.perf_counter() - t0)
            med = {v: statistics.median(t) for v, t in times.items()}
            gf = {v: st.cost(v).flops / med[v] / 1e9 for v in plain}
            print(f"{st.descriptor():36s} " + "  ".join(
                f"{v} {g:6.1f} GFLOP/s {100 * g / sg:3.0f} %" for v, g in gf.items()) +
                f"  fused/direct {med['fused'] / med['direct']:.3f}", flush=True)

if __name__ == "__main__":
    main()
