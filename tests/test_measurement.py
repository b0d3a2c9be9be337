"""The measurement module on synthetic data: paired speedups and their intervals, validation
into fresh outputs, interleaved timing."""
import numpy as np
import pytest

from bnff.kernels.bn.bn_stats import BNStats
from bnff.measure.measurement import (ValidationError, interleaved, paired_speedup,
                                      summary_tables, validate)


def rounds(rng, n, ratio, noise, drift=0.0):
    """Per-round times of a base and a candidate ratio-times faster: each round shares a
    machine state (drift, the same for both), plus independent lognormal noise."""
    state = np.exp(drift * rng.standard_normal(n))
    base = state * np.exp(noise * rng.standard_normal(n))
    cand = state / ratio * np.exp(noise * rng.standard_normal(n))
    return base, cand


def test_paired_speedup_recovers_the_ratio_despite_shared_drift():
    rng = np.random.default_rng(1)
    base, cand = rounds(rng, 30, 1.25, 0.01, drift=0.3)
    sp = paired_speedup(base, cand)
    assert sp.low < 1.25 < sp.high and not sp.no_difference and sp.rounds == 30
    assert sp.half_width < 0.01  # pairing removes the 30 % drift the rounds share
    unpaired = paired_speedup(base, rng.permutation(cand))  # the same times, pairs broken
    assert unpaired.half_width > 5 * sp.half_width


def test_equal_schedules_are_no_difference():
    base, cand = rounds(np.random.default_rng(2), 10, 1.0, 0.05)
    sp = paired_speedup(base, cand)
    assert sp.no_difference and "no difference" in str(sp)


def test_interval_is_reproducible_and_narrows_with_rounds():
    rng = np.random.default_rng(3)
    base, cand = rounds(rng, 40, 1.1, 0.05)
    assert paired_speedup(base, cand) == paired_speedup(base, cand)  # fixed seed
    assert paired_speedup(base, cand).half_width < paired_speedup(base[:5], cand[:5]).half_width


def test_coverage_near_95_percent():
    """Over 300 synthetic runs of 20 rounds, the 95 % interval holds the true ratio in at
    least 90 % (a percentile bootstrap undercovers a little at small n; far below means a
    bug)."""
    rng = np.random.default_rng(4)
    hits = 0
    for _ in range(300):
        sp = paired_speedup(*rounds(rng, 20, 1.1, 0.05, drift=0.2))
        hits += sp.low <= 1.1 <= sp.high
    assert hits >= 270


def test_paired_speedup_needs_paired_rounds():
    with pytest.raises(ValueError):
        paired_speedup([1.0, 2.0], [1.0])


def test_a_variant_that_writes_nothing_fails_after_a_correct_one(monkeypatch):
    monkeypatch.setitem(BNStats.variants, "noop", lambda X, mean, var: None)
    st = BNStats(dict(mb=2, ic=8, ih=3, iw=3))
    ins = st.make_inputs(np.random.default_rng(0))
    assert validate(st, ["two_pass"], ins)["two_pass"] <= st.tolerance
    with pytest.raises(ValidationError, match="bn_stats variant noop"):
        validate(st, ["two_pass", "noop"], ins)


def test_interleaved_runs_round_after_round():
    order = []
    times = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                        reps=3, min_time=0.0)
    assert order == ["a", "b"] + ["a", "b"] * 3  # warm-up, then three interleaved rounds
    assert all(len(t) == 3 and min(t) >= 0 for t in times.values())


def test_summary_tables_print_intervals_when_given():
    row = dict(network="n", threads=1, stage="iteration", batch=2, image=8, bytes=1e9,
               peak_mem_bytes=2**30, compile_s=0.0, kind="all")
    rows = [dict(row, schedule="baseline", median_s=2.0), dict(row, schedule="bnff", median_s=1.0)]
    assert "2.000x" in summary_tables(rows)
    sp = paired_speedup([2.0, 2.1, 1.9, 2.0], [1.0, 1.02, 0.98, 1.01])
    assert str(sp) in summary_tables(rows, {("n", 1, "bnff", "baseline"): sp})
