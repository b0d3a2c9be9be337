"""Conv backward-weights (the weight gradient), NHWC activations, OHWI weights:

    dw[oc, kh, kw, ic] = sum_{n, oh, ow} dy[n, oh, ow, oc] * x[n, oh*s - p + kh, ow*s - p + kw, ic]

2*N*OH*OW*OC*IC*KH*KW FLOPs; reads x and dy once, writes dw once. As a GEMM, rows = oc,
columns = (kh, kw, ic) (so the OHWI row of each output channel comes out contiguous), and the
reduction runs over all M = N*OH*OW output pixels: the A operand is dy^T, the B operand
im2col(x). Parallel tasks split the pixels and each reduces into its own partial dw (task 0
straight into dw), summed at the end: no races, no atomics.

Variants (all `f(x, dy, dw, stride, pad)`, dw preallocated [OC, KH, KW, IC]):
1. naive:   tasks are output channels; rank-1 updates of dw[oc] over every pixel.
2. blocked: tasks are pixel ranges, each with its own partial dw, rank-1 updates per pixel.
3. im2col:  per task, for each block of MC output channels and each block of KC of its
            pixels: dy^T packed once into k-major MR-row micro-panels (L2), then per block of
            NCB columns im2col(x) packed into NR-wide panels (L2), 6 x NR micro-kernel
            accumulating into the task's partial dw. Each operand is packed pixel by pixel:
            the prologue runs along one contiguous row (a long loop LLVM vectorizes) into a
            small buffer, then W-float vector moves place the row in the panels (copied per
            element, 16- or 6-float pieces stayed scalar in the assembly: LLVM unrolls them
            fully and, unable to prove the source and the panels apart, does not pair them).

4. direct:  (the default) the direct kernel of conv_direct_bww: R x 32 register tiles reduced
            over pixels straight from a band of x rows and from dy, no im2col, no dy packing.

For the fused schedules: `make_conv_backward_weights(prologue_x, prologue_dy)` returns the
default (direct) kernel, `make_im2col_backward_weights(...)` the im2col one, both
    conv(x, dy, dw, stride, pad, px_args=(), pdy_args=(), ntasks=numba.get_num_threads())
with both prologues compiled in (conv_common hook signature; idx indexes x, resp. dy): the
first recomputes the conv input (e.g. BN+ReLU of the stored pre-BN tensor), the second forms
the incoming gradient on the fly (e.g. a*dy + p*x + q from two tensors of dy's layout). x and
dy may be channel slices of wider buffers (conv_common.pixels).
`conv_backward_weights(x, dy, dw, stride, pad)` is the default variant without hooks.
The direct kernel runs 1.2-1.9x faster than im2col on the real shapes (conv_direct_bww's
docstring has the figures); im2col stays to compare the two designs side by side.
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from bnff.kernels import reference as R
from bnff.kernels.conv.conv_common import (add_partials, conv_flops, hooked, identity_prologue,
                                           pixels, tap_groups)
from bnff.kernels.conv.conv_direct_bww import make_direct_backward_weights
from bnff.kernels.conv.conv_fwd import ConvForward
from bnff.engine.gemm import KC, MC, MR, NR, tile_kmajor
from bnff.engine.vec import W as W8, vload, vstore
from bnff.kernels.stage import F32, Cost

NCB = 256  # columns of dw per B block: KC x NCB floats = 256 KiB, in L2 beside A (<= 144 KiB)


@njit(parallel=True, fastmath=True, cache=True)
def conv_backward_weights_naive(x, dy, dw, stride, pad):
    """1. One task per output channel: dw[oc, kh, kw, :] += dy[pixel, oc] * x[window row, :]."""
    N, H, W, IC = x.shape
    OC, KH, KW, _ = dw.shape
    _, OH, OW, _ = dy.shape
    for oc in prange(OC):
        dw[oc] = 0.0
        for n in range(N):
            for oh in range(OH):
                for ow in range(OW):
                    g = dy[n, oh, ow, oc]
                    for kh in range(KH):
                        ih = oh * stride - pad + kh
                        if 0 <= ih < H:
                            for kw in range(KW):
                                iw = ow * stride - pad + kw
                                if 0 <= iw < W:
                                    for ic in range(IC):
                                        dw[oc, kh, kw, ic] += g * x[n, ih, iw, ic]


@njit(parallel=True, fastmath=True, cache=True)
def blocked_partials(x, dy, dw, part, stride, pad):
    N, H, W, IC = x.shape
    OC, KH, KW, _ = dw.shape
    _, OH, OW, _ = dy.shape
    nt = part.shape[0]
    M = N * OH * OW
    chunk = (M + nt - 1) // nt
    for t in prange(nt):
        pt = part[t]
        pt[:] = 0.0
        for m in range(t * chunk, min(M, (t + 1) * chunk)):
            n = m // (OH * OW)
            oh = m // OW - n * OH
            ow = m - (n * OH + oh) * OW
            for oc in range(OC):
                g = dy[n, oh, ow, oc]
                for kh in range(KH):
                    ih = oh * stride - pad + kh
                    if 0 <= ih < H:
                        for kw in range(KW):
                            iw = ow * stride - pad + kw
                            if 0 <= iw < W:
                                for ic in range(IC):
                                    pt[oc, kh, kw, ic] += g * x[n, ih, iw, ic]
    dw1 = dw.reshape(dw.size)
    p2 = part.reshape(nt, dw.size)
    for i in prange(dw.size):
        acc = np.float32(0.0)
        for t in range(nt):
            acc += p2[t, i]
        dw1[i] = acc


def conv_backward_weights_blocked(x, dy, dw, stride, pad):
    """2. One task per range of pixels, each reducing into its own partial dw (one pass over x
    and dy), then the partials summed."""
    blocked_partials(x, dy, dw, np.empty((get_num_threads(),) + dw.shape, np.float32), stride,
                     pad)


@njit(cache=True)
def weight_taps(KH, KW, pad):
    ty = np.empty(KH * KW, np.int64)
    tx = np.empty(KH * KW, np.int64)
    for t in range(KH * KW):
        ty[t] = t // KW - pad
        tx[t] = t % KW - pad
    return tap_groups(ty, tx)


@hooked
def make_im2col_backward_weights(prologue_x=identity_prologue, prologue_dy=identity_prologue):
    """3. Per-task BLIS GEMM dy^T @ im2col(x) with `prologue_x` and `prologue_dy` compiled in;
    memoized."""
    @njit(parallel=True, fastmath=True, cache=True)
    def wgemm(x1, N, H, W, IC, xps, dy1, OH, OW, OC, yps, dw, part, stride, gt, gl, gy, gx,
              px_args, pdy_args, nt):
        """dw2[oc, t*IC + c] = sum_m dy[m, oc] * x[n, oh*s + ty[t], ow*s + tx[t], c], x and dy
        flat with pixel strides xps, yps (conv_common.pixels)."""
        K = dw.size // OC
        M = N * OH * OW
        chunk = (M + nt - 1) // nt
        mcb = min(MC, OC)
        for tid in prange(nt):
            c2 = dw.reshape(OC, K) if tid == 0 else part[tid - 1]
            c2[:] = 0.0
            bp = np.empty(NCB * KC, np.float32)
            ap = np.empty((mcb + MR - 1) // MR * MR * KC, np.float32)
            pix = np.empty(KC, np.int64)  # per pixel of the block: (n*H + oh*s)*W + ow*s
            py = np.empty(KC, np.int64)
            px = np.empty(KC, np.int64)
            arow = np.zeros(mcb + W8, np.float32)  # one pixel's row of A, zero past mc
            brow = np.zeros(NCB + NR, np.float32)  # one pixel's row of B, zero past nc
            rows = np.empty(MR, np.int64)
            scratch = np.empty(MR * NR, np.float32)
            m1 = min(M, (tid + 1) * chunk)
            for r0 in range(0, OC, mcb):
                mc = min(mcb, OC - r0)
                arow[mc:] = 0.0
                for p0 in range(tid * chunk, m1, KC):
                    kc = min(KC, m1 - p0)
                    for p in range(kc):
                        n = (p0 + p) // (OH * OW)
                        py[p] = ((p0 + p) // OW - n * OH) * stride
                        px[p] = (p0 + p - (p0 + p) // OW * OW) * stride
                        pix[p] = (n * H + py[p]) * W + px[p]
                    # A = dy^T[r0:r0+mc, p0:p0+kc] k-major in MR-row micro-panels, rows past
                    # mc zero: ap[(r // MR)*KC*MR + p*MR + r % MR]. Per pixel, the prologue
                    # runs along the dy row into `arow` (a long loop, vectorized), then W-float
                    # vector moves place it: each spills W - MR floats into the next pixels'
                    # slots, written after it (the last pixels of a micro-panel, whose spill
                    # would leave it, move MR scalars).
                    for p in range(kc):
                        s = (p0 + p) * yps + r0
                        for r in range(mc):
                            i = np.uint64(s + r)
                            arow[r] = prologue_dy(dy1[i], i, np.uint64(r0 + r), pdy_args)
                        o = p * MR
                        if p * MR + W8 <= KC * MR:
                            for q in range(0, mc, MR):
                                vstore(ap, o, vload(arow, q))
                                o += KC * MR
                        else:
                            for q in range(0, mc, MR):
                                ap[o:o + MR] = arow[q:q + MR]
                                o += KC * MR
                    for j0 in range(0, K, NCB):
                        nc = min(NCB, K - j0)
                        brow[nc:] = 0.0
                        # B = im2col(x)[p0:p0+kc, j0:j0+nc] in NR-wide panels:
                        # bp[((k - j0) // NR)*kc*NR + p*NR + (k - j0) % NR]. Per pixel, its
                        # im2col row into `brow` (prologue applied along contiguous source runs,
                        # zero in the padding), then moved to the panels 8 floats at a time.
                        for p in range(kc):
                            for g in range(gy.shape[0]):
                                k0 = gt[g] * IC
                                ka = max(k0, j0)
                                kb = min(k0 + gl[g] * IC, j0 + nc)
                                if ka >= kb:
                                    continue
                                y = py[p] + gy[g]
                                xs = px[p] + gx[g]
                                va = max(ka, k0 - xs * IC)
                                vb = min(kb, k0 + (W - xs) * IC)
                                if y < 0 or y >= H or va >= vb:
                                    brow[ka - j0:kb - j0] = 0.0
                                    continue
                                brow[ka - j0:va - j0] = 0.0
                                brow[vb - j0:kb - j0] = 0.0
                                k = va
                                c = (va - k0) % IC
                                src = pix[p] + gy[g] * W + gx[g]  # the group's first pixel
                                if xps == IC and IC < NR:  # few channels (the stem): one
                                    base = src * IC - k0  # flat run, c wraps
                                    for q in range(vb - va):
                                        i = np.uint64(base + va + q)
                                        brow[np.uint64(va - j0 + q)] = prologue_x(
                                            x1[i], i, np.uint64(c), px_args)
                                        c = c + 1 if c + 1 < IC else 0
                                    continue
                                base = (src + (va - k0) // IC) * xps
                                while k < vb:  # one source pixel at a time, channels c ..
                                    e = min(vb, k + IC - c)
                                    for q in range(e - k):
                                        i = np.uint64(base + c + q)
                                        brow[np.uint64(k - j0 + q)] = prologue_x(
                                            x1[i], i, np.uint64(c + q), px_args)
                                    k = e
                                    c = 0
                                    base += xps
                            o = p * NR
                            for jp in range((nc + NR - 1) // NR):
                                vstore(bp, o, vload(brow, jp * NR))
                                vstore(bp, o + W8, vload(brow, jp * NR + W8))
                                o += kc * NR
                        for jp in range((nc + NR - 1) // NR):
                            nr = min(NR, nc - jp * NR)
                            for ir in range(0, mc, MR):
                                mr = min(MR, mc - ir)
                                for i in range(MR):
                                    rows[i] = r0 + ir + min(i, mr - 1)
                                tile_kmajor(kc, ap, ir * KC, bp, jp * kc * NR, c2, rows, mr,
                                            j0 + jp * NR, K, nr, True, scratch)
        dw2 = dw.reshape(OC, K)
        add_partials(dw2, part)

    def conv_backward_weights_gemm(x, dy, dw, stride, pad, px_args=(), pdy_args=(),
                                   ntasks=None):
        nt = ntasks or get_num_threads()
        OC, KH, KW, IC = dw.shape
        part = np.empty((nt - 1, OC, KH * KW * IC), np.float32)
        n, h, w, _ = x.shape
        _, oh, ow, _ = dy.shape
        (xf, xps), (yf, yps) = pixels(x), pixels(dy)
        wgemm(xf, n, h, w, IC, xps, yf, oh, ow, OC, yps, dw, part, stride,
              *weight_taps(KH, KW, pad), px_args, pdy_args, nt)

    return conv_backward_weights_gemm


def make_conv_backward_weights(prologue_x=identity_prologue, prologue_dy=identity_prologue):
    """The default kernel (direct) with both prologues compiled in; memoized."""
    return make_direct_backward_weights(prologue_x, prologue_dy)


def conv_backward_weights_im2col(x, dy, dw, stride, pad):
    """3. im2col, no hooks."""
    make_im2col_backward_weights()(x, dy, dw, stride, pad)


def conv_backward_weights(x, dy, dw, stride, pad):
    """4. The default variant (direct), no hooks."""
    make_conv_backward_weights()(x, dy, dw, stride, pad)


class ConvBackwardWeights(ConvForward):
    """Shape keys as ConvForward (the forward conv's shape): mb, ic, ih, iw, oc, kh, kw, sh, ph."""

    name = "conv_bwd_weights"
    variants = {"naive": conv_backward_weights_naive, "blocked": conv_backward_weights_blocked,
                "im2col": conv_backward_weights_im2col, "direct": conv_backward_weights}
    default = "direct"

    def make_inputs(self, rng):
        mb, ic, ih, iw, oc, _, _, oh, ow = self.dims()
        return {"x": rng.standard_normal((mb, ih, iw, ic), dtype=np.float32),
                "dy": rng.standard_normal((mb, oh, ow, oc), dtype=np.float32)}

    def allocate_outputs(self):
        _, ic, _, _, oc, kh, kw, _, _ = self.dims()
        return {"dw": np.empty((oc, kh, kw, ic), np.float32)}

    def run(self, variant, inputs, outputs):
        self.variants[variant](inputs["x"], inputs["dy"], outputs["dw"], self.shape["sh"],
                               self.shape["ph"])

    def reference(self, inputs):
        _, ic, _, _, oc, kh, kw, _, _ = self.dims()
        x = np.transpose(inputs["x"], (0, 3, 1, 2)).astype(np.float64)
        dy = np.transpose(inputs["dy"], (0, 3, 1, 2)).astype(np.float64)
        _, dw = R.conv2d_backward(dy, x, np.zeros((oc, ic, kh, kw)), self.shape["sh"],
                                  self.shape["ph"])
        return {"dw": np.transpose(dw, (0, 2, 3, 1))}

    def cost(self, variant):
        mb, ic, ih, iw, oc, kh, kw, oh, ow = self.dims()
        return Cost(conv_flops(mb, ic, oh, ow, oc, kh, kw),
                    F32 * (mb * ih * iw * ic + mb * oh * ow * oc), F32 * oc * kh * kw * ic)
