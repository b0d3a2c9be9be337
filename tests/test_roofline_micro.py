"""Contracts of `bnff roofline` and `bnff micro` at tiny sizes, through the CLI itself: CSV
columns, one header per file on append, positive figures, clear errors. Speed is not tested
here."""
import csv
import os

import numpy as np
import pytest

from bnff.cli import micro
from bnff.measure import roofline
from bnff.cli.main import main as bnff  # the CLI itself: its parsing and its error handling
from bnff.measure.machine import machine_info
from bnff.measure.measurement import ValidationError, validate
from bnff.kernels import registry
from bnff.kernels.bn.bn_stats import BNStats
from bnff.suites import networks

EXAMPLE = "bnff/suites/examples/vgg_residual.json"
TINY = ["--array-mib", "1", "--gemm-n", "64", "--reps", "1"]
MACHINE = ["cpu_model", "vec_width", "cores", "l1d_bytes", "l2_bytes", "l3_bytes", "python", "numpy", "numba",
           "threading_layer", "git_commit", "timestamp"]


def read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_machine_info_has_the_columns():
    m = machine_info()
    for k in MACHINE:
        assert m[k] not in ("", None), k
    assert m["threading_layer"] in ("omp", "tbb", "workqueue")


def test_roofline_csv_appends_under_one_header(tmp_path, capsys):
    out = tmp_path / "roof.csv"
    assert bnff(["roofline", "--threads", "1", "--csv", str(out)] + TINY) == 0
    assert bnff(["roofline", "--threads", "1", "--csv", str(out)] + TINY) == 0
    rows = read(out)
    header = rows[0]
    assert len(rows) == 3 and rows[1][0] != header[0] and rows[2][0] != header[0]
    for k in roofline.FIGURES + MACHINE:
        assert k in header, k
    for r in rows[1:]:
        d = dict(zip(header, r))
        assert all(float(d[k]) > 0 for k in roofline.FIGURES)
    assert "triad" in capsys.readouterr().out.lower()


def test_roofline_refuses_a_csv_with_other_columns(tmp_path, capsys):
    out = tmp_path / "other.csv"
    out.write_text("a,b\n1,2\n")
    assert bnff(["roofline", "--threads", "1", "--csv", str(out)] + TINY) == 2
    assert "other columns" in capsys.readouterr().err


def test_bad_thread_count_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        bnff(["roofline", "--threads", "999"])
    assert e.value.code == 2
    assert "thread counts must be between 1 and" in capsys.readouterr().err


def test_stages_of_is_the_plans_steps_deduplicated_and_counted():
    g = networks.load("resnet50")
    plans = micro.plans_of(g, 2, 32)
    items = micro.stages_of(g, 2, 32, plans)
    keys = [(st.name, st.descriptor()) for st, _ in items]
    assert len(keys) == len(set(keys))
    names = {st.name for st, _ in items}
    assert {"bn_stats", "bn_normalize", "bn_backward", "relu_fwd", "relu_bwd", "add",
            "maxpool_fwd", "gap_fwd", "linear_fwd", "linear_bwd", "softmax_xent"} <= names
    assert {"bn_scale", "bn_scale_bwd"} <= names  # caffe's Scale layers, as caffe runs them
    assert {"bn_relu", "relu_mask_sums", "bn_add_relu", "bn2_add_relu"} <= names  # fission's
    hooked = {st.descriptor().partition("_pro-")[2] for st, _ in items
              if st.name in ("conv_fwd_hooked", "conv_bwd_data_hooked")}
    assert {"bn_relu_epi-stats", "bn_relu_grad_epi-relu_sums"} <= hooked  # bnff's fused convs
    bn = sum(1 for n in g.nodes if n.op == "batchnorm")
    assert sum(c for st, c in items if st.name == "bn_backward") == bn
    staged = {(s.stage.stage, s.stage.descriptor) for p in plans.values() for s in p.steps
              if s.stage is not None}
    assert staged == set(keys)  # every staged step of every plan, nothing else
    assert "bnff: " in micro.untimed(plans)  # the hooked convs, said so


def test_every_registered_stage_is_planned_or_listed_unplanned():
    """Over the built-in networks and the example graph (vgg16_bn brings the flatten and the
    conv biases; registry.py imports every stage module, so `micro vgg16_bn` finds them)."""
    planned = {st.name for net, batch, image in (("densenet121", 2, 32), ("resnet50", 2, 32),
                                                 (EXAMPLE, 2, 32), ("vgg16_bn", 1, 224))
               for st, _ in micro.stages_of(networks.load(net), batch, image)}
    assert planned.isdisjoint(registry.UNPLANNED)
    assert planned | set(registry.UNPLANNED) == set(registry.STAGES)


