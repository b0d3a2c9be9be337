"""The BN-site convs of `bnff micro`: the fused variant moves exactly the passes it removes
fewer bytes (both variants against the float64 reference: tests/test_stages.py)."""
from bnff.kernels.conv.conv_fused import ConvBwdDataReLUSums, ConvFwdBNReLU

SHAPES = [dict(mb=2, ic=32, ih=9, iw=8, oc=16, kh=3, kw=3, sh=1, ph=1),
          dict(mb=2, ic=24, ih=8, iw=8, oc=40, kh=1, kw=1, sh=2, ph=0)]


def test_fused_bytes():
    s = SHAPES[0]
    sx, sy = 2 * 9 * 8 * 32 * 4, 2 * 9 * 8 * 16 * 4
    fwd = ConvFwdBNReLU(s)
    assert fwd.cost("separate").bytes - fwd.cost("fused").bytes == 2 * sx + sy  # z, stats
    bwd = ConvBwdDataReLUSums(s)
    assert bwd.cost("separate").bytes - bwd.cost("fused").bytes == 2 * sx  # dz read, g write
