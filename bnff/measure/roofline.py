"""The limits of this machine per thread count, measured by the suite (`bnff roofline` prints
them, `bnff micro` measures them around its stages).

    STREAM (Numba, prange, float64 arrays of --array-mib each, default 8x the LLC):
        copy  a = b         16 B/elem      scale a = s*b        16 B/elem
        add   a = b + c     24 B/elem      triad a = b + s*c    24 B/elem
      (STREAM's counting: write-allocate reads not counted; best of --reps, as STREAM reports)
    FMA peak: each thread runs CHAINS independent vector FMA chains (<W x float>, W = 16 with
      AVX-512 else 8) in registers: 2 * CHAINS * W FLOP per iteration.
    sgemm: numpy float32 matmul n x n in a child process whose BLAS is limited to the thread
      count by OPENBLAS/OMP/MKL/BLIS_NUM_THREADS: 2 n^3 FLOP (the child in a session of its
      own: a Ctrl-C at the terminal reaches only the command, which ends it).

measure(threads, array_mib, gemm_n, reps) -> dict of the figures above for one thread count,
with the sizes and repetitions they were measured with (each figure is a best of reps).
"""
from __future__ import annotations

import os
import subprocess
import sys

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from bnff.measure.machine import llc_bytes
from bnff.measure.measurement import best_of

CHAINS = 12  # independent FMA chains per thread: > latency x pipes on current x86 cores
WIDTH = 16 if llvm.get_host_cpu_features().get("avx512f", False) else 8
FIGURES = ["copy_gbps", "scale_gbps", "add_gbps", "triad_gbps", "fma_gflops", "sgemm_gflops"]
COLUMNS = ["threads"] + FIGURES + ["array_mib", "gemm_n", "reps"]  # of a measure() row


@njit(parallel=True, fastmath=True)
def stream_copy(a, b, c, s):
    for i in prange(a.size):
        a[i] = b[i]


@njit(parallel=True, fastmath=True)
def stream_scale(a, b, c, s):
    for i in prange(a.size):
        a[i] = s * b[i]


@njit(parallel=True, fastmath=True)
def stream_add(a, b, c, s):
    for i in prange(a.size):
        a[i] = b[i] + c[i]


@njit(parallel=True, fastmath=True)
def stream_triad(a, b, c, s):
    for i in prange(a.size):
        a[i] = b[i] + s * c[i]


STREAM = {"copy": (stream_copy, 16), "scale": (stream_scale, 16),
          "add": (stream_add, 24), "triad": (stream_triad, 24)}


@intrinsic
def _fma_chains(typingctx, n):
    """float32 sum of CHAINS vector accumulators after n >= 1 rounds of acc = fma(acc, a, b)."""
    def codegen(context, builder, sig, args):
        vt = ir.VectorType(ir.FloatType(), WIDTH)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt, vt]),
                                             f"llvm.fma.v{WIDTH}f32")
        splat = lambda v: ir.Constant(vt, [v] * WIDTH)
        a, b = splat(0.999999), splat(1e-6)
        entry = builder.block
        loop = builder.append_basic_block("fma.loop")
        done = builder.append_basic_block("fma.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        i = builder.phi(ir.IntType(64))
        accs = [builder.phi(vt) for _ in range(CHAINS)]
        new = [builder.call(fma, [acc, a, b]) for acc in accs]
        i2 = builder.add(i, ir.Constant(ir.IntType(64), 1))
        i.add_incoming(ir.Constant(ir.IntType(64), 0), entry)
        i.add_incoming(i2, loop)
        for k, (acc, v) in enumerate(zip(accs, new)):
            acc.add_incoming(splat(1.0 + k), entry)
            acc.add_incoming(v, loop)
        builder.cbranch(builder.icmp_signed("<", i2, args[0]), loop, done)
        builder.position_at_end(done)
        total = new[0]
        for v in new[1:]:
            total = builder.fadd(total, v)
        s = builder.extract_element(total, ir.Constant(ir.IntType(32), 0))
        for lane in range(1, WIDTH):
            s = builder.fadd(s, builder.extract_element(total, ir.Constant(ir.IntType(32), lane)))
        return s
    return types.float32(types.int64), codegen


@njit(parallel=True)
def fma_peak_kernel(threads, n, out):
    for t in prange(threads):
        out[t] = _fma_chains(n)


def stream(array_mib: float, reps: int) -> dict:
    """GB/s of the four STREAM kernels at the current Numba thread count."""
    n = max(1024, int(array_mib * (1 << 20)) // 8)
    a, b, c = np.zeros(n), np.full(n, 1.0), np.full(n, 2.0)
    out = {}
    for name, (fn, per_elem) in STREAM.items():
        out[f"{name}_gbps"] = per_elem * n / best_of(lambda: fn(a, b, c, 3.0), reps) / 1e9
    return out


def fma_peak(threads: int, reps: int, seconds: float = 0.1) -> float:
    """GFLOP/s of `threads` threads each running CHAINS register-resident FMA chains."""
    out = np.zeros(threads, np.float32)
    n = 1 << 16
    while True:  # grow n until one call takes `seconds`
        t = best_of(lambda: fma_peak_kernel(threads, n, out), 1)
        if t >= seconds / 4 or n >= 1 << 34:
            break
        n *= 4
    n = max(1, int(n * seconds / max(t, 1e-9)))
    t = best_of(lambda: fma_peak_kernel(threads, n, out), reps)
    return 2.0 * CHAINS * WIDTH * n * threads / t / 1e9


_GEMM = """
import sys, time, numpy as np
n, reps = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32)
b = rng.standard_normal((n, n), dtype=np.float32)
c = np.empty((n, n), np.float32)
np.matmul(a, b, out=c)
best = float("inf")
for _ in range(reps):
    t0 = time.perf_counter(); np.matmul(a, b, out=c); best = min(best, time.perf_counter() - t0)
print(2.0 * n ** 3 / best / 1e9)
"""


def sgemm(threads: int, n: int, reps: int) -> float:
    """GFLOP/s of numpy's float32 matmul n x n with BLAS limited to `threads` threads."""
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        env[var] = str(threads)
    p = subprocess.run([sys.executable, "-c", _GEMM, str(n), str(reps)], env=env,
                       capture_output=True, text=True, start_new_session=True)
    if p.returncode != 0:
        raise RuntimeError(f"sgemm child process failed: {p.stderr.strip()[-500:]}")
    return float(p.stdout.strip())


def default_array_mib() -> float:
    return 8 * llc_bytes() / (1 << 20)


def measure(threads: int, array_mib: float, gemm_n: int, reps: int) -> dict:
    """All figures at `threads` threads (Numba's thread count is restored afterwards)."""
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        row = stream(array_mib, reps)
        row["fma_gflops"] = fma_peak(threads, reps)
    finally:
        numba.set_num_threads(before)
    row["sgemm_gflops"] = sgemm(threads, gemm_n, reps)
    return {"threads": threads, **row, "array_mib": round(array_mib, 3), "gemm_n": gemm_n,
            "reps": reps}
