"""Conv backward of a 1x1 conv without padding, stride s, both gradients in one pass over the
incoming gradient. With g = prologue_dy(dy) (the gradient as the fused schedules form it on
the fly, e.g. a*dz*[relu mask] + p*x' + q) and xs = prologue_x(x) at the pixels the conv reads:

    dx[n, s*oh, s*ow, ic] = sum_oc g[n, oh, ow, oc] * w[oc, ic]       (other dx pixels: 0)
    dw[oc, ic]            = sum_{n, oh, ow} g[n, oh, ow, oc] * xs[n, s*oh, s*ow, ic]

As GEMMs over the M = N*OH*OW output pixels: dx_rows = G @ W and dW = G^T @ Xs, both with the
same G [M, OC]; 2 * 2*M*OC*IC FLOPs. Two kernels (conv_bwd_data, then conv_bwd_weights) each
read dy (and the prologue's extra tensor) and apply the prologue to every element; one pass
reads them and applies the prologue once.

Variants (stage conv_bwd_1x1, both `f(x, dy, w, dx, dw, stride, prologue_dy, pdy_args)`):
1. two_kernels: the hooked backward-data, then the hooked backward-weights.
2. one_pass:    per row block of pixels, G's block packed once (prologue applied) and used as
                the A operand of both GEMMs: dx_block = G_block @ W and the task's partial
                dW += G_block^T @ Xs_block; partials summed at the end.

Layout of one pass (per task, per block of mc <= row_step pixels; per KC-wide chunk of oc):
G_block is packed row by row, KC apart, ap[r*KC + oc]. The micro-kernel `tile` (A(r, k) =
ap[r*KC + k]) computes dx tiles from it against W packed in NR-wide panels of ic; the same
buffer read transposed, A(oc, r) = ap[oc + r*KC] (make_tile(1, KC)), is dW's A operand against
Xs_block packed in NR-wide panels of ic, bx[(ic // NR)*mc*NR + r*NR + ic % NR]. Task 0
accumulates into dw, task t > 0 into part[t - 1].

For stride s > 1 the dx pixels the conv does not read get zeros: each block also writes the
s*s - 1 neighbours (s*oh + a, s*ow + b) of its pixels, which cover dx exactly, and runs the
epilogue on those zero tiles too, so the epilogue sees every tile of dx, as in
conv_bwd_data (an epilogue that rewrites or adds to dx stays correct; sums get zeros).

`make_conv_backward_1x1(prologue_dy, prologue_x, epilogue)` (conv_common hooks: prologue_dy's
idx indexes the flat view of dy, prologue_x's that of x; the epilogue sees finished dx tiles,
`rows` pixel indices of dx) returns
    conv(x, dy, w, dx, dw, stride, pdy_args=(), px_args=(), epi_args=(), ntasks=None,
         accumulate=False)
with w, dw [OC, 1, 1, IC] (dw C-contiguous); x, dy, dx NHWC, each possibly a channel slice of
a wider buffer (conv_common.pixels); accumulate: dx += the result, as conv_bwd_data.
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from bnff.kernels import reference as R
from bnff.hooks.bnff_hooks import bn_relu_grad_prologue
from bnff.kernels.conv.conv_bwd_data import make_conv_backward_data
from bnff.kernels.conv.conv_bwd_weights import make_conv_backward_weights
from bnff.kernels.conv.conv_common import (JB_FLOATS, add_partials, conv_flops, from_ohwi,
                                 identity_epilogue, identity_prologue, pixels, row_step,
                                 hooked)
from bnff.kernels.conv.conv_fwd import ConvForward
from bnff.engine.gemm import KC, MR, NR, make_tile, pack_b, tile
from bnff.kernels.stage import F32, Cost

tile_t = make_tile(1, KC)  # A(r, k) = ap[r + k*KC]: the row-packed G block read transposed

@hooked
def make_conv_backward_1x1(prologue_dy=identity_prologue, prologue_x=identity_prologue,
                           epilogue=identity_epilogue):
    """2. One pass, the three hooks compiled in; memoized."""
    @njit(parallel=True, fastmath=True, cache=True)
    def kernel(x1, xps, dy1, yps, dx1, dps, dw2, part, bw, N, H, W, OH, OW, s, acc, pdy_args,
               px_args, epi_args, nt):
        OC, IC = dw2.shape
        M = N * OH * OW
        npan = (IC + NR - 1) // NR
        step = row_step(M, nt)
        nblocks = (M + step - 1) // step
        for tid in prange(nt):
            c2 = dw2 if tid == 0 else part[tid - 1]
            for r in range(OC):
                for k in range(IC):
                    c2[r, k] = 0.0
            ap = np.empty((step + MR) * KC + MR, np.float32)
            bx = np.empty(npan * step * NR, np.float32)
            oh_ = np.empty(step, np.int64)
            ow_ = np.empty(step, np.int64)
            rd = np.empty(step, np.int64)
            nbr = np.empty(step * (s * s - 1), np.int64)
            rows = np.empty(MR, np.int64)
            scratch = np.empty(MR * NR, np.float32)
            for blk in range(tid, nblocks, nt):
                r0 = blk * step
                mc = min(step, M - r0)
                for r in range(mc):
                    q = (r0 + r) // OW
                    ow_[r] = r0 + r - q * OW
                    n = q // OH
                    oh_[r] = q - n * OH
                    rd[r] = (n * H + s * oh_[r]) * W + s * ow_[r]
                # Xs_block in NR-wide panels of ic, prologue_x applied, zero past IC
                for r in range(mc):
                    base = rd[r] * xps
                    for jp in range(npan):
                        o = (jp * mc + r) * NR
                        c0 = jp * NR
                        nr = min(NR, IC - c0)
                        for j in range(nr):
                            i = np.uint64(base + c0 + j)
                            bx[np.uint64(o + j)] = prologue_x(x1[i], i, np.uint64(c0 + j),
                                                              px_args)
                        for j in range(nr, NR):
                            bx[o + j] = 0.0
                for p0 in range(0, OC, KC):
                    kc = min(KC, OC - p0)
                    # G_block[:, p0:p0+kc] row by row, KC apart, prologue_dy applied once
                    for r in range(mc):
                        sdy = (r0 + r) * yps + p0
                        o = r * KC
                        for q in range(kc):
                            i = np.uint64(sdy + q)
                            ap[np.uint64(o + q)] = prologue_dy(dy1[i], i, np.uint64(p0 + q),
                                                               pdy_args)
                    for i in range(mc * KC, ((mc + MR - 1) // MR * MR) * KC + MR):
                        ap[i] = 0.0
                    # dW[p0:p0+kc, :] += G_block^T @ Xs_block, k = the mc pixels
                    for ir in range(0, kc, MR):
                        mr = min(MR, kc - ir)
                        for i in range(MR):
                            rows[i] = p0 + ir + min(i, mr - 1)
                        for jp in range(npan):
                            tile_t(mc, ap, ir, bx, jp * mc * NR, c2, rows, mr, jp * NR, IC,
                                   min(NR, IC - jp * NR), True, scratch)
                    # dx_block (+)= G_block[:, p0:p0+kc] @ W[p0:p0+kc, :], W panels in
                    # L2-sized groups, tile rows outermost within a group (as conv_common)
                    jb = max(1, JB_FLOATS // (kc * NR))
                    for j0 in range(0, npan, jb):
                        for ir in range(0, mc, MR):
                            mr = min(MR, mc - ir)
                            for i in range(MR):
                                rows[i] = rd[ir + min(i, mr - 1)]
                            for jp in range(j0, min(npan, j0 + jb)):
                                nr = min(NR, IC - jp * NR)
                                tile(kc, ap, ir * KC, bw, (jp * OC + p0) * NR, dx1, rows, mr,
                                     jp * NR, dps, nr, acc or p0 > 0, scratch)
                                if p0 + KC >= OC:
                                    epilogue(dx1, dps, rows, mr, jp * NR, nr, tid, epi_args)
                # stride > 1: zeros (+= 0 when acc) at the neighbours (s*oh + a, s*ow + b)
                nn = 0
                for r in range(mc):
                    for a in range(s):
                        for b in range(s):
                            if (a > 0 or b > 0) and s * oh_[r] + a < H and s * ow_[r] + b < W:
                                nbr[nn] = rd[r] + a * W + b
                                nn += 1
                if not acc:
                    for r in range(nn):
                        for k in range(IC):
                            dx1[nbr[r] * dps + k] = 0.0
                for ir in range(0, nn, MR):
                    mr = min(MR, nn - ir)
                    for i in range(MR):
                        rows[i] = nbr[ir + min(i, mr - 1)]
                    for jp in range(npan):
                        epilogue(dx1, dps, rows, mr, jp * NR, min(NR, IC - jp * NR), tid,
                                 epi_args)
        add_partials(dw2, part)

    def conv_backward_1x1(x, dy, w, dx, dw, stride, pdy_args=(), px_args=(), epi_args=(),
                          ntasks=None, accumulate=False):
        nt = ntasks or get_num_threads()
        OC, KH, KW, IC = w.shape
        N, H, W, _ = dx.shape
        oh, ow = (H - 1) // stride + 1, (W - 1) // stride + 1
        if (KH, KW) != (1, 1) or x.shape != dx.shape or x.shape[3] != IC or \
                dy.shape != (N, oh, ow, OC) or dw.shape != w.shape:
            raise ValueError(f"not a 1x1 stride-{stride} conv: x {x.shape}, dy {dy.shape}, "
                             f"w {w.shape}, dx {dx.shape}, dw {dw.shape}")
        if not dw.flags.c_contiguous:
            raise ValueError("dw must be C-contiguous")
        (xf, xps), (yf, yps), (df, dps) = pixels(x), pixels(dy), pixels(dx)
        bw = np.empty(((IC + NR - 1) // NR, OC, NR), np.float32)
        pack_b(np.ascontiguousarray(w.reshape(OC, IC), np.float32), bw)
        part = np.empty((nt - 1, OC, IC), np.float32)
        kernel(xf, xps, yf, yps, df, dps, dw.reshape(OC, IC), part, bw, N, H, W, oh, ow, stride,
               accumulate, pdy_args, px_args, epi_args, nt)

    return conv_backward_1x1


def two_kernels(x, dy, w, dx, dw, stride, prologue_dy=identity_prologue, pdy_args=()):
    """1. Backward-data, then backward-weights, each forming the gradient from dy."""
    make_conv_backward_data(prologue_dy)(dy, w, dx, stride, 0, pdy_args)
    make_conv_backward_weights(identity_prologue, prologue_dy)(x, dy, dw, stride, 0, (),
                                                               pdy_args)


def one_pass(x, dy, w, dx, dw, stride, prologue_dy=identity_prologue, pdy_args=()):
    """2. Both gradients in one pass over the gradient tiles."""
    make_conv_backward_1x1(prologue_dy)(x, dy, w, dx, dw, stride, pdy_args)


class ConvBackward1x1(ConvForward):
    """Both gradients of a 1x1 conv (kh = kw = 1, ph = 0), shape keys as ConvForward. With
    hooks=True the incoming gradient is formed by bnff_hooks.bn_relu_grad_prologue from dz
    (input "dy") and the pre-BN tensor x' of dy's shape and per-channel af, bf, a, p, q."""

    name = "conv_bwd_1x1"
    variants = {"two_kernels": two_kernels, "one_pass": one_pass}
    default = "one_pass"

    def __init__(self, shape: dict, hooks: bool = False):
        super().__init__(shape)
        if (self.shape["kh"], self.shape["kw"], self.shape["ph"]) != (1, 1, 0):
            raise ValueError(f"conv_bwd_1x1 needs kh = kw = 1, ph = 0: {self.shape}")
        self.hooks = hooks

    HOOKED = "_bn_relu_grad"
    examples = tuple(f"mb2ic{ic}ih{hw}iw{hw + 2}oc{oc}kh1kw1sh{s}ph0" + ("_bn_relu_grad" if ic == 256
                                                                         else "")
                     for ic, oc, s, hw in (
                         (256, 128, 1, 7),     # DenseNet-121 block 2, first 1x1 of a layer
                         (64, 128, 1, 8),      # DenseNet-121 block 1
                         (256, 64, 1, 7),      # ResNet-50 bottleneck reduce
                         (64, 256, 1, 7),      # ResNet-50 bottleneck expand
                         (1024, 256, 1, 4),    # ResNet-50 stage 4 reduce (ic spans many panels)
                         (256, 512, 2, 8),     # ResNet-50 strided projection
                         (13, 300, 2, 9),      # odd: two oc chunks, odd image, stride 2
                         (5, 7, 1, 11)))       # odd, fewer channels than a panel

    def descriptor(self) -> str:
        return super().descriptor() + (self.HOOKED if self.hooks else "")

    @classmethod
    def from_descriptor(cls, text):
        hooks = text.endswith(cls.HOOKED)
        st = super().from_descriptor(text[:-len(cls.HOOKED)] if hooks else text)
        st.hooks = hooks
        return st

    def make_inputs(self, rng):
        mb, ic, ih, iw, oc, _, _, oh, ow = self.dims()
        ins = {"x": rng.standard_normal((mb, ih, iw, ic), dtype=np.float32),
               "dy": rng.standard_normal((mb, oh, ow, oc), dtype=np.float32),
               "w": (rng.standard_normal((oc, 1, 1, ic)) / np.sqrt(oc)).astype(np.float32)}
        if self.hooks:
            ins["xg"] = rng.standard_normal((mb, oh, ow, oc), dtype=np.float32)
            for k in ("af", "bf", "a", "p", "q"):
                ins[k] = rng.standard_normal(oc).astype(np.float32)
        return ins

    def allocate_outputs(self):
        mb, ic, ih, iw, oc = self.dims()[:5]
        return {"dx": np.empty((mb, ih, iw, ic), np.float32),
                "dw": np.empty((oc, 1, 1, ic), np.float32)}

    def run(self, variant, inputs, outputs):
        hook = ()
        if self.hooks:
            hook = (bn_relu_grad_prologue, (inputs["xg"].reshape(-1),) +
                    tuple(inputs[k] for k in ("af", "bf", "a", "p", "q")))
        self.variants[variant](inputs["x"], inputs["dy"], inputs["w"], outputs["dx"],
                               outputs["dw"], self.shape["sh"], *hook)

    def reference(self, inputs):
        g = inputs["dy"].astype(np.float64)
        if self.hooks:
            xg = inputs["xg"].astype(np.float64)
            g = inputs["a"] * g * (inputs["af"] * xg + inputs["bf"] > 0) + \
                inputs["p"] * xg + inputs["q"]
        nchw = lambda t: np.transpose(t, (0, 3, 1, 2)).astype(np.float64)
        dx, dw = R.conv2d_backward(nchw(g), nchw(inputs["x"]),
                                   from_ohwi(inputs["w"]).astype(np.float64), self.shape["sh"], 0)
        return {"dx": np.transpose(dx, (0, 2, 3, 1)), "dw": np.transpose(dw, (0, 2, 3, 1))}

    def cost(self, variant):
        """Both directions' FLOPs; x, w and dy (with x' when hooked) read, dx and dw written,
        dy (and x') read twice by two_kernels."""
        mb, ic, ih, iw, oc, _, _, oh, ow = self.dims()
        reads_dy = (2 if self.hooks else 1) * (2 if variant == "two_kernels" else 1)
        return Cost(2 * conv_flops(mb, ic, oh, ow, oc, 1, 1),
                    F32 * (mb * ih * iw * ic + oc * ic + reads_dy * mb * oh * ow * oc),
                    F32 * (mb * ih * iw * ic + oc * ic))


BENCH = {  # name: (ic, spatial, oc, stride) of real 1x1 convs
    "densenet121-b2": (256, 28, 128, 1),
    "resnet50-reduce56": (256, 56, 64, 1),
    "resnet50-expand56": (64, 56, 256, 1),
    "resnet50-reduce14": (1024, 14, 256, 1),
    "resnet50-proj56s2": (256, 56, 512, 2),
}


def main(argv=None):
    """Median ms and GFLOP/s of both variants per BENCH shape, without and with the bnff hooks;
    --check compares both with the float64 reference instead (run it first: it compiles)."""
    import argparse
    from functools import partial

    from bnff.measure.measurement import interleaved, median_min_max, seconds, validate

    ap = argparse.ArgumentParser(prog="python -m bnff.kernels.conv.conv_bwd_fused",
                                 description=main.__doc__)
    ap.add_argument("shapes", nargs="*", help=f"some of {', '.join(BENCH)} (default: all)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    if set(args.shapes) - set(BENCH):
        ap.error(f"unknown shapes {sorted(set(args.shapes) - set(BENCH))}")
    print(f"batch {args.batch}, {get_num_threads()} threads, median of {args.reps} after a "
          "warm-up call")
    for name in args.shapes or BENCH:
        ic, hw, oc, s = BENCH[name]
        for hooks in (False, True):
            st = ConvBackward1x1(dict(mb=args.batch, ic=ic, ih=hw, iw=hw, oc=oc, kh=1, kw=1,
                                      sh=s, ph=0), hooks)
            ins = st.make_inputs(np.random.default_rng(0))
            if args.check:  # each variant into fresh NaN outputs
                first = seconds(lambda: validate(st, list(st.variants), ins))
                print(f"{st.descriptor()}: every variant within tolerance, {first:.2f} s with "
                      "compiles", flush=True)
                continue
            out = st.allocate_outputs()
            times = interleaved({v: partial(st.run, v, ins, out) for v in st.variants},
                                args.reps, max_rounds=args.reps)
            for v, ts in times.items():
                med, lo, _ = median_min_max(ts)
                c = st.cost(v)
                print(f"{st.descriptor()} {v:11s} median {med * 1e3:8.2f} ms  min "
                      f"{lo * 1e3:8.2f} ms  {c.flops / med / 1e9:6.1f} GFLOP/s  "
                      f"{c.bytes / med / 1e9:5.1f} GB/s (model)", flush=True)


if __name__ == "__main__":
    main()
