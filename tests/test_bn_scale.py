"""Bytes of Caffe's Scale layer kernels (their values: tests/test_stages.py)."""
from bnff.kernels.bn.bn_scale import BNScale, BNScaleBackward


def test_scale_bytes():
    m, c = 2 * 7 * 7, 64
    assert BNScale(dict(mb=2, ic=c, ih=7, iw=7)).cost("forward").bytes == 4 * (2 * m * c + 2 * c)
    assert BNScaleBackward(dict(mb=2, ic=c, ih=7, iw=7)).cost("one_pass").bytes == \
        4 * (3 * m * c + 3 * c)
