"""``agentsd eval``: FID, CLIP score and time per image of each method."""

from agentsd.tools.evaluate.command import EvalConfig, add_parser, run, run_eval

__all__ = ["EvalConfig", "add_parser", "run", "run_eval"]
