"""The PyTorch paths: the graph as a torch module against the float64 reference, the
`pytorch` schedule of bench and check, micro's `torch` variant of every stage that has one;
and what a run without torch says. Skipped where torch is needed and not installed."""
import argparse
import csv
import re

from functools import partial

import numpy as np
import pytest

from bnff.cli import bench, micro
from bnff.cli.main import main
from bnff.kernels import registry
from bnff.lowering import schedules
from bnff.measure.measurement import interleaved, summary_tables, validate
from bnff.lowering.reference_step import train_step as reference
from bnff.measure.measurement import max_rel_grad_diff
from bnff.suites import networks
from bnff.suites.problem import make_batch, make_params

EXAMPLE = "bnff/suites/examples/vgg_residual.json"


@pytest.mark.parametrize("net,image", [(EXAMPLE, 16), ("densenet121", 64)])
def test_module_matches_the_reference(net, image):
    pytest.importorskip("torch")
    from bnff.torchref.model import train_step
    g = networks.load(net)
    params, (x, labels) = make_params(g, 0), make_batch(g, 2, image, 0)
    loss, grads = train_step(g, params, x, labels)
    ref_loss, ref_grads = reference(g, params, x, labels)
    assert set(grads) == set(ref_grads)
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    # densenet at 64x64 amplifies float32 rounding as `baseline` does (schedules.GRAD_TOLERANCE)
    assert max_rel_grad_diff(grads, ref_grads)[0] < (1e-3 if net == EXAMPLE else 2e-2)


def test_check_pytorch(capsys):
    pytest.importorskip("torch")
    assert main(["check", EXAMPLE, "--batch", "2", "--image", "16", "--schedule", "pytorch"]) == 0
    out = capsys.readouterr().out
    assert "pytorch" in out and "max grad rel diff" in out


