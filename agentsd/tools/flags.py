"""Command-line flags for every AgentSD setting, built from :class:`agentsd.AgentSDConfig`'s fields.

Each field gives its flag's name, type, default and help (``field.metadata["help"]``), so the CLI
cannot drift from the library and no docstring layout is an API.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Collection, Mapping

import agentsd

DEST_PREFIX = "patch_"
_NONE_WORDS = ("none", "default")


def setting_fields() -> tuple[dataclasses.Field, ...]:
    """The fields of :class:`agentsd.AgentSDConfig`, one per ``apply_patch`` setting, in order."""
    return dataclasses.fields(agentsd.AgentSDConfig)


def patch_defaults() -> dict:
    """``{setting: default}`` of every AgentSD setting."""
    return {f.name: f.default for f in setting_fields()}


def _flag(name: str, reserved: Collection[str]) -> str:
    return "--" + ("patch-" if name in reserved else "") + name.replace("_", "-")


def _parser_for(kind: type, optional: bool):
    """An argparse ``type`` for ``kind``; optional settings also take ``none``."""

    def parse(text: str):
        if optional and text.lower() in _NONE_WORDS:
            return None
        return kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error: "invalid int value"
    return parse


def add_patch_arguments(
    parser: argparse.ArgumentParser,
    reserved: Collection[str] = ("seed",),
    help_overrides: Mapping[str, str] | None = None,
    exclude: Collection[str] = (),
) -> argparse._ArgumentGroup:
    """Add one flag per AgentSD setting, with the library's default, to ``parser``.

    Args:
        parser: the (sub)command parser.
        reserved: setting names the command already uses for something else; their flags get a
            ``patch-`` prefix (``seed`` -> ``--patch-seed``).
        help_overrides: help text for settings the command treats specially, by name.
        exclude: settings that get no flag (the command sets them itself); pass the same to
            :func:`patch_settings`.

    Values land in ``args.patch_<name>``; read them back with :func:`patch_settings`.
    """
    group = parser.add_argument_group(
        "AgentSD patch (apply_patch settings; defaults are the library's, from the paper)"
    )
    hints = typing.get_type_hints(agentsd.AgentSDConfig)
    for field in setting_fields():
        if field.name in exclude:
            continue
        kinds = [t for t in typing.get_args(hints[field.name]) if t is not type(None)] or [hints[field.name]]
        optional = type(None) in typing.get_args(hints[field.name])
        kind = kinds[0]
        text = (help_overrides or {}).get(field.name, field.metadata.get("help", "")).replace("%", "%%")
        flag, dest = _flag(field.name, reserved), DEST_PREFIX + field.name
        if kind is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=field.default,
                               help=f"{text} (default: %(default)s)")
            continue
        choices = field.metadata.get("choices")  # shown, but checked by the library (its message)
        metavar = "{" + ",".join(str(c).lower() for c in choices) + "}" if choices else kind.__name__.upper()
        group.add_argument(flag, dest=dest, type=_parser_for(kind, optional), default=field.default,
                           metavar=metavar, help=f"{text} (default: %(default)s)")
    return group


def patch_settings(args: argparse.Namespace, exclude: Collection[str] = ()) -> dict:
    """The AgentSD settings given on the command line (defaults included), for ``apply_patch``.

    Args:
        args: parsed flags of a parser given :func:`add_patch_arguments`.
        exclude: the settings excluded there.
    """
    settings = {}
    for field in setting_fields():
        if field.name not in exclude:
            settings[field.name] = getattr(args, DEST_PREFIX + field.name)
    return settings
