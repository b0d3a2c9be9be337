"""`bnff roofline`: the limits of this machine per thread count (bnff/measure/roofline.py
says how each is measured)."""
from __future__ import annotations

from tabulate import tabulate

from bnff.cli.args import UserError, positive_int, thread_list
from bnff.measure.machine import append_csv, machine_info
from bnff.measure.roofline import FIGURES, default_array_mib, measure


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
    p.add_argument("--csv", metavar="FILE", help="append one row per thread count to FILE")
    p.add_argument("--array-mib", type=float, default=None,
                   help="MiB per STREAM array (default 8x the last-level cache)")
    p.add_argument("--gemm-n", type=positive_int, default=2048, help="sgemm size (default 2048)")
    p.add_argument("--reps", type=positive_int, default=10, help="repetitions, best kept "
                                                                 "(default 10)")
    p.set_defaults(func=run)


COLUMNS = ["threads"] + FIGURES + ["array_mib", "gemm_n"]


def run(args) -> int:
    threads = args.threads or thread_list("all")
    mib = args.array_mib if args.array_mib is not None else default_array_mib()
    if mib <= 0:
        raise UserError(f"--array-mib must be positive, got {mib}")
    machine = machine_info()
    rows = [{**measure(t, mib, args.gemm_n, args.reps), **machine} for t in threads]
    print(f"{machine['cpu_model']} ({machine['cpu_arch']}), {machine['cores']} cores, "
          f"L3 {machine['l3_bytes'] >> 20} MiB, Numba {machine['numba']} "
          f"({machine['threading_layer']}); STREAM arrays {mib:.0f} MiB, sgemm n={args.gemm_n}")
    print(tabulate([[r[k] for k in COLUMNS[:7]] for r in rows],
                   headers=["threads", "copy GB/s", "scale GB/s", "add GB/s", "triad GB/s",
                            "FMA GFLOP/s", "sgemm GFLOP/s"], floatfmt=".1f"))
    if args.csv:
        append_csv(args.csv, rows, COLUMNS + list(machine))
        print(f"wrote {len(rows)} rows to {args.csv}")
    return 0
