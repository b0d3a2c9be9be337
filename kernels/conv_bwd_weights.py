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
3. gemm:    per task, for each block of its partial dw that fits in L2, BLIS loops over
            KC-pixel blocks: im2col(x) packed into NR-wide panels (prologue_x applied), dy^T
            into k-major MR-row micro-panels (prologue_dy applied), 6x16 micro-kernel accumulating.

For the fused schedules: `make_conv_backward_weights(prologue_x, prologue_dy)` returns the gemm
kernel
    conv(x, dy, dw, stride, pad, px_args=(), pdy_args=(), ntasks=numba.get_num_threads())
with both prologues compiled in (conv_common hook signature; idx indexes x, resp. dy): the
first recomputes the conv input (e.g. BN+ReLU of the stored pre-BN tensor), the second forms
the incoming gradient on the fly (e.g. a*dy + p*x + q from two tensors of dy's layout). x and
dy may be channel slices of wider buffers (conv_common.pixels).
`conv_backward_weights(x, dy, dw, stride, pad)` is the default variant without hooks.
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from kernels import reference as R
from kernels.conv_common import conv_flops, identity_prologue, pixels, stable, tap_groups
from kernels.conv_fwd import ConvForward
from kernels.gemm import KC, MC, MR, NR, tile_kmajor

BLOCK = 48 * 1024  # floats of the dw block a task keeps hot (192 KiB of a >= 256 KiB L2)
from kernels.stage import F32, Cost


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


_cache: dict = {}


def make_conv_backward_weights(prologue_x=identity_prologue, prologue_dy=identity_prologue):
    """3. Per-task BLIS GEMM dy^T @ im2col(x) with `prologue_x` and `prologue_dy` compiled in;
    memoized."""
    key = (prologue_x, prologue_dy)
    if key in _cache:
        return _cache[key]
    stable(prologue_x)
    stable(prologue_dy)

    @njit(parallel=True, fastmath=True, cache=True)
    def wgemm(x1, N, H, W, IC, xps, dy1, OH, OW, OC, yps, dw, part, stride, gt, gl, gy, gx,
              px_args, pdy_args, nt):
        """dw2[oc, t*IC + c] = sum_m dy[m, oc] * x[n, oh*s + ty[t], ow*s + tx[t], c], x and dy
        flat with pixel strides xps, yps (conv_common.pixels)."""
        K = dw.size // OC
        M = N * OH * OW
        chunk = (M + nt - 1) // nt
        mcb = min(MC, OC)
        ncb = max(NR, BLOCK // mcb // NR * NR)  # the mcb x ncb block of dw stays in L2
        for tid in prange(nt):
            c2 = dw.reshape(OC, K) if tid == 0 else part[tid - 1]
            c2[:] = 0.0
            bp = np.empty(ncb * KC, np.float32)
            ap = np.empty((mcb + MR - 1) // MR * MR * KC, np.float32)
            rows = np.empty(MR, np.int64)
            scratch = np.empty(MR * NR, np.float32)
            m1 = min(M, (tid + 1) * chunk)
            for r0 in range(0, OC, mcb):
                mc = min(mcb, OC - r0)
                for j0 in range(0, K, ncb):
                    nc = min(ncb, K - j0)
                    for p0 in range(tid * chunk, m1, KC):
                        kc = min(KC, m1 - p0)
                        # B = im2col(x)[p0:p0+kc, j0:j0+nc] in NR-wide panels:
                        # bp[((k - j0) // NR)*kc*NR + p*NR + (k - j0) % NR]
                        bp[:(nc + NR - 1) // NR * NR * kc] = 0.0
                        for p in range(kc):
                            n = (p0 + p) // (OH * OW)
                            oh = (p0 + p) // OW - n * OH
                            ow = p0 + p - (n * OH + oh) * OW
                            for g in range(gy.shape[0]):
                                y = oh * stride + gy[g]
                                xs = ow * stride + gx[g]
                                k0 = gt[g] * IC
                                k = max(k0, k0 - xs * IC, j0)
                                kb = min(k0 + gl[g] * IC, k0 + (W - xs) * IC, j0 + nc)
                                if y < 0 or y >= H or k >= kb:
                                    continue
                                c = (k - k0) % IC
                                base = (((n * H + y) * W + xs) + (k - k0) // IC) * xps
                                j = (k - j0) % NR
                                o = ((k - j0) // NR * kc + p) * NR
                                while k < kb:  # pieces within one panel and one source pixel
                                    e = min(kb, k + NR - j, k + IC - c)
                                    for q in range(e - k):
                                        i = np.uint64(base + c + q)
                                        bp[np.uint64(o + j + q)] = prologue_x(
                                            x1[i], i, np.uint64(c + q), px_args)
                                    c += e - k
                                    j += e - k
                                    k = e
                                    if c == IC:
                                        c = 0
                                        base += xps
                                    if j == NR:
                                        j = 0
                                        o += kc * NR
                        # A = dy^T[r0:r0+mc, p0:p0+kc] k-major in MR-row micro-panels:
                        # ap[(r // MR)*KC*MR + p*MR + r % MR]
                        for p in range(kc):
                            s = (p0 + p) * yps + r0
                            for q in range(0, mc, MR):
                                o = q * KC + p * MR
                                for r in range(MR):
                                    if q + r < mc:
                                        i = np.uint64(s + q + r)
                                        ap[np.uint64(o + r)] = prologue_dy(
                                            dy1[i], i, np.uint64(r0 + q + r), pdy_args)
                                    else:
                                        ap[np.uint64(o + r)] = 0.0
                        for jp in range((nc + NR - 1) // NR):
                            nr = min(NR, nc - jp * NR)
                            for ir in range(0, mc, MR):
                                mr = min(MR, mc - ir)
                                for i in range(MR):
                                    rows[i] = r0 + ir + min(i, mr - 1)
                                tile_kmajor(kc, ap, ir * KC, bp, jp * kc * NR, c2, rows, mr,
                                     j0 + jp * NR, K, nr, True, scratch)
        dw2 = dw.reshape(OC, K)
        for r in prange(OC):
            for t in range(nt - 1):
                for k in range(K):
                    dw2[r, k] += part[t, r, k]

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

    _cache[key] = conv_backward_weights_gemm
    return conv_backward_weights_gemm


def conv_backward_weights(x, dy, dw, stride, pad):
    """The default variant (gemm), no hooks."""
    make_conv_backward_weights()(x, dy, dw, stride, pad)


class ConvBackwardWeights(ConvForward):
    """Shape keys as ConvForward (the forward conv's shape): mb, ic, ih, iw, oc, kh, kw, sh, ph."""

    name = "conv_bwd_weights"
    variants = {"naive": conv_backward_weights_naive, "blocked": conv_backward_weights_blocked,
                "gemm": conv_backward_weights}
    default = "gemm"

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
