"""`bnff roofline`: the limits of this machine per thread count (bnff/measure/roofline.py
says how each is measured). Rows are appended to --csv as each thread count is measured;
--resume skips what the file holds for this machine and commit at the same sizes and
repetitions (array_mib, gemm_n, reps: columns of each row; a file written before `reps` was
one is refused, its header differs)."""
from __future__ import annotations

from tabulate import tabulate

from bnff.cli.args import UserError, check_memory, positive_float, positive_int, thread_list
from bnff.measure.machine import CsvLog, latest, machine_info, same_machine
from bnff.measure.roofline import COLUMNS, default_array_mib, measure


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
                        "commit, sizes and repetitions")
    p.add_argument("--array-mib", type=positive_float, default=None,
                   help="MiB per STREAM array (default 8x the last-level cache)")
    p.add_argument("--gemm-n", type=positive_int, default=2048, help="sgemm size (default 2048)")
    p.add_argument("--reps", type=positive_int, default=10, help="repetitions, best kept "
                                                                 "(default 10)")
    p.set_defaults(func=run)


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
    key = lambda r: (r["threads"], r["array_mib"], r["gemm_n"], r["reps"])
    held = {key(r) for r in log.read() if same_machine(r, machine)} if args.resume else set()
    rows = []
    for t in threads:
        if (t, round(mib, 3), args.gemm_n, args.reps) in held:
            continue
        rows.append({**measure(t, mib, args.gemm_n, args.reps), **machine})
        if log:
            log.append(rows[-1:])
    appended = len(rows)
    if log:  # the table of everything this run covers, as the CSV holds it
        wanted = {(t, round(mib, 3), args.gemm_n, args.reps) for t in threads}
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