def test_stages_of_densenet_concats_are_what_the_schedules_run():
    g = networks.load("densenet121")
    plans = micro.plans_of(g, 2, 32)
    items = micro.stages_of(g, 2, 32, plans)
    names = {st.name for st, _ in items}
    assert "concat_fwd" in names  # one call per concatenation, as run
    cats = [s for s in plans["baseline"].steps if s.kind == "concat" and s.phase == "forward"]
    assert len(cats) == sum(n.op == "concat" for n in g.nodes)
    assert sum(c for st, c in items if st.name == "concat_fwd") == len(cats)
    assert all(s.stage.stage == "concat_fwd" and s.stage.variant == "stream" for s in cats)


def test_standalone_descriptor_reproduces_a_row(tmp_path, capsys):
    out = tmp_path / "micro.csv"
    argv = ["micro", "--stage", "bn_normalize", "--descriptor", "mb2ic8ih4iw4eps0.001",
            "--threads", "1", "--reps", "1", "--min-time", "0", "--csv", str(out)] + TINY
    assert bnff(argv) == 0
    rows = [dict(zip(read(out)[0], r)) for r in read(out)[1:]]
    assert {r["variant"] for r in rows} == {"naive", "affine"}
    assert all(r["descriptor"] == "mb2ic8ih4iw4eps0.001" and r["network"] == "" for r in rows)
    assert rows[0]["reproducer"].startswith("bnff micro --stage bn_normalize --descriptor "
                                            "mb2ic8ih4iw4eps0.001 --variant ")
    assert bnff(["micro", "--stage", "bn_normalize"] + TINY) == 2
    assert "--descriptor" in capsys.readouterr().err
    assert bnff(["micro", "--stage", "bn_normalize", "--descriptor", "mb2x"] + TINY) == 2
    assert "cannot parse descriptor" in capsys.readouterr().err


def test_micro_csv_rows_and_single_header(tmp_path, capsys):
    out = tmp_path / "micro.csv"
    argv = ["micro", "resnet50", "--batch", "2", "--image", "32", "--threads", "1",
            "--stage", "bn_stats", "--reps", "1", "--min-time", "0", "--csv", str(out)] + TINY
    assert bnff(argv) == 0
    assert bnff(argv[:-2] + ["--variant", "default", "--csv", str(out)]) == 0
    rows = read(out)
    header = rows[0]
    for k in micro.COLUMNS + MACHINE:
        assert k in header, k
    data = [dict(zip(header, r)) for r in rows[1:]]
    assert all(r["stage"] == "bn_stats" for r in data)
    n_shapes = sum(1 for st, _ in micro.stages_of(networks.load("resnet50"), 2, 32)
                   if st.name == "bn_stats")
    assert len(data) == n_shapes * (len(BNStats.variants) + 1)
    for r in data:
        assert float(r["median_s"]) > 0 and float(r["gbps"]) > 0 and float(r["bytes"]) > 0
        assert float(r["pct_roofline"]) > 0 and r["bound"] in ("memory", "compute")
        assert r["reproducer"].startswith("bnff micro --stage bn_stats")
        assert r["descriptor"] in r["reproducer"]
    assert "bn_stats" in capsys.readouterr().out


def test_micro_unknown_stage_and_variant_are_clear(capsys):
    base = ["micro", "resnet50", "--batch", "2", "--image", "32", "--threads", "1"] + TINY
    assert bnff(base + ["--stage", "nope"]) == 2
    assert "unknown stage 'nope'" in capsys.readouterr().err
    assert bnff(base + ["--stage", "bn_stats", "--variant", "nope"]) == 2
    assert "has no variant 'nope'" in capsys.readouterr().err
    assert bnff(["micro", "nosuchnet"] + TINY) == 2
    assert "unknown network" in capsys.readouterr().err


def test_micro_refuses_single_value_batch_norm(capsys):
    argv = ["micro", "resnet50", "--batch", "1", "--image", "32", "--threads", "1"] + TINY
    assert bnff(argv) == 2
    assert "more than one value per channel" in capsys.readouterr().err


