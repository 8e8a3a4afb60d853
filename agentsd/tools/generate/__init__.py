"""``agentsd generate``: images from prompts with AgentSD applied."""

from agentsd.tools.generate.command import add_parser, run

__all__ = ["add_parser", "run"]
