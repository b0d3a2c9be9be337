"""BN normalize (sub-BN2): y = gamma * (x - mean) * inv + beta on an NHWC tensor.

Per channel c, with inv = 1 / sqrt(var + eps), the affine form folds the scale into one
per-channel number:

    a[c] = gamma[c] * inv[c],   y = a[c] * (x - mean[c]) + beta[c]

(BNFF writes y = a*x + b with b = beta - mean*a; centering first costs one subtraction and
avoids the float32 cancellation of a*x against b when |mean| >> std or var ~ 0.)

On the [M, C] view (M = N*H*W) each variant reads x once and writes y once; the per-channel
prologue is O(C). The pass is bnff/kernels/rows.py's row_blocks (BLOCKS contiguous row
blocks, one prange iteration each), vectorized along C.

Kernels (X, Y are [M, C] float32 views; vectors are float32 [C]):
    normalize_naive(X, mean, var, gamma, beta, eps, Y)
    normalize_affine(X, mean, var, gamma, beta, eps, Y)
"""
from __future__ import annotations

import numpy as np
from numba import njit

from bnff.kernels import reference as ref
from bnff.kernels.rows import row_blocks
from bnff.kernels.stage import F32, ActivationStage, Cost


@njit(inline="always")
def _naive_row(args, r):
    """Y[r] = gamma * ((X[r] - mean) * inv) + beta: args = (X, mean, inv, gamma, beta, Y)."""
    X, mean, inv, gamma, beta = args[:5]
    for j in range(X.shape[1]):
        args[5][r, j] = gamma[j] * ((X[r, j] - mean[j]) * inv[j]) + beta[j]


@njit(inline="always")
def _affine_row(args, r):
    """Y[r] = a * (X[r] - mean) + beta: args = (X, mean, a, beta, Y)."""
    X, mean, a, beta = args[:4]
    for j in range(X.shape[1]):
        args[4][r, j] = a[j] * (X[r, j] - mean[j]) + beta[j]


_naive_rows = row_blocks(_naive_row)
_affine_rows = row_blocks(_affine_row)


# 1. naive: the textbook formula per element.
@njit(cache=True)
def normalize_naive(X, mean, var, gamma, beta, eps, Y):
    """Per element gamma * ((x - mean) * inv) + beta: 4 flops, the layer as written."""
    c = X.shape[1]
    inv = np.empty(c, np.float32)
    for j in range(c):
        inv[j] = 1.0 / np.sqrt(np.float64(var[j]) + eps)
    _naive_rows((X, mean, inv, gamma, beta, Y), X.shape[0])


# 2. affine: a subtraction and one FMA per element with a per-channel scale.
@njit(cache=True)
def normalize_affine(X, mean, var, gamma, beta, eps, Y):
    """y = a * (x - mean) + beta with a = gamma * inv folded per channel first."""
    c = X.shape[1]
    a = np.empty(c, np.float32)
    for j in range(c):
        a[j] = gamma[j] / np.sqrt(np.float64(var[j]) + eps)
    _affine_rows((X, mean, a, beta, Y), X.shape[0])


def bn_inputs(rng, shape):
    """A BN input x [mb, ih, iw, ic] (std 2, mean 0.5) with its batch statistics mean and var,
    as sub-BN1 gives them, and gamma, beta: the inputs of every BN stage that normalizes."""
    c = shape["ic"]
    x = rng.standard_normal((shape["mb"], shape["ih"], shape["iw"], c), dtype=np.float32)
    x = x * np.float32(2.0) + np.float32(0.5)
    xd = x.reshape(-1, c).astype(np.float64)
    f = lambda v: np.asarray(v, np.float32)
    return {"x": x, "mean": f(xd.mean(0)), "var": f(xd.var(0)),
            "gamma": f(rng.uniform(0.5, 1.5, c)), "beta": f(rng.uniform(-0.5, 0.5, c))}


class BNNormalize(ActivationStage):
    """Shape keys: mb, ic, ih, iw. Inputs x [mb, ih, iw, ic], mean, var, gamma, beta [ic];
    output y like x. eps = 1e-5."""

    name = "bn_normalize"
    variants = {"naive": normalize_naive, "affine": normalize_affine}
    default = "affine"
    eps = 1e-5

    def make_inputs(self, rng):
        return bn_inputs(rng, self.shape)

    def allocate_outputs(self):
        s = self.shape
        return {"y": np.empty((s["mb"], s["ih"], s["iw"], s["ic"]), np.float32)}

    def run(self, variant, inputs, outputs):
        m, c = self._size()
        i = inputs
        self.variants[variant](i["x"].reshape(m, c), i["mean"], i["var"], i["gamma"], i["beta"],
                               self.eps, outputs["y"].reshape(m, c))

    def reference(self, inputs):
        """The float64 BN forward, which recomputes the batch statistics from x."""
        x = np.moveaxis(inputs["x"], 3, 1).astype(np.float64)
        y, _ = ref.batchnorm_forward(x, inputs["gamma"].astype(np.float64),
                                     inputs["beta"].astype(np.float64), self.eps)
        return {"y": np.moveaxis(y, 1, 3)}

    def cost(self, variant):
        m, c = self._size()
        flops = (4 if variant == "naive" else 3) * m * c
        return Cost(flops=flops, bytes_read=m * c * F32 + 4 * c * F32,
                    bytes_written=m * c * F32)
