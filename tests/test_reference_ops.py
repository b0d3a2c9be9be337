"""Every float64 reference op's backward checked by central finite differences on tiny shapes."""
import numpy as np
import pytest

from bnff.kernels import reference as R

EPS = 1e-6


def numeric_grad(f, x, dy, samples=12, rng=None):
    """d sum(f(x) * dy) / dx at a few random entries of x; returns (indices, values)."""
    rng = rng or np.random.default_rng(1)
    idx = [tuple(rng.integers(0, s) for s in x.shape) for _ in range(samples)]
    vals = []
    for i in idx:
        xp, xm = x.copy(), x.copy()
        xp[i] += EPS
        xm[i] -= EPS
        vals.append(((f(xp) - f(xm)) * dy).sum() / (2 * EPS))
    return idx, np.array(vals)


def assert_grad(f, x, dx, dy):
    idx, num = numeric_grad(f, x, dy)
    ana = np.array([dx[i] for i in idx])
    np.testing.assert_allclose(ana, num, rtol=1e-5, atol=1e-7)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("k,s,p", [(1, 1, 0), (3, 1, 1), (3, 2, 1), (7, 2, 3), (1, 2, 0)])
def test_conv2d(rng, k, s, p):
    x = rng.standard_normal((2, 3, 9, 9))
    w = rng.standard_normal((4, 3, k, k))
    y = R.conv2d_forward(x, w, s, p)
    assert y.shape == (2, 4, R.out_size(9, k, s, p), R.out_size(9, k, s, p))
    # a direct loop for one output value pins the forward itself
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    assert np.isclose(y[1, 2, 1, 0], (xp[1, :, s:s + k, 0:k] * w[2]).sum())
    dy = rng.standard_normal(y.shape)
    dx, dw = R.conv2d_backward(dy, x, w, s, p)
    assert_grad(lambda v: R.conv2d_forward(v, w, s, p), x, dx, dy)
    assert_grad(lambda v: R.conv2d_forward(x, v, s, p), w, dw, dy)


def test_batchnorm(rng):
    x = rng.standard_normal((3, 4, 5, 5)) * 2 + 1
    g, b = rng.uniform(0.5, 1.5, 4), rng.uniform(-0.5, 0.5, 4)
    y, cache = R.batchnorm_forward(x, g, b, 1e-5)
    np.testing.assert_allclose(((y - b[None, :, None, None]) / g[None, :, None, None])
                               .mean(axis=(0, 2, 3)), 0, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx, dg, db = R.batchnorm_backward(dy, g, cache)
    fwd = lambda x_, g_, b_: R.batchnorm_forward(x_, g_, b_, 1e-5)[0]
    assert_grad(lambda v: fwd(v, g, b), x, dx, dy)
    assert_grad(lambda v: fwd(x, v, b), g, dg, dy)
    assert_grad(lambda v: fwd(x, g, v), b, db, dy)


def test_relu(rng):
    x = rng.standard_normal((2, 3, 4, 4))
    x[np.abs(x) < 1e-3] = 0.5  # keep finite differences away from the kink
    y = R.relu_forward(x)
    dy = rng.standard_normal(y.shape)
    assert_grad(R.relu_forward, x, R.relu_backward(dy, y), dy)


@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_maxpool(rng, k, s, p):
    x = rng.standard_normal((2, 3, 8, 8))
    y, arg = R.maxpool2d_forward(x, k, s, p)
    dy = rng.standard_normal(y.shape)
    dx = R.maxpool2d_backward(dy, arg, x.shape, k, s, p)
    assert_grad(lambda v: R.maxpool2d_forward(v, k, s, p)[0], x, dx, dy)


def test_avgpool(rng):
    x = rng.standard_normal((2, 3, 8, 8))
    y = R.avgpool2d_forward(x, 2, 2)
    assert np.isclose(y[1, 2, 3, 1], x[1, 2, 6:8, 2:4].mean())
    dy = rng.standard_normal(y.shape)
    assert_grad(lambda v: R.avgpool2d_forward(v, 2, 2), x,
                R.avgpool2d_backward(dy, x.shape, 2, 2), dy)


def test_global_avgpool(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    y = R.global_avgpool_forward(x)
    dy = rng.standard_normal(y.shape)
    assert_grad(R.global_avgpool_forward, x, R.global_avgpool_backward(dy, x.shape), dy)


def test_concat_and_add(rng):
    a, b = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 5, 4, 4))
    y = R.concat_forward([a, b])
    dy = rng.standard_normal(y.shape)
    da, db = R.concat_backward(dy, [3, 5])
    assert_grad(lambda v: R.concat_forward([v, b]), a, da, dy)
    assert_grad(lambda v: R.concat_forward([a, v]), b, db, dy)
    c = rng.standard_normal(a.shape)
    np.testing.assert_array_equal(R.add_forward(a, c), a + c)


def test_linear(rng):
    x, w, b = rng.standard_normal((3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    y = R.linear_forward(x, w, b)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = R.linear_backward(dy, x, w)
    assert_grad(lambda v: R.linear_forward(v, w, b), x, dx, dy)
    assert_grad(lambda v: R.linear_forward(x, v, b), w, dw, dy)
    assert_grad(lambda v: R.linear_forward(x, w, v), b, db, dy)


def test_softmax_cross_entropy(rng):
    z, labels = rng.standard_normal((4, 6)) * 3, np.array([0, 5, 2, 2])
    loss, dz = R.softmax_cross_entropy(z, labels)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert np.isclose(loss, -np.log(p[np.arange(4), labels]).mean())
    assert_grad(lambda v: np.array(R.softmax_cross_entropy(v, labels)[0]), z, dz,
                np.array(1.0))
