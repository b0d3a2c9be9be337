"""Float32 schedules against the float64 reference, and the contracts of their plans."""
import numpy as np
import pytest

from bnff.measure.measurement import max_rel_grad_diff
from bnff.lowering.executor import Executor, train_step
from bnff.suites.problem import make_batch, make_params
from bnff.lowering.reference_step import train_step as reference_step
from bnff.lowering.schedules import FLOAT32, SCHEDULES
from bnff.suites import networks
from bnff.suites.densenet import densenet
from bnff.suites.resnet import resnet

# the built-in networks' structure at a depth where float32 rounding is not amplified
MINI = {
    "densenet-mini": lambda: densenet("densenet-mini", growth=8, blocks=(2, 3), stem=16,
                                      classes=10),
    "resnet-mini": lambda: resnet("resnet-mini", stages=(1, 2), widths=(8, 16), classes=10),
    "vgg_residual": lambda: networks.load("bnff/suites/examples/vgg_residual.json"),
}
TOL = 1e-4  # float32 against float64 on these graphs: measured below 1e-5


@pytest.fixture(scope="module", params=list(MINI))
def problem(request):
    g = MINI[request.param]()
    params = make_params(g, 1)
    x, labels = make_batch(g, 4, 32, 1)
    return g, params, x, labels, reference_step(g, params, x, labels)


@pytest.mark.parametrize("schedule", FLOAT32)
def test_schedule_matches_reference(problem, schedule):
    g, params, x, labels, (ref_loss, ref_grads) = problem
    loss, grads = train_step(g, params, x, labels, SCHEDULES[schedule])
    assert abs(loss - ref_loss) / ref_loss < 1e-6
    diff, where = max_rel_grad_diff(grads, ref_grads)
    assert diff < TOL, (schedule, where, diff)
    assert all(v.dtype == np.float32 for v in grads.values())


def test_repeated_iterations_give_the_same_result():
    g = MINI["densenet-mini"]()
    ex = Executor(g, SCHEDULES["baseline"], 2, 32)
    ex.load(make_params(g, 0), *make_batch(g, 2, 32, 0))
    ex.run()
    first = ex.loss(), ex.grads()
    times = []
    ex.run(times)
    assert ex.loss() == first[0] and len(times) == len(ex.plan.steps)
    assert all(np.array_equal(first[1][k], v) for k, v in ex.grads().items())


def test_caffe_moves_more_bytes_than_baseline():
    g = networks.load("densenet121")
    plans = {s: Executor(g, SCHEDULES[s], 16, 224).plan for s in ("caffe", "baseline")}
    bn = {s: sum(st.cost.bytes for st in p.steps if st.kind == "bn") for s, p in plans.items()}
    assert bn["caffe"] > bn["baseline"]
    assert plans["caffe"].peak_bytes() > plans["baseline"].peak_bytes()


def test_a_gradient_several_concats_feed_is_contiguous_after_its_view():
    """DenseNet's stem pool feeds every concatenation of block 1: its gradient starts as a
    view of the last one's, and the next part adds the view and itself into a contiguous
    d:pool0 (as autograd does), which the pool backward then reads; a feature one concat alone
    reads keeps its gradient as the view."""
    from bnff.lowering.plan import Ref
    g = MINI["densenet-mini"]()
    plan = Executor(g, SCHEDULES["baseline"], 2, 32).plan
    consumers = g.consumers()
    many = [n for n, cs in consumers.items() if n in plan.tensors and len(cs) > 1
            and all(c.op in ("concat", "batchnorm") for c in cs)
            and g.by_name[n].op in ("conv2d", "maxpool2d", "avgpool2d")]
    assert "pool0" in many
    for x in many:
        assert plan.tensors[f"d:{x}"].slice_of is None, x
        views = [t for t in plan.tensors if t.startswith(f"d:{x}@") and plan.tensors[t].slice_of]
        assert len(views) == 1, x
        readers = [s for s in plan.steps
                   if any(isinstance(a, Ref) and a.name == views[0] for a in s.args)]
        assert len(readers) == 1 and readers[0].kind == "concat", (x, readers)
    one = [n for n, cs in consumers.items() if len(cs) == 1 and cs[0].op == "concat"
           and g.by_name[n].op == "conv2d" and n in plan.tensors]
    assert one and all(plan.tensors[f"d:{x}"].slice_of is not None for x in one)


@pytest.mark.parametrize("schedule", ["baseline", "bnff"])
def test_an_identity_shortcut_takes_the_add_gradient_without_a_copy(schedule):
    """resnet-mini's identity block: the shortcut's gradient is the add's buffer (dA's under
    bnff), as autograd passes an add's gradient on, with no copy step; the block's conv1 adds
    its part into it after the residual branch has read it (the values: the reference test
    above)."""
    g = MINI["resnet-mini"]()
    plan = Executor(g, SCHEDULES[schedule], 2, 32).plan
    consumers = g.consumers()
    shared = [i for n in g.nodes if n.op == "add" for i in n.inputs if len(consumers[i]) > 1]
    assert shared
    for i in shared:
        assert plan.tensors[f"d:{i}"].inplace_of is not None, i
        assert not any(s.name.endswith(f"bwd {i}") for s in plan.steps), i
