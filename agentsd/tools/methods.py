"""The methods an evaluation compares: parse their specs, apply one to a pipeline, remove it again.

A spec is ``baseline`` (the unpatched pipeline), ``tome:R`` (ToMe for SD from the ``tomesd``
package, merging a fraction R of the tokens, its defaults otherwise) or ``agentsd:R`` (this
package's patch with its default schedule at ratio R).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

FAMILIES = ("baseline", "tome", "agentsd")
LABELS = {"baseline": "Baseline", "tome": "ToMeSD", "agentsd": "AgentSD"}
# Both patches merge with 2x2 cells in (part of) the schedule, so at most 3 of 4 tokens can go.
MAX_RATIO = 0.75
PAPER_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_METHODS = ("baseline", *(f"tome:{r}" for r in PAPER_RATIOS), *(f"agentsd:{r}" for r in PAPER_RATIOS))


@dataclass(frozen=True)
class Method:
    """One row of the results table.

    Attributes:
        family: ``"baseline"``, ``"tome"`` or ``"agentsd"``.
        ratio: fraction of tokens merged (0 for the baseline).
    """

    family: str
    ratio: float = 0.0

    @property
    def name(self) -> str:
        """The spec, e.g. ``agentsd:0.4``."""
        return self.family if self.family == "baseline" else f"{self.family}:{self.ratio:g}"

    @property
    def slug(self) -> str:
        """Folder name of the method's images, e.g. ``agentsd-0.4`` (no ``:``, which Windows forbids)."""
        return self.name.replace(":", "-")

    @property
    def label(self) -> str:
        """Display name of the family, as in the paper's table."""
        return LABELS[self.family]


def parse_method(spec: str) -> Method:
    """Parse one spec (``baseline``, ``tome:R``, ``agentsd:R``); raise ValueError naming the problem."""
    text = spec.strip()
    family, sep, value = text.partition(":")
    family = family.strip().lower()
    if family == "baseline" and not sep:
        return Method("baseline")
    if family not in ("tome", "agentsd") or not sep:
        raise ValueError(
            f"unknown method {spec!r}: use baseline, tome:R or agentsd:R with R the merge ratio "
            "(e.g. agentsd:0.4)"
        )
    try:
        ratio = float(value)
    except ValueError:
        raise ValueError(f"method {spec!r}: ratio {value!r} is not a number") from None
    if not 0.0 <= ratio <= MAX_RATIO:
        raise ValueError(f"method {spec!r}: ratio must be in [0, {MAX_RATIO}], got {ratio:g}")
    return Method(family, ratio)


def parse_methods(specs: Iterable[str]) -> list[Method]:
    """Parse specs given as separate items and/or comma-separated; order kept, duplicates refused."""
    if isinstance(specs, str):
        specs = [specs]
    methods: list[Method] = []
    for item in specs:
        for spec in item.split(","):
            if not spec.strip():
                continue
            method = parse_method(spec)
            if method in methods:
                raise ValueError(f"method {method.name} is given twice")
            methods.append(method)
    if not methods:
        raise ValueError("no method given")
    return methods


def apply_method(pipe, method: Method, seed: int) -> None:
    """Patch ``pipe`` in place for ``method`` (nothing for the baseline).

    Args:
        pipe: a Stable Diffusion pipeline that no method is applied to.
        method: the method.
        seed: seed of the patch's own random choices (AgentSD's random dst positions), so that
            every process of a sharded run makes the same images.
    """
    if method.family == "tome":
        import tomesd

        tomesd.apply_patch(pipe, ratio=method.ratio)
    elif method.family == "agentsd":
        import agentsd

        agentsd.apply_patch(pipe, ratio=method.ratio, seed=seed)


def remove_method(pipe, method: Method) -> None:
    """Undo :func:`apply_method`."""
    if method.family == "tome":
        import tomesd

        tomesd.remove_patch(pipe)
    elif method.family == "agentsd":
        import agentsd

        agentsd.remove_patch(pipe)


def reseed(pipe, method: Method, seed: int) -> None:
    """Reset a method's own random state before a generation.

    tomesd forks one generator from torch's global RNG on first use and keeps drawing from it, so an
    image would depend on every generation before it (and differ between processes). Resetting it
    before each batch makes each batch draw the same dst positions, whichever images it holds.
    AgentSD needs nothing: its choices depend only on (seed, timestep, block).
    """
    if method.family != "tome":
        return
    info = getattr(pipe.unet, "_tome_info", None)
    if info is not None:
        # tomesd replaces a generator that is not on the hidden states' device, so create it there.
        info["args"]["generator"] = torch.Generator(device=pipe.unet.device).manual_seed(seed)


@contextlib.contextmanager
def applied(pipe, method: Method, seed: int) -> Iterator[None]:
    """Context manager: ``pipe`` patched for ``method`` inside, restored on exit (errors included)."""
    apply_method(pipe, method, seed)
    try:
        yield
    finally:
        remove_method(pipe, method)
