"""BN statistics (sub-BN1): per-channel mean and biased variance of an NHWC tensor.

View x [N, H, W, C] as X [M, C] with M = N*H*W rows. Per channel c:

    mean[c] = sum_r X[r, c] / M
    var[c]  = sum_r (X[r, c] - mean[c])^2 / M

Float32 sum(x) and sum(x*x) in one pass cancel catastrophically when |mean| >> std, so every
variant below is stable: it subtracts the mean (or a per-channel shift close to it) before
squaring, and carries the cross-tile sums in float64. The test data has mean 1000, std 1.

Parallel scheme (all variants): the bnff/kernels/rows.py scheme. The M rows are cut
into BLOCKS blocks, each accumulating its own [C] partials (vectorized along C), merged
serially at the end; a block walks its rows in float32 tiles of TILE_ROWS rows, flushed into
float64 once per tile. two_pass, shifted and shifted_pairs give reduce.py their per-element
sums; chan keeps its own loop (its tiles are read twice and merged by Chan's formula).

Kernels (called directly by schedules, on preallocated outputs; X is the [M, C] view):
    stats_two_pass(X, mean, var)   X f32 [M, C]; mean, var f32 [C] (written)
    stats_shifted(X, mean, var)    same signature
    stats_chan(X, mean, var)       same signature
    stats_shifted_pairs(X, mean, var)   same signature (the default)
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from bnff.kernels import reference as ref
from bnff.kernels.rows import (BLOCKS, TILE_ROWS, block_rows, channel_sums, merge_blocks,
                                    row_sum, tile_sums)
from bnff.kernels.stage import F32, ActivationStage, Cost


@njit(inline="always")
def _centered_square(args, r, j, t):
    """t[0, j] += (X[r, j] - mu[j])^2, args = (X, mu)."""
    d = args[0][r, j] - args[1][j]
    t[0, j] += d * d


@njit(inline="always")
def _shifted(args, r, j, t):
    """t[0, j] += d, t[1, j] += d^2 with d = X[r, j] - k[j], args = (X, k)."""
    d = args[0][r, j] - args[1][j]
    t[0, j] += d
    t[1, j] += d * d


@njit(inline="always")
def _shifted_pair(args, r, j, t):
    """As _shifted for rows r and r + h together (two row streams), args = (X, k, h)."""
    X, k, h = args
    d = X[r, j] - k[j]
    e = X[r + h, j] - k[j]
    t[0, j] += d + e
    t[1, j] += d * d + e * e


_row_sums = channel_sums(row_sum, 1)
_centered_square_sums = channel_sums(_centered_square, 1)
_shifted_sums = channel_sums(_shifted, 2)


@njit(inline="always")
def _shifted_moments(k, s, m, mean, var):
    """mean, var from s [2, C] float64 sums of d = x - k and d^2 over m rows."""
    s1 = np.empty(k.shape[0])
    s2 = np.empty(k.shape[0])
    merge_blocks(s[:, 0], 1.0 / m, s1)
    merge_blocks(s[:, 1], 1.0 / m, s2)
    for j in range(k.shape[0]):
        mean[j] = k[j] + s1[j]
        var[j] = s2[j] - s1[j] * s1[j]


# 1. two-pass: reads X twice; pass 1 sums x, pass 2 sums (x - mean)^2.
@njit(fastmath=True, cache=True)
def stats_two_pass(X, mean, var):
    """Two passes over X: the textbook mean, then the centered sum of squares."""
    m, c = X.shape
    mu = np.empty(c)
    merge_blocks(_row_sums((X,), m, c)[:, 0], 1.0 / m, mu)
    mu32 = np.empty(c, np.float32)
    for j in range(c):
        mu32[j] = mu[j]
    sq = np.empty(c)
    merge_blocks(_centered_square_sums((X, mu32), m, c)[:, 0], 1.0 / m, sq)
    for j in range(c):  # the float32 rounding of the mean adds (mu - mu32)^2 to the centered sum
        dm = mu[j] - mu32[j]
        mean[j] = mu[j]
        var[j] = sq[j] - dm * dm


# 2. shifted one-pass: sums of d = x - K and d^2 with K = X[0] (close to the mean).
@njit(fastmath=True, cache=True)
def stats_shifted(X, mean, var):
    """One pass over X: float32 tile sums of the data shifted by its first row, in float64."""
    m, c = X.shape
    k = X[0].copy()
    _shifted_moments(k, _shifted_sums((X, k), m, c), m, mean, var)


# 3. Chan one-pass: per tile (count, mean, M2) from the cache-resident tile, merged with Chan.
@njit(parallel=True, fastmath=True, cache=True)
def stats_chan(X, mean, var):
    """One pass over X: each tile's corrected two-pass (count, mean, M2) from L1, merged by Chan."""
    m, c = X.shape
    nb = BLOCKS
    rows = max(TILE_ROWS, 4096 // c)  # a tile of <= 16 KiB stays in L1 for its second read
    pn = np.empty(nb)
    pm = np.empty((nb, c))
    pq = np.empty((nb, c))
    for b in prange(nb):
        r0, r1 = block_rows(b, nb, m)
        bm = np.zeros(c)
        bq = np.zeros(c)
        t = np.empty(c, np.float32)
        q = np.empty(c, np.float32)
        q1 = np.empty(c, np.float32)
        n = 0.0
        for s in range(r0, r1, rows):
            e = min(s + rows, r1)
            nt = e - s
            t[:] = 0.0
            for r in range(s, e):
                for j in range(c):
                    t[j] += X[r, j]
            for j in range(c):
                t[j] /= nt
            q1[:] = 0.0
            q[:] = 0.0
            for r in range(s, e):
                for j in range(c):
                    d = X[r, j] - t[j]
                    q1[j] += d
                    q[j] += d * d
            w = nt / (n + nt)
            for j in range(c):  # Chan: merge (n, bm, bq) with the tile (nt, tm, tq)
                d1 = np.float64(q1[j]) / nt  # corrects t, the float32-rounded tile mean
                tm = t[j] + d1
                tq = q[j] - d1 * q1[j]
                delta = tm - bm[j]
                bm[j] += delta * w
                bq[j] += tq + delta * delta * n * w
            n += nt
        pn[b] = n
        pm[b] = bm
        pq[b] = bq
    for j in range(c):
        n = 0.0
        mu = 0.0
        m2 = 0.0
        for b in range(nb):
            if pn[b] == 0:
                continue
            w = pn[b] / (n + pn[b])
            delta = pm[b, j] - mu
            mu += delta * w
            m2 += pq[b, j] + delta * delta * n * w
            n += pn[b]
        mean[j] = mu
        var[j] = m2 / m


# 4. shifted pairs: as 2, each block reading its two halves side by side (two row streams).
@njit(parallel=True, fastmath=True, cache=True)
def stats_shifted_pairs(X, mean, var):
    """As shifted, with rows r and r + half of a block summed together: two streams per thread."""
    m, c = X.shape
    nb = BLOCKS
    k = X[0].copy()
    part = np.empty((nb, 2, c))
    for b in prange(nb):
        r0, r1 = block_rows(b, nb, m)
        h = (r1 - r0) // 2
        acc = np.zeros((2, c))
        t = np.empty((2, c), np.float32)
        tile_sums(_shifted_pair, (X, k, h), r0, r0 + h, acc, t)
        tile_sums(_shifted, (X, k), r0 + 2 * h, r1, acc, t)  # the odd row out
        part[b] = acc
    _shifted_moments(k, part, m, mean, var)


class BNStats(ActivationStage):
    """Shape keys: mb, ic, ih, iw. Inputs x [mb, ih, iw, ic]; outputs mean, var [ic]."""

    name = "bn_stats"
    variants = {"two_pass": stats_two_pass, "shifted": stats_shifted, "chan": stats_chan,
                "shifted_pairs": stats_shifted_pairs}
    default = "shifted_pairs"

    def make_inputs(self, rng):
        s = self.shape
        x = rng.standard_normal((s["mb"], s["ih"], s["iw"], s["ic"]), dtype=np.float32)
        return {"x": x + np.float32(1000.0)}  # mean 1000, std 1: the cancellation stress case

    def allocate_outputs(self):
        c = self.shape["ic"]
        return {"mean": np.empty(c, np.float32), "var": np.empty(c, np.float32)}

    def run(self, variant, inputs, outputs):
        m, c = self._size()
        self.variants[variant](inputs["x"].reshape(m, c), outputs["mean"], outputs["var"])

    def reference(self, inputs):
        mean, var = ref.batchnorm_stats(np.moveaxis(inputs["x"], 3, 1).astype(np.float64))
        return {"mean": mean, "var": var}

    def cost(self, variant):
        m, c = self._size()
        passes = 2 if variant == "two_pass" else 1
        return Cost(flops=4 * m * c, bytes_read=passes * m * c * F32, bytes_written=2 * c * F32)
