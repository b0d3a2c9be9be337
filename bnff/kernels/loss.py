"""Softmax cross-entropy over integer labels, loss and gradient in one kernel.

For logits z [N, K] and labels l [N]:

    lse_n = max_k z[n] + log sum_k exp(z[n, k] - max_k z[n])
    loss  = mean_n (lse_n - z[n, l_n])
    dz[n, k] = (exp(z[n, k] - lse_n) - [k == l_n]) / N

Tiny (N*K floats); rows are split over the threads, exp sums kept in float64.

Kernel: softmax_xent(z f32 [N, K], labels int64 [N], loss f32 [1], dz f32 [N, K])
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from bnff.kernels import reference as ref
from bnff.kernels.stage import F32, Cost, Stage


# 1. rows: max, sum of exp and gradient per row, parallel over the batch.
@njit(parallel=True, fastmath=True, cache=True)
def softmax_xent(z, labels, loss, dz):
    """Per row: max, float64 sum of exp, then the normalized gradient; row losses averaged."""
    n, k = z.shape
    rows = np.empty(n)
    for i in prange(n):
        zmax = z[i, 0]
        for j in range(k):
            zmax = max(zmax, z[i, j])
        s = 0.0
        for j in range(k):
            s += np.exp(np.float64(z[i, j] - zmax))
        lse = zmax + np.log(s)
        rows[i] = lse - z[i, labels[i]]
        for j in range(k):
            dz[i, j] = np.exp(np.float64(z[i, j]) - lse) / n
        dz[i, labels[i]] -= np.float32(1.0 / n)
    total = 0.0
    for i in range(n):
        total += rows[i]
    loss[0] = total / n


class SoftmaxCrossEntropy(Stage):
    """Shape keys: mb (batch), oc (classes). Inputs z [mb, oc], labels int64 [mb];
    outputs loss [1], dz [mb, oc]."""

    name = "softmax_xent"
    variants = {"rows": softmax_xent}
    default = "rows"
    examples = ("mb2oc1000", "mb5oc3")

    def make_inputs(self, rng):
        n, k = self.shape["mb"], self.shape["oc"]
        return {"z": rng.standard_normal((n, k), dtype=np.float32) * np.float32(3.0),
                "labels": rng.integers(0, k, n).astype(np.int64)}

    def allocate_outputs(self):
        n, k = self.shape["mb"], self.shape["oc"]
        return {"loss": np.empty(1, np.float32), "dz": np.empty((n, k), np.float32)}

    def run(self, variant, inputs, outputs):
        self.variants[variant](inputs["z"], inputs["labels"], outputs["loss"], outputs["dz"])

    def reference(self, inputs):
        loss, dz = ref.softmax_cross_entropy(inputs["z"].astype(np.float64), inputs["labels"])
        return {"loss": np.array([loss]), "dz": dz}

    def cost(self, variant):
        n, k = self.shape["mb"], self.shape["oc"]
        return Cost(flops=8 * n * k, bytes_read=n * k * F32 + n * 8,
                    bytes_written=n * k * F32 + F32)
