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
    """The convs timed are the ones with the most conv work: DenseNet-121's 3x3 128->32 of
    block 1 and ResNet-50's 3x3 256->256 of layer 3, at their own channels and image size."""
    timed = ci_cases.cases(ci_cases.TIMED["batch"], ci_cases.TIMED["image"])
    conv = {st.descriptor(): nets for st, nets, _ in timed if st.name == "conv_fwd"}
    assert conv == {"mb4ic128ih56iw56oc32kh3kw3sh1ph1": ["densenet121"],
                    "mb4ic256ih14iw14oc256kh3kw3sh1ph1": ["resnet50"]}


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