def test_bench_pytorch_row_and_kinds(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "bench.csv"
    assert main(["bench", EXAMPLE, "--batch", "2", "--image", "16", "--threads", "1",
                 "--schedules", "baseline,pytorch", "--repeat", "2", "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vs pytorch" in printed and "no pytorch row" not in printed
    note = re.search(r"pytorch's time by kind is from profiled iterations of ([0-9.]+) s "
                     r"against ([0-9.]+) s timed \(([0-9.]+)x\)", printed)
    assert note and float(note[1]) > 0 and float(note[2]) > 0
    assert float(note[3]) == pytest.approx(float(note[1]) / float(note[2]), rel=0.01)
    with open(out, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["schedule"] == "pytorch"]
    it = [r for r in rows if r["stage"] == "iteration"]
    assert len(it) == 1 and float(it[0]["median_s"]) > 0 and it[0]["bytes"] == ""
    kinds = {r["kind"]: float(r["median_s"]) for r in rows if r["stage"] != "iteration"}
    assert set(kinds) == {"conv", "bn", "relu", "concat", "pool", "other"}
    assert kinds["conv"] > 0 and kinds["bn"] > 0 and kinds["pool"] > 0
    assert kinds["concat"] > 0 and kinds["relu"] > 0


def test_pytorch_schedule_is_validated(monkeypatch):
    pytest.importorskip("torch")
    from bnff.torchref.schedule import TorchExecutor
    g = networks.load(EXAMPLE)
    exs = [bench.executor(g, s, 2, 16) for s in bench._schedule_list("baseline,pytorch")]
    assert isinstance(exs[1], TorchExecutor)
    params, (x, labels) = make_params(g, 0), make_batch(g, 2, 16, 0)
    try:
        for ex in exs:
            ex.load(params, x, labels)
            ex.run()
        assert bench.validate(exs)["pytorch"] < 1e-3
        wrong = exs[1].grads()
        wrong["conv2.weight"] = wrong["conv2.weight"] * 1.5
        monkeypatch.setattr(exs[1], "grads", lambda: wrong)
        with pytest.raises(Exception, match="pytorch disagrees with baseline"):
            bench.validate(exs)
    finally:
        exs[1].release()


def test_kind_mapping():
    from bnff.torchref.kinds import kind_of
    assert [kind_of(n) for n in (
        "aten::mkldnn_convolution", "aten::convolution_backward", "aten::native_batch_norm",
        "NativeBatchNormBackward0", "aten::threshold_backward", "aten::relu_", "aten::cat",
        "CatBackward0", "aten::max_pool2d_with_indices_backward", "aten::clamp_min_",
        "aten::mean", "aten::add_", "aten::nll_loss_forward", "aten::addmm")] == [
        "conv", "conv", "bn", "bn", "relu", "relu", "concat", "concat", "pool", "relu", "pool",
        "other", "other", "other"]


def test_an_op_counts_as_the_kind_of_its_nearest_enclosing_op_that_names_one():
    """autograd's accumulation adds run inside CatBackward0's evaluation (concat, as the
    suite's concat_add_out); a max-pool backward's zeroing is pool; a lone add is other."""
    from types import SimpleNamespace as Ev

    from bnff.torchref.kinds import by_kind
    cat = Ev(name="autograd::engine::evaluate_function: CatBackward0", cpu_parent=None,
             self_cpu_time_total=1e6)
    pool = Ev(name="aten::max_pool2d_with_indices_backward", cpu_parent=None,
              self_cpu_time_total=3e6)
    zero = Ev(name="aten::zero_", cpu_parent=pool, self_cpu_time_total=0.0)
    events = [cat, Ev(name="aten::add_", cpu_parent=cat, self_cpu_time_total=2e6), pool, zero,
              Ev(name="aten::fill_", cpu_parent=zero, self_cpu_time_total=4e6),
              Ev(name="aten::add", cpu_parent=None, self_cpu_time_total=5e6)]
    assert by_kind(events) == dict(conv=0.0, bn=0.0, relu=0.0, concat=3.0, pool=7.0, other=5.0)


def test_micro_torch_variant_of_every_stage_it_has():
    pytest.importorskip("torch")
    from bnff.torchref.stages import OPS, TorchOp
    seen = {}
    for net in ("densenet121", "resnet50"):
        for st, _ in micro.stages_of(networks.load(net), 2, 32):
            if TorchOp.supports(st) and st.name not in seen:
                seen[st.name] = st
    # every mapped stage occurs, so every one is checked, except the whole-concat backward:
    # the plans split the gradient input by input, so it is taken at an example shape
    whole = {"concat_bwd"}
    assert set(OPS) - set(seen) == whole
    seen.update({name: registry.make(name, registry.STAGES[name].examples[0]) for name in whole})
    rng = np.random.default_rng(0)
    for st in seen.values():
        ins, outs = st.make_inputs(rng), st.allocate_outputs()
        assert validate(st, ["torch"], ins, partial(micro.run_variant, st))["torch"] \
            <= st.tolerance
        times = interleaved(micro.timed_calls(st, [st.default, "torch"], ins, outs), 1)
        assert len(times["torch"]) == len(times[st.default]) >= 1


def test_micro_variant_list_and_parity_table(capsys):
    pytest.importorskip("torch")
    argv = ["micro", EXAMPLE, "--batch", "2", "--image", "16", "--threads", "1",
            "--stage", "relu_fwd,add", "--variant", "default,torch", "--array-mib", "1",
            "--gemm-n", "64", "--reps", "1", "--min-time", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "default variants against PyTorch" in out and "relu_fwd" in out


def test_without_torch_the_tables_say_how_to_add_it(monkeypatch, capsys):
    monkeypatch.setattr(bench, "torch_available", lambda: False)
    assert schedules.PYTORCH not in bench.default_schedules()
    with pytest.raises(argparse.ArgumentTypeError, match=r"pip install '\.\[torch\]'"):
        bench._schedule_list("baseline,pytorch")
    row = dict(network="n", schedule="baseline", threads=1, batch=2, image=16, stage="iteration",
               kind="all", median_s=1.0, bytes=10, peak_mem_bytes=10, compile_s=0.0)
    assert "no pytorch row" in summary_tables([row])
    from bnff.cli import check
    monkeypatch.setattr(check, "torch_available", lambda: False)
    assert main(["check", EXAMPLE, "--batch", "2", "--image", "16", "--schedule", "pytorch"]) == 2
    assert "PyTorch is not installed" in capsys.readouterr().err
