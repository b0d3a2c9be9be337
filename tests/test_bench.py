"""`bnff bench` and `bnff report`: CSV contract, memory guard, validation before timing."""
import csv
import gzip

import numpy as np
import pytest

from bnff.cli.args import RunFailed, UserError
from bnff.cli.bench import COLUMNS, memory_groups, validate
from bnff.cli.main import main
from bnff.lowering.executor import Executor
from bnff.lowering.schedules import SCHEDULES
from bnff.suites.problem import make_batch, make_params
from bnff.suites import networks

EXAMPLE = "bnff/suites/examples/vgg_residual.json"


def test_bench_csv_and_report(tmp_path, capsys):
    out = tmp_path / "m" / "bench.csv"
    argv = ["bench", EXAMPLE, "--batch", "2", "--image", "16", "--threads", "1",
            "--schedules", "caffe,baseline", "--repeat", "2", "--csv", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "vs caffe" in printed and "time by kind" in printed
    assert "2 rounds, stopped: " in printed  # --budget 0: --repeat rounds, and it says why
    assert "x [" in printed  # speedups with their intervals
    assert main(argv) == 0  # appending keeps a single header
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(out) as f:
        assert sum(line.startswith("network,") for line in f) == 1
    assert set(COLUMNS) <= set(rows[0]) and {"cpu_model", "numba", "threading_layer"} <= set(rows[0])
    its = [r for r in rows if r["stage"] == "iteration"]
    assert len(its) == 4 and all(float(r["median_s"]) > 0 and int(r["peak_mem_bytes"]) > 0
                                 for r in its)
    steps = [r for r in rows if r["stage"] != "iteration" and r["schedule"] == "baseline"]
    assert {r["phase"] for r in steps} == {"forward", "backward"}
    assert {r["kind"] for r in steps} >= {"conv", "bn", "relu", "concat", "pool", "other"}
    # bytes of the iteration row are the sum of its stages
    run1 = steps[:len(steps) // 2]  # the first of the two identical runs
    it = next(r for r in its if r["schedule"] == "baseline")
    assert sum(int(r["bytes"]) for r in run1) == int(it["bytes"])
    pytest.importorskip("matplotlib")
    assert main(["report", "--results", str(tmp_path)]) == 0
    report = (tmp_path / "REPORT.md").read_text()
    assert "vgg_residual" in report and "speedup.png" in report
    # committed results are gzipped: the report reads them the same way
    with open(out, "rb") as f, gzip.open(str(out) + ".gz", "wb") as g:
        g.write(f.read())
    out.unlink()
    assert main(["report", "--results", str(tmp_path)]) == 0
    assert (tmp_path / "REPORT.md").read_text() == report


def test_bench_plot_draws_the_roofs_measured_in_the_run(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from bnff.measure import plots
    drawn, save = {}, plots._save
    def keep(fig, plt, outdir, name):  # the labels of each chart's lines, before it is closed
        drawn[name] = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
        return save(fig, plt, outdir, name)
    monkeypatch.setattr(plots, "_save", keep)
    folder = tmp_path / "plots"
    assert main(["bench", EXAMPLE, "--batch", "2", "--image", "16", "--threads", "1",
                 "--schedules", "baseline,bnff", "--repeat", "1", "--plot", str(folder)]) == 0
    assert "roofline, 1 threads: triad" in capsys.readouterr().out
    with open(folder / "roofline.csv", newline="") as f:
        roof = next(csv.DictReader(f))
    assert roof["threads"] == "1" and float(roof["triad_gbps"]) > 0
    labels = drawn["vgg_residual-roofline.png"]
    assert f"memory roof: triad {float(roof['triad_gbps']):.1f} GB/s" in labels
    assert f"compute roof: FMA peak {float(roof['fma_gflops']):.0f} GFLOP/s" in labels
    assert f"numpy sgemm {float(roof['sgemm_gflops']):.0f} GFLOP/s" in labels
    assert (folder / "vgg_residual-roofline.png").stat().st_size > 0


def test_memory_groups_refuse_only_a_schedule_that_does_not_fit_alone():
    ex = [Executor(networks.load("densenet121"), SCHEDULES["baseline"], 16, 224)]
    with pytest.raises(UserError, match="schedule baseline alone needs .* GiB are available"):
        memory_groups(ex, available=2**30)
    assert ex[0].arrays is None
    assert memory_groups(ex, available=2**40) == [ex]


def test_validation_catches_a_wrong_schedule():
    g = networks.load(EXAMPLE)
    exs = [Executor(g, SCHEDULES[s], 2, 16) for s in ("baseline", "caffe")]
    params = make_params(g, 0)
    x, labels = make_batch(g, 2, 16, 0)
    for ex in exs:
        ex.load(params, x, labels)
        ex.run()
    assert validate(exs)["caffe"] < 1e-4
    exs[1].arrays["grad:conv2.weight"] *= np.float32(1.5)
    with pytest.raises(RunFailed, match="caffe disagrees with baseline"):
        validate(exs)


def test_bench_argument_errors(capsys):
    with pytest.raises(SystemExit):
        main(["bench", EXAMPLE, "--schedules", "nope"])
    assert "unknown schedule" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", EXAMPLE, "--threads", "999"])
    assert "thread counts must be between 1 and" in capsys.readouterr().err


def test_bench_adds_rounds_until_the_budget_ends(capsys):
    argv = ["bench", EXAMPLE, "--batch", "2", "--image", "16", "--threads", "1",
            "--schedules", "caffe,baseline", "--repeat", "2", "--ci-target", "1e-9",
            "--budget", "0.5"]
    assert main(argv) == 0
    note = next(line for line in capsys.readouterr().out.splitlines() if "stopped:" in line)
    assert "time budget of 0.5 s reached" in note and int(note.split()[3]) > 2
    with pytest.raises(SystemExit):
        main(argv[:-2] + ["--budget", "-1"])

