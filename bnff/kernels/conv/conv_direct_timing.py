"""`python -m bnff.kernels.conv.conv_direct_timing`: the direct engine (conv_direct) against
the im2col one and numpy sgemm on real shapes, each validated, then timed (llm.c style)."""
from __future__ import annotations

import numpy as np

from bnff.engine.vec import W
from bnff.kernels.conv.conv_common import identity_prologue
from bnff.kernels.conv.conv_direct import RP


# DenseNet-121 and ResNet-50 shapes at 224 (ic, hw, oc, k, stride, pad), named as in the report
BENCH = {"dn3x3-56": (128, 56, 32, 3, 1, 1), "dn3x3-28": (128, 28, 32, 3, 1, 1),
         "dn3x3-14": (128, 14, 32, 3, 1, 1), "stem": (3, 224, 64, 7, 2, 3),
         "dn1x1-160": (160, 56, 128, 1, 1, 0), "dn1x1-256": (256, 56, 128, 1, 1, 0),
         "rn3x3-64": (64, 56, 64, 3, 1, 1), "rn1x1-256": (256, 56, 64, 1, 1, 0),
         "rn1x1-512": (512, 28, 128, 1, 1, 0)}


def main(argv=None):
    """Validate, then time, the direct and the im2col engines of conv forward and backward-data
    on real shapes at the current thread count (NUMBA_NUM_THREADS; numpy's BLAS threads from
    OPENBLAS_NUM_THREADS), beside numpy sgemm of the same run: one line per shape, medians of
    interleaved repetitions after a warm-up (compilation excluded)."""
    import argparse
    import statistics
    import time

    from numba import get_num_threads

    from bnff.kernels.conv.conv_bwd_data import ConvBackwardData
    from bnff.kernels.conv.conv_fwd import ConvForward

    ap = argparse.ArgumentParser(prog="python -m bnff.kernels.conv.conv_direct_timing",
                                 description=main.__doc__)
    ap.add_argument("shapes", nargs="*", help=f"some of {', '.join(BENCH)} (default: all)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--stages", default="conv_fwd,conv_bwd_data")
    args = ap.parse_args(argv)
    if set(args.shapes) - set(BENCH):
        ap.error(f"unknown shapes {sorted(set(args.shapes) - set(BENCH))}")
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    a @ a
    ts = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        a @ a
        ts.append(time.perf_counter() - t0)
    sg = 2 * 2048 ** 3 / statistics.median(ts) / 1e9
    print(f"W={W} RP={RP}, {get_num_threads()} threads, batch {args.batch}; numpy sgemm 2048: "
          f"{sg:.1f} GFLOP/s", flush=True)
    stages = {"conv_fwd": ConvForward, "conv_bwd_data": ConvBackwardData}
    for name in args.shapes or BENCH:
        ic, hw, oc, k, s, p = BENCH[name]
        for sn in args.stages.split(","):
            st = stages[sn](dict(mb=args.batch, ic=ic, ih=hw, iw=hw, oc=oc, kh=k, kw=k, sh=s,
                                 ph=p))
            ins = st.make_inputs(np.random.default_rng(0))
            variants = ("direct", "im2col")
            errs = {}
            small = stages[sn](dict(st.shape, mb=1))
            sins = small.make_inputs(np.random.default_rng(1))
            ref = small.reference(sins)
            for v in variants:
                out = {n: np.full_like(x, np.nan) for n, x in small.allocate_outputs().items()}
                small.run(v, sins, out)
                errs[v] = small.max_rel_error(out, ref)
                assert errs[v] < small.tolerance, (name, sn, v, errs[v])
            out = st.allocate_outputs()
            runs = {v: (lambda v=v: st.run(v, ins, out)) for v in variants}
            runs["fused"] = fused_call(sn, ins, out, s, p)
            times = {v: [] for v in runs}
            for run in runs.values():
                run()
            for _ in range(args.reps):  # interleaved, so drift hits all alike
                for v, run in runs.items():
                    t0 = time.perf_counter()
                    run()
                    times[v].append(time.perf_counter() - t0)
            med = {v: statistics.median(ts) for v, ts in times.items()}
            f = st.cost(st.default).flops
            line = "  ".join(f"{v} {f / med[v] / 1e9:6.1f} GFLOP/s ({100 * f / med[v] / 1e9 / sg:3.0f} %)"
                             for v in variants)
            print(f"{name:10s} {sn:13s} {st.descriptor():34s} {line}  fused "
                  f"{100 * (med['fused'] / med['direct'] - 1):+5.1f} %  err "
                  f"{max(errs.values()):.1e}", flush=True)


def fused_call(stage, ins, out, stride, pad):
    """The bnff conv of a BN site on this stage's operands: forward with the normalize+ReLU
    prologue and the statistics epilogue; backward-data with the mask-and-sums epilogue."""
    from numba import get_num_threads

    from bnff.hooks.bnff_hooks import relu_sums_epilogue
    from bnff.kernels.conv.conv_bwd_data import make_conv_backward_data
    from bnff.kernels.conv.conv_common import bn_relu_prologue, channel_sums_epilogue, pixels
    from bnff.kernels.conv.conv_fwd import make_conv_forward

    nt = get_num_threads()
    rng = np.random.default_rng(2)
    if stage == "conv_fwd":
        ic, oc = ins["x"].shape[3], ins["w"].shape[0]
        ab = (rng.uniform(0.5, 1.5, ic).astype(np.float32),
              rng.uniform(-0.5, 0.5, ic).astype(np.float32))
        part = (np.zeros((nt, oc)), np.zeros((nt, oc)))
        conv = make_conv_forward(bn_relu_prologue, channel_sums_epilogue)
        return lambda: conv(ins["x"], ins["w"], out["y"], stride, pad, ab, part, nt)
    ic = ins["w"].shape[3]
    x = rng.standard_normal(out["dx"].shape, dtype=np.float32)
    epi = pixels(x) + (rng.uniform(0.5, 1.5, ic).astype(np.float32),
                       rng.uniform(-0.5, 0.5, ic).astype(np.float32),
                       np.zeros((nt, ic)), np.zeros((nt, ic)))
    conv = make_conv_backward_data(identity_prologue, relu_sums_epilogue)
    return lambda: conv(ins["dy"], ins["w"], out["dx"], stride, pad, (), epi, nt)


if __name__ == "__main__":
    main()
