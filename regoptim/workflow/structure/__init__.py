"""From zero groups to a smaller model: channel-set analysis, structured groups and slim.

A client of the optimizers: nothing in the optimizers imports this package.
"""

from regoptim.workflow.structure.graph import (
    ChannelGraph,
    ChannelSet,
    Consumer,
    UntraceableModelError,
    analyze,
)
from regoptim.workflow.structure.groups import structured_groups
from regoptim.workflow.structure.slim import SlimReport, SlimRow, slim

__all__ = [
    "ChannelGraph",
    "ChannelSet",
    "Consumer",
    "SlimReport",
    "SlimRow",
    "UntraceableModelError",
    "analyze",
    "slim",
    "structured_groups",
]
