"""Caffe's Scale layer kernels against their float64 reference."""
import numpy as np
import pytest

from bnff.kernels.bn.bn_scale import BNScale, BNScaleBackward


@pytest.mark.parametrize("cls", [BNScale, BNScaleBackward])
@pytest.mark.parametrize("shape", [dict(mb=2, ic=64, ih=7, iw=7), dict(mb=1, ic=13, ih=5, iw=3)])
def test_scale_matches_reference(cls, shape):
    st = cls(shape)
    ins = st.make_inputs(np.random.default_rng(0))
    for v in st.variants:
        out = st.allocate_outputs()
        st.run(v, ins, out)
        assert st.max_rel_error(out, st.reference(ins)) < 1e-5


def test_scale_bytes():
    m, c = 2 * 7 * 7, 64
    assert BNScale(dict(mb=2, ic=c, ih=7, iw=7)).cost("forward").bytes == 4 * (2 * m * c + 2 * c)
    assert BNScaleBackward(dict(mb=2, ic=c, ih=7, iw=7)).cost("one_pass").bytes == \
        4 * (3 * m * c + 3 * c)
