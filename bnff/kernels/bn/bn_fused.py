"""Fused BN stages of the `bnff` and `fission` schedules: BN fission puts the per-channel
arithmetic into O(C) coefficient functions, and fusion leaves one streaming pass per site.

Forward, per channel c over the m = N*H*W rows of the [M, C] views (NHWC tensors), with the
batch statistics mean, var (biased) and inv = 1 / sqrt(var + eps):

    a = gamma * inv,   b = beta - mean * a          y = gamma * (x - mean) * inv + beta = a*x + b
    z = max(a*x + b, 0)                             (BN + ReLU)
    z = max(a*x + b + s, 0)                         (BN + identity shortcut + ReLU)
    z = max(a1*x1 + b1 + a2*x2 + b2, 0)             (BN + BN of the projection + ReLU)

Statistics from the per-task float64 sums s1 = sum(x), s2 = sum(x^2) of a conv epilogue:
mean = s1/m, var = max(s2/m - mean^2, 0), all in float64 (the float32 data is exact in it).

Backward, with dz the gradient at the ReLU output and dy = dz * [a*x + b > 0] (or [z > 0]):

    s1 = sum(dy),  s2 = sum(dy * x)
    dbeta  = s1,   dgamma = sum(dy * (x - mean)) * inv = inv * (s2 - mean * s1)
    dx = a * (dy - dbeta/m - (x - mean) * inv * dgamma/m) = a*dy + p*x + q,
         p = -a * inv * dgamma / m,   q = -p * mean - a * dbeta / m

The row-block loops are bnff/kernels/rows.py's, given their per-row or per-element functions
here: the elementwise passes its row_blocks, the reductions its channel_sums (BLOCKS row
blocks, float32 tiles of TILE_ROWS rows flushed into per-block float64 partials, merged
serially). s2 = sum(dy * x) is accumulated as
sum(dy * (x - k)) + k * s1 with k = X[0] per channel, so its float32 tiles do not lose the
centered part when |mean| >> std (the same shift as stats_shifted).

Kernels ([M, C] float32 views, C-contiguous rows or channel slices of a wider buffer; vectors
float32 [C]; s1, s2 float64; outputs last, written; DX of bn_dx_add read and written; the dx
kernels run on flat rows with strides (conv_common.pixels), so a slice vectorizes too):
    bn_coefficients(mean, var, gamma, beta, eps, a, b)
    normalize_relu(X, a, b, Y)
    normalize_add_relu(X, a, b, S, Y)
    normalize2_add_relu(X1, a1, b1, X2, a2, b2, Y)
    stats_from_sums(s1, s2, m, mean, var)                 s1, s2 float64 [T, C]
    relu_mask_sums(DZ, X, a, b, DY, s1, s2)               s1, s2 float64 [C]
    relu_mask_sums_z(DZ, Z, X, DY, s1, s2)
    dy_sums(DY, X, s1, s2)
    bn_backward_coefficients(s1, s2, mean, var, gamma, eps, m, dgamma, dbeta, a, p, q)
    bn_dx(DY, X, a, p, q, DX)
    bn_dx_add(DY, X, a, p, q, DX)
    bn_relu_dx(DZ, X, af, bf, a, p, q, DX)       dy = dz * [af*x + bf > 0] formed on the fly
    bn_relu_dx_add(DZ, X, af, bf, a, p, q, DX)   (dz left unmasked by a store-free epilogue)

Each Stage below runs its kernel after the O(C) coefficient function it needs, so it takes the
same per-channel inputs (mean, var, gamma, beta) as the unfused stages and its reference is the
composition of the unfused float64 ops.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from bnff.kernels import reference as ref
from bnff.kernels.rows import channel_sums, dy_product_sums, merge_blocks, row_blocks
from bnff.kernels.conv.conv_common import pixels
from bnff.kernels.bn.bn_normalize import bn_inputs
from bnff.kernels.stage import F32, ActivationStage, Cost

F64 = 8  # bytes per float64

# --- per-channel coefficients (serial, O(C)) ------------------------------------------------


@njit(cache=True)
def bn_coefficients(mean, var, gamma, beta, eps, a, b):
    """a = gamma * inv, b = beta - mean * a, in float64 then rounded."""
    for j in range(mean.shape[0]):
        aj = gamma[j] / np.sqrt(np.float64(var[j]) + eps)
        a[j] = aj
        b[j] = beta[j] - mean[j] * aj


@njit(cache=True)
def stats_from_sums(s1, s2, m, mean, var):
    """mean, biased var from per-task float64 sums of x and x^2 ([T, C]), merged in float64."""
    for j in range(s1.shape[1]):
        t1 = 0.0
        t2 = 0.0
        for t in range(s1.shape[0]):
            t1 += s1[t, j]
            t2 += s2[t, j]
        mu = t1 / m
        mean[j] = mu
        var[j] = max(t2 / m - mu * mu, 0.0)


@njit(cache=True)
def bn_backward_coefficients(s1, s2, mean, var, gamma, eps, m, dgamma, dbeta, a, p, q):
    """dgamma, dbeta and the dx = a*dy + p*x + q coefficients from s1 = sum(dy), s2 = sum(dy*x)."""
    for j in range(mean.shape[0]):
        inv = 1.0 / np.sqrt(np.float64(var[j]) + eps)
        mu = np.float64(mean[j])
        db = s1[j]
        dg = inv * (s2[j] - mu * db)
        aj = gamma[j] * inv
        pj = -aj * inv * dg / m
        dbeta[j] = db
        dgamma[j] = dg
        a[j] = aj
        p[j] = pj
        q[j] = -pj * mu - aj * db / m


# --- forward: normalize (+ add) + ReLU, one pass ----------------------------------------------


@njit(inline="always")
def _relu_row(args, r):
    """Y[r] = max(a*X[r] + b, 0): args = (X, a, b, Y)."""
    X, a, b = args[:3]
    for j in range(X.shape[1]):
        args[3][r, j] = max(a[j] * X[r, j] + b[j], np.float32(0.0))


@njit(inline="always")
def _add_relu_row(args, r):
    """Y[r] = max(a*X[r] + b + S[r], 0): args = (X, a, b, S, Y)."""
    X, a, b, S = args[:4]
    for j in range(X.shape[1]):
        args[4][r, j] = max(a[j] * X[r, j] + b[j] + S[r, j], np.float32(0.0))


@njit(inline="always")
def _two_relu_row(args, r):
    """Y[r] = max(a1*X1[r] + a2*X2[r] + b, 0): args = (X1, a1, X2, a2, b, Y)."""
    X1, a1, X2, a2, b = args[:5]
    for j in range(X1.shape[1]):
        args[5][r, j] = max(a1[j] * X1[r, j] + a2[j] * X2[r, j] + b[j], np.float32(0.0))


_relu_rows = row_blocks(_relu_row)
_add_relu_rows = row_blocks(_add_relu_row)
_two_relu_rows = row_blocks(_two_relu_row)


@njit(cache=True)
def normalize_relu(X, a, b, Y):
    """Y = max(a*X + b, 0): reads X, writes Y."""
    _relu_rows((X, a, b, Y), X.shape[0])


@njit(cache=True)
def normalize_add_relu(X, a, b, S, Y):
    """Y = max(a*X + b + S, 0): reads X and S, writes Y."""
    _add_relu_rows((X, a, b, S, Y), X.shape[0])


@njit(cache=True)
def normalize2_add_relu(X1, a1, b1, X2, a2, b2, Y):
    """Y = max(a1*X1 + a2*X2 + (b1 + b2), 0): reads X1 and X2, writes Y."""
    _two_relu_rows((X1, a1, X2, a2, b1 + b2, Y), X1.shape[0])


# --- backward: ReLU mask + BN reductions, one pass --------------------------------------------


@njit(inline="always")
def _masked_by_bn(args, r, j, t):
    """dy = dz * [a*x + b > 0] stored in DY and summed: args = (DZ, X, a, b, DY, k)."""
    DZ, X, a, b = args[:4]
    k = args[5]
    x = X[r, j]
    g = DZ[r, j]
    g = g if a[j] * x + b[j] > 0 else np.float32(0.0)
    args[4][r, j] = g
    t[0, j] += g
    t[1, j] += g * (x - k[j])


@njit(inline="always")
def _masked_by_z(args, r, j, t):
    """dy = dz * [z > 0] stored in DY and summed: args = (DZ, Z, X, DY, k)."""
    DZ, Z, X = args[:3]
    k = args[4]
    g = DZ[r, j]
    g = g if Z[r, j] > 0 else np.float32(0.0)
    args[3][r, j] = g
    t[0, j] += g
    t[1, j] += g * (X[r, j] - k[j])


@njit(inline="always")
def _shifted_dy_sums(sums, args, X, s1, s2):
    """s1 = sum(dy), s2 = sum(dy * X) over the rows of X from the kernel sums (channel_sums of
    an elem adding dy into t[0, j] and dy * (X - k) into t[1, j]) given args + (k,), k = X[0];
    the shift undone after the merge (s2 += k * s1)."""
    m, c = X.shape
    k = X[0].copy()
    part = sums(args + (k,), m, c)
    merge_blocks(part[:, 0], 1.0, s1)
    merge_blocks(part[:, 1], 1.0, s2)
    for j in range(c):
        s2[j] += k[j] * s1[j]


_masked_by_bn_sums = channel_sums(_masked_by_bn, 2)
_masked_by_z_sums = channel_sums(_masked_by_z, 2)


@njit(cache=True)
def relu_mask_sums(DZ, X, a, b, DY, s1, s2):
    """DY = DZ * [a*X + b > 0], s1 = sum(DY), s2 = sum(DY * X): reads DZ and X, writes DY."""
    _shifted_dy_sums(_masked_by_bn_sums, (DZ, X, a, b, DY), X, s1, s2)


@njit(cache=True)
def relu_mask_sums_z(DZ, Z, X, DY, s1, s2):
    """DY = DZ * [Z > 0], s1 = sum(DY), s2 = sum(DY * X): reads DZ, Z and X, writes DY."""
    _shifted_dy_sums(_masked_by_z_sums, (DZ, Z, X, DY), X, s1, s2)


@njit(cache=True)
def dy_sums(DY, X, s1, s2):
    """s1 = sum(DY), s2 = sum(DY * X): reads DY and X (the second BN of a projection add)."""
    _shifted_dy_sums(dy_product_sums, (DY, X), X, s1, s2)


# --- backward: BN input gradient, one pass ----------------------------------------------------


@njit(inline="always")
def _dx_row(args, r):
    """dx (+)= a*dy + p*x + q on row r of flat arrays with row strides: args = (dy, ldy, x, ldx,
    a, p, q, dx, ldd, accumulate). Each row is a contiguous 1-D view and the accumulate test is
    outside the loop over it: with flat indices, or the test inside, the loop stayed scalar (4x
    slower)."""
    dy, ldy, x, ldx, a, p, q = args[:7]
    ldd, accumulate = args[8:]
    c = a.shape[0]
    yr = dy[r * ldy:r * ldy + c]
    xr = x[r * ldx:r * ldx + c]
    dr = args[7][r * ldd:r * ldd + c]
    if accumulate:
        for j in range(c):
            dr[j] += a[j] * yr[j] + p[j] * xr[j] + q[j]
    else:
        for j in range(c):
            dr[j] = a[j] * yr[j] + p[j] * xr[j] + q[j]


@njit(inline="always")
def _relu_dx_row(args, r):
    """dx (+)= a*dz*[af*x + bf > 0] + p*x + q on row r, organized as _dx_row: args = (dz, ldz,
    x, ldx, af, bf, a, p, q, dx, ldd, accumulate). dz is loaded before the mask selects it: a
    load under the condition becomes a masked vector load, slow on AMD Zen (half the
    bandwidth)."""
    dz, ldz, x, ldx, af, bf, a, p, q = args[:9]
    ldd, accumulate = args[10:]
    c = a.shape[0]
    zr = dz[r * ldz:r * ldz + c]
    xr = x[r * ldx:r * ldx + c]
    dr = args[9][r * ldd:r * ldd + c]
    if accumulate:
        for j in range(c):
            xv = xr[j]
            g = zr[j]
            g = g if af[j] * xv + bf[j] > 0 else np.float32(0.0)
            dr[j] += a[j] * g + p[j] * xv + q[j]
    else:
        for j in range(c):
            xv = xr[j]
            g = zr[j]
            g = g if af[j] * xv + bf[j] > 0 else np.float32(0.0)
            dr[j] = a[j] * g + p[j] * xv + q[j]


dx_rows = row_blocks(_dx_row)
relu_dx_rows = row_blocks(_relu_dx_row)


def bn_dx(DY, X, a, p, q, DX):
    """DX = a*DY + p*X + q: reads DY and X, writes DX."""
    dx_rows((*pixels(DY), *pixels(X), a, p, q, *pixels(DX), False), X.shape[0])


def bn_dx_add(DY, X, a, p, q, DX):
    """DX += a*DY + p*X + q: reads DY, X and DX, writes DX (a gradient several consumers feed)."""
    dx_rows((*pixels(DY), *pixels(X), a, p, q, *pixels(DX), True), X.shape[0])


def bn_relu_dx(DZ, X, af, bf, a, p, q, DX):
    """DX = a*DZ*[af*X + bf > 0] + p*X + q: reads DZ and X, writes DX."""
    relu_dx_rows((*pixels(DZ), *pixels(X), af, bf, a, p, q, *pixels(DX), False), X.shape[0])


def bn_relu_dx_add(DZ, X, af, bf, a, p, q, DX):
    """DX += a*DZ*[af*X + bf > 0] + p*X + q: reads DZ, X and DX, writes DX."""
    relu_dx_rows((*pixels(DZ), *pixels(X), af, bf, a, p, q, *pixels(DX), True), X.shape[0])


# --- stages -----------------------------------------------------------------------------------


def _nchw64(t):
    return np.moveaxis(t, 3, 1).astype(np.float64)


def _nhwc(t):
    return np.moveaxis(t, 1, 3)


class _Fused(ActivationStage):
    """Shape keys: mb, ic, ih, iw. Activations [mb, ih, iw, ic], per-channel vectors [ic]."""

    eps = 1e-5

    def _x(self, rng):
        """A BN input (std 2, mean 0.5) with its batch statistics, gamma and beta."""
        return bn_inputs(rng, self.shape)

    def _coefficients(self, i, suffix=""):
        """(a, b) of the BN whose inputs carry `suffix` (bn_coefficients on fresh [C] arrays)."""
        c = self.shape["ic"]
        a, b = np.empty(c, np.float32), np.empty(c, np.float32)
        bn_coefficients(i["mean" + suffix], i["var" + suffix], i["gamma" + suffix],
                        i["beta" + suffix], self.eps, a, b)
        return a, b

    def _bn(self, i, suffix=""):
        """float64 NCHW BN forward output of x<suffix> (batch statistics recomputed)."""
        g = lambda k: i[k + suffix].astype(np.float64)
        y, _ = ref.batchnorm_forward(_nchw64(i["x" + suffix]), g("gamma"), g("beta"), self.eps)
        return y

    def _cost(self, flops, reads, writes, vec_reads=0, vec_writes=0):
        """Cost of `reads` / `writes` activation passes and per-channel [C] byte counts."""
        m, c = self._size()
        s = m * c * F32
        return Cost(flops=flops * m * c, bytes_read=reads * s + vec_reads * c,
                    bytes_written=writes * s + vec_writes * c)


class BNReLU(_Fused):
    """z = relu(BN(x)) in one pass. Inputs x, mean, var, gamma, beta; output z."""

    name = "bn_relu"
    variants = {"fused": normalize_relu}
    default = "fused"

    def make_inputs(self, rng):
        return self._x(rng)

    def allocate_outputs(self):
        return {"z": np.empty(self._act(), np.float32)}

    def run(self, variant, inputs, outputs):
        m, c = self._size()
        a, b = self._coefficients(inputs)
        self.variants[variant](inputs["x"].reshape(m, c), a, b, outputs["z"].reshape(m, c))

    def reference(self, inputs):
        return {"z": _nhwc(ref.relu_forward(self._bn(inputs)))}

    def cost(self, variant):
        return self._cost(3, 1, 1, vec_reads=4 * F32)


class BNAddReLU(_Fused):
    """z = relu(BN(x) + s), s the identity shortcut. Inputs x, mean, var, gamma, beta, s."""

    name = "bn_add_relu"
    variants = {"fused": normalize_add_relu}
    default = "fused"

    def make_inputs(self, rng):
        i = self._x(rng)
        i["s"] = rng.standard_normal(self._act(), dtype=np.float32)
        return i

    def allocate_outputs(self):
        return {"z": np.empty(self._act(), np.float32)}

    def run(self, variant, inputs, outputs):
        m, c = self._size()
        a, b = self._coefficients(inputs)
        self.variants[variant](inputs["x"].reshape(m, c), a, b, inputs["s"].reshape(m, c),
                               outputs["z"].reshape(m, c))

    def reference(self, inputs):
        y = ref.add_forward(self._bn(inputs), _nchw64(inputs["s"]))
        return {"z": _nhwc(ref.relu_forward(y))}

    def cost(self, variant):
        return self._cost(4, 2, 1, vec_reads=4 * F32)


class BN2AddReLU(_Fused):
    """z = relu(BN1(x1) + BN2(x2)), the projection block's end. Inputs x1, mean1, var1,
    gamma1, beta1 and the same with suffix 2; output z."""

    name = "bn2_add_relu"
    variants = {"fused": normalize2_add_relu}
    default = "fused"

    def make_inputs(self, rng):
        return {k + sfx: v for sfx in ("1", "2") for k, v in self._x(rng).items()}

    def allocate_outputs(self):
        return {"z": np.empty(self._act(), np.float32)}

    def run(self, variant, inputs, outputs):
        m, c = self._size()
        a1, b1 = self._coefficients(inputs, "1")
        a2, b2 = self._coefficients(inputs, "2")
        self.variants[variant](inputs["x1"].reshape(m, c), a1, b1, inputs["x2"].reshape(m, c),
                               a2, b2, outputs["z"].reshape(m, c))

    def reference(self, inputs):
        y = ref.add_forward(self._bn(inputs, "1"), self._bn(inputs, "2"))
        return {"z": _nhwc(ref.relu_forward(y))}

    def cost(self, variant):
        return self._cost(5, 2, 1, vec_reads=8 * F32)


class StatsFromSums(_Fused):
    """BN statistics from per-task float64 sums of x and x^2, as a conv epilogue leaves them
    (channel_sums_epilogue). Inputs x (mean 1000, std 1: the cancellation stress case) and its
    sums s1, s2 [T, C], T = `tasks` (default 2); outputs mean, var. Reads only s1, s2."""

    name = "bn_stats_from_sums"
    variants = {"float64": stats_from_sums}
    default = "float64"

    def _tasks(self):
        return self.shape.get("tasks", 2)

    def make_inputs(self, rng):
        m, c = self._size()
        x = rng.standard_normal(self._act(), dtype=np.float32) + np.float32(1000.0)
        t = self._tasks()
        s1, s2 = np.zeros((t, c)), np.zeros((t, c))
        for k, rows in enumerate(np.array_split(x.reshape(m, c).astype(np.float64), t)):
            s1[k] = rows.sum(0)
            s2[k] = (rows * rows).sum(0)
        return {"x": x, "s1": s1, "s2": s2}

    def allocate_outputs(self):
        c = self.shape["ic"]
        return {"mean": np.empty(c, np.float32), "var": np.empty(c, np.float32)}

    def run(self, variant, inputs, outputs):
        m, _ = self._size()
        self.variants[variant](inputs["s1"], inputs["s2"], m, outputs["mean"], outputs["var"])

    def reference(self, inputs):
        mean, var = ref.batchnorm_stats(_nchw64(inputs["x"]))
        return {"mean": mean, "var": var}

    def cost(self, variant):
        m, c = self._size()
        return Cost(flops=2 * self._tasks() * c + 4 * c,
                    bytes_read=2 * self._tasks() * c * F64, bytes_written=2 * c * F32)


def _sums(dy, x):
    """Reference s1 = sum(dy), s2 = sum(dy * x) per channel of float64 NCHW tensors."""
    return {"s1": dy.sum((0, 2, 3)), "s2": (dy * x).sum((0, 2, 3))}


class ReLUMaskSums(_Fused):
    """The backward of BN + ReLU up to BN's reductions, one pass: dy = relu_backward(dz,
    BN(x)), s1 = sum(dy), s2 = sum(dy * x). Inputs dz, x, mean, var, gamma, beta; outputs
    dy, s1, s2."""

    name = "relu_mask_sums"
    variants = {"fused": relu_mask_sums}
    default = "fused"

    def make_inputs(self, rng):
        i = self._x(rng)
        i["dz"] = rng.standard_normal(self._act(), dtype=np.float32)
        return i

    def allocate_outputs(self):
        c = self.shape["ic"]
        return {"dy": np.empty(self._act(), np.float32), "s1": np.empty(c), "s2": np.empty(c)}

    def run(self, variant, inputs, outputs):
        m, c = self._size()
        a, b = self._coefficients(inputs)
        self.variants[variant](inputs["dz"].reshape(m, c), inputs["x"].reshape(m, c), a, b,
                               outputs["dy"].reshape(m, c), outputs["s1"], outputs["s2"])

    def reference(self, inputs):
        dy = ref.relu_backward(_nchw64(inputs["dz"]), self._bn(inputs))
        return {"dy": _nhwc(dy), **_sums(dy, _nchw64(inputs["x"]))}

    def cost(self, variant):
        return self._cost(6, 2, 1, vec_reads=4 * F32, vec_writes=2 * F64)


class ReLUMaskSumsZ(_Fused):
    """As relu_mask_sums with the mask from the stored ReLU output z (a block output):
    dy = relu_backward(dz, z). Inputs dz, z, x; outputs dy, s1, s2."""

    name = "relu_mask_sums_z"
    variants = {"fused": relu_mask_sums_z}
    default = "fused"

    def make_inputs(self, rng):
        act = self._act()
        return {"dz": rng.standard_normal(act, dtype=np.float32),
                "z": np.maximum(rng.standard_normal(act, dtype=np.float32), np.float32(0.0)),
                "x": self._x(rng)["x"]}

    def allocate_outputs(self):
        c = self.shape["ic"]
        return {"dy": np.empty(self._act(), np.float32), "s1": np.empty(c), "s2": np.empty(c)}

    def run(self, variant, inputs, outputs):
        m, c = self._size()
        v = lambda t: t.reshape(m, c)
        self.variants[variant](v(inputs["dz"]), v(inputs["z"]), v(inputs["x"]),
                               v(outputs["dy"]), outputs["s1"], outputs["s2"])

    def reference(self, inputs):
        dy = ref.relu_backward(_nchw64(inputs["dz"]), _nchw64(inputs["z"]))
        return {"dy": _nhwc(dy), **_sums(dy, _nchw64(inputs["x"]))}

    def cost(self, variant):
        return self._cost(6, 3, 1, vec_writes=2 * F64)


class DYSums(_Fused):
    """BN's two reductions alone: s1 = sum(dy), s2 = sum(dy * x). Inputs dy, x; outputs s1, s2."""

    name = "dy_sums"
    variants = {"fused": dy_sums}
    default = "fused"

    def make_inputs(self, rng):
        return {"dy": rng.standard_normal(self._act(), dtype=np.float32), "x": self._x(rng)["x"]}

    def allocate_outputs(self):
        c = self.shape["ic"]
        return {"s1": np.empty(c), "s2": np.empty(c)}

    def run(self, variant, inputs, outputs):
        m, c = self._size()
        self.variants[variant](inputs["dy"].reshape(m, c), inputs["x"].reshape(m, c),
                               outputs["s1"], outputs["s2"])

    def reference(self, inputs):
        return _sums(_nchw64(inputs["dy"]), _nchw64(inputs["x"]))

    def cost(self, variant):
        return self._cost(4, 2, 0, vec_writes=2 * F64)


