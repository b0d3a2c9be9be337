"""Every stage, by name. Stages register themselves when their module is defined
(`Stage.__init_subclass__` in bnff/kernels/stage.py); importing this module imports every
stage module, so `STAGES` is complete. What a stage declares, the registry hands on: its
variants and default, its shape as a descriptor that parses back (`make`), its cost.

Most stages are what some plan step runs and records (bnff/lowering/plan.py StageCall), so
`bnff micro NET` times them at the shapes NET uses. The few that no plan records are listed
in UNPLANNED with what they are registered for (tests/test_roofline_micro.py checks the list
against the plans of the built-in networks and the example graph, both ways).

    from bnff.kernels import registry
    for name, cls in registry.STAGES.items():
        for d in cls.examples:
            st = registry.make(name, d)          # == cls.from_descriptor(d)
            for v in st.variants: ...
"""
from __future__ import annotations

from bnff.kernels import linear, loss, pool  # noqa: F401  (each import registers its stages)
from bnff.kernels.bn import bn_backward, bn_fused, bn_normalize, bn_scale, bn_stats  # noqa: F401
from bnff.kernels.conv import conv_bias, conv_bwd_data, conv_bwd_fused  # noqa: F401
from bnff.kernels.conv import conv_bwd_weights, conv_fused, conv_fwd, conv_hooked  # noqa: F401
from bnff.kernels.elementwise import add, concat, flatten, relu  # noqa: F401
from bnff.kernels.stage import REGISTRY, DescriptorError, Stage

STAGES: dict = dict(sorted(REGISTRY.items()))

UNPLANNED = {  # registered stages no plan records: name -> what they are registered for
    "concat_bwd": "the split of a whole concatenation's gradient in one call (copies), beside "
                  "the plans' views of it plus concat_add_out where a gradient accumulates",
    "bn_stats_from_sums": "the merge the plans run inside a coefficient step (with "
                          "bn_coefficients), as a stage of its own",
    "conv_fwd_bn_relu": "a bnff forward site, separate passes beside the fused conv",
    "conv_bwd_data_relu_sums": "a bnff backward-data site, separate passes beside the fused "
                               "conv",
}


class UnknownStage(KeyError):
    """A stage name or variant no registered stage has."""

    def __str__(self):
        return self.args[0]


def stage_class(name: str) -> type:
    try:
        return STAGES[name]
    except KeyError:
        raise UnknownStage(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None


def make(name: str, descriptor: str) -> Stage:
    """The stage `name` at the shape `descriptor` (UnknownStage, DescriptorError)."""
    return stage_class(name).from_descriptor(descriptor)


def check_variant(st: Stage, variant: str) -> str:
    """`variant` if the stage has it (`default` names its default), else UnknownStage."""
    if variant == "default":
        return st.default
    if variant not in st.variants:
        raise UnknownStage(f"stage {st.name} has no variant {variant!r}; variants: "
                           f"{', '.join(st.variants)} or default")
    return variant


__all__ = ["STAGES", "UNPLANNED", "DescriptorError", "UnknownStage", "check_variant", "make", "stage_class"]
