"""BN statistics (sub-BN1): per-channel mean and biased variance of an NHWC tensor.

View x [N, H, W, C] as X [M, C] with M = N*H*W rows. Per channel c:

    mean[c] = sum_r X[r, c] / M
    var[c]  = sum_r (X[r, c] - mean[c])^2 / M

Float32 sum(x) and sum(x*x) in one pass cancel catastrophically when |mean| >> std, so every
variant below is stable: it subtracts the mean (or a per-channel shift close to it) before
squaring, and carries the cross-tile sums in float64. The test data has mean 1000, std 1.

Parallel scheme (all variants): the M rows are cut into BLOCKS blocks (prange hands each
thread a contiguous run of them, so a thread streams one range of rows); each block
accumulates into its own [C] partials (vectorized along C), and the partials are merged
serially at the end. A block walks its rows in tiles of TILE_ROWS rows: float32 sums over a
tile (short enough to be accurate), flushed into float64 once per tile.

Kernels (called directly by schedules, on preallocated outputs; X is the [M, C] view):
    stats_two_pass(X, mean, var)   X f32 [M, C]; mean, var f32 [C] (written)
    stats_shifted(X, mean, var)    same signature
    stats_chan(X, mean, var)       same signature
    stats_shifted_pairs(X, mean, var)   same signature (the default)
Shared with the other [M, C] kernels: BLOCKS, TILE_ROWS, block_rows(b, nb, m) -> (r0, r1),
merge_blocks(part [B, C] f64, scale, out [C]).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from bnff.kernels import reference as ref
from bnff.kernels.stage import F32, Cost, Stage

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


# 1. two-pass: reads X twice; pass 1 sums x, pass 2 sums (x - mean)^2.
@njit(parallel=True, fastmath=True, cache=True)
def stats_two_pass(X, mean, var):
    """Two passes over X: the textbook mean, then the centered sum of squares."""
    m, c = X.shape
    nb = BLOCKS
    part = np.empty((nb, c))
    for b in prange(nb):
        r0, r1 = block_rows(b, nb, m)
        acc = np.zeros(c)
        t = np.empty(c, np.float32)
        for s in range(r0, r1, TILE_ROWS):
            t[:] = 0.0
            for r in range(s, min(s + TILE_ROWS, r1)):
                for j in range(c):
                    t[j] += X[r, j]
            for j in range(c):
                acc[j] += t[j]
        part[b] = acc
    mu = np.empty(c)
    merge_blocks(part, 1.0 / m, mu)
    mu32 = np.empty(c, np.float32)
    for j in range(c):
        mu32[j] = mu[j]
    for b in prange(nb):
        r0, r1 = block_rows(b, nb, m)
        acc = np.zeros(c)
        t = np.empty(c, np.float32)
        for s in range(r0, r1, TILE_ROWS):
            t[:] = 0.0
            for r in range(s, min(s + TILE_ROWS, r1)):
                for j in range(c):
                    d = X[r, j] - mu32[j]
                    t[j] += d * d
            for j in range(c):
                acc[j] += t[j]
        part[b] = acc
    sq = np.empty(c)
    merge_blocks(part, 1.0 / m, sq)
    for j in range(c):  # the float32 rounding of the mean adds (mu - mu32)^2 to the centered sum
        dm = mu[j] - mu32[j]
        mean[j] = mu[j]
        var[j] = sq[j] - dm * dm


# 2. shifted one-pass: sums of d = x - K and d^2 with K = X[0] (close to the mean).
@njit(parallel=True, fastmath=True, cache=True)
def stats_shifted(X, mean, var):
    """One pass over X: float32 tile sums of the data shifted by its first row, in float64."""
    m, c = X.shape
    nb = BLOCKS
    k = np.empty(c, np.float32)
    for j in range(c):
        k[j] = X[0, j]
    p1 = np.empty((nb, c))
    p2 = np.empty((nb, c))
    for b in prange(nb):
        r0, r1 = block_rows(b, nb, m)
        a1 = np.zeros(c)
        a2 = np.zeros(c)
        t1 = np.empty(c, np.float32)
        t2 = np.empty(c, np.float32)
        for s in range(r0, r1, TILE_ROWS):
            t1[:] = 0.0
            t2[:] = 0.0
            for r in range(s, min(s + TILE_ROWS, r1)):
                for j in range(c):
                    d = X[r, j] - k[j]
                    t1[j] += d
                    t2[j] += d * d
            for j in range(c):
                a1[j] += t1[j]
                a2[j] += t2[j]
        p1[b] = a1
        p2[b] = a2
    s1 = np.empty(c)
    s2 = np.empty(c)
    merge_blocks(p1, 1.0 / m, s1)
    merge_blocks(p2, 1.0 / m, s2)
    for j in range(c):
        mean[j] = k[j] + s1[j]
        var[j] = s2[j] - s1[j] * s1[j]


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
    k = np.empty(c, np.float32)
    for j in range(c):
        k[j] = X[0, j]
    p1 = np.empty((nb, c))
    p2 = np.empty((nb, c))
    for b in prange(nb):
        r0, r1 = block_rows(b, nb, m)
        h = (r1 - r0) // 2
        a1 = np.zeros(c)
        a2 = np.zeros(c)
        t1 = np.empty(c, np.float32)
        t2 = np.empty(c, np.float32)
        for s in range(r0, r0 + h, TILE_ROWS):
            t1[:] = 0.0
            t2[:] = 0.0
            for r in range(s, min(s + TILE_ROWS, r0 + h)):
                for j in range(c):
                    d = X[r, j] - k[j]
                    e = X[r + h, j] - k[j]
                    t1[j] += d + e
                    t2[j] += d * d + e * e
            for j in range(c):
                a1[j] += t1[j]
                a2[j] += t2[j]
        for r in range(r0 + 2 * h, r1):  # the odd row out
            for j in range(c):
                d = X[r, j] - k[j]
                a1[j] += d
                a2[j] += d * d
        p1[b] = a1
        p2[b] = a2
    s1 = np.empty(c)
    s2 = np.empty(c)
    merge_blocks(p1, 1.0 / m, s1)
    merge_blocks(p2, 1.0 / m, s2)
    for j in range(c):
        mean[j] = k[j] + s1[j]
        var[j] = s2[j] - s1[j] * s1[j]


class BNStats(Stage):
    """Shape keys: mb, ic, ih, iw. Inputs x [mb, ih, iw, ic]; outputs mean, var [ic]."""

    name = "bn_stats"
    variants = {"two_pass": stats_two_pass, "shifted": stats_shifted, "chan": stats_chan,
                "shifted_pairs": stats_shifted_pairs}
    default = "shifted_pairs"
    examples = ("mb2ic256ih7iw7", "mb1ic64ih14iw14", "mb2ic3ih5iw3")

    def _size(self):
        s = self.shape
        return s["mb"] * s["ih"] * s["iw"], s["ic"]

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