def test_validation_failure_is_a_clear_error(monkeypatch, capsys):
    def broken(X, mean, var):
        mean[:] = 0.0
        var[:] = 0.0
    monkeypatch.setitem(BNStats.variants, "broken", broken)
    argv = ["micro", "resnet50", "--batch", "2", "--image", "32", "--threads", "1",
            "--stage", "bn_stats", "--variant", "broken"] + TINY
    assert bnff(argv) == 1
    err = capsys.readouterr().err
    assert "validation failed: bn_stats variant broken" in err and "tolerance" in err
    with pytest.raises(ValidationError):
        st = BNStats(dict(mb=1, ic=8, ih=4, iw=4))
        validate(st, ["broken"], st.make_inputs(np.random.default_rng(0)))


def test_memory_target_is_byte_weighted_over_big_default_memory_rows():
    llc = 1000
    row = dict(threads=1, is_default=True, bound="memory", footprint_bytes=3000, count=1)
    rows = [dict(row, bytes=300, pct_roofline=90.0),
            dict(row, bytes=100, count=2, pct_roofline=60.0),          # weight 200
            dict(row, bytes=900, pct_roofline=10.0, footprint_bytes=1500),  # fits 2x LLC
            dict(row, bytes=900, pct_roofline=10.0, is_default=False),
            dict(row, bytes=900, pct_roofline=10.0, bound="compute")]
    [(t, n, w, pct)] = micro.memory_target(rows, llc)
    assert (t, n, w) == (1, 2, 500) and pct == pytest.approx((300 * 90 + 200 * 60) / 500)


def test_conv_target_is_flop_weighted_per_direction():
    """Total FLOPs over total time of the default rows (count included), per direction and
    thread count: 1 x 6 GFLOP in 0.1 s plus 3 x 1 GFLOP in 0.1 s each is 9 GFLOP in 0.4 s =
    22.5 GFLOP/s (the plain mean of the rows' GFLOP/s would be 35, weighted by FLOPs 43.3)."""
    row = dict(threads=2, is_default=True, stage="conv_bwd_weights", sgemm_gflops=45.0)
    rows = [dict(row, flops=6e9, count=1, median_s=0.1),
            dict(row, flops=1e9, count=3, median_s=0.1),
            dict(row, flops=1e9, count=1, median_s=1.0, is_default=False),
            dict(row, flops=1e9, count=1, median_s=1.0, stage="bn_stats"),
            dict(row, flops=4e9, count=2, median_s=0.1, stage="conv_fwd"),
            dict(row, flops=4e9, count=1, median_s=0.4, threads=1, sgemm_gflops=20.0)]
    got = micro.conv_target(rows)
    assert [g[:4] for g in got] == [(1, "conv_bwd_weights", 1, 4.0), (2, "conv_fwd", 1, 8.0),
                                    (2, "conv_bwd_weights", 2, 9.0)]
    assert got[0][4:] == pytest.approx((10.0, 20.0, 50.0))
    assert got[1][4:] == pytest.approx((40.0, 45.0, 100 * 40 / 45))
    assert got[2][4:] == pytest.approx((22.5, 45.0, 50.0))


def test_micro_conv_rows_have_pct_sgemm(tmp_path, capsys):
    out = tmp_path / "micro.csv"
    argv = ["micro", "resnet50", "--batch", "2", "--image", "32", "--threads", "1",
            "--stage", "conv_fwd,bn_stats", "--variant", "default", "--reps", "1",
            "--min-time", "0", "--csv", str(out)] + TINY
    assert bnff(argv) == 0
    rows = [dict(zip(read(out)[0], r)) for r in read(out)[1:]]
    for r in rows:
        if r["stage"] == "conv_fwd":
            assert float(r["pct_sgemm"]) == pytest.approx(
                100 * float(r["gflops"]) / float(r["sgemm_gflops"]))
        else:
            assert r["pct_sgemm"] == ""
    assert "conv_fwd default" in capsys.readouterr().out


def test_timing_commands_run_numpy_blas_on_one_thread_unless_the_user_chose(monkeypatch):
    from bnff.cli.main import _single_thread_blas
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    _single_thread_blas(["check", "densenet121"])
    assert "OPENBLAS_NUM_THREADS" not in os.environ
    _single_thread_blas(["micro", "--stage", "relu_fwd"])
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    _single_thread_blas(["bench", "resnet50"])
    assert os.environ["OPENBLAS_NUM_THREADS"] == "2"
