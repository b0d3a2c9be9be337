"""Conv hooks of the fused schedules beyond those in conv_common (same signatures; the math is
in bn_fused's docstring):

    bn_prologue(v, idx, c, args)                          args = (a, b)
        a[c]*v + b[c]: BN normalize applied as a conv loads its input (a BN followed by a conv
        without ReLU).
    relu_sums_epilogue(d, ldc, rows, mr, c0, nc, tid, args)   args = (x, xps, a, b, s1, s2)
        in the epilogue of the consuming conv's backward-data, d = dz: the sums
        s1[tid, c] += dy, s2[tid, c] += dy * x of dy = dz * [a*x + b > 0], without storing
        anything per element: d keeps dz, and whoever reads it applies the mask
        (bn_relu_grad_prologue, bn_fused.bn_relu_dx). Stores would cost a full extra pass.
    sums_epilogue(d, ldc, rows, mr, c0, nc, tid, args)    args = (x, xps, s1, s2)
        the same without the mask (a BN followed by a conv without ReLU): s1 += d, s2 += d*x.
    bn_relu_grad_prologue(v, idx, c, args)                args = (x, af, bf, a, p, q)
        dx = a[c] * v * [af[c]*x + bf[c] > 0] + p[c]*x + q[c] as a conv loads v = dz.

x is the pre-BN tensor: flat with pixel stride xps in the epilogues (conv_common.pixels, so a
channel slice of a wider buffer, DenseNet's block buffer buf[..., :C], works in place), flat
with the source's layout in the prologue. s1, s2 are float64 [ntasks, C], C-contiguous; the
caller zeroes them and merges them over tasks (bn_fused.bn_backward_coefficients takes
s1.sum(0), s2.sum(0)). The products dy * x of two float32 values are exact in float64, so
these sums need no shift. Full tiles take a vector path (bnff/engine/vec.py): written as scalar
loops with a branch per element, the masked sums cost four times the tile's GEMM.

The epilogues that read x prefetch the x of the next tile first (`prefetch_next`; in the
direct engine, the same channels of the next output row, read while that row's GEMM runs).
Measured on the direct backward-data (batch 16, best of 15 interleaved calls, 2-vCPU AMD EPYC
znver5), cost of relu_sums over the plain kernel without / with the prefetch: DenseNet 1x1
160->128 at 56 +35 / +24 % on 2 threads (+37 / +27 % on 1), 3x3 128->32 at 28 +12 / +3 %,
at 56 +13 / +9 % on 1 thread; ResNet 1x1 256->64 and 512->128 unchanged at +26-65 %. Isolated
on the same shapes: reading x alone (one add per vector) costs +12-40 % on those 1x1 convs,
the mask alone, the sums alone and both cost about the same, and float32 partials over 32
pixels flushed into float64 (4 vector ops per 16 elements instead of 11) were no faster:
what is left is the pass over x (bytes the plain kernel does not move: 1x1 256->64 reads dy
with 64 channels and writes dx with 256, so x adds 44 % to its traffic), not the flops, so
the sums stay float64.

Each function is wrapped in a conv_common.Hook (BN, RELU_SUMS, SUMS, BN_RELU_GRAD below):
what the lowering passes, carrying how its arguments are packed and the bytes it adds.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from bnff.kernels.conv.conv_common import (Hook, coefficients, flat_first, pixels_first, sums_of,
                                           tensor_and_coefficients, tile_sums)
from bnff.engine.gemm import NR
from bnff.engine.vec import W, prefetch_read, vadd, vfma, vload, vstore, vwhere_pos, vwiden, vzero64


@njit(inline="always", cache=True, fastmath=True)
def bn_prologue(v, idx, c, args):
    """y = a[c] * x + b[c]: BN normalize without ReLU as the conv loads x."""
    return args[0][c] * v + args[1][c]


@njit(inline="always", cache=True, fastmath=True)
def prefetch_next(x, xps, rows, mr, c0):
    """Prefetch x at the mr pixels after each of the tile's (rows[r] + mr: the next output row
    for the direct engine's row-long tiles), channels c0 .. c0+NR-1, inside x."""
    e = x.shape[0] - NR
    for r in range(mr):
        i = (rows[r] + mr) * xps + c0
        if i <= e:
            prefetch_read(x, i)
            prefetch_read(x, i + NR - 1)


