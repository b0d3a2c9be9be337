"""The numerics of the BN statistics, descriptors and docstrings of the memory-bound stages,
the concat slice kernels (every variant against the float64 reference: tests/test_stages.py)."""
import numba
import numpy as np
import pytest

from bnff.kernels.elementwise.add import Add
from bnff.kernels.bn.bn_backward import BNBackward
from bnff.kernels.bn.bn_normalize import BNNormalize
from bnff.kernels.bn.bn_stats import BNStats
from bnff.kernels.elementwise.concat import ConcatBackward, ConcatForward
from bnff.kernels.linear import LinearBackward, LinearForward
from bnff.kernels.loss import SoftmaxCrossEntropy
from bnff.kernels.pool import (AvgPoolBackward, AvgPoolForward, GlobalAvgPoolBackward,
                          GlobalAvgPoolForward, MaxPoolBackward, MaxPoolForward)
from bnff.kernels.elementwise.relu import ReLUBackward, ReLUForward

MEMORY_STAGES = (BNStats, BNNormalize, BNBackward, ReLUForward, ReLUBackward, Add,
                 GlobalAvgPoolForward, GlobalAvgPoolBackward, MaxPoolForward, MaxPoolBackward,
                 AvgPoolForward, AvgPoolBackward, ConcatForward, ConcatBackward, LinearForward,
                 LinearBackward, SoftmaxCrossEntropy)


@pytest.mark.parametrize("threads", [1, numba.config.NUMBA_NUM_THREADS])
@pytest.mark.parametrize("variant", sorted(BNStats.variants))
def test_bn_stats_stable_at_mean_1000(variant, threads):
    """Data with mean 1000 and std 1: the variance must match float64 two-pass to 1e-4."""
    numba.set_num_threads(threads)
    try:
        st = BNStats(dict(mb=2, ic=128, ih=14, iw=14))
        ins = st.make_inputs(np.random.default_rng(1))
        out = st.allocate_outputs()
        st.run(variant, ins, out)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    x = ins["x"].reshape(-1, 128).astype(np.float64)
    assert abs(x.mean() - 1000) < 0.1 and abs(x.std() - 1) < 0.1
    rel = np.abs(out["var"] / x.var(axis=0) - 1)
    assert rel.max() < 1e-4, f"{variant}: relative variance error {rel.max():.2e}"
    assert np.abs(out["mean"] - x.mean(axis=0)).max() < 1e-3


def test_stress_data_breaks_a_naive_one_pass():
    """The mean-1000 data does catch float32 E[x^2] - E[x]^2 (so the test above means something)."""
    st = BNStats(dict(mb=2, ic=128, ih=14, iw=14))
    x = st.make_inputs(np.random.default_rng(1))["x"].reshape(-1, 128)
    mean = x.mean(axis=0, dtype=np.float32)
    naive = (x * x).mean(axis=0, dtype=np.float32) - mean * mean
    assert np.abs(naive / x.astype(np.float64).var(axis=0) - 1).max() > 1e-4


def test_byte_declarations_count_passes():
    s = dict(mb=2, ic=64, ih=8, iw=8)
    tensor = 2 * 64 * 8 * 8 * 4
    st = BNStats(s)
    assert st.cost("two_pass").bytes_read == 2 * tensor
    assert st.cost("shifted").bytes_read == st.cost("chan").bytes_read == tensor
    assert st.cost("shifted_pairs").bytes_read == tensor
    bw = BNBackward(s)
    assert bw.cost("three_pass").bytes_read > bw.cost("two_pass").bytes_read >= 4 * tensor
    assert ReLUForward(s).cost("prange").bytes == 2 * tensor
    assert Add(s).cost("prange").bytes == 3 * tensor
    assert ConcatForward(dict(mb=2, ics=(32, 32), ih=8, iw=8)).cost("prange").bytes == 2 * tensor


def test_descriptors():
    assert BNStats(dict(mb=16, ic=256, ih=56, iw=56)).descriptor() == "mb16ic256ih56iw56"
    d = ConcatForward(dict(mb=16, ics=(64, 32, 32, 32), ih=56, iw=56)).descriptor()
    assert d == "mb16ic64+32x3ih56iw56"


def test_every_variant_has_a_docstring():
    for cls in MEMORY_STAGES:
        for name, fn in cls.variants.items():
            doc = (fn.__doc__ or "").strip()
            assert doc and "\n" not in doc, f"{cls.name}/{name} needs a one-line docstring"


