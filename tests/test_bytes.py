"""The byte model: what each schedule moves at each kind of BN site, in multiples of S, the
bytes of the site's activation tensor (per-channel vectors add well under 0.1 % of S), and
that the fused schedules move fewer bytes and hold less memory on the built-in networks.
Figures at batch 16, 224x224, counting each tensor pass once (bnff.md, 'Counting')."""
import math

import pytest

from bnff.lowering.executor import Executor
from bnff.lowering.schedules import FLOAT32, SCHEDULES
from bnff.suites import networks
from bnff.suites.flops import network_flops

ORDER = ["caffe", "baseline", "fission", "bnff-fwd", "bnff", "bnff+"]


@pytest.fixture(scope="module")
def plans():
    return {net: {s: Executor(networks.load(net), SCHEDULES[s], 16, 224).plan for s in FLOAT32}
            for net in ("densenet121", "resnet50")}


def site_bytes(plan, nodes, phase, kind=None):
    return sum(s.cost.bytes for s in plan.steps if s.name.split(" ")[0] in nodes
               and s.phase == phase and (kind is None or s.kind == kind))


def in_s(value, s):
    assert abs(value - round(value / s) * s) < 1e-3 * s, value / s
    return round(value / s)


# (network, nodes of the site, S = the BN input tensor, forward and backward in S per schedule)
SITES = {
    # conv -> BN -> ReLU -> conv: everything fuses
    "plain": ("resnet50", ("layer1.0.bn1", "layer1.0.relu1"), 16 * 56 * 56 * 64 * 4,
              dict(caffe=(8, 11), baseline=(5, 8), fission=(3, 6), **{"bnff-fwd": (0, 6)},
                   bnff=(0, 0), **{"bnff+": (0, 0)})),
    # ResNet block end, identity shortcut: BN -> add -> ReLU, written once when split.
    # baseline fwd: stats 1 + normalize 2 + add 3 + ReLU in place 2; bwd: ReLU 3, BN 5 (the
    # shortcut takes the add's gradient buffer, no copy: Lowering.shares_grad). Split:
    # normalize+add+ReLU 3; backward the mask with the sums reads dz, z and x and writes dy
    # (4, the shortcut's gradient too), dx 3 unless fused.
    "block end": ("resnet50", ("layer1.1.bn3", "layer1.1.add", "layer1.1.relu3"),
                  16 * 56 * 56 * 256 * 4,
                  dict(caffe=(11, 11), baseline=(8, 8), fission=(4, 7),
                       **{"bnff-fwd": (3, 7)}, bnff=(3, 4), **{"bnff+": (3, 4)})),
    # DenseNet: BN of a concat (statistics in their own pass), normalize into the conv; in
    # bnff+ the statistics come from the block's vectors and dx is added into the slice of
    # the block's gradient (reading it: 4)
    "concat input": ("densenet121", ("block1.layer3.norm1", "block1.layer3.relu1"),
                     16 * 56 * 56 * 128 * 4,
                     dict(caffe=(8, 11), baseline=(5, 8), fission=(3, 6),
                          **{"bnff-fwd": (1, 6)}, bnff=(1, 3), **{"bnff+": (0, 4)})),
}


@pytest.mark.parametrize("kind", SITES)
def test_site_bytes(plans, kind):
    net, nodes, s, expect = SITES[kind]
    got = {sch: (in_s(site_bytes(plans[net][sch], nodes, "forward"), s),
                 in_s(site_bytes(plans[net][sch], nodes, "backward"), s)) for sch in expect}
    assert got == expect


def test_hooks_add_their_reads_to_the_convs(plans):
    """bnff's backward reads the pre-BN tensor in the consumer's backward-data epilogue and in
    the producer's backward prologues: conv2's epilogue for bn1 (1 S) and conv2's two
    kernels' prologues for bn2 (2 S). conv1 is 1x1: its one pass reads bn1's pre-BN tensor
    once (1 S) but its dy once instead of twice (-1 S)."""
    p, b = plans["resnet50"]["bnff"], plans["resnet50"]["baseline"]
    s = 16 * 56 * 56 * 64 * 4
    convs = ("layer1.0.conv1", "layer1.0.conv2")
    extra = site_bytes(p, convs, "backward", "conv") - site_bytes(b, convs, "backward", "conv")
    assert in_s(extra, s) == 3
    assert site_bytes(p, convs, "forward", "conv") == site_bytes(b, convs, "forward", "conv")


# bytes per training iteration at batch 16, 224x224, in ORDER (the README quotes them in GB)
TOTAL_BYTES = {
    # concat backward by views: each block's final concat starts every input's gradient as a
    # slice of its own, so its copies out (read + write of the block's output, 2 x 93126656
    # bytes over the four blocks) are gone from every schedule but bnff+ (block buffers)
    "densenet121": [26588480964, 20571341380, 16516987972, 14292835396, 11418963268, 8447041604],
    # the identity shortcuts take the add's gradient without a copy (2 x 256901120 bytes)
    "resnet50": [19748003268, 15479702212, 12476630724, 11345601732, 9017524420, 8298201284],
}


@pytest.mark.parametrize("net", ["densenet121", "resnet50"])
def test_each_step_of_restructuring_moves_fewer_bytes(plans, net):
    total = [plans[net][s].cost().bytes for s in ORDER]
    assert total == TOTAL_BYTES[net]
    assert total == sorted(total, reverse=True) and len(set(total)) == len(total)
    assert plans[net]["bnff"].peak_bytes() < plans[net]["baseline"].peak_bytes()
    assert plans[net]["bnff+"].peak_bytes() <= plans[net]["bnff"].peak_bytes()


def test_block_buffer_copies_only_block_inputs(plans):
    """bnff+ on DenseNet-121: the only concat traffic is each block input copied into its
    buffer (read + write) and its gradient copied out (read + write): 4 S per block, against
    a copy of every feature into every later concat in bnff."""
    s = sum(16 * h * h * c * 4 for h, c in ((56, 64), (28, 128), (14, 256), (7, 512)))
    concat = lambda sch: sum(st.cost.bytes for st in plans["densenet121"][sch].steps
                             if st.kind == "concat")
    assert concat("bnff+") == 4 * s
    assert concat("bnff") > 30 * concat("bnff+")


@pytest.mark.parametrize("net", ["densenet121", "resnet50"])
def test_conv_and_linear_flops_are_the_analytic_count(plans, net):
    """Every schedule's conv and linear steps do the multiply-adds of bnff/suites/flops.py
    (forward, backward-data except for the input, backward-weights), 2 FLOPs each; bnff+ on
    ResNet-50 adds one FLOP per element of each block's conv1 input gradient, the shortcut's
    gradient its backward-data accumulates into instead of a separate add. (Adding a conv's
    input gradient into one others started, through a temporary, is a step of kind conv too,
    but no multiply-add.)"""
    graph = networks.load(net)
    _, train = network_flops(graph, 16, 224)
    shapes = graph.infer_shapes(16, 224)
    linear = {n.name for n in graph.nodes if n.op == "linear"}
    for sched in ORDER:
        got = sum(st.cost.flops for st in plans[net][sched].steps
                  if (st.kind == "conv" and " accumulate d:" not in st.name)
                  or st.name.split(" ")[0] in linear)
        extra = 0
        if sched == "bnff+" and net == "resnet50":
            extra = sum(math.prod(shapes[n.inputs[0]]) for n in graph.nodes
                        if n.op == "conv2d" and n.name.endswith(".conv1"))
        assert got == train + extra, sched
