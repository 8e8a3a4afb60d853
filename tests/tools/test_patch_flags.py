"""agentsd.tools.options.add_patch_arguments: one flag per AgentSDConfig field, with its default and help."""

import argparse
import dataclasses

import pytest

import agentsd
from agentsd.tools import options as flags


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    flags.add_patch_arguments(parser, reserved=("seed",))
    return parser


def test_every_setting_is_a_flag_with_its_default():
    parser = _parser()
    defaults = {f.name: f.default for f in dataclasses.fields(agentsd.AgentSDConfig)}
    assert flags.patch_settings(parser.parse_args([])) == defaults
    args = parser.parse_args(
        ["--ratio", "0.3", "--sx", "2", "--max-downsample", "2", "--attn-precision", "fp32",
         "--no-use-rand", "--patch-seed", "7", "--agent-until", "1"]
    )
    settings = flags.patch_settings(args)
    assert settings == {**defaults, "ratio": 0.3, "sx": 2, "max_downsample": 2, "attn_precision": "fp32",
                        "use_rand": False, "seed": 7, "agent_until": 1.0}
    agentsd.check_settings(**settings)  # valid: no error
    with pytest.raises(ValueError, match="ratio 0.99 is too high"):
        agentsd.check_settings(**{**settings, "ratio": 0.99})
    none = parser.parse_args(["--max-downsample", "none", "--attn-precision", "none"])
    assert flags.patch_settings(none)["max_downsample"] is None
    assert flags.patch_settings(none)["attn_precision"] is None


def test_help_comes_from_the_field_metadata(monkeypatch):
    help_text = " ".join(_parser().format_help().split())
    for field in dataclasses.fields(agentsd.AgentSDConfig):
        assert " ".join(field.metadata["help"].split())[:40] in help_text
    # the docstring's layout is not an API: the flags do not read it
    monkeypatch.setattr(agentsd.apply_patch, "__doc__", "no Args section at all")
    assert " ".join(_parser().format_help().split()) == help_text
