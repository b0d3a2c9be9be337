"""Elementwise stages: ReLU forward and backward, the residual and gradient add, concatenation
forward and backward, every variant.
Shapes, scaling and grouping: ci_cases.py; validation before timing: conftest.py."""
from ci_cases import time_case

FAMILY = "elementwise"


def test_elementwise(benchmark, validated):
    time_case(benchmark, validated)
