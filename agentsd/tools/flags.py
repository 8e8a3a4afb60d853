"""Command-line flags for every ``apply_patch`` parameter, derived from its signature.

The flags, their types, defaults and help text are read from :func:`agentsd.apply_patch` itself
(signature and docstring), so the CLI can never drift from the library.
"""

from __future__ import annotations

import argparse
import inspect
import re
import typing

import agentsd

DEST_PREFIX = "patch_"


def patch_parameters() -> dict[str, inspect.Parameter]:
    """The keyword parameters of :func:`agentsd.apply_patch` (all but the model), in order."""
    parameters = inspect.signature(agentsd.apply_patch).parameters
    return {name: p for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _docstring_help() -> dict[str, str]:
    """First sentence of each argument's description in apply_patch's ``Args:`` section."""
    doc = inspect.getdoc(agentsd.apply_patch) or ""
    section = doc.split("Args:", 1)[-1].split("\n\n", 1)[0]
    helps: dict[str, str] = {}
    for match in re.finditer(r"^    ([\w, ]+): (.*(?:\n {8,}.*)*)", section, flags=re.MULTILINE):
        text = " ".join(match.group(2).split()).replace("``", "")
        first = re.split(r"(?<=\.) ", text, maxsplit=1)[0]
        for name in match.group(1).split(","):
            helps[name.strip()] = first
    return helps


def _flag(name: str, reserved: typing.Collection[str]) -> str:
    return "--" + ("patch-" if name in reserved else "") + name.replace("_", "-")


def add_patch_arguments(
    parser: argparse.ArgumentParser,
    reserved: typing.Collection[str] = ("seed",),
    help_overrides: typing.Mapping[str, str] | None = None,
) -> argparse._ArgumentGroup:
    """Add one flag per ``apply_patch`` parameter, with the library's default, to ``parser``.

    Args:
        parser: the (sub)command parser.
        reserved: parameter names the command already uses for something else; their flags get a
            ``patch-`` prefix (``seed`` -> ``--patch-seed``).
        help_overrides: help text for parameters the command treats specially, by name.

    Values land in ``args.patch_<name>``; read them back with :func:`patch_kwargs`.
    """
    group = parser.add_argument_group(
        "AgentSD patch (apply_patch parameters; defaults are the library's, from the paper)"
    )
    hints = typing.get_type_hints(agentsd.apply_patch)
    helps = _docstring_help()
    for name, parameter in patch_parameters().items():
        default = parameter.default
        kinds = [t for t in typing.get_args(hints[name]) if t is not type(None)] or [hints[name]]
        kind = kinds[0]
        text = (help_overrides or {}).get(name, helps.get(name, "")).replace("%", "%%")
        if kind is bool:
            group.add_argument(
                _flag(name, reserved), dest=DEST_PREFIX + name, action=argparse.BooleanOptionalAction,
                default=default, help=f"{text} (default: %(default)s)",
            )
        else:
            group.add_argument(
                _flag(name, reserved), dest=DEST_PREFIX + name, type=kind, default=default,
                metavar=kind.__name__.upper(), help=f"{text} (default: %(default)s)",
            )
    return group


def patch_kwargs(args: argparse.Namespace) -> dict:
    """The ``apply_patch`` keyword arguments given on the command line (defaults included)."""
    return {name: getattr(args, DEST_PREFIX + name) for name in patch_parameters()}
