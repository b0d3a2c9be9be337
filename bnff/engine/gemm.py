"""Single-precision GEMM building blocks: BLIS-style packing, a register-blocked MR x NR
micro-kernel, and a packed parallel sgemm that exercises them.

    C[m, n] (+)= sum_k A[m, k] * B[k, n]

The loops are split (Goto/BLIS) so that each operand sits in one level of the memory
hierarchy while it is reused:

    B packed once into NR-wide panels, Bp[n // NR][k][n % NR]      (read from L2/L3)
    for ic in M step MC:                     (parallel: one row block per task)
      for pc in K step KC:
        pack A[ic:ic+MC, pc:pc+KC] row by row, Ap[r][k], rows KC apart              (L2)
        for jr in N step NR:                 one KC x NR slice of a B panel   (L1)
          for ir in MC step MR:              micro-kernel, an MR x NR tile of C in registers:
            for p in KC:  tile[r, :] += broadcast(Ap[ir + r][p]) * Bp[jr, pc + p, :]

MR = 6, NR = 2 W (16 with W = 8 lanes, 32 with W = 16, bnff/engine/vec.py): the tile is 6 x 2
vectors = 12 accumulator registers, plus two B vectors and one broadcast A value; that fits the
16 vector registers of AVX2 (and of any ISA with 16 or more), and each k step does 12 FMAs for
2 vector loads and 6 broadcasts. KC = 4096 / NR keeps the KC x NR B slice at 16 KiB, half of
a 32 KiB L1, at either width.

Why explicit vectors: LLVM splits a register tile written as nested loops over a small local
array into scalars before vectorizing (scalar vfmadd231ss, ~6 GFLOP/s). Here the tile is twelve
local variables of type `f32v` (bnff/engine/vec.py, LLVM `<W x float>`), so the accumulators
stay in registers.
`tile` and `ukernel` are inlined at the Numba level: as calls, each passed its arrays with
atomic reference-count updates, and the shared arrays' counters bounced between cores.
The strides of the packed A are compile-time constants (`make_tile`), so the six broadcasts
are one pointer plus fixed offsets; with run-time strides LLVM kept six index registers and
the kernel lost a fifth of its speed (78 vs 98 GFLOP/s in L1 on one Zen 3 core).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from bnff.engine.vec import W, prefetch, vadd, vbroadcast, vfma, vload, vstore, vzero

MR, NR = 6, 2 * W  # register tile: MR rows x NR columns = MR x 2 vectors
KC, MC = 4096 // NR, 144  # cache blocking: KC x NR B slice in L1, MC x KC packed A block in L2


def make_tile(rs, ps):
    """The micro-kernel and its edge-tile wrapper for packed A(r, p) = ap[ai + r*rs + p*ps], with
    the strides compile-time constants (one pointer and fixed offsets address the six rows)."""

    @njit(fastmath=True, inline="always")
    def ukernel(kc, ap, ai, bp, bi, c, o0, o1, o2, o3, o4, o5, accumulate):
        """One MR x NR tile, rows r = 0..5:
        c.flat[o_r : o_r + NR] (+)= sum_p ap[ai + r*rs + p*ps] * bp[bi + p*NR : bi + p*NR + NR]."""
        c00 = vzero(); c01 = vzero(); c10 = vzero(); c11 = vzero(); c20 = vzero(); c21 = vzero()
        c30 = vzero(); c31 = vzero(); c40 = vzero(); c41 = vzero(); c50 = vzero(); c51 = vzero()
        if accumulate:  # the tile of c is needed after the loop: start fetching it now
            prefetch(c, o0); prefetch(c, o0 + NR - 1); prefetch(c, o1); prefetch(c, o1 + NR - 1)
            prefetch(c, o2); prefetch(c, o2 + NR - 1); prefetch(c, o3); prefetch(c, o3 + NR - 1)
            prefetch(c, o4); prefetch(c, o4 + NR - 1); prefetch(c, o5); prefetch(c, o5 + NR - 1)
        for _ in range(kc):
            b0 = vload(bp, bi)
            b1 = vload(bp, bi + W)
            a = vbroadcast(ap, ai)
            c00 = vfma(a, b0, c00); c01 = vfma(a, b1, c01)
            a = vbroadcast(ap, ai + 1 * rs)
            c10 = vfma(a, b0, c10); c11 = vfma(a, b1, c11)
            a = vbroadcast(ap, ai + 2 * rs)
            c20 = vfma(a, b0, c20); c21 = vfma(a, b1, c21)
            a = vbroadcast(ap, ai + 3 * rs)
            c30 = vfma(a, b0, c30); c31 = vfma(a, b1, c31)
            a = vbroadcast(ap, ai + 4 * rs)
            c40 = vfma(a, b0, c40); c41 = vfma(a, b1, c41)
            a = vbroadcast(ap, ai + 5 * rs)
            c50 = vfma(a, b0, c50); c51 = vfma(a, b1, c51)
            ai += ps
            bi += NR
        if accumulate:
            c00 = vadd(c00, vload(c, o0)); c01 = vadd(c01, vload(c, o0 + W))
            c10 = vadd(c10, vload(c, o1)); c11 = vadd(c11, vload(c, o1 + W))
            c20 = vadd(c20, vload(c, o2)); c21 = vadd(c21, vload(c, o2 + W))
            c30 = vadd(c30, vload(c, o3)); c31 = vadd(c31, vload(c, o3 + W))
            c40 = vadd(c40, vload(c, o4)); c41 = vadd(c41, vload(c, o4 + W))
            c50 = vadd(c50, vload(c, o5)); c51 = vadd(c51, vload(c, o5 + W))
        vstore(c, o0, c00); vstore(c, o0 + W, c01)
        vstore(c, o1, c10); vstore(c, o1 + W, c11)
        vstore(c, o2, c20); vstore(c, o2 + W, c21)
        vstore(c, o3, c30); vstore(c, o3 + W, c31)
        vstore(c, o4, c40); vstore(c, o4 + W, c41)
        vstore(c, o5, c50); vstore(c, o5 + W, c51)

    @njit(fastmath=True, inline="always")
    def tile(kc, ap, ai, bp, bi, c, rows, mr, col, ldc, nr, accumulate, scratch):
        """An mr x nr (<= MR x NR) tile of c.flat[rows[r] * ldc + col + j]: the micro-kernel
        straight into c when the tile is full, else into `scratch` (MR*NR floats), copied out."""
        if mr == MR and nr == NR:
            ukernel(kc, ap, ai, bp, bi, c, rows[0] * ldc + col, rows[1] * ldc + col,
                    rows[2] * ldc + col, rows[3] * ldc + col, rows[4] * ldc + col,
                    rows[5] * ldc + col, accumulate)
            return
        ukernel(kc, ap, ai, bp, bi, scratch, 0, NR, 2 * NR, 3 * NR, 4 * NR, 5 * NR, False)
        for r in range(mr):
            o = rows[r] * ldc + col
            for j in range(nr):
                if accumulate:
                    c.flat[o + j] += scratch[r * NR + j]
                else:
                    c.flat[o + j] = scratch[r * NR + j]

    return tile


tile = make_tile(KC, 1)          # A packed row by row, rows KC apart (conv forward, backward-data)
tile_kmajor = make_tile(1, MR)   # A packed k-major in MR-row micro-panels (conv backward-weights)


@njit(parallel=True, fastmath=True, cache=True)
def pack_b(b, bp):
    """B[k, n] -> Bp[n // NR, k, n % NR], zero-padding the last panel."""
    k, n = b.shape
    for jp in prange(bp.shape[0]):
        n0 = jp * NR
        nr = min(NR, n - n0)
        for p in range(k):
            for j in range(nr):
                bp[jp, p, j] = b[p, n0 + j]
            for j in range(nr, NR):
                bp[jp, p, j] = 0.0


@njit(fastmath=True, cache=True)
def pack_a(a, r0, mc, p0, kc, ap):
    """A[r0:r0+mc, p0:p0+kc] -> ap[r * KC + p], zero rows up to a multiple of MR."""
    for r in range(mc):
        for p in range(kc):
            ap[r * KC + p] = a[r0 + r, p0 + p]
    ap[mc * KC:(mc + MR - 1) // MR * MR * KC] = 0.0


def row_blocks(m: int, nthreads: int) -> int:
    """Number of row blocks of at most about MC rows, a multiple of nthreads so tasks balance."""
    nb = -(-m // MC)
    return -(-nb // nthreads) * nthreads


@njit(parallel=True, fastmath=True, cache=True)
def sgemm(a, b, c, nblocks):
    """c = a @ b for C-contiguous float32 matrices, parallel over `nblocks` row blocks."""
    m, k = a.shape
    n = b.shape[1]
    npan = (n + NR - 1) // NR
    bp = np.empty((npan, k, NR), np.float32)
    pack_b(b, bp)
    step = ((m + nblocks - 1) // nblocks + MR - 1) // MR * MR
    for blk in prange(nblocks):
        r0 = blk * step
        mc = min(step, m - r0)
        if mc <= 0:
            continue
        ap = np.empty((mc + MR - 1) // MR * MR * KC, np.float32)
        rows = np.empty(MR, np.int64)
        scratch = np.empty(MR * NR, np.float32)
        for p0 in range(0, k, KC):
            kc = min(KC, k - p0)
            pack_a(a, r0, mc, p0, kc, ap)
            for jp in range(npan):
                for ir in range(0, mc, MR):
                    mr = min(MR, mc - ir)
                    for i in range(MR):
                        rows[i] = r0 + ir + min(i, mr - 1)
                    tile(kc, ap, ir * KC, bp, (jp * k + p0) * NR, c, rows, mr, jp * NR, n,
                         min(NR, n - jp * NR), p0 > 0, scratch)
