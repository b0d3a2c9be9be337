"""The gradient of a conv's bias (its forward is `conv_common.bias_epilogue`, fused into the conv):

    dbias[c] = sum over the m = N*OH*OW output pixels of dy[., c]     reads dy, writes C floats

Kernels:
    bias_grad(DY, db)           DY an [M, C] float32 view (C-contiguous rows, or a channel
                                slice of a wider buffer), db float32 [C]: one reduction pass,
                                the plain per-channel sum bnff/kernels/rows.channel_sum
                                (row blocks, float32 tiles of TILE_ROWS rows flushed into
                                float64 partials, merged serially).
    bias_grad_bn(a, p, q, dbeta, mean, m, db)
                                no pass at all, when the conv's output feeds only a BN whose
                                dx = a*dy + p*x + q is formed in the conv's own backward
                                prologues (bnff) and never written: summed over the m rows,
                                dbias = a*sum(dy) + p*sum(x) + q*m = a*dbeta + m*(p*mean + q),
                                from the BN's own sums. (It is zero in exact arithmetic: a
                                BN's input gradient sums to zero per channel.)
"""
from __future__ import annotations

import numpy as np
from numba import njit

from bnff.kernels import reference as ref
from bnff.kernels.rows import channel_sum
from bnff.kernels.stage import F32, ActivationStage, Cost

bias_grad = channel_sum  # db[c] = sum_r DY[r, c]: reads DY once


@njit(cache=True)
def bias_grad_bn(a, p, q, dbeta, mean, m, db):
    """db = a*dbeta + m*(p*mean + q) in float64: the sum of the BN's dx = a*dy + p*x + q."""
    for j in range(db.shape[0]):
        db[j] = a[j] * np.float64(dbeta[j]) + m * (p[j] * np.float64(mean[j]) + q[j])


class ConvBiasBackward(ActivationStage):
    """Shape keys: mb, ic, ih, iw (of dy). Input dy [mb, ih, iw, ic]; output db [ic]."""

    name = "conv_bias_bwd"
    variants = {"prange": lambda dy, db: bias_grad(dy.reshape(-1, dy.shape[-1]), db)}
    default = "prange"

    def make_inputs(self, rng):
        return {"dy": rng.standard_normal(self._act(), dtype=np.float32) + np.float32(3.0)}

    def allocate_outputs(self):
        return {"db": np.empty(self.shape["ic"], np.float32)}

    def run(self, variant, inputs, outputs):
        self.variants[variant](inputs["dy"], outputs["db"])

    def reference(self, inputs):
        return {"db": ref.conv2d_bias_backward(np.moveaxis(inputs["dy"], 3, 1).astype(np.float64))}

    def cost(self, variant):
        n = int(np.prod(self._act()))
        return Cost(flops=n, bytes_read=n * F32, bytes_written=self.shape["ic"] * F32)
