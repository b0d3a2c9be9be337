"""The CI benchmarks cover every registered stage and variant, in exactly one family module,
at layer shapes of the built-in networks; and validation before timing rejects a wrong
variant and one that leaves outputs unwritten."""
import numpy as np
import pytest

import ci_cases
from bnff.cli.micro import ValidationError
from bnff.kernels import registry


@pytest.mark.parametrize("scale", [ci_cases.TIMED, ci_cases.CHECK], ids=["timed", "check"])
def test_every_registered_stage_is_benchmarked(scale):
    got = ci_cases.cases(scale["batch"], scale["image"])
    assert {st.name for st, _, _ in got} == set(registry.STAGES)
    assert {ci_cases.family(type(st)) for st, _, _ in got} == set(ci_cases.FAMILIES)
    for st, nets, count in got:
        assert type(st) is registry.STAGES[st.name]
        assert set(nets) <= set(ci_cases.NETWORKS) and count >= 1
        assert st.shape.get("mb") == scale["batch"]


def test_shapes_are_the_networks_layers():
    """DenseNet-121's 3x3 128->32 conv (its most conv work) and ResNet-50's 3x3 in layer 3
    are timed at their channels, at 1/2 the image side (112 for 224)."""
    conv = {st.descriptor() for st, _, _ in ci_cases.cases(2, 112) if st.name == "conv_fwd"}
    assert conv == {"mb2ic128ih28iw28oc32kh3kw3sh1ph1", "mb2ic256ih7iw7oc256kh3kw3sh1ph1"}


def _broken(kind):
    st = registry.make("relu_fwd", "mb2ic16ih4iw4")
    run = st.run

    def hooked(variant, inputs, outputs):  # test-only: a wrong or incomplete variant
        run(variant, inputs, outputs)
        y = next(iter(outputs.values()))
        if kind == "wrong":
            y.flat[0] += 1.0
        else:
            y.flat[-1] = np.nan
    st.run = hooked
    return st


@pytest.mark.parametrize("kind", ["wrong", "unwritten"])
def test_check_rejects_a_bad_variant(kind):
    st = _broken(kind)
    ins = st.make_inputs(np.random.default_rng(0))
    with pytest.raises(ValidationError, match="relu_fwd variant prange"):
        ci_cases.check(st, "prange", ins, st.reference(ins))


def test_check_accepts_the_kernel():
    st = registry.make("relu_fwd", "mb2ic16ih4iw4")
    ins = st.make_inputs(np.random.default_rng(0))
    _, err, _ = ci_cases.check(st, "prange", ins, st.reference(ins))
    assert err <= st.tolerance
