"""Convolutions: forward, backward-data, backward-weights, and bnff's fused forms of a BN site's
convs (conv_fwd_bn_relu, conv_bwd_data_relu_sums, conv_bwd_1x1), every variant.
Shapes, scaling and grouping: ci_cases.py; validation before timing: conftest.py."""
from ci_cases import time_case

FAMILY = "conv"


def test_conv(benchmark, validated):
    time_case(benchmark, validated)
