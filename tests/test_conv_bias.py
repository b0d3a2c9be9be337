"""Convolutions with bias: the graph format, the float64 reference, and every schedule."""
import numpy as np
import pytest

from bnff.measure.measurement import max_rel_grad_diff
from bnff.kernels.conv.conv_bias import ConvBiasBackward
from bnff.lowering.executor import Executor, train_step
from bnff.lowering.reference_step import train_step as reference_step
from bnff.lowering.schedules import FLOAT32, SCHEDULES
from bnff.suites.graph import Builder, Graph, GraphError
from bnff.suites.problem import make_batch, make_params


def biased_graph() -> Graph:
    """Biased convs at BN sites (conv-BN-ReLU-conv, a block end conv-BN-add-ReLU) and plain
    (conv-ReLU, conv-add, a conv into a concat and one into the pool)."""
    b = Builder("biased", 3)
    x = b.add("stem", "conv2d", "input", out_channels=8, kernel=3, padding=1, bias=True)
    x = b.add("stem.bn", "batchnorm", x)
    x = b.add("stem.relu", "relu", x)
    h = b.add("c1", "conv2d", x, out_channels=8, kernel=1, bias=True)
    h = b.add("c1.bn", "batchnorm", h)
    h = b.add("c1.relu", "relu", h)
    h = b.add("c2", "conv2d", h, out_channels=8, kernel=3, padding=1, bias=True)
    h = b.add("c2.bn", "batchnorm", h)
    h = b.add("end.add", "add", [h, x])
    x = b.add("end.relu", "relu", h)
    p = b.add("plain1", "conv2d", x, out_channels=8, kernel=3, padding=1, bias=True)
    p = b.add("plain1.relu", "relu", p)
    q = b.add("plain2", "conv2d", p, out_channels=8, kernel=1, bias=True)
    x = b.add("plain.add", "add", [q, x])
    f = b.add("feat", "conv2d", x, out_channels=4, kernel=3, padding=1, bias=True)
    x = b.add("cat", "concat", [x, f])
    x = b.add("cat.bn", "batchnorm", x)
    x = b.add("cat.relu", "relu", x)
    x = b.add("pool", "maxpool2d", x, kernel=2)
    x = b.add("last", "conv2d", x, out_channels=6, kernel=1, stride=1, bias=True)
    x = b.add("gap", "global_avgpool", x)
    return b.graph(b.add("fc", "linear", x, out_features=5))


@pytest.fixture(scope="module")
def problem():
    g = biased_graph()
    params = make_params(g, 3)
    x, labels = make_batch(g, 2, 8, 3)
    return g, params, x, labels, reference_step(g, params, x, labels)


def test_bias_parameters_and_format():
    g = biased_graph()
    convs = [n for n in g.nodes if n.op == "conv2d"]
    assert all(g.params()[f"{n.name}.bias"] == (n["out_channels"],) for n in convs)
    d = g.to_dict()
    assert Graph.from_dict(d) == g
    d["nodes"][0]["bias"] = 1
    with pytest.raises(GraphError, match="'bias' must be true or false"):
        Graph.from_dict(d)


def test_reference_bias_gradient_is_the_sum_of_dy(problem):
    """The reference's dbias, checked by finite differences of the loss."""
    g, params, x, labels, (loss, grads) = problem
    for name in ("plain1.bias", "last.bias"):
        for c in (0, 3):
            p = {k: v.astype(np.float64) for k, v in params.items()}
            h = 1e-5
            p[name][c] += h
            up = reference_step(g, p, x, labels)[0]
            p[name][c] -= 2 * h
            down = reference_step(g, p, x, labels)[0]
            assert abs((up - down) / (2 * h) - grads[name][c]) < 1e-6


@pytest.mark.parametrize("schedule", FLOAT32)
def test_schedule_with_biased_convs_matches_reference(problem, schedule):
    g, params, x, labels, (ref_loss, ref_grads) = problem
    loss, grads = train_step(g, params, x, labels, SCHEDULES[schedule])
    assert abs(loss - ref_loss) / ref_loss < 1e-6
    diff, where = max_rel_grad_diff(grads, ref_grads)
    # a conv bias feeding a BN has a gradient that is zero in exact arithmetic: its float32
    # noise against measurement.rel_errors' zero level reaches 3e-4; a lost term is O(1)
    assert diff < 1e-3, (schedule, where, diff)
    # convs whose output only reaches a BN (feat through the concat): the bias gradient is
    # zero in exact arithmetic, float32 rounding here
    scale = np.linalg.norm(ref_grads["stem.weight"])
    for name in ("stem.bias", "c1.bias", "c2.bias", "feat.bias"):
        assert np.linalg.norm(grads[name]) < 1e-5 * scale
    # the others: a real gradient, matched tightly
    for name in ("plain1.bias", "plain2.bias", "last.bias"):
        r = ref_grads[name]
        assert np.linalg.norm(r) > 1e-2 * scale
        assert np.linalg.norm(grads[name] - r) < 1e-4 * np.linalg.norm(r), (schedule, name)


def test_bias_is_an_epilogue_and_its_gradient_a_step():
    g = biased_graph()
    for schedule in FLOAT32:
        steps = [s.name for s in Executor(g, SCHEDULES[schedule], 2, 8).plan.steps]
        fwd = [s for s in steps if s.startswith("c2 fwd")]
        assert len(fwd) == 1 and "bias" in fwd[0], (schedule, fwd)
        grads = [s for s in steps if s.startswith("plain1 bias grad")]
        assert len(grads) == 1, (schedule, steps)
    bnff = [s.name for s in Executor(g, SCHEDULES["bnff"], 2, 8).plan.steps]
    assert "c1 bias grad from BN sums" in bnff  # c1's dx lives only in its prologue


def test_bias_grad_kernel_against_reference():
    st = ConvBiasBackward(dict(mb=2, ic=19, ih=5, iw=7))
    ins = st.make_inputs(np.random.default_rng(0))
    out = st.allocate_outputs()
    st.run(st.default, ins, out)
    assert st.max_rel_error(out, st.reference(ins)) < 1e-6
    assert st.cost(st.default).bytes_read == 2 * 5 * 7 * 19 * 4
