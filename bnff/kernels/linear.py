"""Fully connected layer on [batch, features] float32: the classifier after global pooling.

    forward:   y[n, o] = sum_f x[n, f] * w[o, f] + b[o]          x [N, F], w [O, F], b [O]
    backward:  dx[n, f] = sum_o dy[n, o] * w[o, f]
               dw[o, f] = sum_n dy[n, o] * x[n, f],    db[o] = sum_n dy[n, o]

Small GEMMs (N = batch); w is the big operand (O*F floats), read once per pass from memory
while x and dy stay in cache. Loops are ordered so the innermost one runs along a
contiguous F and vectorizes (a dot product in forward, an axpy in both backward products).

Kernels (float32 arrays, outputs last and written):
    linear_forward(x, w, b, y)
    linear_backward(dy, x, w, dx, dw, db)
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from bnff.kernels import reference as ref
from bnff.kernels.stage import F32, Cost, Stage

FB = 256  # features per dx block (a [N, FB] accumulator stays in L1)


# 1. dot: one vectorized dot product per output, parallel over output features.
@njit(parallel=True, fastmath=True, cache=True)
def linear_forward(x, w, b, y):
    """y[n, o] = dot(x[n], w[o]) + b[o]; each w row is read once and reused over the batch."""
    n, f = x.shape
    for o in prange(w.shape[0]):
        for i in range(n):
            acc = np.float32(0.0)
            for j in range(f):
                acc += x[i, j] * w[o, j]
            y[i, o] = acc + b[o]


# 1. axpy: dx by feature blocks, dw by output rows, both axpy along F.
@njit(parallel=True, fastmath=True, cache=True)
def linear_backward(dy, x, w, dx, dw, db):
    """dx in [N, FB] blocks over all outputs; dw[o] = sum_n dy[n, o] * x[n]; db = sum_n dy."""
    n, f = x.shape
    nout = w.shape[0]
    nblk = (f + FB - 1) // FB
    for blk in prange(nblk):
        f0 = blk * FB
        fb = min(FB, f - f0)
        acc = np.zeros((n, fb), np.float32)
        for o in range(nout):
            for i in range(n):
                d = dy[i, o]
                for j in range(fb):
                    acc[i, j] += d * w[o, f0 + j]
        dx[:, f0:f0 + fb] = acc
    for o in prange(nout):
        dw[o, :] = 0.0
        s = np.float32(0.0)
        for i in range(n):
            d = dy[i, o]
            s += d
            for j in range(f):
                dw[o, j] += d * x[i, j]
        db[o] = s


class _Linear(Stage):
    """Shape keys: mb (batch), ic (in features), oc (out features)."""

    examples = ("mb2ic1024oc1000", "mb3ic300oc7")

    def _dims(self):
        s = self.shape
        return s["mb"], s["ic"], s["oc"]

    def _params(self, rng):
        n, f, o = self._dims()
        w = rng.standard_normal((o, f), dtype=np.float32) / np.float32(np.sqrt(f))
        return w, rng.uniform(-0.1, 0.1, o).astype(np.float32)


class LinearForward(_Linear):
    """Inputs x [mb, ic], w [oc, ic], b [oc]; output y [mb, oc]."""

    name = "linear_fwd"
    variants = {"dot": linear_forward}
    default = "dot"

    def make_inputs(self, rng):
        n, f, o = self._dims()
        w, b = self._params(rng)
        return {"x": rng.standard_normal((n, f), dtype=np.float32), "w": w, "b": b}

    def allocate_outputs(self):
        n, f, o = self._dims()
        return {"y": np.empty((n, o), np.float32)}

    def run(self, variant, inputs, outputs):
        self.variants[variant](inputs["x"], inputs["w"], inputs["b"], outputs["y"])

    def reference(self, inputs):
        d = {k: v.astype(np.float64) for k, v in inputs.items()}
        return {"y": ref.linear_forward(d["x"], d["w"], d["b"])}

    def cost(self, variant):
        n, f, o = self._dims()
        return Cost(flops=2 * n * f * o, bytes_read=(n * f + o * f + o) * F32,
                    bytes_written=n * o * F32)


class LinearBackward(_Linear):
    """Inputs dy [mb, oc], x [mb, ic], w [oc, ic]; outputs dx [mb, ic], dw [oc, ic], db [oc]."""

    name = "linear_bwd"
    variants = {"axpy": linear_backward}
    default = "axpy"

    def make_inputs(self, rng):
        n, f, o = self._dims()
        w, _ = self._params(rng)
        return {"dy": rng.standard_normal((n, o), dtype=np.float32),
                "x": rng.standard_normal((n, f), dtype=np.float32), "w": w}

    def allocate_outputs(self):
        n, f, o = self._dims()
        return {"dx": np.empty((n, f), np.float32), "dw": np.empty((o, f), np.float32),
                "db": np.empty(o, np.float32)}

    def run(self, variant, inputs, outputs):
        i, t = inputs, outputs
        self.variants[variant](i["dy"], i["x"], i["w"], t["dx"], t["dw"], t["db"])

    def reference(self, inputs):
        d = {k: v.astype(np.float64) for k, v in inputs.items()}
        dx, dw, db = ref.linear_backward(d["dy"], d["x"], d["w"])
        return {"dx": dx, "dw": dw, "db": db}

    def cost(self, variant):
        n, f, o = self._dims()
        return Cost(flops=4 * n * f * o, bytes_read=(n * o + n * f + o * f) * F32,
                    bytes_written=(n * f + o * f + o) * F32)
