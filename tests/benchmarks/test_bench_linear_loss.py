"""The classifier: linear forward and backward and the softmax cross-entropy loss, every variant.
Shapes, scaling and grouping: ci_cases.py; validation before timing: conftest.py."""
from ci_cases import time_case

FAMILY = "linear_loss"


def test_linear_loss(benchmark, validated):
    time_case(benchmark, validated)
