"""``agentsd eval``: FID, CLIP score, time and memory per image of each method."""

from agentsd.tools.evaluate.command import EvalConfig, EvalResult, add_parser, config_from_args, run, run_eval

__all__ = ["EvalConfig", "EvalResult", "add_parser", "config_from_args", "run", "run_eval"]
