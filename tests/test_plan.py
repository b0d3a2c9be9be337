"""Plans: lifetimes, peak memory, buffer reuse and in-place aliases."""
import numpy as np
import pytest

from bnff.lowering.plan import RW, Plan, R, W
from bnff.kernels.stage import Cost

NO_COST = Cost(0, 0, 0)


def _copy_add(src, dst):
    dst[...] = src + 1


def _chain(n=4, size=1000):
    p = Plan()
    p.tensor("x", (size,), persistent=True)
    prev = "x"
    for i in range(n):
        p.tensor(f"t{i}", (size,))
        p.step(f"s{i}", "other", "forward", _copy_add, (R(prev), W(f"t{i}")), NO_COST)
        prev = f"t{i}"
    p.tensor("out", (size,), persistent=True)
    p.step("last", "other", "forward", _copy_add, (R(prev), W("out")), NO_COST)
    return p


def test_chain_reuses_buffers_and_computes():
    p = _chain()
    assert p.lifetimes() == {"t0": (0, 1), "t1": (1, 2), "t2": (2, 3), "t3": (3, 4)}
    # x and out, plus two transients live at once
    assert p.peak_bytes() == 4 * 4000
    arrays = p.allocate()
    distinct = {a.__array_interface__["data"][0] for k, a in arrays.items() if k.startswith("t")}
    assert len(distinct) == 2
    arrays["x"][:] = 5
    p.run(p.bind(arrays))
    assert np.all(arrays["out"] == 10)


def test_inplace_alias_shares_the_buffer_and_extends_lifetime():
    p = Plan()
    p.tensor("x", (10,), persistent=True)
    p.tensor("y", (10,))
    p.tensor("z", (10,), inplace_of="y")
    p.tensor("out", (10,), persistent=True)
    p.step("a", "other", "forward", _copy_add, (R("x"), W("y")), NO_COST)
    p.step("relu", "relu", "forward", lambda v: np.maximum(v, 0, out=v), (RW("z"),), NO_COST)
    p.step("b", "other", "forward", _copy_add, (R("z"), W("out")), NO_COST)
    assert p.lifetimes() == {"y": (0, 2)}
    arrays = p.allocate()
    assert np.shares_memory(arrays["y"], arrays["z"])
    arrays["x"][:] = -3
    times = []
    p.run(p.bind(arrays), times)
    assert np.all(arrays["out"] == 1) and len(times) == 3


def test_first_use_must_write_whole():
    p = Plan()
    p.tensor("acc", (4,))
    p.step("accumulate", "other", "backward", lambda a: None, (RW("acc"),), NO_COST)
    with pytest.raises(ValueError, match="does not write it whole"):
        p.peak_bytes()
    with pytest.raises(ValueError, match="not declared"):
        p.step("bad", "other", "forward", lambda a: None, (R("nope"),), NO_COST)


def test_costs_add_up():
    p = _chain(2)
    p.steps[0].cost = Cost(10, 4000, 4000)
    p.steps[1].cost = Cost(5, 4000, 0)
    assert p.cost() == Cost(15, 8000, 4000)


def test_channel_slices_are_views_of_one_buffer():
    """A block buffer written slice by slice: slices share its memory and its lifetime, and
    only the buffer counts towards peak memory."""
    p = Plan()
    p.tensor("x", (2, 3), persistent=True)
    p.tensor("buf", (2, 5))
    p.tensor("f0", (2, 3), slice_of=("buf", 0))
    p.tensor("f1", (2, 2), slice_of=("buf", 3))
    p.tensor("out", (2, 5), persistent=True)
    p.step("a", "other", "forward", _copy_add, (R("x"), W("f0")), NO_COST)
    p.step("b", "other", "forward", lambda a: a.fill(7), (W("f1"),), NO_COST)
    p.step("c", "other", "forward", _copy_add, (R("buf"), W("out")), NO_COST)
    assert p.lifetimes() == {"buf": (0, 2)}
    assert p.peak_bytes() == 4 * (6 + 10 + 10)
    arrays = p.allocate()
    assert np.shares_memory(arrays["f1"], arrays["buf"])
    p.run(p.bind(arrays))
    assert np.all(arrays["out"] == [[2, 2, 2, 8, 8]] * 2)
    with pytest.raises(ValueError, match="no channel slice"):
        p.tensor("bad", (2, 3), slice_of=("buf", 3))


def test_every_staged_step_costs_what_its_stage_declares():
    """A step's StageCall names a stage, shape and variant whose declared cost is the step's:
    what `bnff micro` times is what `bench` runs and counts."""
    from bnff.kernels import registry
    from bnff.lowering.dispatch import lower
    from bnff.lowering.schedules import SCHEDULES
    from bnff.suites import networks
    for net in ("resnet50", "densenet121"):
        g = networks.load(net)
        for name, opt in SCHEDULES.items():
            plan, _ = lower(g, 2, 32, opt)
            staged = [s for s in plan.steps if s.stage is not None]
            assert staged, (net, name)
            for s in staged:
                st = registry.make(s.stage.stage, s.stage.descriptor)
                assert st.cost(s.stage.variant) == s.cost, (net, name, s.name)
            if net == "densenet121" and name in ("caffe", "baseline"):
                assert len(staged) == len(plan.steps)  # layer by layer, every step a stage