class BNDx(_Fused):
    """BN's input gradient from the sums: bn_backward_coefficients, then dx = a*dy + p*x + q.
    Inputs dy, x, mean, var, gamma and s1 = sum(dy), s2 = sum(dy * x) (float64); outputs dx,
    dgamma, dbeta (and the coefficients a, p, q)."""

    name = "bn_dx"
    variants = {"fused": bn_dx}
    default = "fused"

    def make_inputs(self, rng):
        i = self._x(rng)
        del i["beta"]
        i["dy"] = rng.standard_normal(self._act(), dtype=np.float32)
        i.update(_sums(_nchw64(i["dy"]), _nchw64(i["x"])))
        return i

    def allocate_outputs(self):
        c = self.shape["ic"]
        out = {"dx": np.empty(self._act(), np.float32)}
        out.update({k: np.empty(c, np.float32) for k in ("dgamma", "dbeta", "a", "p", "q")})
        return out

    def run(self, variant, inputs, outputs):
        m, c = self._size()
        i, o = inputs, outputs
        bn_backward_coefficients(i["s1"], i["s2"], i["mean"], i["var"], i["gamma"], self.eps, m,
                                 o["dgamma"], o["dbeta"], o["a"], o["p"], o["q"])
        self.variants[variant](i["dy"].reshape(m, c), i["x"].reshape(m, c), o["a"], o["p"],
                               o["q"], o["dx"].reshape(m, c))

    def reference(self, inputs):
        gamma = inputs["gamma"].astype(np.float64)
        _, cache = ref.batchnorm_forward(_nchw64(inputs["x"]), gamma, np.zeros_like(gamma),
                                         self.eps)
        dx, dgamma, dbeta = ref.batchnorm_backward(_nchw64(inputs["dy"]), gamma, cache)
        return {"dx": _nhwc(dx), "dgamma": dgamma, "dbeta": dbeta}

    def cost(self, variant):
        return self._cost(4, 2, 1, vec_reads=3 * F32 + 2 * F64, vec_writes=5 * F32)


