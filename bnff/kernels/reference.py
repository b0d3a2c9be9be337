"""Float64 NumPy reference of every op, forward and backward, in NCHW.

Every Numba variant in `kernels/` is checked against these; the reference training
iteration (`bnff/lowering/reference_step.py`) is built from them. Clarity over speed.

Layouts: activations [N, C, H, W]; conv weights [O, I, KH, KW]; linear weights [out, in].

BatchNorm (training mode), per channel over the m = N*H*W values:
    mean = sum(x)/m,  var = sum((x-mean)^2)/m,  inv = 1/sqrt(var+eps),  xh = (x-mean)*inv
    y = gamma*xh + beta
    dbeta = sum(dy),  dgamma = sum(dy*xh),  dx = gamma*inv*(dy - dbeta/m - xh*dgamma/m)
Softmax cross-entropy: loss = mean_i(logsumexp(z_i) - z_i[label_i]),
    dz = (softmax(z) - onehot(label)) / N.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _pad(x, ph, pw, value=0.0):
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _windows(x, kh, kw, stride, padding, value=0.0):
    """[N, C, OH, OW, KH, KW] view of the (padded) input windows."""
    xp = _pad(x, padding, padding, value)
    return sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]


# --- conv2d ------------------------------------------------------------------------------

def conv2d_forward(x, w, stride=1, padding=0, bias=None):
    """y = conv(x, w) (+ bias[o] on every output pixel of channel o)."""
    cols = _windows(x, w.shape[2], w.shape[3], stride, padding)
    y = np.einsum("ncpqij,ocij->nopq", cols, w, optimize=True)
    return y if bias is None else y + bias[None, :, None, None]


def conv2d_bias_backward(dy):
    """dbias[o] = sum of dy over batch and pixels."""
    return dy.sum(axis=(0, 2, 3))


def conv2d_backward(dy, x, w, stride=1, padding=0):
    """Returns (dx, dw)."""
    kh, kw = w.shape[2], w.shape[3]
    cols = _windows(x, kh, kw, stride, padding)
    dw = np.einsum("nopq,ncpqij->ocij", dy, cols, optimize=True)
    n, c, h, wd = x.shape
    oh, ow = dy.shape[2], dy.shape[3]
    dxp = np.zeros((n, c, h + 2 * padding, wd + 2 * padding))
    dcols = np.einsum("nopq,ocij->ncpqij", dy, w, optimize=True)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += dcols[..., i, j]
    dx = dxp[:, :, padding:padding + h, padding:padding + wd]
    return dx, dw


# --- batchnorm ---------------------------------------------------------------------------

def batchnorm_stats(x):
    """Two-pass per-channel mean and biased variance."""
    mean = x.mean(axis=(0, 2, 3))
    var = ((x - mean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))
    return mean, var


def batchnorm_forward(x, gamma, beta, eps=1e-5):
    """Returns (y, (xh, inv)) with inv = 1/sqrt(var+eps)."""
    mean, var = batchnorm_stats(x)
    inv = 1.0 / np.sqrt(var + eps)
    xh = (x - mean[None, :, None, None]) * inv[None, :, None, None]
    return gamma[None, :, None, None] * xh + beta[None, :, None, None], (xh, inv)


def batchnorm_backward(dy, gamma, cache):
    """Returns (dx, dgamma, dbeta)."""
    xh, inv = cache
    m = dy.shape[0] * dy.shape[2] * dy.shape[3]
    dbeta = dy.sum(axis=(0, 2, 3))
    dgamma = (dy * xh).sum(axis=(0, 2, 3))
    c = lambda v: v[None, :, None, None]
    dx = c(gamma * inv) * (dy - c(dbeta / m) - xh * c(dgamma / m))
    return dx, dgamma, dbeta


# --- elementwise ---------------------------------------------------------------------------

def relu_forward(x):
    return np.maximum(x, 0.0)


def relu_backward(dy, y):
    """Gradient of relu given its output y (or input: the mask y > 0 is the same)."""
    return dy * (y > 0)


def add_forward(a, b):
    return a + b


def concat_forward(xs):
    return np.concatenate(xs, axis=1)


def concat_backward(dy, channels):
    return np.split(dy, np.cumsum(channels)[:-1], axis=1)


# --- pooling -------------------------------------------------------------------------------

def maxpool2d_forward(x, kernel, stride, padding=0):
    """Returns (y, argmax) with argmax the flat window index of each maximum (first wins)."""
    win = _windows(x, kernel, kernel, stride, padding, value=-np.inf)
    flat = win.reshape(win.shape[:4] + (kernel * kernel,))
    arg = flat.argmax(axis=-1)
    return np.take_along_axis(flat, arg[..., None], axis=-1)[..., 0], arg


def maxpool2d_backward(dy, argmax, x_shape, kernel, stride, padding=0):
    n, c, h, w = x_shape
    oh, ow = dy.shape[2], dy.shape[3]
    dxp = np.zeros((n, c, h + 2 * padding, w + 2 * padding))
    for i in range(kernel):
        for j in range(kernel):
            sel = dy * (argmax == i * kernel + j)
            dxp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += sel
    return dxp[:, :, padding:padding + h, padding:padding + w]


def avgpool2d_forward(x, kernel, stride):
    return _windows(x, kernel, kernel, stride, 0).mean(axis=(4, 5))


def avgpool2d_backward(dy, x_shape, kernel, stride):
    n, c, h, w = x_shape
    oh, ow = dy.shape[2], dy.shape[3]
    dx = np.zeros(x_shape)
    for i in range(kernel):
        for j in range(kernel):
            dx[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += dy / (kernel * kernel)
    return dx


def global_avgpool_forward(x):
    return x.mean(axis=(2, 3))


def global_avgpool_backward(dy, x_shape):
    n, c, h, w = x_shape
    return np.broadcast_to(dy[:, :, None, None] / (h * w), x_shape).copy()


def flatten_forward(x):
    """[N, C, H, W] -> [N, C*H*W]."""
    return x.reshape(x.shape[0], -1)


def flatten_backward(dy, x_shape):
    return dy.reshape(x_shape)


# --- linear and loss -----------------------------------------------------------------------

def linear_forward(x, w, b):
    return x @ w.T + b


def linear_backward(dy, x, w):
    """Returns (dx, dw, db)."""
    return dy @ w, dy.T @ x, dy.sum(axis=0)


def softmax_cross_entropy(z, labels):
    """Returns (loss, dz): mean cross-entropy of softmax(z) against integer labels."""
    n = z.shape[0]
    zs = z - z.max(axis=1, keepdims=True)
    logp = zs - np.log(np.exp(zs).sum(axis=1, keepdims=True))
    loss = -logp[np.arange(n), labels].mean()
    dz = np.exp(logp)
    dz[np.arange(n), labels] -= 1.0
    return float(loss), dz / n
