"""``agentsd bench``: UNet step and generation timing of unpatched, ToMeSD, AgentSD and the bound."""

from agentsd.tools.bench.command import BenchResult, add_parser, config_from_args, run, run_bench
from agentsd.tools.bench.config import BenchConfig

__all__ = ["BenchConfig", "BenchResult", "add_parser", "config_from_args", "run", "run_bench"]
