"""Conv forward, NHWC activations, OHWI weights (see conv_common for layouts and hooks):

    y[n, oh, ow, oc] = sum_{kh, kw, ic} x[n, oh*s - p + kh, ow*s - p + kw, ic] * w[oc, kh, kw, ic]

(x is zero outside the image). As a GEMM: M = N*OH*OW output pixels, N = OC, K = KH*KW*IC;
2*M*N*K FLOPs. Each variant reads x and w once and writes y once (the cost model).

Variants (all `f(x, w, y, stride, pad)`, y preallocated [N, OH, OW, OC]):
1. naive:   one output value at a time, a dot product over ic per tap.
2. blocked: weights repacked to 16-channel blocks; each pixel accumulates 16 output channels
            at once in a vectorized inner loop, tasks are (image row, channel block).
3. im2col:  implicit GEMM: row blocks of im2col(x) packed on the fly (prologue applied there),
            6 x NR register-blocked micro-kernel, epilogue on each finished tile.
4. direct:  the direct engine (conv_direct): RP pixels x NR channels register tiles read
            straight from NHWC rows, the prologue applied once per element into a padded band
            of rows, the epilogue once per output row and channel panel. The default.

For the fused schedules: `make_conv_forward(prologue, epilogue, engine="direct")` returns
    conv(x, w, y, stride, pad, pro_args=(), epi_args=(), ntasks=numba.get_num_threads())
with the hooks compiled in (prologue sees x, epilogue sees y; see conv_common); x and y may be
channel slices of wider buffers (conv_common.pixels).
engine="im2col" gives the implicit GEMM with the same signature. `ENGINES` holds both engines
without hooks, f(x, w, y, stride, pad) (conv_common.engine_variants); `conv_forward` is the
default one.
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from bnff.kernels import reference as R
from bnff.kernels.conv.conv_common import (conv_flops, engine_variants, from_ohwi, hooked,
                                           identity_epilogue, identity_prologue, make_igemm,
                                           out_size, pack_b_rows, pixels, tap_groups)
from bnff.engine.gemm import NR
from bnff.kernels.conv.conv_direct import make_direct, pack_panels
from bnff.kernels.stage import F32, Cost, Stage


@njit(parallel=True, fastmath=True, cache=True)
def conv_forward_naive(x, w, y, stride, pad):
    """1. One output value at a time: a dot product over ic for every tap of its window."""
    N, H, W, IC = x.shape
    OC, KH, KW, _ = w.shape
    _, OH, OW, _ = y.shape
    for q in prange(N * OH):
        n = q // OH
        oh = q - n * OH
        for ow in range(OW):
            for oc in range(OC):
                acc = np.float32(0.0)
                for kh in range(KH):
                    ih = oh * stride - pad + kh
                    if 0 <= ih < H:
                        for kw in range(KW):
                            iw = ow * stride - pad + kw
                            if 0 <= iw < W:
                                for ic in range(IC):
                                    acc += x[n, ih, iw, ic] * w[oc, kh, kw, ic]
                y[n, oh, ow, oc] = acc


@njit(parallel=True, fastmath=True, cache=True)
def conv_forward_blocked(x, w, y, stride, pad):
    """2. 16 output channels at a time from weights repacked to [OC/16, KH, KW, IC, 16]:
    rank-1 updates of a 16-wide accumulator, vectorized; tasks are (image row, channel block)."""
    N, H, W, IC = x.shape
    OC, KH, KW, _ = w.shape
    _, OH, OW, _ = y.shape
    nb = (OC + 15) // 16
    wb = np.zeros((nb, KH, KW, IC, 16), np.float32)
    for b in prange(nb):
        for j in range(min(16, OC - 16 * b)):
            wb[b, :, :, :, j] = w[16 * b + j]
    for q in prange(N * OH * nb):
        r = q // nb
        b = q - r * nb
        n = r // OH
        oh = r - n * OH
        acc = np.empty(16, np.float32)
        for ow in range(OW):
            acc[:] = 0.0
            for kh in range(KH):
                ih = oh * stride - pad + kh
                if 0 <= ih < H:
                    for kw in range(KW):
                        iw = ow * stride - pad + kw
                        if 0 <= iw < W:
                            for ic in range(IC):
                                v = x[n, ih, iw, ic]
                                for j in range(16):
                                    acc[j] += v * wb[b, kh, kw, ic, j]
            for j in range(min(16, OC - 16 * b)):
                y[n, oh, ow, 16 * b + j] = acc[j]


@njit(cache=True)
def forward_operands(w, pad):
    """Weights packed as the GEMM's B in NR-wide panels, and the tap groups."""
    OC, KH, KW, IC = w.shape
    bp = np.empty(((OC + NR - 1) // NR, KH * KW * IC, NR), np.float32)
    pack_b_rows(w.reshape(OC, KH * KW * IC), bp)
    ty = np.empty(KH * KW, np.int64)
    tx = np.empty(KH * KW, np.int64)
    for t in range(KH * KW):
        ty[t] = t // KW - pad
        tx[t] = t % KW - pad
    return bp, tap_groups(ty, tx)


@hooked
def make_conv_forward(prologue=identity_prologue, epilogue=identity_epilogue, engine="direct"):
    """3./4. The conv with `prologue` (on x) and `epilogue` (on y) compiled in; memoized.
    engine "direct" (the default: conv_direct, no im2col) or "im2col" (implicit GEMM)."""
    if engine == "im2col":
        igemm = make_igemm(prologue, epilogue)

        def conv(x, w, y, stride, pad, pro_args=(), epi_args=(), ntasks=None):
            bp, groups = forward_operands(w, pad)
            n, h, wd, c = x.shape
            _, oh, ow, oc = y.shape
            (xf, xps), (yf, yps) = pixels(x), pixels(y)
            igemm(xf, h, wd, c, xps, yf, n, oh, ow, oc, yps, False, bp, stride, *groups, oh,
                  ow, 0, 0, 1, pro_args, epi_args, ntasks or get_num_threads())
    else:
        direct = make_direct(prologue, epilogue)

        def conv(x, w, y, stride, pad, pro_args=(), epi_args=(), ntasks=None):
            oc, kh, kw, ic = w.shape
            n, h, wd, c = x.shape
            _, oh, ow, _ = y.shape
            (xf, xps), (yf, yps) = pixels(x), pixels(y)
            direct(xf, n, h, wd, c, xps, yf, oh, ow, oc, yps, False,
                   pack_panels(w.reshape(oc, -1)), kh, kw, stride, pad, pad, pro_args,
                   epi_args, ntasks or get_num_threads())
    return conv


ENGINES = engine_variants(make_conv_forward)  # 3. im2col and 4. direct (the default), no hooks
conv_forward = ENGINES["direct"]


class ConvForward(Stage):
    """Shape keys: mb, ic, ih, iw, oc, kh, kw, sh, ph (square stride and padding)."""

    name = "conv_fwd"
    variants = {"naive": conv_forward_naive, "blocked": conv_forward_blocked, **ENGINES}
    default = "direct"
    examples = tuple(f"mb2ic{ic}ih{hw}iw{hw + 1}oc{oc}kh{k}kw{k}sh{s}ph{p}"
                     for ic, oc, k, s, p, hw in (  # inherited by the other conv stages
        (3, 64, 7, 2, 3, 14),       # stem
        (64, 128, 1, 1, 0, 8),      # DenseNet bottleneck 1x1
        (128, 32, 3, 1, 1, 9),      # DenseNet 3x3
        (256, 128, 1, 1, 0, 7),     # DenseNet transition
        (64, 64, 3, 1, 1, 8),       # ResNet 3x3
        (128, 128, 3, 2, 1, 10),    # ResNet strided 3x3
        (256, 512, 1, 2, 0, 8),     # ResNet strided projection
        (1024, 256, 1, 1, 0, 7),    # ResNet 1x1
        (13, 21, 3, 2, 1, 11),      # odd everything
        (17, 40, 7, 2, 3, 9),       # odd, 7x7 stride 2
        (5, 7, 1, 2, 0, 9)))        # odd 1x1 stride 2 (empty stride phases)

    def dims(self):
        s = self.shape
        oh = out_size(s["ih"], s["kh"], s["sh"], s["ph"])
        ow = out_size(s["iw"], s["kw"], s["sh"], s["ph"])
        return s["mb"], s["ic"], s["ih"], s["iw"], s["oc"], s["kh"], s["kw"], oh, ow

    def make_inputs(self, rng):
        mb, ic, ih, iw, oc, kh, kw, _, _ = self.dims()
        x = rng.standard_normal((mb, ih, iw, ic), dtype=np.float32)
        w = rng.standard_normal((oc, kh, kw, ic), dtype=np.float32) / np.sqrt(ic * kh * kw)
        return {"x": x, "w": w.astype(np.float32)}

    def allocate_outputs(self):
        mb, _, _, _, oc, _, _, oh, ow = self.dims()
        return {"y": np.empty((mb, oh, ow, oc), np.float32)}

    def run(self, variant, inputs, outputs):
        self.variants[variant](inputs["x"], inputs["w"], outputs["y"], self.shape["sh"],
                               self.shape["ph"])

    def reference(self, inputs):
        x = np.transpose(inputs["x"], (0, 3, 1, 2)).astype(np.float64)
        w = from_ohwi(inputs["w"]).astype(np.float64)
        y = R.conv2d_forward(x, w, self.shape["sh"], self.shape["ph"])
        return {"y": np.transpose(y, (0, 2, 3, 1))}

    def cost(self, variant):
        mb, ic, ih, iw, oc, kh, kw, oh, ow = self.dims()
        return Cost(conv_flops(mb, ic, oh, ow, oc, kh, kw),
                    F32 * (mb * ih * iw * ic + oc * kh * kw * ic), F32 * mb * oh * ow * oc)
