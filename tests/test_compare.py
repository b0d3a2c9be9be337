"""`bnff compare`: a variant slowed on purpose (a test-only wrapper put in place of the kernel
in the stage's variant table, the kernel itself untouched) is flagged and fails the command;
a file against itself is all noise; row pooling, noise marks and machine warnings on small
hand-made CSVs; bad input is one line and exit status 2."""
import time

import pytest

from bnff.cli.bench import COLUMNS as BENCH_COLUMNS
from bnff.cli.main import main
from bnff.kernels.elementwise.relu import ReLUForward
from bnff.measure.machine import CsvLog

MICRO = ["micro", "densenet121", "--batch", "2", "--image", "32", "--threads", "1",
         "--stage", "relu_fwd", "--descriptor", "mb2ic64ih8iw8", "--reps", "5",
         "--min-time", "0", "--array-mib", "1", "--gemm-n", "64"]


def slowed(kernel, seconds):
    """Test-only hook: the kernel, then a sleep."""
    def run(*args):
        kernel(*args)
        time.sleep(seconds)
    return run


def test_compare_flags_a_slowed_variant(tmp_path, monkeypatch, capsys):
    a, b = str(tmp_path / "a.csv"), str(tmp_path / "b.csv")
    assert main(MICRO + ["--csv", a]) == 0
    # the relu runs in microseconds at this shape: 5 ms more is a ratio in the hundreds
    monkeypatch.setitem(ReLUForward.variants, "prange",
                        slowed(ReLUForward.variants["prange"], 0.005))
    assert main(MICRO + ["--csv", b]) == 0
    capsys.readouterr()
    assert main(["compare", a, b, "--fail", "50"]) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if " prange " in line)
    assert row.split()[:4] == ["relu_fwd", "mb2ic64ih8iw8", "prange", "1"]
    assert row.split()[-1] == "FAIL" and float(row.split()[-2]) > 10
    assert "FAIL: " in out and "rows of" in out
    assert main(["compare", a, a, "--fail", "0"]) == 0  # the same file: ratio 1, inside noise
    out = capsys.readouterr().out
    assert "2 matched rows (0 not shown): 2 inside the noise, 0 slower, 0 faster, 0 over" in out


def bench_csv(path, rows, **machine):
    base = dict(network="net", schedule="bnff", batch=16, image=224, threads=2, kind="conv",
                phase="forward", repeats=3, bytes=1, flops=1, peak_mem_bytes="", compile_s="",
                cpu_model="AMD EPYC 9R14 @ 2.60GHz", cpu_arch="znver4", cores=2, l1d_bytes=32768,
                l2_bytes=1 << 20, l3_bytes=32 << 20, python="3.11.7", numpy="2.4.6",
                numba="0.68.1", threading_layer="omp", git_commit="abc", timestamp="t")
    cols = BENCH_COLUMNS + [k for k in base if k not in BENCH_COLUMNS]
    CsvLog(str(path), cols).append([dict(base, **machine, **r) for r in rows])
    return str(path)


def row(stage, med, lo, hi):
    return dict(stage=stage, median_s=med, min_s=lo, max_s=hi)


def test_ratios_noise_and_threshold(tmp_path, capsys):
    # A: two runs of each stage pooled (median of medians, range over both runs)
    a = bench_csv(tmp_path / "a.csv", [row("conv1", 1.0, 0.95, 1.05), row("conv1", 1.0, 0.9, 1.1),
                                       row("conv2", 1.0, 0.95, 1.05), row("only_a", 1, 1, 1)])
    b = bench_csv(tmp_path / "b.csv", [row("conv1", 1.15, 1.1, 1.2), row("conv2", 1.5, 1.45, 1.55),
                                       row("only_b", 1, 1, 1)], cpu_model="AMD EPYC 9R14 @ 3.7GHz")
    assert main(["compare", a, b]) == 0  # no --fail: report only
    out = capsys.readouterr().out
    assert "warning" not in out  # only the clock differs
    lines = {line.split()[5]: line.split() for line in out.splitlines()
             if line.startswith("net ")}
    # conv1: spread of A (1.1 - 0.9) / 1.0 = 20 %, B/A = 1.15 inside it; conv2: 1.5 outside
    assert lines["conv1"][-6:] == ["1000.000", "20.000", "1150.000", "8.696", "1.150", "noise"]
    assert lines["conv2"][-2:] == ["1.500", "slower"]
    assert "2 matched rows (0 not shown): 1 inside the noise, 1 slower, 0 faster, 0 over --fail;" \
           " 1 only in A, 1 only in B" in out
    assert main(["compare", a, b, "--fail", "10"]) == 1
    out = capsys.readouterr().out
    assert "FAIL (noise)" in out and "FAIL: 2 rows" in out
    assert main(["compare", a, b, "--fail", "60"]) == 0


def test_machine_and_software_warnings(tmp_path, capsys):
    a = bench_csv(tmp_path / "a.csv", [row("conv1", 1.0, 1.0, 1.0)])
    b = bench_csv(tmp_path / "b.csv", [row("conv1", 1.0, 1.0, 1.0)], cpu_arch="znver3",
                  l2_bytes=512 << 10, numba="0.69.0")
    assert main(["compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "warning: machines differ: cpu_arch znver4 (A) vs znver3 (B)" in out
    assert "warning: machines differ: l2_bytes 1048576 (A) vs 524288 (B)" in out
    assert "warning: software differs: numba 0.68.1 (A) vs 0.69.0 (B)" in out


@pytest.mark.parametrize("case", ["missing", "not csv", "other csv", "kinds differ", "no match",
                                  "bad number"])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, case):
    a = bench_csv(tmp_path / "a.csv", [row("conv1", 1.0, 1.0, 1.0)])
    b = {"missing": str(tmp_path / "nope.csv"),
         "no match": bench_csv(tmp_path / "b.csv", [row("conv9", 1.0, 1.0, 1.0)]),
         "bad number": bench_csv(tmp_path / "b.csv", [row("conv1", "fast", 1.0, 1.0)])}.get(case)
    if b is None:
        b = tmp_path / "b.csv"
        b.write_bytes({"not csv": b"\x1f\x8b\x00garbage", "other csv": b"x,y\n1,2\n",
                       "kinds differ": b"stage,descriptor,variant,threads,median_s,min_s\n"
                                       b"conv1,mb1,gemm,2,1.0,1.0\n"}[case])
    assert main(["compare", a, str(b)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnff compare: error: ") and err.count("\n") == 1


def test_bad_threshold_is_refused(tmp_path, capsys):
    a = bench_csv(tmp_path / "a.csv", [row("conv1", 1.0, 1.0, 1.0)])
    with pytest.raises(SystemExit) as e:
        main(["compare", a, a, "--fail", "fast"])
    assert e.value.code == 2 and "expected a percentage" in capsys.readouterr().err
