"""Pooling on NHWC tensors: max-pool, average-pool and global average pool, forward and backward.

For output pixel (oh, ow) the k x k window starts at input (oh*s - p, ow*s - p):

    max:     y = max over the window (padding never wins),  argmax = i*k + j of the first max
    avg:     y = sum over the window / k^2                   (no padding)
    global:  y[n, c] = sum over h, w of x[n, h, w, c] / (H*W)
    backward: dx[n, h, w, c] = sum over the windows holding (h, w) of their share of dy
              (max: dy where argmax points at (h, w); avg: dy / k^2; global: dy / (H*W))

Backward kernels gather: each input pixel sums the few windows that cover it, so every dx
element is written once by one thread, with no zeroing pass and no write conflicts when
windows overlap (3x3 stride 2). Rows (n, h) are split over the threads; the innermost loop
runs along C. The gather kernels take dy and dx as channel slices of wider buffers too (the
schedules hand a pool the slice of a concatenation's gradient: conv_common.pixels) and read
and write each pixel's channels as a contiguous 1-D row: indexed as 4-D arrays of any layout,
the loop along C stayed scalar (DenseNet-121's stem max-pool backward at batch 16, dy a
64-channel slice of 256: 22 ms against 5.9 ms for a contiguous dy, 2 threads, 2-vCPU AMD EPYC
znver5). They sum straight into the dx row, which stays in L1, rather than into a
separate accumulator copied out after: DenseNet-121's first transition avg-pool backward
(batch 16, 128 channels, 56x56) took 1.18 ms that way against 0.66 ms, 2 threads. argmax is int8 (k*k <= 127), the workspace a framework keeps.

Kernels (4-d NHWC float32 arrays, outputs last and written):
    maxpool_forward(x, k, s, p, y, arg)
    maxpool_backward_scatter(dy, arg, k, s, p, dx)     maxpool_backward_gather(...)
    avgpool_forward(x, k, s, y)                        avgpool_backward(dy, k, s, dx)
    gap_forward(x, y)  y [N, C]                        gap_backward(dy, dx)
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from bnff.kernels import reference as ref
from bnff.kernels.conv.conv_common import pixels
from bnff.kernels.stage import F32, ActivationStage, Cost, Stage


@njit(inline="always")
def _covering(i, k, s, p, n_out):
    """Range [lo, hi) of outputs whose window (start o*s - p, length k) holds input i."""
    lo = max(0, (i + p - k + s) // s)
    hi = min(n_out, (i + p) // s + 1)
    return lo, hi


# 1. direct: one scan of the clipped window, running max and first index by selects along C.
@njit(parallel=True, cache=True)
def maxpool_forward(x, k, s, p, y, arg):
    """Window clipped to the image, strict-greater selects (first max wins) along C, by (n, oh)."""
    n, h, w, c = x.shape
    oh_, ow_ = y.shape[1], y.shape[2]
    for t in prange(n * oh_):
        b, oh = t // oh_, t % oh_
        ih0 = oh * s - p
        i0, i1 = max(0, -ih0), min(k, h - ih0)
        best = np.empty(c, np.float32)
        idx = np.empty(c, np.int32)  # as wide as the float mask, so the selects vectorize
        for ow in range(ow_):
            iw0 = ow * s - p
            j0, j1 = max(0, -iw0), min(k, w - iw0)
            for ch in range(c):
                best[ch] = x[b, ih0 + i0, iw0 + j0, ch]
                idx[ch] = i0 * k + j0
            for i in range(i0, i1):
                for j in range(j0, j1):
                    q = i * k + j
                    for ch in range(c):
                        v = x[b, ih0 + i, iw0 + j, ch]
                        bv = best[ch]  # both select operands loaded first: no branch
                        iv = idx[ch]
                        gt = v > bv
                        best[ch] = v if gt else bv
                        idx[ch] = q if gt else iv
            for ch in range(c):
                y[b, oh, ow, ch] = best[ch]
                arg[b, oh, ow, ch] = idx[ch]


# 1. scatter: zero dx, then add each dy at its argmax (parallel over images).
@njit(parallel=True, fastmath=True, cache=True)
def maxpool_backward_scatter(dy, arg, k, s, p, dx):
    """Zero pass over dx, then dx[argmax] += dy per window; one image per prange iteration."""
    n, h, w, c = dx.shape
    oh_, ow_ = dy.shape[1], dy.shape[2]
    for b in prange(n):
        dx[b] = 0.0
        for oh in range(oh_):
            for ow in range(ow_):
                for ch in range(c):
                    q = arg[b, oh, ow, ch]
                    dx[b, oh * s - p + q // k, ow * s - p + q % k, ch] += dy[b, oh, ow, ch]


@njit(parallel=True, fastmath=True, cache=True)
def _maxpool_gather(dy, yps, oh_, ow_, arg, k, s, p, dx, xps, n, h, w, c):
    arg = arg.reshape(-1, c)
    for t in prange(n * h):
        b, ih = t // h, t % h
        oh0, oh1 = _covering(ih, k, s, p, oh_)
        for iw in range(w):
            ow0, ow1 = _covering(iw, k, s, p, ow_)
            i = ((b * h + ih) * w + iw) * xps
            d = dx[i:i + c]
            for ch in range(c):
                d[ch] = 0.0
            for oh in range(oh0, oh1):
                for ow in range(ow0, ow1):
                    q = np.int8((ih + p - oh * s) * k + (iw + p - ow * s))
                    o = (b * oh_ + oh) * ow_ + ow
                    g = dy[o * yps:o * yps + c]
                    a = arg[o]
                    for ch in range(c):
                        d[ch] += g[ch] if a[ch] == q else np.float32(0.0)


# 2. gather: each dx element sums the windows covering it whose argmax points at it.
def maxpool_backward_gather(dy, arg, k, s, p, dx):
    """dx written once per element from the covering windows, parallel over (n, h)."""
    (yf, yps), (xf, xps) = pixels(dy), pixels(dx)
    _maxpool_gather(yf, yps, dy.shape[1], dy.shape[2], arg, k, s, p, xf, xps, *dx.shape)


# 1. direct: window sum times 1/k^2.
@njit(parallel=True, fastmath=True, cache=True)
def avgpool_forward(x, k, s, y):
    """Window sums along C, parallel over (n, oh)."""
    n = x.shape[0]
    c = x.shape[3]
    oh_, ow_ = y.shape[1], y.shape[2]
    scale = np.float32(1.0 / (k * k))
    for t in prange(n * oh_):
        b, oh = t // oh_, t % oh_
        acc = np.empty(c, np.float32)
        for ow in range(ow_):
            acc[:] = 0.0
            for i in range(k):
                for j in range(k):
                    for ch in range(c):
                        acc[ch] += x[b, oh * s + i, ow * s + j, ch]
            for ch in range(c):
                y[b, oh, ow, ch] = acc[ch] * scale


@njit(parallel=True, fastmath=True, cache=True)
def _avgpool_gather(dy, yps, oh_, ow_, k, s, dx, xps, n, h, w, c):
    scale = np.float32(1.0 / (k * k))
    for t in prange(n * h):
        b, ih = t // h, t % h
        oh0, oh1 = _covering(ih, k, s, 0, oh_)
        for iw in range(w):
            ow0, ow1 = _covering(iw, k, s, 0, ow_)
            i = ((b * h + ih) * w + iw) * xps
            d = dx[i:i + c]
            if oh1 <= oh0 or ow1 <= ow0:  # past the last window
                for ch in range(c):
                    d[ch] = 0.0
                continue
            o = ((b * oh_ + oh0) * ow_ + ow0) * yps
            g = dy[o:o + c]
            for ch in range(c):  # the first window writes, the others add
                d[ch] = g[ch] * scale
            for oh in range(oh0, oh1):
                for ow in range(ow0, ow1):
                    if oh > oh0 or ow > ow0:
                        o = ((b * oh_ + oh) * ow_ + ow) * yps
                        g = dy[o:o + c]
                        for ch in range(c):
                            d[ch] += g[ch] * scale


# 1. gather: each dx element sums dy / k^2 over the windows covering it.
def avgpool_backward(dy, k, s, dx):
    """dx written once per element, parallel over (n, h); input rows past the last window get 0."""
    (yf, yps), (xf, xps) = pixels(dy), pixels(dx)
    _avgpool_gather(yf, yps, dy.shape[1], dy.shape[2], k, s, xf, xps, *dx.shape)


# 1. direct: per image, float32 sum over the H*W rows.
@njit(parallel=True, fastmath=True, cache=True)
def gap_forward(x, y):
    """y[n] = mean of the H*W rows of image n, one image per prange iteration."""
    n, h, w, c = x.shape
    for b in prange(n):
        acc = np.zeros(c, np.float32)
        for ih in range(h):
            for iw in range(w):
                for ch in range(c):
                    acc[ch] += x[b, ih, iw, ch]
        for ch in range(c):
            y[b, ch] = acc[ch] / (h * w)


# 1. broadcast: every pixel of image n gets dy[n] / (H*W).
@njit(parallel=True, fastmath=True, cache=True)
def gap_backward(dy, dx):
    """dx[n, h, w] = dy[n] / (H*W), parallel over (n, h)."""
    n, h, w, c = dx.shape
    for t in prange(n * h):
        b, ih = t // h, t % h
        for iw in range(w):
            for ch in range(c):
                dx[b, ih, iw, ch] = dy[b, ch] / (h * w)


def _nchw64(a):
    return np.moveaxis(a, 3, 1).astype(np.float64)


def _nhwc(a):
    return np.moveaxis(a, 1, 3)


class _Pool(Stage):
    """Shape keys: mb, ic, ih, iw, kh, sh (and ph for max-pool)."""

    def _in(self):
        s = self.shape
        return (s["mb"], s["ih"], s["iw"], s["ic"])

    def _out(self):
        s = self.shape
        p = s.get("ph", 0)
        o = lambda i: ref.out_size(i, s["kh"], s["sh"], p)
        return (s["mb"], o(s["ih"]), o(s["iw"]), s["ic"])

    def _args(self):
        s = self.shape
        return (s["kh"], s["sh"], s["ph"]) if "ph" in s else (s["kh"], s["sh"])


class MaxPoolForward(_Pool):
    """Input x; outputs y and argmax (int8 window index)."""

    name = "maxpool_fwd"
    examples = ("mb2ic64ih14iw14kh3sh2ph1", "mb1ic24ih13iw11kh3sh2ph0")
    variants = {"direct": maxpool_forward}
    default = "direct"

    def make_inputs(self, rng):
        return {"x": rng.standard_normal(self._in(), dtype=np.float32)}

    def allocate_outputs(self):
        return {"y": np.empty(self._out(), np.float32), "argmax": np.empty(self._out(), np.int8)}

    def run(self, variant, inputs, outputs):
        self.variants[variant](inputs["x"], *self._args(), outputs["y"], outputs["argmax"])

    def reference(self, inputs):
        y, arg = ref.maxpool2d_forward(_nchw64(inputs["x"]), *self._args())
        return {"y": _nhwc(y), "argmax": _nhwc(arg)}

    def cost(self, variant):
        nin, nout = np.prod(self._in()), np.prod(self._out())
        k = self.shape["kh"]
        return Cost(flops=int(nout * k * k), bytes_read=int(nin * F32),
                    bytes_written=int(nout * (F32 + 1)))


class MaxPoolBackward(_Pool):
    """Inputs dy and argmax (as the forward writes it); output dx."""

    name = "maxpool_bwd"
    examples = MaxPoolForward.examples
    variants = {"scatter": maxpool_backward_scatter, "gather": maxpool_backward_gather}
    default = "gather"

    def make_inputs(self, rng):
        x = rng.standard_normal(self._in(), dtype=np.float32)
        arg = np.empty(self._out(), np.int8)
        maxpool_forward(x, *self._args(), np.empty(self._out(), np.float32), arg)
        return {"dy": rng.standard_normal(self._out(), dtype=np.float32), "argmax": arg}

    def allocate_outputs(self):
        return {"dx": np.empty(self._in(), np.float32)}

    def run(self, variant, inputs, outputs):
        self.variants[variant](inputs["dy"], inputs["argmax"], *self._args(), outputs["dx"])

    def reference(self, inputs):
        dx = ref.maxpool2d_backward(_nchw64(inputs["dy"]), _nchw64(inputs["argmax"]).astype(int),
                                    (lambda n, h, w, c: (n, c, h, w))(*self._in()),
                                    *self._args())
        return {"dx": _nhwc(dx)}

    def cost(self, variant):
        nin, nout = int(np.prod(self._in())), int(np.prod(self._out()))
        read = nout * (F32 + 1)
        if variant == "scatter":  # zero pass, then read-modify-write of dx
            return Cost(flops=nout, bytes_read=read + nin * F32, bytes_written=2 * nin * F32)
        return Cost(flops=nout, bytes_read=read, bytes_written=nin * F32)


class AvgPoolForward(_Pool):
    """Input x; output y."""

    name = "avgpool_fwd"
    examples = ("mb2ic128ih14iw14kh2sh2", "mb1ic16ih7iw9kh3sh2")
    variants = {"direct": avgpool_forward}
    default = "direct"

    def make_inputs(self, rng):
        return {"x": rng.standard_normal(self._in(), dtype=np.float32)}

    def allocate_outputs(self):
        return {"y": np.empty(self._out(), np.float32)}

    def run(self, variant, inputs, outputs):
        self.variants[variant](inputs["x"], *self._args(), outputs["y"])

    def reference(self, inputs):
        return {"y": _nhwc(ref.avgpool2d_forward(_nchw64(inputs["x"]), *self._args()))}

    def cost(self, variant):
        nin, nout = int(np.prod(self._in())), int(np.prod(self._out()))
        return Cost(flops=nout * self.shape["kh"] ** 2, bytes_read=nin * F32,
                    bytes_written=nout * F32)


class AvgPoolBackward(_Pool):
    """Input dy; output dx."""

    name = "avgpool_bwd"
    examples = AvgPoolForward.examples
    variants = {"gather": avgpool_backward}
    default = "gather"

    def make_inputs(self, rng):
        return {"dy": rng.standard_normal(self._out(), dtype=np.float32)}

    def allocate_outputs(self):
        return {"dx": np.empty(self._in(), np.float32)}

    def run(self, variant, inputs, outputs):
        self.variants[variant](inputs["dy"], *self._args(), outputs["dx"])

    def reference(self, inputs):
        n, h, w, c = self._in()
        dx = ref.avgpool2d_backward(_nchw64(inputs["dy"]), (n, c, h, w), *self._args())
        return {"dx": _nhwc(dx)}

    def cost(self, variant):
        nin, nout = int(np.prod(self._in())), int(np.prod(self._out()))
        return Cost(flops=nin, bytes_read=nout * F32, bytes_written=nin * F32)


class GlobalAvgPoolForward(ActivationStage):
    """Shape keys: mb, ic, ih, iw. Input x [mb, ih, iw, ic]; output y [mb, ic]."""

    name = "gap_fwd"
    variants = {"direct": gap_forward}
    default = "direct"

    def make_inputs(self, rng):
        return {"x": rng.standard_normal(self._act(), dtype=np.float32)}

    def allocate_outputs(self):
        return {"y": np.empty((self.shape["mb"], self.shape["ic"]), np.float32)}

    def run(self, variant, inputs, outputs):
        self.variants[variant](inputs["x"], outputs["y"])

    def reference(self, inputs):
        return {"y": ref.global_avgpool_forward(_nchw64(inputs["x"]))}

    def cost(self, variant):
        n = int(np.prod(self._act()))
        out = self.shape["mb"] * self.shape["ic"]
        return Cost(flops=n, bytes_read=n * F32, bytes_written=out * F32)


class GlobalAvgPoolBackward(GlobalAvgPoolForward):
    """Input dy [mb, ic]; output dx [mb, ih, iw, ic]."""

    name = "gap_bwd"
    variants = {"broadcast": gap_backward}
    default = "broadcast"

    def make_inputs(self, rng):
        return {"dy": rng.standard_normal((self.shape["mb"], self.shape["ic"]), dtype=np.float32)}

    def allocate_outputs(self):
        return {"dx": np.empty(self._act(), np.float32)}

    def run(self, variant, inputs, outputs):
        self.variants[variant](inputs["dy"], outputs["dx"])

    def reference(self, inputs):
        n, h, w, c = self._act()
        dx = ref.global_avgpool_backward(inputs["dy"].astype(np.float64), (n, c, h, w))
        return {"dx": _nhwc(dx)}

    def cost(self, variant):
        n = int(np.prod(self._act()))
        out = self.shape["mb"] * self.shape["ic"]
        return Cost(flops=n, bytes_read=out * F32, bytes_written=n * F32)
