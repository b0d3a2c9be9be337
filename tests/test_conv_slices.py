"""Convs on channel slices of wider buffers (DenseNet's block buffer): reading x and dy, writing y
in place, and backward-data accumulating into a gradient slice, equal the contiguous results
and leave the other channels alone."""
import numpy as np
import pytest

from bnff.kernels.conv.conv_bwd_data import conv_backward_data, make_conv_backward_data
from bnff.kernels.conv.conv_bwd_weights import conv_backward_weights
from bnff.kernels.conv.conv_common import out_size, pixels
from bnff.kernels.conv.conv_fwd import conv_forward

SHAPES = [(8, 16, 3, 1, 1), (3, 20, 7, 2, 3), (24, 32, 1, 2, 0)]  # ic, oc, k, stride, pad
IDS = ["ic%d-oc%d-k%d-s%d-p%d" % s for s in SHAPES]


def _case(shape, seed):
    ic, oc, k, s, p = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 9, 10, ic), dtype=np.float32)
    w = (rng.standard_normal((oc, k, k, ic)) / np.sqrt(ic * k * k)).astype(np.float32)
    oh, ow = out_size(9, k, s, p), out_size(10, k, s, p)
    return rng, x, w, (2, oh, ow, oc)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_forward_on_slices(shape):
    rng, x, w, ys = _case(shape, 1)
    ic, oc, s, p = shape[0], shape[1], shape[3], shape[4]
    want = np.empty(ys, np.float32)
    conv_forward(x, w, want, s, p)
    xbuf = rng.standard_normal(x.shape[:3] + (ic + 11,), dtype=np.float32)
    xbuf[..., 5:5 + ic] = x
    ybuf = rng.standard_normal(ys[:3] + (oc + 7,), dtype=np.float32)
    keep = ybuf.copy()
    conv_forward(xbuf[..., 5:5 + ic], w, ybuf[..., 3:3 + oc], s, p)
    np.testing.assert_allclose(ybuf[..., 3:3 + oc], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ybuf[..., :3], keep[..., :3])
    np.testing.assert_array_equal(ybuf[..., 3 + oc:], keep[..., 3 + oc:])


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_backward_data_accumulates_into_slice(shape):
    rng, x, w, ys = _case(shape, 2)
    ic, s, p = shape[0], shape[3], shape[4]
    dy = rng.standard_normal(ys, dtype=np.float32)
    dx = np.empty(x.shape, np.float32)
    conv_backward_data(dy, w, dx, s, p)
    gbuf = rng.standard_normal(x.shape[:3] + (ic + 9,), dtype=np.float32)
    keep = gbuf.copy()
    make_conv_backward_data()(dy, w, gbuf[..., 4:4 + ic], s, p, accumulate=True)
    np.testing.assert_allclose(gbuf[..., 4:4 + ic], keep[..., 4:4 + ic] + dx, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(gbuf[..., :4], keep[..., :4])
    np.testing.assert_array_equal(gbuf[..., 4 + ic:], keep[..., 4 + ic:])


def test_pixels_rejects_other_layouts():
    a = np.zeros((2, 3, 4, 5), np.float32)
    assert pixels(a[..., 1:3])[1] == 5
    for bad in (a[:, ::2], a[..., ::2], a.astype(np.float64), np.transpose(a, (0, 2, 1, 3))):
        with pytest.raises(ValueError):
            pixels(bad)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_backward_weights_on_slices(shape):
    rng, x, w, ys = _case(shape, 3)
    ic, oc, s, p = shape[0], shape[1], shape[3], shape[4]
    dy = rng.standard_normal(ys, dtype=np.float32)
    want = np.empty_like(w)
    conv_backward_weights(x, dy, want, s, p)
    xbuf = rng.standard_normal(x.shape[:3] + (ic + 6,), dtype=np.float32)
    xbuf[..., 6:] = x
    gbuf = rng.standard_normal(ys[:3] + (oc + 5,), dtype=np.float32)
    gbuf[..., 2:2 + oc] = dy
    dw = np.full_like(w, np.nan)
    conv_backward_weights(xbuf[..., 6:], gbuf[..., 2:2 + oc], dw, s, p)
    np.testing.assert_allclose(dw, want, rtol=1e-4, atol=1e-4)
