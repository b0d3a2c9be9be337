"""`python -m bnff.kernels.conv.conv_slices_timing`: the default conv kernels (forward,
backward-data, backward-weights) on channel slices of a wider NHWC buffer, as bnff+ runs them
on DenseNet's block buffer, against the same convs on contiguous tensors: both validated
against each other, then timed interleaved, one line per shape and direction.

Measured (2-vCPU AMD EPYC znver5, batch 16, medians of 15 interleaved calls), slice time over
contiguous time, two runs of the same code:

    shape                                   1 thread                2 threads
    3x3 128->32 at 56, y a slice of 256     fwd 1.04 / 1.03         fwd 1.10 / 1.03
                                            data 1.04 / 1.05        data 1.06 / 1.09
                                            weights 0.99 / 1.05     weights 1.04 / 1.05
    1x1 192->128 at 56, x a prefix of 256   fwd 1.07 / 1.03         fwd 1.08 / 1.07
                                            data 1.01 / 1.01        data 1.01 / 1.03
                                            weights 1.05 / 1.06     weights 1.03 / 1.15

So a slice costs 0-15 % more, most often 3-7 %, for the same bytes; the cause is not isolated.
"""
from __future__ import annotations

# name: (ic, hw, oc, k, pad, channels of the buffer x and dx are sliced from, of y's and dy's,
#        first channel of x's slice, of y's)
SHAPES = {"dn3x3-56": (128, 56, 32, 3, 1, 128, 256, 0, 192),
          "dn1x1-192": (192, 56, 128, 1, 0, 256, 128, 0, 0)}


def main(argv=None):
    """Time each shape's three directions on slices and on contiguous copies at the current
    thread count (NUMBA_NUM_THREADS): medians of --reps interleaved calls after a warm-up."""
    import argparse
    import time

    import numpy as np
    from numba import get_num_threads

    from bnff.kernels.conv.conv_bwd_data import make_conv_backward_data
    from bnff.kernels.conv.conv_bwd_weights import make_conv_backward_weights
    from bnff.kernels.conv.conv_fwd import make_conv_forward

    ap = argparse.ArgumentParser(prog="python -m bnff.kernels.conv.conv_slices_timing",
                                 description=main.__doc__)
    ap.add_argument("shapes", nargs="*", help=f"some of {', '.join(SHAPES)} (default: all)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    rng = np.random.default_rng(0)
    fwd, data, weights = (make_conv_forward(), make_conv_backward_data(),
                          make_conv_backward_weights())
    for name in args.shapes or SHAPES:
        ic, hw, oc, k, pad, wide_x, wide_y, cx, cy = SHAPES[name]
        n = args.batch
        xw = rng.standard_normal((n, hw, hw, wide_x), dtype=np.float32)
        yw, dxw = np.zeros((n, hw, hw, wide_y), np.float32), np.zeros_like(xw)
        w = (rng.standard_normal((oc, k, k, ic)) / np.sqrt(ic * k * k)).astype(np.float32)
        sl = {"x": xw[..., cx:cx + ic], "y": yw[..., cy:cy + oc], "dx": dxw[..., cx:cx + ic],
              "dw": np.empty_like(w)}
        co = {"x": np.ascontiguousarray(sl["x"]), "y": np.empty((n, hw, hw, oc), np.float32),
              "dx": np.empty((n, hw, hw, ic), np.float32), "dw": np.empty_like(w)}
        runs = {"fwd": lambda t: fwd(t["x"], w, t["y"], 1, pad),
                "data": lambda t: data(t["y"], w, t["dx"], 1, pad),
                "weights": lambda t: weights(t["x"], t["y"], t["dw"], 1, pad)}
        line = []
        for direction, run in runs.items():
            run(co)
            run(sl)
            out = "y" if direction == "fwd" else "dx" if direction == "data" else "dw"
            if not np.allclose(sl[out], co[out], rtol=1e-3, atol=1e-3):
                raise SystemExit(f"{name} {direction}: the slice and the contiguous results "
                                 "differ")
            times = ([], [])
            for _ in range(args.reps):
                for i, t in enumerate((co, sl)):
                    t0 = time.perf_counter()
                    run(t)
                    times[i].append(time.perf_counter() - t0)
            c, s = (float(np.median(v)) * 1e3 for v in times)
            line.append(f"{direction} {c:.2f} / {s:.2f} ms ({s / c:.2f}x)")
        print(f"{name} batch {n}, {get_num_threads()} threads, contiguous / slice: "
              + ", ".join(line), flush=True)


if __name__ == "__main__":
    main()
