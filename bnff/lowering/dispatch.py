"""lower(graph, batch, image, schedule) -> (Plan, io): the Lowering class a Schedule selects.
Here rather than in lower.py, so the base class does not import its subclasses."""
from __future__ import annotations

from bnff.lowering.lower import Lowering
from bnff.lowering.lower_blocks import BlockLowering
from bnff.lowering.lower_bnff import SplitLowering
from bnff.lowering.schedules import Schedule
from bnff.suites.graph import Graph


def lower(graph: Graph, batch: int, image: int, schedule: Schedule):
    if schedule.bn == "split":
        cls = BlockLowering if schedule.blocks else SplitLowering
    else:
        cls = Lowering
    return cls(graph, batch, image, schedule).lower()
