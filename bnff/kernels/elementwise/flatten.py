"""Flatten of an NHWC activation into the [N, F] features a linear layer reads, in PyTorch's
(NCHW) order so that linear weights keep their exported layout (VGG's classifier):

    forward:   y[n, c*H*W + h*W + w] = x[n, h, w, c]       reads S, writes S
    backward:  dx[n, h, w, c] = dy[n, c*H*W + h*W + w]     reads S, writes S

(In NCHW both are a reshape; here they are a transpose of each image's [H*W, C] block.)

Kernels (x NHWC [N, H, W, C], y [N, C*H*W], float32, outputs last and written):
    flatten(x, y)          unflatten(dy, dx)           parallel over images
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from bnff.kernels import reference as ref
from bnff.kernels.stage import F32, ActivationStage, Cost


@njit(parallel=True, cache=True)
def flatten(x, y):
    """y[n, c*HW + p] = x[n, p, c] with p = h*W + w."""
    n, h, w, c = x.shape
    hw = h * w
    for i in prange(n):
        xi = x[i].reshape(hw, c)
        for p in range(hw):
            for j in range(c):
                y[i, j * hw + p] = xi[p, j]


@njit(parallel=True, cache=True)
def unflatten(dy, dx):
    """dx[n, p, c] = dy[n, c*HW + p]."""
    n, h, w, c = dx.shape
    hw = h * w
    for i in prange(n):
        for p in range(hw):
            for j in range(c):
                dx[i, p // w, p % w, j] = dy[i, j * hw + p]


def _nchw64(a):
    return np.moveaxis(a, 3, 1).astype(np.float64)


class _Flatten(ActivationStage):
    """Shape keys: mb, ic, ih, iw (of the 4-d side)."""

    default = "prange"
    examples = ("mb2ic64ih7iw7", "mb1ic3ih5iw3")

    def _shapes(self):
        s = self.shape
        return self._act(), (s["mb"], s["ic"] * s["ih"] * s["iw"])

    def cost(self, variant):
        n = int(np.prod(self._shapes()[0]))
        return Cost(flops=0, bytes_read=n * F32, bytes_written=n * F32)


class FlattenForward(_Flatten):
    name = "flatten_fwd"
    variants = {"prange": flatten}

    def make_inputs(self, rng):
        return {"x": rng.standard_normal(self._shapes()[0], dtype=np.float32)}

    def allocate_outputs(self):
        return {"y": np.empty(self._shapes()[1], np.float32)}

    def run(self, variant, inputs, outputs):
        self.variants[variant](inputs["x"], outputs["y"])

    def reference(self, inputs):
        return {"y": ref.flatten_forward(_nchw64(inputs["x"]))}


class FlattenBackward(_Flatten):
    name = "flatten_bwd"
    variants = {"prange": unflatten}

    def make_inputs(self, rng):
        return {"dy": rng.standard_normal(self._shapes()[1], dtype=np.float32)}

    def allocate_outputs(self):
        return {"dx": np.empty(self._shapes()[0], np.float32)}

    def run(self, variant, inputs, outputs):
        self.variants[variant](inputs["dy"], outputs["dx"])

    def reference(self, inputs):
        s = self.shape
        dx = ref.flatten_backward(inputs["dy"].astype(np.float64), (s["mb"], s["ic"], s["ih"],
                                                                     s["iw"]))
        return {"dx": np.moveaxis(dx, 1, 3)}
