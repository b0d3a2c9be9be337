"""Batch normalization passes of every schedule (statistics, normalize, scale, backward, and the
fused BN+ReLU(+add) passes), every variant.
Shapes, scaling and grouping: ci_cases.py; validation before timing: conftest.py."""
from ci_cases import time_case

FAMILY = "bn"


def test_bn(benchmark, validated):
    time_case(benchmark, validated)
