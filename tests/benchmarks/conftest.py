"""Parametrizes the CI benchmark modules (each sets FAMILY) with every registered variant of
its family's stages (ci_cases.py), and compiles and validates each variant before it is
timed. Timed runs (`make bench-ci`, --benchmark-enable) use the TIMED scale, correctness runs
(`make test`, --benchmark-disable) the CHECK scale. A regression against the saved run
(--benchmark-compare-fail) fails the session with one line instead of pytest-benchmark's
traceback."""
import numpy as np
import pytest
from pytest_benchmark.session import PerformanceRegression

import ci_cases
from bnff.cli.micro import ValidationError

_PREPARED = {}  # the current stage shape's inputs and float64 reference (cases come grouped)
_SESSION = []


def pytest_sessionstart(session):
    _SESSION.append(session)


@pytest.hookimpl(wrapper=True)
def pytest_terminal_summary(terminalreporter):
    try:
        return (yield)
    except PerformanceRegression:
        terminalreporter.write_line("FAIL: slower than the previous saved run beyond "
                                    "--benchmark-compare-fail (listed above)", red=True)
        _SESSION[0].exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_generate_tests(metafunc):
    if "case_key" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    timed = cfg.getoption("benchmark_enable") or not cfg.getoption("benchmark_disable")
    scale = ci_cases.TIMED if timed else ci_cases.CHECK
    params, ids = [], []
    for st, nets, count in ci_cases.cases(scale["batch"], scale["image"]):
        if ci_cases.family(type(st)) == metafunc.module.FAMILY:
            for v in st.variants:
                params.append((st, tuple(nets), count, v, scale))
                ids.append(f"{st.name}-{st.descriptor()}-{v}")
    metafunc.parametrize("case_key", params, ids=ids)


@pytest.fixture
def validated(case_key):
    """The case compiled and checked against the float64 reference: a variant that misses
    its tolerance fails here, before anything is timed."""
    st, nets, count, variant, scale = case_key
    key = (st.name, st.descriptor())
    if key not in _PREPARED:
        _PREPARED.clear()
        inputs = st.make_inputs(np.random.default_rng(0))
        _PREPARED[key] = (inputs, st.reference(inputs))
    inputs, ref = _PREPARED[key]
    try:
        outputs, err, first = ci_cases.check(st, variant, inputs, ref)
    except ValidationError as e:
        pytest.fail(f"validation failed: {e}", pytrace=False)
    return {"stage": st, "variant": variant, "inputs": inputs, "outputs": outputs,
            "error": err, "first_call_s": first, "networks": nets, "count": count,
            "scale": f"batch {scale['batch']}, image {scale['image']}"}
