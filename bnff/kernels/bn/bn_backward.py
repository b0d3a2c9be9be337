"""BN backward: the gradients of y = gamma * xh + beta, xh = (x - mean) * inv, per channel.

Over the m = N*H*W rows of the [M, C] views of dy and x:

    dbeta  = sum(dy)                  dgamma = sum(dy * xh) = inv * sum(dy * (x - mean))
    dx     = a * (dy - dbeta/m - xh * dgamma/m),     a = gamma * inv
           = a * dy + p * (x - mean) + q,            p = -a * inv * dgamma / m,  q = -a * dbeta / m

It is two passes at best: a reduction (dbeta, dgamma) that must finish before any dx, then
the elementwise dx. Both loops are bnff/kernels/rows.py's: the reductions its channel_sums
(per-block [C] partials, float32 tiles of TILE_ROWS rows flushed into float64), the dx pass its
row_blocks, given their per-element and per-row functions here.

Kernels ([M, C] float32 views; vectors float32 [C]; outputs last, written):
    reduce_separate(DY, X, mean, var, eps, dgamma, dbeta)   one pass per sum (reads dy twice)
    reduce_fused(DY, X, mean, var, eps, dgamma, dbeta)      both sums in one pass
    dx_naive(DY, X, mean, var, gamma, eps, dgamma, dbeta, DX)
    dx_affine(DY, X, mean, var, gamma, eps, dgamma, dbeta, DX)
"""
from __future__ import annotations

import numpy as np
from numba import njit

from bnff.kernels import reference as ref
from bnff.kernels.rows import (channel_sum, channel_sums, dy_product_sums, merge_blocks,
                               row_blocks)
from bnff.kernels.bn.bn_normalize import bn_inputs
from bnff.kernels.stage import F32, ActivationStage, Cost


@njit(inline="always")
def _centered_product(args, r, j, t):
    """t[0, j] += DY[r, j] * (X[r, j] - mean[j]), args = (DY, X, mean)."""
    DY, X, mean = args
    t[0, j] += DY[r, j] * (X[r, j] - mean[j])


_centered_product_sums = channel_sums(_centered_product, 1)


@njit(cache=True)
def _sum_centered_products(DY, X, mean, out):
    """out[c] = sum_r DY[r, c] * (X[r, c] - mean[c]) (float64)."""
    m, c = DY.shape
    merge_blocks(_centered_product_sums((DY, X, mean), m, c)[:, 0], 1.0, out)


# Separate reductions: a framework's dbeta and dgamma kernels, dy streamed twice.
def reduce_separate(DY, X, mean, var, eps, dgamma, dbeta):
    """dbeta in one pass over dy, dgamma in a second pass over dy and x."""
    s = np.empty(mean.size)
    channel_sum(DY, s)
    dbeta[:] = s
    _sum_centered_products(DY, X, mean, s)
    dgamma[:] = s / np.sqrt(var.astype(np.float64) + eps)


# Fused reduction: both sums from one pass over dy and x.
@njit(fastmath=True, cache=True)
def reduce_fused(DY, X, mean, var, eps, dgamma, dbeta):
    """dbeta and dgamma accumulated together: dy and x are each read once."""
    m, c = DY.shape
    part = dy_product_sums((DY, X, mean), m, c)
    s1 = np.empty(c)
    s2 = np.empty(c)
    merge_blocks(part[:, 0], 1.0, s1)
    merge_blocks(part[:, 1], 1.0, s2)
    for j in range(c):
        dbeta[j] = s1[j]
        dgamma[j] = s2[j] / np.sqrt(np.float64(var[j]) + eps)


@njit(inline="always")
def _naive_dx_row(args, r):
    """DX[r] = gamma*inv * (DY[r] - db - xh * dg), xh = (X[r] - mean) * inv: args = (DY, X,
    mean, inv, gamma, db, dg, DX)."""
    DY, X, mean, inv, gamma, db, dg = args[:7]
    for j in range(X.shape[1]):
        xh = (X[r, j] - mean[j]) * inv[j]
        args[7][r, j] = gamma[j] * inv[j] * (DY[r, j] - db[j] - xh * dg[j])


@njit(inline="always")
def _affine_dx_row(args, r):
    """DX[r] = a*DY[r] + (p*(X[r] - mean) + q): args = (DY, X, mean, a, p, q, DX)."""
    DY, X, mean, a, p, q = args[:6]
    for j in range(X.shape[1]):
        args[6][r, j] = a[j] * DY[r, j] + (p[j] * (X[r, j] - mean[j]) + q[j])


