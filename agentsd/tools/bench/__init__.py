"""``agentsd bench``: UNet step and generation timing of unpatched, ToMeSD and AgentSD."""

from agentsd.tools.bench.command import add_parser, run

__all__ = ["add_parser", "run"]
