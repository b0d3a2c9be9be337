"""ReLU forward and backward, elementwise on flat float32 tensors (any layout).

    forward:   y = max(x, 0)
    backward:  dx = dy * [y > 0]        (y the forward output; the mask of x > 0 is the same)

Pure streaming: forward reads S and writes S, backward reads 2S and writes S. The Numba
variants split the flat index range over the threads (prange) and vectorize each chunk.

Kernels (flat float32 arrays, output last and written):
    relu_forward_numpy(x, y)      relu_forward(x, y)
    relu_backward(dy, y, dx)
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from bnff.kernels import reference as ref
from bnff.kernels.stage import F32, ActivationStage, Cost


# 1. numpy: a framework-style single-threaded ufunc into the preallocated output.
def relu_forward_numpy(x, y):
    """np.maximum(x, 0, out=y): one thread, no temporaries."""
    np.maximum(x, np.float32(0.0), out=y)


# 2. prange: the same streaming loop split over the threads.
@njit(parallel=True, fastmath=True, cache=True)
def relu_forward(x, y):
    """y[i] = max(x[i], 0), parallel over the flat index."""
    for i in prange(x.size):
        y[i] = max(x[i], np.float32(0.0))


# 1. prange: masked copy of the gradient.
@njit(parallel=True, fastmath=True, cache=True)
def relu_backward(dy, y, dx):
    """dx[i] = dy[i] if y[i] > 0 else 0, parallel over the flat index."""
    for i in prange(dy.size):
        g = dy[i]  # loaded before the select: a masked load under it is slow on AMD Zen
        dx[i] = g if y[i] > 0 else np.float32(0.0)


def _nchw64(a):
    return np.moveaxis(a, 3, 1).astype(np.float64)


class ReLUForward(ActivationStage):
    """Shape keys: mb, ic, ih, iw. Input x, output y, both [mb, ih, iw, ic]."""

    name = "relu_fwd"
    variants = {"numpy": relu_forward_numpy, "prange": relu_forward}
    default = "prange"

    def make_inputs(self, rng):
        return {"x": rng.standard_normal(self._act(), dtype=np.float32)}

    def allocate_outputs(self):
        return {"y": np.empty(self._act(), np.float32)}

    def run(self, variant, inputs, outputs):
        self.variants[variant](inputs["x"].reshape(-1), outputs["y"].reshape(-1))

    def reference(self, inputs):
        return {"y": np.moveaxis(ref.relu_forward(_nchw64(inputs["x"])), 1, 3)}

    def cost(self, variant):
        n = int(np.prod(self._act()))
        return Cost(flops=n, bytes_read=n * F32, bytes_written=n * F32)


class ReLUBackward(ActivationStage):
    """Shape keys: mb, ic, ih, iw. Inputs dy and y (forward output), output dx."""

    name = "relu_bwd"
    examples = ReLUForward.examples
    variants = {"prange": relu_backward}
    default = "prange"

    def make_inputs(self, rng):
        shape = self._act()
        y = np.maximum(rng.standard_normal(shape, dtype=np.float32), np.float32(0.0))
        return {"dy": rng.standard_normal(shape, dtype=np.float32), "y": y}

    def allocate_outputs(self):
        return {"dx": np.empty(self._act(), np.float32)}

    def run(self, variant, inputs, outputs):
        self.variants[variant](inputs["dy"].reshape(-1), inputs["y"].reshape(-1),
                               outputs["dx"].reshape(-1))

    def reference(self, inputs):
        dx = ref.relu_backward(_nchw64(inputs["dy"]), _nchw64(inputs["y"]))
        return {"dx": np.moveaxis(dx, 1, 3)}

    def cost(self, variant):
        n = int(np.prod(self._act()))
        return Cost(flops=n, bytes_read=2 * n * F32, bytes_written=n * F32)