_naive_dx_rows = row_blocks(_naive_dx_row)
_affine_dx_rows = row_blocks(_affine_dx_row)


# Naive dx: the textbook formula, xh formed per element.
@njit(cache=True)
def dx_naive(DY, X, mean, var, gamma, eps, dgamma, dbeta, DX):
    """dx = gamma*inv * (dy - dbeta/m - xh * dgamma/m) with xh = (x - mean) * inv per element."""
    m, c = DY.shape
    inv = np.empty(c, np.float32)
    db = np.empty(c, np.float32)
    dg = np.empty(c, np.float32)
    for j in range(c):
        inv[j] = 1.0 / np.sqrt(np.float64(var[j]) + eps)
        db[j] = dbeta[j] / m
        dg[j] = dgamma[j] / m
    _naive_dx_rows((DY, X, mean, inv, gamma, db, dg, DX), m)


# Affine dx: a*dy + p*(x - mean) + q with a, p, q folded per channel.
@njit(cache=True)
def dx_affine(DY, X, mean, var, gamma, eps, dgamma, dbeta, DX):
    """dx = a*dy + p*(x - mean) + q: a sub and two FMAs per element."""
    m, c = DY.shape
    a = np.empty(c, np.float32)
    p = np.empty(c, np.float32)
    q = np.empty(c, np.float32)
    for j in range(c):
        inv = 1.0 / np.sqrt(np.float64(var[j]) + eps)
        aj = gamma[j] * inv
        a[j] = aj
        p[j] = -aj * inv * dgamma[j] / m
        q[j] = -aj * dbeta[j] / m
    _affine_dx_rows((DY, X, mean, a, p, q, DX), m)


def backward_three_pass(DY, X, mean, var, gamma, eps, dgamma, dbeta, DX):
    """1. Framework order: dbeta pass, dgamma pass, textbook dx pass (dy read three times)."""
    reduce_separate(DY, X, mean, var, eps, dgamma, dbeta)
    dx_naive(DY, X, mean, var, gamma, eps, dgamma, dbeta, DX)


def backward_two_pass(DY, X, mean, var, gamma, eps, dgamma, dbeta, DX):
    """2. One fused reduction pass, then the affine dx pass (dy and x read twice)."""
    reduce_fused(DY, X, mean, var, eps, dgamma, dbeta)
    dx_affine(DY, X, mean, var, gamma, eps, dgamma, dbeta, DX)


class BNBackward(ActivationStage):
    """Shape keys: mb, ic, ih, iw. Inputs dy, x [mb, ih, iw, ic], mean, var, gamma [ic]
    (the forward's batch statistics); outputs dx like x, dgamma, dbeta [ic]. eps = 1e-5."""

    name = "bn_backward"
    variants = {"three_pass": backward_three_pass, "two_pass": backward_two_pass}
    default = "two_pass"
    eps = 1e-5

    def make_inputs(self, rng):
        i = bn_inputs(rng, self.shape)
        del i["beta"]
        i["dy"] = rng.standard_normal(i["x"].shape, dtype=np.float32)
        return i

    def allocate_outputs(self):
        s = self.shape
        c = s["ic"]
        return {"dx": np.empty((s["mb"], s["ih"], s["iw"], c), np.float32),
                "dgamma": np.empty(c, np.float32), "dbeta": np.empty(c, np.float32)}

    def run(self, variant, inputs, outputs):
        m, c = self._size()
        i, o = inputs, outputs
        self.variants[variant](i["dy"].reshape(m, c), i["x"].reshape(m, c), i["mean"], i["var"],
                               i["gamma"], self.eps, o["dgamma"], o["dbeta"],
                               o["dx"].reshape(m, c))

    def reference(self, inputs):
        t = lambda a: np.moveaxis(a, 3, 1).astype(np.float64)
        gamma = inputs["gamma"].astype(np.float64)
        _, cache = ref.batchnorm_forward(t(inputs["x"]), gamma, np.zeros_like(gamma), self.eps)
        dx, dgamma, dbeta = ref.batchnorm_backward(t(inputs["dy"]), gamma, cache)
        return {"dx": np.moveaxis(dx, 1, 3), "dgamma": dgamma, "dbeta": dbeta}

    def cost(self, variant):
        m, c = self._size()
        s = m * c * F32
        if variant == "three_pass":  # dy | dy, x | dy, x -> dx
            return Cost(flops=13 * m * c, bytes_read=5 * s + 5 * c * F32, bytes_written=s)
        return Cost(flops=9 * m * c, bytes_read=4 * s + 5 * c * F32, bytes_written=s)
