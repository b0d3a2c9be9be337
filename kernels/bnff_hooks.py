"""Conv hooks of the fused schedules beyond those in conv_common (same signatures; the math is
in bn_fused's docstring):

    bn_prologue(v, idx, c, args)                          args = (a, b)
        a[c]*v + b[c]: BN normalize applied as a conv loads its input (a BN followed by a conv
        without ReLU).
    relu_mask_sums_epilogue(dst, rows, mr, c0, nc, tid, args)   args = (x, a, b, s1, s2)
        in the epilogue of the consuming conv's backward-data, dst = dz: writes
        dy = dz * [a*x + b > 0] back into dst and adds s1[tid, c] += dy, s2[tid, c] += dy * x.
    sums_epilogue(dst, rows, mr, c0, nc, tid, args)       args = (x, s1, s2)
        the same without the mask (BN followed by a conv without ReLU): s1 += dst, s2 += dst*x.
    relu_sums_epilogue(dst, rows, mr, c0, nc, tid, args)  args = (x, a, b, s1, s2)
        the sums of dy = dz * [a*x + b > 0] without storing anything per element: dst keeps dz,
        and whoever reads it applies the mask (bn_relu_grad_prologue, bn_fused.bn_relu_dx).
        Per-element stores from an epilogue cost about 5 ns each in the conv engine, more
        than the pass they replace; sums kept in registers cost little.
    bn_relu_grad_prologue(v, idx, c, args)                args = (x, af, bf, a, p, q)
        dx = a[c] * v * [af[c]*x + bf[c] > 0] + p[c]*x + q[c] as a conv loads v = dz.

x is the pre-BN tensor as an [M, C] view in the epilogues (flat in the prologue) (M = N*H*W pixels of dst, C = dst.shape[3]): row
rows[r] holds dst's pixel rows[r], so a C-contiguous x.reshape(M, C) and a channel slice of a
wider buffer (DenseNet's block buffer, buf[:, :C]) both work without index arithmetic.
s1, s2 are float64 [ntasks, C]; the caller zeroes them and merges them over tasks
(bn_fused.bn_backward_coefficients takes s1.sum(0), s2.sum(0)). The products dy * x of two
float32 values are exact in float64, so these sums need no shift.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(inline="always", cache=True, fastmath=True)
def bn_prologue(v, idx, c, args):
    """y = a[c] * x + b[c]: BN normalize without ReLU as the conv loads x."""
    return args[0][c] * v + args[1][c]


@njit(inline="always", cache=True, fastmath=True)
def relu_mask_sums_epilogue(dst, rows, mr, c0, nc, tid, args):
    """dst = dy = dz * [a*x + b > 0] on the finished tile, and its per-task float64 s1, s2.
    Row by row, so the inner loop runs along contiguous channels and vectorizes."""
    x, a, b, s1, s2 = args
    C = dst.shape[3]
    d = dst.reshape(dst.size // C, C)
    for r in range(mr):
        p = rows[r]
        for j in range(nc):
            c = c0 + j
            xv = x[p, c]
            g = d[p, c] if a[c] * xv + b[c] > 0 else np.float32(0.0)
            d[p, c] = g
            s1[tid, c] += g
            s2[tid, c] += np.float64(g) * xv


@njit(inline="always", cache=True, fastmath=True)
def sums_epilogue(dst, rows, mr, c0, nc, tid, args):
    """Per-task float64 s1 += dy, s2 += dy * x over the finished tile of dst = dy, row by row."""
    x, s1, s2 = args
    C = dst.shape[3]
    d = dst.reshape(dst.size // C, C)
    for r in range(mr):
        p = rows[r]
        for j in range(nc):
            c = c0 + j
            g = np.float64(d[p, c])
            s1[tid, c] += g
            s2[tid, c] += g * x[p, c]


@njit(inline="always", cache=True, fastmath=True)
def relu_sums_epilogue(dst, rows, mr, c0, nc, tid, args):
    """Per-task float64 s1 += dz * [a*x + b > 0], s2 += that * x, from registers; dst unchanged."""
    x, a, b, s1, s2 = args
    C = dst.shape[3]
    d = dst.reshape(dst.size)
    for j in range(nc):
        c = c0 + j
        ac = a[c]
        bc = b[c]
        a1 = 0.0
        a2 = 0.0
        for r in range(mr):
            p = rows[r]
            xv = x[p, c]
            g = np.float64(d[p * C + c]) if ac * xv + bc > 0 else 0.0
            a1 += g
            a2 += g * xv
        s1[tid, c] += a1
        s2[tid, c] += a2


@njit(inline="always", cache=True, fastmath=True)
def bn_relu_grad_prologue(v, idx, c, args):
    """dx = a[c] * dz * [af[c]*x + bf[c] > 0] + p[c]*x + q[c]: the ReLU mask and the BN input
    gradient formed as the conv loads dz; x flat, same shape as dz."""
    x, af, bf, a, p, q = args
    xv = x[idx]
    g = v if af[c] * xv + bf[c] > 0 else np.float32(0.0)
    return a[c] * g + p[c] * xv + q[c]
