"""Every variant of every memory-bound stage against the float64 reference, at small shapes
with real channel counts; plus the numerics of the BN statistics."""
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

BN = [dict(mb=2, ic=256, ih=7, iw=7), dict(mb=1, ic=64, ih=14, iw=14),
      dict(mb=2, ic=3, ih=5, iw=3)]
CASES = (
    [(cls, s) for cls in (BNStats, BNNormalize, BNBackward, ReLUForward, ReLUBackward, Add,
                          GlobalAvgPoolForward, GlobalAvgPoolBackward) for s in BN]
    + [(cls, dict(mb=2, ic=64, ih=14, iw=14, kh=3, sh=2, ph=1))
       for cls in (MaxPoolForward, MaxPoolBackward)]
    + [(cls, dict(mb=1, ic=24, ih=13, iw=11, kh=3, sh=2, ph=0))
       for cls in (MaxPoolForward, MaxPoolBackward)]
    + [(cls, s) for cls in (AvgPoolForward, AvgPoolBackward)
       for s in (dict(mb=2, ic=128, ih=14, iw=14, kh=2, sh=2), dict(mb=1, ic=16, ih=7, iw=9, kh=3, sh=2))]
    + [(cls, dict(mb=2, ics=ics, ih=7, iw=7)) for cls in (ConcatForward, ConcatBackward)
       for ics in ((64, 32), (128, 32, 32, 32), (3, 5))]
    + [(cls, s) for cls in (LinearForward, LinearBackward)
       for s in (dict(mb=2, ic=1024, oc=1000), dict(mb=3, ic=300, oc=7))]
    + [(SoftmaxCrossEntropy, dict(mb=2, oc=1000)), (SoftmaxCrossEntropy, dict(mb=5, oc=3))]
)


def _id(case):
    cls, shape = case
    return f"{cls.name}-{cls(shape).descriptor()}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_variants_match_reference(case):
    cls, shape = case
    st = cls(shape)
    ins = st.make_inputs(np.random.default_rng(0))
    ref = st.reference(ins)
    assert st.default in st.variants
    for v in st.variants:
        out = st.allocate_outputs()
        for a in out.values():
            a.fill(np.nan if a.dtype.kind == "f" else -1)  # every output element must be written
        st.run(v, ins, out)
        err = st.max_rel_error(out, ref)
        assert err <= st.tolerance, f"{st.name}/{v} {st.descriptor()}: rel error {err:.2e}"


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
    for cls in {c for c, _ in CASES}:
        for name, fn in cls.variants.items():
            doc = (fn.__doc__ or "").strip()
            assert doc and "\n" not in doc, f"{cls.name}/{name} needs a one-line docstring"


def test_concat_slice_kernels():
    from bnff.kernels.elementwise.concat import add_out, copy_into, copy_out
    rng = np.random.default_rng(2)
    y = rng.standard_normal((10, 48), dtype=np.float32)
    x = rng.standard_normal((10, 16), dtype=np.float32)
    acc = x.copy()
    add_out(y, 8, acc)
    np.testing.assert_array_equal(acc, x + y[:, 8:24])
    out = np.empty_like(x)
    copy_out(y, 32, out)
    np.testing.assert_array_equal(out, y[:, 32:])
    copy_into(x, y, 0)
    np.testing.assert_array_equal(y[:, :16], x)
