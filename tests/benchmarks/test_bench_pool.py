"""Pooling: max, average and global average pooling, forward and backward, every variant.
Shapes, scaling and grouping: ci_cases.py; validation before timing: conftest.py."""
from ci_cases import time_case

FAMILY = "pool"


def test_pool(benchmark, validated):
    time_case(benchmark, validated)
