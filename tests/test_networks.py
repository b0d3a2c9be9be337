"""The built-in networks against torchvision's published figures, and VGG's pieces (conv
bias, flatten, ReLU between linear layers) under every schedule."""
import numpy as np
import pytest

from bnff.measure.measurement import max_rel_grad_diff
from bnff.cli.main import main
from bnff.kernels.elementwise.flatten import FlattenBackward, FlattenForward
from bnff.lowering.executor import train_step
from bnff.lowering.reference_step import train_step as reference_step
from bnff.lowering.schedules import FLOAT32, SCHEDULES
from bnff.suites import networks
from bnff.suites.flops import network_flops
from bnff.suites.graph import GraphError
from bnff.suites.problem import make_batch, make_params
from bnff.suites.vgg import vgg

# torchvision's model tables: parameters, and "GFLOPS" (multiply-adds) per 224x224 image
PUBLISHED = {
    "resnet18": (11_689_512, 1.81), "resnet34": (21_797_672, 3.66),
    "resnet50": (25_557_032, 4.09), "resnet101": (44_549_160, 7.80),
    "resnet152": (60_192_808, 11.51), "densenet121": (7_978_856, 2.83),
    "densenet169": (14_149_480, 3.36), "densenet201": (20_013_928, 4.29),
    "vgg16_bn": (138_365_992, 15.47),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_builtin_matches_torchvision(name):
    params, gmacs = PUBLISHED[name]
    g = networks.load(name)
    assert g.num_params() == params
    assert network_flops(g, 1, 224)[0] / 2e9 == pytest.approx(gmacs, abs=0.005)
    assert g.infer_shapes(2, 224)[g.output] == (2, 1000)


def test_networks_lists_every_builtin(capsys):
    assert set(networks.BUILTIN) == set(PUBLISHED)
    assert main(["networks"]) == 0
    out = capsys.readouterr().out
    for name, (params, _) in PUBLISHED.items():
        assert f"{name} " in out and f"{params:,}" in out


def test_vgg_takes_224_to_255_pixel_images():
    g = networks.load("vgg16_bn")
    assert g.infer_shapes(1, 255)["flatten"] == (1, 512 * 7 * 7)
    with pytest.raises(GraphError, match="flatten expects a 7x7 input, got 8x8"):
        g.infer_shapes(1, 256)


@pytest.fixture(scope="module")
def vgg_mini():
    g = vgg("vgg-mini", config=(8, "M", 16, 16, "M"), classes=5, hidden=12, size=2)
    params = make_params(g, 2)
    x, labels = make_batch(g, 4, 8, 2)
    return g, params, x, labels, reference_step(g, params, x, labels)


@pytest.mark.parametrize("schedule", FLOAT32)
def test_vgg_structure_under_every_schedule(vgg_mini, schedule):
    g, params, x, labels, (ref_loss, ref_grads) = vgg_mini
    loss, grads = train_step(g, params, x, labels, SCHEDULES[schedule])
    assert abs(loss - ref_loss) / ref_loss < 1e-6
    diff, where = max_rel_grad_diff(grads, ref_grads)
    # a conv bias feeding a BN has a gradient that is zero in exact arithmetic: its float32
    # noise against measurement.rel_errors' zero level reaches 3e-4; a lost term is O(1)
    assert diff < 1e-3, (schedule, where, diff)


@pytest.mark.parametrize("cls", [FlattenForward, FlattenBackward])
def test_flatten_kernels_against_reference(cls):
    st = cls(dict(mb=2, ic=5, ih=3, iw=3))
    ins = st.make_inputs(np.random.default_rng(0))
    out = st.allocate_outputs()
    st.run(st.default, ins, out)
    assert st.max_rel_error(out, st.reference(ins)) == 0.0
    assert st.cost(st.default).bytes == 2 * 2 * 5 * 9 * 4