class BNDxAdd(BNDx):
    """As bn_dx, accumulated into the gradient dx0 that other consumers already wrote:
    dx = dx0 + BN backward. run copies dx0 into dx first (not in the cost: in a schedule dx
    already holds it); the kernel reads dy, x and dx and writes dx."""

    name = "bn_dx_add"
    variants = {"fused": bn_dx_add}
    default = "fused"

    def make_inputs(self, rng):
        i = super().make_inputs(rng)
        i["dx0"] = rng.standard_normal(self._act(), dtype=np.float32)
        return i

    def run(self, variant, inputs, outputs):
        np.copyto(outputs["dx"], inputs["dx0"])
        super().run(variant, inputs, outputs)

    def reference(self, inputs):
        r = super().reference(inputs)
        r["dx"] = r["dx"] + inputs["dx0"]
        return r

    def cost(self, variant):
        return self._cost(5, 3, 1, vec_reads=3 * F32 + 2 * F64, vec_writes=5 * F32)


class BNReLUDx(_Fused):
    """BN+ReLU's input gradient from an unmasked dz (bnff's store-free backward-data
    epilogue leaves dz as the conv wrote it): dx = a*dz*[a*x + b > 0] + p*x + q. Inputs dz, x,
    mean, var, gamma, beta, and s1, s2 of the masked dy; outputs dx, dgamma, dbeta."""

    name = "bn_relu_dx"
    variants = {"fused": bn_relu_dx}
    default = "fused"

    def make_inputs(self, rng):
        i = self._x(rng)
        i["dz"] = rng.standard_normal(self._act(), dtype=np.float32)
        a, b = self._coefficients(i)
        dy = i["dz"] * (i["x"] * a + b > 0)
        i.update(_sums(_nchw64(dy), _nchw64(i["x"])))
        return i

    def allocate_outputs(self):
        c = self.shape["ic"]
        out = {"dx": np.empty(self._act(), np.float32)}
        out.update({k: np.empty(c, np.float32) for k in ("dgamma", "dbeta", "a", "p", "q")})
        return out

    def run(self, variant, inputs, outputs):
        m, c = self._size()
        i, o = inputs, outputs
        af, bf = self._coefficients(i)
        bn_backward_coefficients(i["s1"], i["s2"], i["mean"], i["var"], i["gamma"], self.eps, m,
                                 o["dgamma"], o["dbeta"], o["a"], o["p"], o["q"])
        self.variants[variant](i["dz"].reshape(m, c), i["x"].reshape(m, c), af, bf, o["a"],
                               o["p"], o["q"], o["dx"].reshape(m, c))

    def reference(self, inputs):
        g = lambda k: inputs[k].astype(np.float64)
        y, cache = ref.batchnorm_forward(_nchw64(inputs["x"]), g("gamma"), g("beta"), self.eps)
        dy = ref.relu_backward(_nchw64(inputs["dz"]), y)
        dx, dgamma, dbeta = ref.batchnorm_backward(dy, g("gamma"), cache)
        return {"dx": _nhwc(dx), "dgamma": dgamma, "dbeta": dbeta}

    def cost(self, variant):
        return self._cost(6, 2, 1, vec_reads=5 * F32 + 2 * F64, vec_writes=5 * F32)


STAGES = [BNReLU, BNAddReLU, BN2AddReLU, StatsFromSums, ReLUMaskSums, ReLUMaskSumsZ, DYSums,
          BNDx, BNDxAdd, BNReLUDx]
