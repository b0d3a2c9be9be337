"""Every registered stage and variant against the float64 reference at its small example
shapes (bnff/kernels/registry.py), into fresh outputs filled with NaN so a variant that leaves
an element unwritten fails; and the descriptor of every example parses back to the stage."""
import numpy as np
import pytest

from bnff.kernels import registry
from bnff.kernels.stage import DescriptorError
from bnff.measure import measurement

CASES = [(name, d) for name, cls in registry.STAGES.items() for d in cls.examples]


def test_every_stage_has_examples_and_a_valid_default():
    for name, cls in registry.STAGES.items():
        assert cls.examples, f"stage {name} has no example shapes to validate"
        assert cls.default in cls.variants, name


@pytest.mark.parametrize("name,descriptor", CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_variants_match_reference(name, descriptor):
    """Every variant through micro's own validation: fresh NaN outputs, every output the
    reference gives written and finite, within the stage's tolerance."""
    st = registry.make(name, descriptor)
    assert registry.make(name, st.descriptor()).shape == st.shape
    ins = st.make_inputs(np.random.default_rng(0))
    errors = measurement.validate(st, list(st.variants), ins)
    assert set(errors) == set(st.variants)


def test_eps_is_part_of_a_bn_descriptor():
    st = registry.make("bn_normalize", "mb2ic8ih3iw3eps0.001")
    assert st.eps == 0.001 and st.descriptor() == "mb2ic8ih3iw3eps0.001"
    assert registry.make("bn_normalize", "mb2ic8ih3iw3").descriptor().endswith("eps1e-05")


@pytest.mark.parametrize("name,descriptor", [("bn_stats", "mb2ic3"), ("bn_stats", "mb2ic3ih4iw4qq"),
                                             ("concat_fwd", "mb2ic3ih4"), ("relu_fwd", "")])
def test_bad_descriptors_are_refused(name, descriptor):
    with pytest.raises(DescriptorError):
        registry.make(name, descriptor)


def test_unknown_stage_and_variant():
    with pytest.raises(registry.UnknownStage, match="stages: add"):
        registry.make("nope", "mb1")
    st = registry.make("bn_stats", "mb2ic3ih4iw4")
    assert registry.check_variant(st, "default") == "shifted_pairs"
    with pytest.raises(registry.UnknownStage, match="variants: two_pass"):
        registry.check_variant(st, "fast")
