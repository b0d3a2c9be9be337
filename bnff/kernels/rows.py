"""The row-block loops of the [M, C] streaming kernels, written once and specialized by the
per-row or per-element function they are given: the per-channel reductions (BN statistics, BN
backward sums, Caffe's Scale backward, a conv's bias gradient) and the elementwise passes (BN
normalize and its fused forms, BN's input gradient, Caffe's Scale forward).

View an NHWC tensor as X [M, C], M = N*H*W rows. A reduction computes K per-channel sums

    S[k, c] = sum_r f_k(r, c)          (f_k read from one or more [M, C] arrays at row r)

Parallel scheme: the M rows are cut into BLOCKS blocks (prange hands each thread a contiguous
run of them, so a thread streams one range of rows); each block accumulates into its own
[K, C] partials (vectorized along C), and the partials are merged serially at the end
(`merge_blocks`). A block walks its rows in tiles of TILE_ROWS rows: float32 sums over a tile
(short enough to be accurate), flushed into float64 once per tile, so the float64 adds cost
1/TILE_ROWS of the float32 ones.

Elementwise passes. `row_blocks(row)` is the same prange over the BLOCKS row blocks around a
per-row function `row(args, r)` (@njit(inline="always"), its loop over the row's C channels
inside it, so each kernel keeps the inner loop it vectorizes best: 2-D indexing for C-contiguous
[M, C] arrays, 1-D row views for flat arrays with row strides).

Per-element functions. `elem(args, r, j, t)` adds f_k(r, j) into t[k, j] for each k (t the
float32 [K, C] tile; args a tuple of the arrays it reads, and writes: an elementwise output
computed on the way, e.g. a masked gradient, is stored there too). It is an
@njit(inline="always") function, as is `tile_sums`, so the kernel `channel_sums(elem, K)`
makes compiles to the loop it would have written by hand: the prange is its parallel region,
and the j loop, with elem inlined, is vectorized along C (inspect_asm on znver5: the same
packed zmm subtract, FMA and add as the hand-written loops it replaced). A store indexes the
tuple, `args[i][r, j] = v`, never an array unpacked from it: Numba's dead-code elimination
inside a prange ties an array to the kernel's arguments through indexing but not through
tuple unpacking, and drops the stores to an unpacked one (the output is then never written;
tests/test_stages.py catches it).

    BLOCKS, TILE_ROWS
    block_rows(b, nb, m) -> (r0, r1)          rows of block b of nb
    merge_blocks(part [B, C] f64, scale, out) out[j] = scale * sum_b part[b, j]
    tile_sums(elem, args, r0, r1, acc, t)     rows r0 .. r1 into acc [K, C] f64, tile t f32
    channel_sums(elem, K) -> sums             the parallel kernel sums(args, m, c) -> part,
                                              [BLOCKS, K, C] float64 per-block partials
    row_blocks(row) -> run                    the parallel pass run(args, m): row(args, r)
                                              for every row r < m, in BLOCKS blocks
    row_sum(args, r, j, t)                    the plain sum, args = (X,): t[0, j] += X[r, j]
    channel_sum(X, out)                       out[c] = sum_r X[r, c] (one pass over X)
    dy_products(args, r, j, t)                BN backward's sum(dy), sum(dy * (x - u)),
                                              args = (DY, X, u)
    dy_product_sums                           its kernel, channel_sums(dy_products, 2)
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from bnff.kernels.conv.conv_common import stable

TILE_ROWS = 32  # rows per float32 tile before a float64 flush
BLOCKS = 4 * numba.config.NUMBA_NUM_THREADS  # row blocks; a compile-time constant keeps cache=True


@njit(inline="always")
def block_rows(b, nb, m):
    """Rows [r0, r1) of block b out of nb over m rows."""
    return b * m // nb, (b + 1) * m // nb


@njit(cache=True)
def merge_blocks(part, scale, out):
    """out[j] = scale * sum_b part[b, j]. A separate serial function: inside parallel=True every
    array expression becomes its own parallel region, a thread wake-up per channel."""
    for j in range(part.shape[1]):
        s = 0.0
        for b in range(part.shape[0]):
            s += part[b, j]
        out[j] = s * scale


@njit(inline="always")
def tile_sums(elem, args, r0, r1, acc, t):
    """acc[k, j] += sum over rows r0 .. r1 of what elem(args, r, j, t) adds into t[k, j]:
    float32 tiles of TILE_ROWS rows, each flushed into the float64 acc."""
    nk, c = acc.shape
    for s in range(r0, r1, TILE_ROWS):
        t[:] = 0.0
        for r in range(s, min(s + TILE_ROWS, r1)):
            for j in range(c):
                elem(args, r, j, t)
        for i in range(nk):
            for j in range(c):
                acc[i, j] += t[i, j]


def channel_sums(elem, k):
    """The parallel kernel sums(args, m, c) -> part: the k per-channel sums elem adds over m
    rows, as [BLOCKS, k, c] float64 per-block partials (merge them with
    merge_blocks(part[:, i], ...)). elem is compiled in, and made `stable` so the kernel hits
    Numba's disk cache in a new process."""
    stable(elem)

    @njit(parallel=True, fastmath=True, cache=True)
    def sums(args, m, c):
        part = np.empty((BLOCKS, k, c))
        for b in prange(BLOCKS):
            r0, r1 = block_rows(b, BLOCKS, m)
            acc = np.zeros((k, c))
            tile_sums(elem, args, r0, r1, acc, np.empty((k, c), np.float32))
            part[b] = acc
        return part
    return sums


def row_blocks(row):
    """The parallel pass run(args, m): row(args, r) for every row r < m, the rows cut into BLOCKS
    contiguous blocks, one prange iteration each. row is compiled in and made `stable` (as in
    channel_sums); it stores through the tuple, args[i][r, j] = v."""
    stable(row)

    @njit(parallel=True, fastmath=True, cache=True)
    def run(args, m):
        for b in prange(BLOCKS):
            r0, r1 = block_rows(b, BLOCKS, m)
            for r in range(r0, r1):
                row(args, r)
    return run


@njit(inline="always")
def row_sum(args, r, j, t):
    """The plain sum: t[0, j] += X[r, j], args = (X,)."""
    t[0, j] += args[0][r, j]


_row_sums = channel_sums(row_sum, 1)


@njit(inline="always")
def dy_products(args, r, j, t):
    """t[0, j] += dy, t[1, j] += dy * (x - u[j]) with dy = DY[r, j], x = X[r, j], args =
    (DY, X, u): BN backward's sum(dy) and sum(dy * (x - u)), u the mean or a shift."""
    DY, X, u = args
    g = DY[r, j]
    t[0, j] += g
    t[1, j] += g * (X[r, j] - u[j])


dy_product_sums = channel_sums(dy_products, 2)


@njit(cache=True)
def channel_sum(X, out):
    """out[c] = sum_r X[r, c] (float64 partials, out float32 or float64): reads X once."""
    m, c = X.shape
    merge_blocks(_row_sums((X,), m, c)[:, 0], 1.0, out)
