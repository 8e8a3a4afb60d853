"""``agentsd generate``: images from prompts with AgentSD applied (or without, or both)."""

from agentsd.tools.generate.command import (
    GenerateResult,
    add_parser,
    config_from_args,
    run,
    run_generate,
)
from agentsd.tools.generate.config import GenerateConfig

__all__ = ["GenerateConfig", "GenerateResult", "add_parser", "config_from_args", "run", "run_generate"]
