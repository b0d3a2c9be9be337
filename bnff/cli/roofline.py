"""`bnff roofline`: the limits of this machine per thread count, measured by the suite.

    STREAM (Numba, prange, float64 arrays of --array-mib each, default 8x the LLC):
        copy  a = b         16 B/elem      scale a = s*b        16 B/elem
        add   a = b + c     24 B/elem      triad a = b + s*c    24 B/elem
      (STREAM's counting: write-allocate reads not counted; best of --reps, as STREAM reports)
    FMA peak: each thread runs CHAINS independent vector FMA chains (<W x float>, W = 16 with
      AVX-512 else 8) in registers: 2 * CHAINS * W FLOP per iteration.
    sgemm: numpy float32 matmul n x n in a child process whose BLAS is limited to the thread
      count by OPENBLAS/OMP/MKL/BLIS_NUM_THREADS: 2 n^3 FLOP.

measure(threads, array_mib, gemm_n, reps) -> dict of the figures above for one thread count.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from tabulate import tabulate

from bnff.cli.args import UserError, check_memory, positive_float, positive_int, thread_list
from bnff.measure.machine import CsvLog, latest, llc_bytes, machine_info, same_machine

CHAINS = 12  # independent FMA chains per thread: > latency x pipes on current x86 cores
WIDTH = 16 if llvm.get_host_cpu_features().get("avx512f", False) else 8
FIGURES = ["copy_gbps", "scale_gbps", "add_gbps", "triad_gbps", "fma_gflops", "sgemm_gflops"]


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


def _best(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def stream(array_mib: float, reps: int) -> dict:
    """GB/s of the four STREAM kernels at the current Numba thread count."""
    n = max(1024, int(array_mib * (1 << 20)) // 8)
    a, b, c = np.zeros(n), np.full(n, 1.0), np.full(n, 2.0)
    out = {}
    for name, (fn, per_elem) in STREAM.items():
        out[f"{name}_gbps"] = per_elem * n / _best(lambda: fn(a, b, c, 3.0), reps) / 1e9
    return out


def fma_peak(threads: int, reps: int, seconds: float = 0.1) -> float:
    """GFLOP/s of `threads` threads each running CHAINS register-resident FMA chains."""
    out = np.zeros(threads, np.float32)
    n = 1 << 16
    while True:  # grow n until one call takes `seconds`
        t = _best(lambda: fma_peak_kernel(threads, n, out), 1)
        if t >= seconds / 4 or n >= 1 << 34:
            break
        n *= 4
    n = max(1, int(n * seconds / max(t, 1e-9)))
    t = _best(lambda: fma_peak_kernel(threads, n, out), reps)
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
                       capture_output=True, text=True)
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
    return {"threads": threads, **row, "array_mib": round(array_mib, 3), "gemm_n": gemm_n}


def add_parser(sub) -> None:
    p = sub.add_parser("roofline", help="measure STREAM bandwidth, FMA peak and sgemm per thread "
                                        "count",
                       description="Measure this machine's limits per thread count: STREAM copy, "
                                   "scale, add and triad (Numba, parallel, arrays of 8x the LLC "
                                   "by default), FMA peak GFLOP/s and numpy sgemm GFLOP/s with "
                                   "BLAS limited to the same thread count. Run it with nothing "
                                   "else busy on the machine.")
    p.add_argument("--threads", type=thread_list, default=None,
                   help="thread counts, e.g. 1,2 or 1-4 or all (default all)")
    p.add_argument("--csv", metavar="FILE",
                   help="append one row per thread count to FILE as each is measured")
    p.add_argument("--resume", action="store_true",
                   help="skip the thread counts the --csv file already holds for this machine, "
                        "commit and sizes")
    p.add_argument("--array-mib", type=positive_float, default=None,
                   help="MiB per STREAM array (default 8x the last-level cache)")
    p.add_argument("--gemm-n", type=positive_int, default=2048, help="sgemm size (default 2048)")
    p.add_argument("--reps", type=positive_int, default=10, help="repetitions, best kept "
                                                                 "(default 10)")
    p.set_defaults(func=run)


COLUMNS = ["threads"] + FIGURES + ["array_mib", "gemm_n"]


def run(args) -> int:
    threads = args.threads or thread_list("all")
    mib = args.array_mib if args.array_mib is not None else default_array_mib()
    check_memory(3 * int(mib * 2**20) + 3 * 4 * args.gemm_n ** 2, f"--array-mib {mib:g} with "
                 f"--gemm-n {args.gemm_n}")
    machine = machine_info()
    columns = COLUMNS + list(machine)
    log = CsvLog(args.csv, columns) if args.csv else None
    if args.resume and log is None:
        raise UserError("--resume needs --csv: it skips what that file already holds")
    key = lambda r: (r["threads"], r["array_mib"], r["gemm_n"])
    held = {key(r) for r in log.read() if same_machine(r, machine)} if args.resume else set()
    rows = []
    for t in threads:
        if (t, round(mib, 3), args.gemm_n) in held:
            continue
        rows.append({**measure(t, mib, args.gemm_n, args.reps), **machine})
        if log:
            log.append(rows[-1:])
    appended = len(rows)
    if log:  # the table of everything this run covers, as the CSV holds it
        wanted = {(t, round(mib, 3), args.gemm_n) for t in threads}
        rows = latest([r for r in log.read() if same_machine(r, machine) and key(r) in wanted],
                      key)
    print(f"{machine['cpu_model']} ({machine['cpu_arch']}), {machine['cores']} cores, "
          f"L3 {machine['l3_bytes'] >> 20} MiB, Numba {machine['numba']} "
          f"({machine['threading_layer']}); STREAM arrays {mib:.0f} MiB, sgemm n={args.gemm_n}")
    print(tabulate([[r[k] for k in COLUMNS[:7]] for r in rows],
                   headers=["threads", "copy GB/s", "scale GB/s", "add GB/s", "triad GB/s",
                            "FMA GFLOP/s", "sgemm GFLOP/s"], floatfmt=".1f"))
    if log:
        print(f"wrote {appended} rows to {args.csv}")
    return 0