def test_concat_slice_kernels():
    from bnff.kernels.elementwise.concat import add_out, copy_into, copy_out
    rng = np.random.default_rng(2)
    y = rng.standard_normal((10, 48), dtype=np.float32)
    x = rng.standard_normal((10, 16), dtype=np.float32)
    acc = x.copy()
    add_out(y, 8, acc, acc)
    np.testing.assert_array_equal(acc, x + y[:, 8:24])
    wide = rng.standard_normal((10, 40), dtype=np.float32)  # into a channel slice
    keep = wide.copy()
    add_out(y, 8, wide[:, 4:20], wide[:, 4:20])
    np.testing.assert_array_equal(wide[:, 4:20], keep[:, 4:20] + y[:, 8:24])
    np.testing.assert_array_equal(wide[:, :4], keep[:, :4])
    np.testing.assert_array_equal(wide[:, 20:], keep[:, 20:])
    out = np.empty_like(x)
    copy_out(y, 32, out)
    np.testing.assert_array_equal(out, y[:, 32:])
    copy_into(x, y, 0)
    np.testing.assert_array_equal(y[:, :16], x)
    wide2 = rng.standard_normal((10, 40), dtype=np.float32)  # from and to channel slices
    copy_out(y[:, 8:], 8, wide2[:, 3:19])
    np.testing.assert_array_equal(wide2[:, 3:19], y[:, 16:32])
    copy_into(wide2[:, 3:19], wide, 20)
    np.testing.assert_array_equal(wide[:, 20:36], y[:, 16:32])


@pytest.mark.parametrize("stage", [MaxPoolBackward, AvgPoolBackward])
def test_pool_backward_on_channel_slices(stage):
    """The schedules hand a pool's backward the slice of a concatenation's gradient as dy (and
    may hand it a slice to write): the same dx as from contiguous tensors."""
    st = stage.from_descriptor(stage.examples[0])
    ins, out = st.make_inputs(np.random.default_rng(3)), st.allocate_outputs()
    st.run(st.default, ins, out)
    dy, dx = ins["dy"], out["dx"]
    wide_dy = np.zeros(dy.shape[:3] + (dy.shape[3] + 24,), np.float32)
    wide_dy[..., 16:16 + dy.shape[3]] = dy
    wide_dx = np.full(dx.shape[:3] + (dx.shape[3] + 8,), 7.0, np.float32)
    st.run(st.default, dict(ins, dy=wide_dy[..., 16:16 + dy.shape[3]]),
           dict(dx=wide_dx[..., 5:5 + dx.shape[3]]))
    np.testing.assert_array_equal(wide_dx[..., 5:5 + dx.shape[3]], dx)
    assert (wide_dx[..., :5] == 7).all() and (wide_dx[..., 5 + dx.shape[3]:] == 7).all()


def test_concat_streams_aligned_parts_and_copies_the_rest():
    """concat with stream=True: the parts whose rows start vector-aligned and hold whole vectors
    go through non-temporal stores (x86: movnt in the code), the others through plain ones,
    and a misaligned Y falls back whole; every result exact."""
    import platform

    from numba.typed import List

    from bnff.engine.vec import W, aligned_empty
    from bnff.kernels.elementwise.concat import _copy_parts
    rng = np.random.default_rng(3)
    widths = (2 * W, W, 3, 2 * W - 3)  # offsets 0, 2W, 3W (aligned), 3W + 3 (not)
    xs = [rng.standard_normal((37, c), dtype=np.float32) for c in widths]
    want = np.concatenate(xs, axis=1)
    y = aligned_empty((37, 5 * W), np.float32)
    y[...] = np.nan
    _copy_parts(List(xs), y, 0, True, True)
    np.testing.assert_array_equal(y, want)
    buf = aligned_empty((37 * 5 * W + 1,), np.float32)[1:]  # 4 bytes past the alignment
    y2 = buf.reshape(37, 5 * W)
    y2[...] = np.nan
    _copy_parts(List(xs), y2, 0, True, True)
    np.testing.assert_array_equal(y2, want)
    if platform.machine() in ("x86_64", "AMD64"):  # an uncached copy: its code can be read
        fresh = numba.njit(parallel=True)(_copy_parts.py_func)
        fresh(List(xs), y, 0, True, True)
        assert any("movnt" in asm for asm in fresh.inspect_asm().values())