@njit(inline="always", cache=True, fastmath=True)
def relu_sums_epilogue(d, ldc, rows, mr, c0, nc, tid, args):
    """Per-task float64 s1 += dz * [a*x + b > 0], s2 += that * x over the tile; d unchanged.
    x of the next tile is prefetched first (prefetch_next)."""
    x, xps, a, b, s1, s2 = args
    prefetch_next(x, xps, rows, mr, c0)
    o = tid * s1.shape[1] + c0
    if nc == NR:
        for h in range(0, NR, W):
            av = vload(a, c0 + h)
            bv = vload(b, c0 + h)
            a1 = vzero64()
            a2 = vzero64()
            for r in range(mr):
                xv = vload(x, rows[r] * xps + c0 + h)
                g = vwiden(vwhere_pos(vload(d, rows[r] * ldc + c0 + h), vfma(av, xv, bv)))
                a1 = vadd(a1, g)
                a2 = vfma(g, vwiden(xv), a2)
            vstore(s1, o + h, vadd(vload(s1, o + h), a1))
            vstore(s2, o + h, vadd(vload(s2, o + h), a2))
        return
    for j in range(nc):
        c = c0 + j
        a1 = 0.0
        a2 = 0.0
        for r in range(mr):
            xv = x[rows[r] * xps + c]
            dv = np.float64(d[rows[r] * ldc + c])
            g = dv if a[c] * xv + b[c] > 0 else 0.0
            a1 += g
            a2 += g * xv
        s1.flat[o + j] += a1
        s2.flat[o + j] += a2


@njit(inline="always", cache=True, fastmath=True)
def sums_epilogue(d, ldc, rows, mr, c0, nc, tid, args):
    """Per-task float64 s1 += dy, s2 += dy * x over the tile of d = dy; x of the next tile
    prefetched first (prefetch_next)."""
    x, xps, s1, s2 = args
    prefetch_next(x, xps, rows, mr, c0)
    tile_sums(d, ldc, x, xps, rows, mr, c0, nc, tid, s1, s2)


@njit(inline="always", cache=True, fastmath=True)
def bn_relu_grad_prologue(v, idx, c, args):
    """dx = a[c] * dz * [af[c]*x + bf[c] > 0] + p[c]*x + q[c]: the ReLU mask and the BN input
    gradient formed as the conv loads dz; x flat, same shape as dz."""
    x, af, bf, a, p, q = args
    xv = x[idx]
    g = v if af[c] * xv + bf[c] > 0 else np.float32(0.0)
    return a[c] * g + p[c] * xv + q[c]


BN = Hook("bn", bn_prologue, inputs=lambda rng, shape: coefficients(rng, shape[3], 2),
          ref=lambda v, a: a[0] * v + a[1])
RELU_SUMS = Hook("relu_sums", relu_sums_epilogue, pixels_first, reads_x=True, sums=True,
                 inputs=tensor_and_coefficients(2),
                 ref=lambda d, a: (d, sums_of(d * (a[1] * a[0] + a[2] > 0), a[0])))
SUMS = Hook("sums", sums_epilogue, pixels_first, reads_x=True, sums=True,
            inputs=tensor_and_coefficients(0), ref=lambda d, a: (d, sums_of(d, a[0])))
BN_RELU_GRAD = Hook("bn_relu_grad", bn_relu_grad_prologue, flat_first, reads_x=True,
                    inputs=tensor_and_coefficients(5),
                    ref=lambda v, a: a[3] * v * (a[1] * a[0] + a[2] > 0) + a[4] * a[0] + a[5])
