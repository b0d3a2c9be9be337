"""Elementwise add of two tensors of one shape (the residual add of ResNet, and the sum of
gradients where a tensor feeds two consumers). Its backward needs no kernel: da = db = dy.

    y = a + b                reads 2S, writes S

Kernels (flat float32 arrays, output last and written):
    add_numpy(a, b, y)       add(a, b, y)
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from bnff.kernels import reference as ref
from bnff.kernels.stage import F32, ActivationStage, Cost


# 1. numpy: a framework-style single-threaded ufunc into the preallocated output.
def add_numpy(a, b, y):
    """np.add(a, b, out=y): one thread, no temporaries."""
    np.add(a, b, out=y)


# 2. prange: the streaming loop split over the threads.
@njit(parallel=True, fastmath=True, cache=True)
def add(a, b, y):
    """y[i] = a[i] + b[i], parallel over the flat index."""
    for i in prange(a.size):
        y[i] = a[i] + b[i]


class Add(ActivationStage):
    """Shape keys: mb, ic, ih, iw. Inputs a, b, output y, all [mb, ih, iw, ic]."""

    name = "add"
    variants = {"numpy": add_numpy, "prange": add}
    default = "prange"

    def make_inputs(self, rng):
        shape = self._act()
        return {"a": rng.standard_normal(shape, dtype=np.float32),
                "b": rng.standard_normal(shape, dtype=np.float32)}

    def allocate_outputs(self):
        return {"y": np.empty(self._act(), np.float32)}

    def run(self, variant, inputs, outputs):
        self.variants[variant](inputs["a"].reshape(-1), inputs["b"].reshape(-1),
                               outputs["y"].reshape(-1))

    def reference(self, inputs):
        t = lambda a: np.moveaxis(a, 3, 1).astype(np.float64)
        return {"y": np.moveaxis(ref.add_forward(t(inputs["a"]), t(inputs["b"])), 1, 3)}

    def cost(self, variant):
        n = int(np.prod(self._act()))
        return Cost(flops=n, bytes_read=2 * n * F32, bytes_written=n * F32)
