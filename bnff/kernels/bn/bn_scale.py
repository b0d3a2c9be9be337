"""Caffe's Scale layer, which follows its BatchNorm layer (that one only standardizes):

    forward   y = gamma[c] * xh + beta[c]
    backward  dbeta = sum(dy),  dgamma = sum(dy * xh),  dxh = gamma[c] * dy

over the [M, C] view of an NHWC tensor. Only the `caffe` schedule uses it; every other
schedule folds gamma and beta into the normalize (bnff/kernels/bn/bn_normalize.py).

Kernels ([M, C] float32 views, vectors float32 [C], outputs last and written):
    scale_forward(XH, gamma, beta, Y)
    scale_backward(DY, XH, gamma, dgamma, dbeta, DXH)   one pass: both sums and dxh
"""
from __future__ import annotations

import numpy as np
from numba import njit

from bnff.kernels.rows import channel_sums, merge_blocks, row_blocks
from bnff.kernels.stage import F32, ActivationStage, Cost


@njit(inline="always")
def _scale_row(args, r):
    """Y[r] = gamma * XH[r] + beta: args = (XH, gamma, beta, Y)."""
    XH, gamma, beta = args[:3]
    for j in range(XH.shape[1]):
        args[3][r, j] = gamma[j] * XH[r, j] + beta[j]


_scale_rows = row_blocks(_scale_row)


# 1. forward: one FMA per element.
@njit(cache=True)
def scale_forward(XH, gamma, beta, Y):
    """y = gamma * xh + beta, rows split in blocks (rows.row_blocks), vectorized along C."""
    _scale_rows((XH, gamma, beta, Y), XH.shape[0])


@njit(inline="always")
def _scale_grads(args, r, j, t):
    """t[0, j] += dy, t[1, j] += dy * xh, and DXH[r, j] = gamma[j] * dy: args = (DY, XH, gamma,
    DXH)."""
    DY, XH, gamma = args[:3]
    g = DY[r, j]
    t[0, j] += g
    t[1, j] += g * XH[r, j]
    args[3][r, j] = gamma[j] * g


_scale_grad_sums = channel_sums(_scale_grads, 2)


# 2. backward: the two parameter sums and dxh from one pass over dy and xh.
@njit(cache=True)
def scale_backward(DY, XH, gamma, dgamma, dbeta, DXH):
    """reduce.py's float32 tile sums flushed to float64 partials, dxh written on the way."""
    m, c = DY.shape
    part = _scale_grad_sums((DY, XH, gamma, DXH), m, c)
    merge_blocks(part[:, 0], 1.0, dbeta)
    merge_blocks(part[:, 1], 1.0, dgamma)


class BNScale(ActivationStage):
    """Shape keys: mb, ic, ih, iw. Forward: inputs xh, gamma, beta; output y."""

    name = "bn_scale"
    variants = {"forward": scale_forward}
    default = "forward"
    examples = ("mb2ic64ih7iw7", "mb1ic13ih5iw3")

    def make_inputs(self, rng):
        m, c = self._size()
        f = lambda v: np.asarray(v, np.float32)
        return {"xh": f(rng.standard_normal((m, c))), "gamma": f(rng.uniform(0.5, 1.5, c)),
                "beta": f(rng.uniform(-0.5, 0.5, c))}

    def allocate_outputs(self):
        m, c = self._size()
        return {"y": np.empty((m, c), np.float32)}

    def run(self, variant, inputs, outputs):
        scale_forward(inputs["xh"], inputs["gamma"], inputs["beta"], outputs["y"])

    def reference(self, inputs):
        g, b = (inputs[k].astype(np.float64) for k in ("gamma", "beta"))
        return {"y": inputs["xh"].astype(np.float64) * g + b}

    def cost(self, variant):
        m, c = self._size()
        return Cost(2 * m * c, m * c * F32 + 2 * c * F32, m * c * F32)


class BNScaleBackward(BNScale):
    """Shape keys: mb, ic, ih, iw. Inputs dy, xh, gamma; outputs dgamma, dbeta, dxh."""

    name = "bn_scale_bwd"
    variants = {"one_pass": scale_backward}
    default = "one_pass"

    def make_inputs(self, rng):
        m, c = self._size()
        f = lambda v: np.asarray(v, np.float32)
        return {"dy": f(rng.standard_normal((m, c))), "xh": f(rng.standard_normal((m, c))),
                "gamma": f(rng.uniform(0.5, 1.5, c))}

    def allocate_outputs(self):
        m, c = self._size()
        return {"dgamma": np.empty(c, np.float32), "dbeta": np.empty(c, np.float32),
                "dxh": np.empty((m, c), np.float32)}

    def run(self, variant, inputs, outputs):
        scale_backward(inputs["dy"], inputs["xh"], inputs["gamma"], outputs["dgamma"],
                       outputs["dbeta"], outputs["dxh"])

    def reference(self, inputs):
        dy, xh, g = (inputs[k].astype(np.float64) for k in ("dy", "xh", "gamma"))
        return {"dgamma": (dy * xh).sum(0), "dbeta": dy.sum(0), "dxh": dy * g}

    def cost(self, variant):
        m, c = self._size()
        return Cost(5 * m * c, 2 * m * c * F32 + c * F32, m * c * F32 + 2 * c * F32)
