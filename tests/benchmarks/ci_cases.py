"""What the CI benchmarks time: every registered stage and variant, at layer shapes of the
built-in networks, scaled down.

Shapes come from `stages_of` (bnff/cli/micro.py), the list of what one training iteration
runs, at a reduced batch and image: channels, kernels and strides are the networks' own, only
the pixel count shrinks. Per stage and network the benchmark keeps the one shape that carries
the most of the stage's work in the iteration (count x FLOPs for stages doing at least one FLOP
per byte, count x bytes for the others). Stages the layer-by-layer list does not run (the other
schedules' BN passes) take the shape of the BN input they work on, the one chosen for bn_stats.

Scales (both networks):
- TIMED, `make bench-ci`: batch 4 at 224x224 instead of the benchmark size's batch 16: every
  activation is 1/4 of its size there, so the largest (ResNet-50's 56x56x256, 12.8 MB) still
  exceed the L2 but not always the L3 (32 MiB on the development machine): memory-bound
  stages read partly from cache, and their GB/s are higher than at batch 16.
- CHECK, `make test` (--benchmark-disable, each variant run once): batch 2, image 32, the
  smallest at which every BN of both networks still sees two values per channel.

A case is (stage class, descriptor, networks, count): groups are named `stage descriptor`.
"""
from __future__ import annotations

import time
from functools import lru_cache

import numba

from bnff.cli.micro import stages_of
from bnff.kernels import registry
from bnff.measure.measurement import ValidationError, fresh_outputs
from bnff.suites import networks

NETWORKS = ("densenet121", "resnet50")
TIMED = dict(batch=4, image=224)
CHECK = dict(batch=2, image=32)
FAMILIES = ("conv", "bn", "elementwise", "pool", "linear_loss")
SHAPE_OF_BN_INPUT = "bn_stats"  # stage whose chosen shape the unlisted BN passes take
# Registered stages that neither network's iteration list runs (registry.UNPLANNED: the whole
# split of a concat's gradient, the separate-pass comparisons of the fused convs; the unhooked
# one-pass 1x1 backward, which only other graphs' plans run) and that do not take a BN input's
# shape: DenseNet-121's first dense block at the run's size.
DENSE_BLOCK = "mb{mb}ic64+32x6ih{s}iw{s}"
DENSE_3X3 = "mb{mb}ic128ih{s}iw{s}oc32kh3kw3sh1ph1"
UNPLANNED = {"concat_bwd": DENSE_BLOCK,
             "conv_fwd_bn_relu": DENSE_3X3, "conv_bwd_data_relu_sums": DENSE_3X3,
             "conv_bwd_1x1": "mb{mb}ic256ih{s}iw{s}oc128kh1kw1sh1ph0_bn_relu_grad"}


def family(cls) -> str:
    """The stage family a stage class belongs to, from the package that defines it."""
    parts = cls.__module__.split(".")  # bnff.kernels.<family>.<module> or bnff.kernels.<module>
    if len(parts) == 4:
        return parts[2]
    return "linear_loss" if parts[2] in ("linear", "loss") else parts[2]


def _work(st) -> int:
    c = st.cost(st.default)
    return c.flops if c.flops >= c.bytes else c.bytes


def _rebuild(cls, shape: dict):
    """cls at the BN input `shape` (BN's eps dropped for a stage that has none)."""
    try:
        st = cls({k: v for k, v in shape.items() if k != "eps" or cls.eps is not None})
        st.cost(st.default)
    except (KeyError, ValueError, TypeError) as e:
        raise LookupError(f"stage {cls.name} is not in a training iteration's list (stages_of) "
                          f"and does not take a BN input's shape ({e}): give it a shape here")
    return st


@lru_cache(maxsize=None)
def cases(batch: int, image: int) -> list:
    """[(Stage, networks, count)] for every registered stage, in registry order."""
    best = {}  # network -> {stage name: (Stage, count)}
    for net in NETWORKS:
        best[net] = {}
        for st, count in stages_of(networks.load(net), batch, image):
            b = best[net].get(st.name)
            if b is None or count * _work(st) > b[1] * _work(b[0]):
                best[net][st.name] = (st, count)
    listed = {name for b in best.values() for name in b}
    chosen = {}  # (name, descriptor) -> [Stage, [networks], count]
    for net, b in best.items():
        bn_shape = b[SHAPE_OF_BN_INPUT][0].shape
        extra = [(registry.make(name, UNPLANNED[name].format(mb=batch, s=image // 4))
                  if name in UNPLANNED else _rebuild(cls, bn_shape), 1)
                 for name, cls in registry.STAGES.items() if name not in listed]
        for st, count in list(b.values()) + extra:
            key = (st.name, st.descriptor())
            if key in chosen:
                chosen[key][1].append(net)
                chosen[key][2] += count
            else:
                chosen[key] = [st, [net], count]
    order = list(registry.STAGES)
    return [tuple(v) for _, v in sorted(chosen.items(), key=lambda kv: (order.index(kv[0][0]),
                                                                          kv[0][1]))]


def check(st, variant: str, inputs: dict, ref: dict) -> tuple:
    """(outputs, max relative error, seconds of the first call): the variant run once into
    fresh outputs filled with NaN (so an element it leaves unwritten fails), compiling it;
    ValidationError if it misses the stage's tolerance."""
    outputs = fresh_outputs(st, inputs)
    t0 = time.perf_counter()
    st.run(variant, inputs, outputs)
    first = time.perf_counter() - t0
    err = st.max_rel_error(outputs, ref)
    if not err <= st.tolerance:
        raise ValidationError(f"{st.name} variant {variant} at {st.descriptor()}: max relative "
                              f"error {err:.3g} > tolerance {st.tolerance:.3g}")
    return outputs, err, first


def time_case(benchmark, case) -> None:
    """Times one validated case (the `validated` fixture of conftest.py) with pytest-benchmark,
    grouped by stage and shape; extra_info carries what GB/s and GFLOP/s are derived from."""
    st, variant = case["stage"], case["variant"]
    cost = st.cost(variant)
    benchmark.group = f"{st.name} {st.descriptor()}"
    benchmark.extra_info.update(
        stage=st.name, descriptor=st.descriptor(), variant=variant, default=st.default,
        bytes=cost.bytes, flops=cost.flops, threads=numba.get_num_threads(),
        networks=",".join(case["networks"]), count=case["count"], scale=case["scale"],
        max_rel_error=case["error"], first_call_s=case["first_call_s"])
    benchmark(st.run, variant, case["inputs"], case["outputs"])
