"""Conv backward-data (the gradient of the conv input), NHWC activations, OHWI weights:

    dx[n, ih, iw, ic] = sum_{kh, kw, oc} dy[n, oh, ow, oc] * w[oc, kh, kw, ic]
                        over the (oh, ow) with ih = oh*s - p + kh, iw = ow*s - p + kw

2*N*OH*OW*OC*IC*KH*KW FLOPs (the forward count); reads dy and w once, writes dx once.

Stride phases. Input rows ih = rh + s*i of one phase rh in [0, s) see a fixed set of kernel
rows, {kh : (rh + p - kh) % s == 0}, at output row oh = i + (rh + p - kh) / s (likewise for
columns). So each of the s*s phases is a stride-1 conv of dy with those taps of the weights
transposed (B[(t, oc), ic] = w[oc, kh_t, kw_t, ic]), written to every s-th pixel of dx; a
phase without taps (1x1 stride 2: three of four) writes zeros.

Variants (all `f(dy, w, dx, stride, pad)`, dx preallocated [N, H, W, IC]):
1. naive:   one input-gradient value at a time, a dot product over oc per contributing tap.
2. blocked: weights repacked to [IC/16, KH, KW, OC, 16]; each pixel accumulates 16 input
            channels at once in a vectorized inner loop, tasks are (image row, channel block).
3. im2col:  one implicit GEMM per stride phase (conv_common.igemm), prologue on dy, epilogue
            on the finished dx tiles.
4. direct:  stride 1: the direct forward conv of dy (conv_direct) with the flipped weights
            w'[ic, kh', kw', oc] = w[oc, KH-1-kh', KW-1-kw', ic], padded by K-1-p; the
            prologue applied once per dy element in the band, the epilogue per dx row. Stride 2
            runs im2col's phases (each phase is a stride-1 conv with a subset of the taps; a
            direct version would need per-phase tap sets in the engine). The default.

For the fused schedules: `make_conv_backward_data(prologue, epilogue, engine="direct")` returns
    conv(dy, w, dx, stride, pad, pro_args=(), epi_args=(), ntasks=numba.get_num_threads(),
         accumulate=False)
with the hooks compiled in: the prologue sees dy (idx indexes dy, so it can form the gradient
from dy and any tensor of dy's layout), the epilogue sees dx tiles. accumulate: dx += the
result (gradients of a shared buffer); dy and dx may be channel slices (conv_common.pixels).
`ENGINES` holds both engines without hooks, f(dy, w, dx, stride, pad)
(conv_common.engine_variants); `conv_backward_data` is the default one.
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from bnff.kernels import reference as R
from bnff.kernels.conv.conv_common import (conv_flops, engine_variants, from_ohwi, hooked,
                                           identity_epilogue, identity_prologue, make_igemm,
                                           pixels, tap_groups)
from bnff.kernels.conv.conv_fwd import ConvForward
from bnff.engine.gemm import NR
from bnff.kernels.conv.conv_direct import make_direct, pack_panels
from bnff.kernels.stage import F32, Cost


@njit(parallel=True, fastmath=True, cache=True)
def conv_backward_data_naive(dy, w, dx, stride, pad):
    """1. One dx value at a time: a dot product over oc for every tap that reaches it."""
    N, H, W, IC = dx.shape
    OC, KH, KW, _ = w.shape
    _, OH, OW, _ = dy.shape
    for q in prange(N * H):
        n = q // H
        ih = q - n * H
        for iw in range(W):
            for ic in range(IC):
                acc = np.float32(0.0)
                for kh in range(KH):
                    th = ih + pad - kh
                    oh = th // stride
                    if th < 0 or th != oh * stride or oh >= OH:
                        continue
                    for kw in range(KW):
                        tw = iw + pad - kw
                        ow = tw // stride
                        if tw < 0 or tw != ow * stride or ow >= OW:
                            continue
                        for oc in range(OC):
                            acc += dy[n, oh, ow, oc] * w[oc, kh, kw, ic]
                dx[n, ih, iw, ic] = acc


@njit(parallel=True, fastmath=True, cache=True)
def conv_backward_data_blocked(dy, w, dx, stride, pad):
    """2. 16 input channels at a time from weights repacked to [IC/16, KH, KW, OC, 16]:
    rank-1 updates of a 16-wide accumulator, vectorized; tasks are (image row, channel block)."""
    N, H, W, IC = dx.shape
    OC, KH, KW, _ = w.shape
    _, OH, OW, _ = dy.shape
    nb = (IC + 15) // 16
    wb = np.zeros((nb, KH, KW, OC, 16), np.float32)
    for b in prange(nb):
        for oc in range(OC):
            for kh in range(KH):
                for kw in range(KW):
                    for j in range(min(16, IC - 16 * b)):
                        wb[b, kh, kw, oc, j] = w[oc, kh, kw, 16 * b + j]
    for q in prange(N * H * nb):
        r = q // nb
        b = q - r * nb
        n = r // H
        ih = r - n * H
        acc = np.empty(16, np.float32)
        for iw in range(W):
            acc[:] = 0.0
            for kh in range(KH):
                th = ih + pad - kh
                oh = th // stride
                if th < 0 or th != oh * stride or oh >= OH:
                    continue
                for kw in range(KW):
                    tw = iw + pad - kw
                    ow = tw // stride
                    if tw < 0 or tw != ow * stride or ow >= OW:
                        continue
                    for oc in range(OC):
                        v = dy[n, oh, ow, oc]
                        for j in range(16):
                            acc[j] += v * wb[b, kh, kw, oc, j]
            for j in range(min(16, IC - 16 * b)):
                dx[n, ih, iw, 16 * b + j] = acc[j]


@njit(cache=True)
def phase_operands(w, stride, pad, rh, rw):
    """Taps of phase (rh, rw) ordered so ty, tx ascend (kh, kw descending), their tap groups,
    and B[(t, oc), ic] = w[oc, kh_t, kw_t, ic] packed in NR-wide panels of ic."""
    OC, KH, KW, IC = w.shape
    khs = [kh for kh in range(KH - 1, -1, -1) if (rh + pad - kh) % stride == 0]
    kws = [kw for kw in range(KW - 1, -1, -1) if (rw + pad - kw) % stride == 0]
    nt = len(khs) * len(kws)
    ty = np.empty(nt, np.int64)
    tx = np.empty(nt, np.int64)
    bp = np.zeros(((IC + NR - 1) // NR, nt * OC, NR), np.float32)
    for a in range(len(khs)):
        for b in range(len(kws)):
            t = a * len(kws) + b
            ty[t] = (rh + pad - khs[a]) // stride
            tx[t] = (rw + pad - kws[b]) // stride
            for oc in range(OC):
                for ic in range(IC):
                    bp[ic // NR, t * OC + oc, ic % NR] = w[oc, khs[a], kws[b], ic]
    return bp, tap_groups(ty, tx)


def flipped_panels(w):
    """The weights of backward-data as a stride-1 forward conv of dy: B[(kh', kw', oc), ic] =
    w[oc, KH-1-kh', KW-1-kw', ic], packed in NR-wide panels of ic (conv_direct.pack_panels)."""
    oc, _, _, ic = w.shape
    return pack_panels(np.ascontiguousarray(w[:, ::-1, ::-1, :].transpose(3, 1, 2, 0))
                       .reshape(ic, -1))


@hooked
def make_conv_backward_data(prologue=identity_prologue, epilogue=identity_epilogue,
                            engine="direct"):
    """3./4. Backward-data with `prologue` (on dy) and `epilogue` (on dx) compiled in; memoized.
    engine "direct" (the default): a stride-1 conv whose padding leaves no output pixel
    without taps (pad <= kernel - 1) runs as the direct forward conv of dy with the flipped
    weights (conv_direct), padded by kernel - 1 - pad; other strides as "im2col": one
    implicit GEMM per stride phase."""
    igemm = make_igemm(prologue, epilogue)
    direct = make_direct(prologue, epilogue) if engine == "direct" else None

    def conv(dy, w, dx, stride, pad, pro_args=(), epi_args=(), ntasks=None,
             accumulate=False):
        n, oh, ow, oc = dy.shape
        _, H, W, ic = dx.shape
        _, kh, kw, _ = w.shape
        (yf, yps), (xf, xps) = pixels(dy), pixels(dx)
        nt = ntasks or get_num_threads()
        if direct is not None and stride == 1 and pad <= min(kh, kw) - 1:
            direct(yf, n, oh, ow, oc, yps, xf, H, W, ic, xps, accumulate, flipped_panels(w),
                   kh, kw, 1, kh - 1 - pad, kw - 1 - pad, pro_args, epi_args, nt)
            return
        for rh in range(min(stride, H)):
            for rw in range(min(stride, W)):
                bp, groups = phase_operands(w, stride, pad, rh, rw)
                igemm(yf, oh, ow, oc, yps, xf, n, H, W, ic, xps, accumulate, bp, 1, *groups,
                      len(range(rh, H, stride)), len(range(rw, W, stride)), rh, rw, stride,
                      pro_args, epi_args, nt)
    return conv


ENGINES = engine_variants(make_conv_backward_data)  # 3. im2col, 4. direct (default), no hooks
conv_backward_data = ENGINES["direct"]


class ConvBackwardData(ConvForward):
    """Shape keys as ConvForward (the forward conv's shape): mb, ic, ih, iw, oc, kh, kw, sh, ph."""

    name = "conv_bwd_data"
    variants = {"naive": conv_backward_data_naive, "blocked": conv_backward_data_blocked,
                **ENGINES}
    default = "direct"

    def make_inputs(self, rng):
        mb, ic, _, _, oc, kh, kw, oh, ow = self.dims()
        dy = rng.standard_normal((mb, oh, ow, oc), dtype=np.float32)
        w = rng.standard_normal((oc, kh, kw, ic), dtype=np.float32) / np.sqrt(oc * kh * kw)
        return {"dy": dy, "w": w.astype(np.float32)}

    def allocate_outputs(self):
        mb, ic, ih, iw = self.dims()[:4]
        return {"dx": np.empty((mb, ih, iw, ic), np.float32)}

    def run(self, variant, inputs, outputs):
        self.variants[variant](inputs["dy"], inputs["w"], outputs["dx"], self.shape["sh"],
                               self.shape["ph"])

    def reference(self, inputs):
        mb, ic, ih, iw = self.dims()[:4]
        dy = np.transpose(inputs["dy"], (0, 3, 1, 2)).astype(np.float64)
        w = from_ohwi(inputs["w"]).astype(np.float64)
        dx, _ = R.conv2d_backward(dy, np.zeros((mb, ic, ih, iw)), w, self.shape["sh"],
                                  self.shape["ph"])
        return {"dx": np.transpose(dx, (0, 2, 3, 1))}

    def cost(self, variant):
        mb, ic, ih, iw, oc, kh, kw, oh, ow = self.dims()
        return Cost(conv_flops(mb, ic, oh, ow, oc, kh, kw),
                    F32 * (mb * oh * ow * oc + oc * kh * kw * ic), F32 * mb * ih * iw * ic)
