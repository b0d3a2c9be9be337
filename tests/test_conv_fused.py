"""The BN-site convs of `bnff micro`: both variants equal the float64 reference, and the fused
one moves exactly the passes it removes fewer bytes."""
import numpy as np
import pytest

from bnff.kernels.conv.conv_fused import ConvBwdDataReLUSums, ConvFwdBNReLU

SHAPES = [dict(mb=2, ic=32, ih=9, iw=8, oc=16, kh=3, kw=3, sh=1, ph=1),
          dict(mb=2, ic=24, ih=8, iw=8, oc=40, kh=1, kw=1, sh=2, ph=0)]


@pytest.mark.parametrize("cls", [ConvFwdBNReLU, ConvBwdDataReLUSums])
@pytest.mark.parametrize("shape", SHAPES, ids=["k3", "k1s2"])
def test_variants_match_reference(cls, shape):
    st = cls(shape)
    ins = st.make_inputs(np.random.default_rng(0))
    ref = st.reference(ins)
    for v in st.variants:
        out = st.allocate_outputs()
        for a in out.values():
            a.fill(np.nan)
        st.run(v, ins, out)
        assert st.max_rel_error(out, ref) < st.tolerance, v


def test_fused_bytes():
    s = SHAPES[0]
    sx, sy = 2 * 9 * 8 * 32 * 4, 2 * 9 * 8 * 16 * 4
    fwd = ConvFwdBNReLU(s)
    assert fwd.cost("separate").bytes - fwd.cost("fused").bytes == 2 * sx + sy  # z, stats
    bwd = ConvBwdDataReLUSums(s)
    assert bwd.cost("separate").bytes - bwd.cost("fused").bytes == 2 * sx  # dz read, g write
