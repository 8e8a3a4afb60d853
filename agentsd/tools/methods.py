"""The one registry of the methods that ``agentsd bench`` and ``agentsd eval`` compare.

A method is written as a spec, the same in both tools, in the results files and in folder names:

==================  ==============================================================================
``unpatched``       diffusers' default attention (SDPA): the reference. Alias: ``baseline``.
``tomesd:R``        ToMe for SD (the ``tomesd`` package) merging a fraction R of the tokens, on the
                    level AgentSD patches. Alias: ``tome:R``.
``agentsd:R``       ``agentsd.apply_patch(ratio=R)`` with its default schedule.
``agentsd-agent:R`` AgentSD's agent phase at every step (``agent_until=1, merge_until=1``).
``agentsd-tome:R``  AgentSD's late phase at every step: ToMe with 2x2 cells (``agent_until=0``).
``bound``           the patched self-attentions replaced by nothing (a processor returning zeros,
                    so the block's residual passes): no patch of those layers can be faster.
                    Benchmark only: its images mean nothing.
==================  ==============================================================================

R is in [0, :data:`MAX_RATIO`]. A ratio kind may also merge the rest of each patched block, from
the same merge plan (:data:`BLOCK_MERGES`): ``+mlp`` its feed-forward (``merge_mlp``), ``+xattn``
its cross-attention (``merge_crossattn``), e.g. ``agentsd-agent:0.4+mlp``, ``tomesd:0.4+mlp+xattn``
(tomesd takes both natively). Names are exact and canonical (``+mlp`` before ``+xattn``):
``agentsd:0.3125`` and ``agentsd:0.31249995`` are two methods with two folders (``agentsd-0.3125``,
``agentsd-0.31249995``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

KINDS = ("unpatched", "tomesd", "agentsd", "agentsd-agent", "agentsd-tome", "bound")
RATIO_KINDS = ("tomesd", "agentsd", "agentsd-agent", "agentsd-tome")
# the kinds whose images mean something (what agentsd eval compares); why the others' do not
IMAGE_KINDS = tuple(kind for kind in KINDS if kind != "bound")
NO_IMAGES = {"bound": "a speed bound of agentsd bench (its patched self-attentions output zeros), whose "
             "images mean nothing"}
ALIASES = {"baseline": "unpatched", "tome": "tomesd"}
LABELS = {
    "unpatched": "Unpatched", "tomesd": "ToMeSD", "agentsd": "AgentSD",
    "agentsd-agent": "AgentSD agent phase", "agentsd-tome": "AgentSD ToMe phase", "bound": "Bound",
}
# AgentSD settings of each AgentSD kind (on top of ratio and seed)
AGENTSD_PHASES = {
    "agentsd": {},
    "agentsd-agent": {"agent_until": 1.0, "merge_until": 1.0},
    "agentsd-tome": {"agent_until": 0.0},
}
# spec suffix -> the setting of AgentSD and tomesd it turns on: the whole block merged from one plan
BLOCK_MERGES = {"mlp": "merge_mlp", "xattn": "merge_crossattn"}
# ToMe's 2x2 cells (tomesd, AgentSD's late phase) keep one token in four: at most 3 of 4 can go.
MAX_RATIO = 0.75
PAPER_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_METHODS = (
    "unpatched", *(f"tomesd:{r}" for r in PAPER_RATIOS), *(f"agentsd:{r}" for r in PAPER_RATIOS)
)


def ratio_text(ratio: float) -> str:
    """Shortest exact text of ``ratio``: ``0.4`` -> ``"0.4"``, ``0.31249995`` -> ``"0.31249995"``.

    ``{:g}`` where it reads back as the same float (so folders made before stay valid), else
    ``repr``: two different ratios never share a name.
    """
    short = f"{ratio:g}"
    return short if float(short) == ratio else repr(float(ratio))


@dataclass(frozen=True)
class Method:
    """One method of a comparison.

    Attributes:
        kind: one of :data:`KINDS`.
        ratio: fraction of tokens merged, for the kinds of :data:`RATIO_KINDS`; ``None`` otherwise.
        merges: the parts of each patched block merged besides its self-attention, keys of
            :data:`BLOCK_MERGES` in their order (``("mlp",)``); ratio kinds only.
    """

    kind: str
    ratio: float | None = None
    merges: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown method kind {self.kind!r}: choose from {', '.join(KINDS)}")
        if (self.ratio is None) == (self.kind in RATIO_KINDS):
            raise ValueError(f"method {self.kind} {'needs' if self.ratio is None else 'takes no'} ratio")
        if self.merges and (self.ratio is None or self.merges != tuple(m for m in BLOCK_MERGES
                                                                       if m in self.merges)):
            raise ValueError(f"method {self.kind}: block merges {self.merges} need a ratio kind and are "
                             f"some of {tuple(BLOCK_MERGES)}, in that order")

    @property
    def family(self) -> str:
        """The spec without its ratio, e.g. ``agentsd+mlp``: a line of a plot against the ratio."""
        return self.kind + "".join("+" + merge for merge in self.merges)

    @property
    def name(self) -> str:
        """The spec, e.g. ``agentsd:0.4`` or ``agentsd:0.4+mlp``."""
        if self.ratio is None:
            return self.kind
        return f"{self.kind}:{ratio_text(self.ratio)}" + "".join("+" + merge for merge in self.merges)

    @property
    def settings(self) -> dict[str, bool]:
        """The block merges as AgentSD's and tomesd's settings, e.g. ``{"merge_mlp": True}``."""
        return {BLOCK_MERGES[merge]: True for merge in self.merges}

    @property
    def slug(self) -> str:
        """Folder name of the method's images, e.g. ``agentsd-0.4`` (no ``:``, which Windows forbids)."""
        return self.name.replace(":", "-")

    @property
    def legacy_slugs(self) -> tuple[str, ...]:
        """Folder names of this method in evaluations made before the names were unified."""
        if self.kind == "unpatched":
            return ("baseline",)
        if self.kind == "tomesd":
            return (f"tome-{ratio_text(self.ratio)}",)
        return ()

    @property
    def label(self) -> str:
        """Display name of the kind, as in the paper's table, with its block merges (``AgentSD +mlp``)."""
        return LABELS[self.kind] + "".join(" +" + merge for merge in self.merges)

    @property
    def percent(self) -> str:
        """The ratio in percent for tables (``"40"``), ``"0"`` without a ratio."""
        return "0" if self.ratio is None else ratio_text(round(self.ratio * 100, 10))

    @property
    def order(self) -> tuple[int, tuple[int, ...], float]:
        """Sort key of the tables: kinds in :data:`KINDS` order, then block merges, then ratios."""
        return KINDS.index(self.kind), tuple(map(list(BLOCK_MERGES).index, self.merges)), self.ratio or 0.0

    def check(self) -> None:
        """Raise ``ValueError`` if AgentSD would refuse this method's settings (before any model loads)."""
        if self.kind in AGENTSD_PHASES:
            import agentsd

            agentsd.check_settings(ratio=self.ratio, **self.settings, **AGENTSD_PHASES[self.kind])


def kind_specs(kinds: Iterable[str]) -> str:
    """How ``kinds`` are written: ``unpatched, tomesd:R, ... or bound``, R, and the block merges."""
    names = [kind + (":R" if kind in RATIO_KINDS else "") for kind in kinds]
    merges = " and/or ".join("+" + merge for merge in BLOCK_MERGES)
    return (", ".join(names[:-1]) + " or " + names[-1] + ", with R the merge ratio (e.g. agentsd:0.4); a "
            f"ratio kind may add {merges} to merge the block's feed-forward / cross-attention too (e.g. "
            "agentsd:0.4+mlp)")


def _split_merges(spec: str) -> tuple[str, tuple[str, ...]]:
    """``"agentsd:0.4+xattn+mlp"`` -> ``("agentsd:0.4", ("mlp", "xattn"))``; raise ValueError naming a
    block merge that is unknown or given twice."""
    head, *merges = (part.strip().lower() for part in spec.split("+"))
    for merge in merges:
        if merge not in BLOCK_MERGES or merges.count(merge) > 1:
            problem = "is given twice" if merge in BLOCK_MERGES else f"is not {' or '.join(BLOCK_MERGES)}"
            raise ValueError(f"method {spec.strip()!r}: block merge +{merge} {problem}")
    return head, tuple(m for m in BLOCK_MERGES if m in merges)


def parse_method(spec: str, kinds: Sequence[str] = KINDS) -> Method:
    """Parse one spec (see the module notes) of the ``kinds`` the caller runs (eval:
    :data:`IMAGE_KINDS`, which its messages suggest); raise ValueError naming the problem."""
    text, merges = _split_merges(spec)
    kind, sep, value = text.partition(":")
    kind = ALIASES.get(kind.strip(), kind.strip())
    if kind not in kinds:
        what = f"method {spec!r} is {NO_IMAGES[kind]}" if kind in NO_IMAGES else f"unknown method {spec!r}"
        raise ValueError(f"{what}: use {kind_specs(kinds)}")
    if kind not in RATIO_KINDS:
        if sep or merges:
            raise ValueError(f"method {spec!r}: {kind} takes no {'ratio' if sep else 'block merge'}")
        return Method(kind)
    if not sep:
        raise ValueError(
            f"method {spec!r} needs a ratio: {kind}:R with R in [0, {MAX_RATIO}] (e.g. {kind}:0.4)"
        )
    try:
        ratio = float(value)
    except ValueError:
        raise ValueError(f"method {spec!r}: ratio {value!r} is not a number") from None
    if not 0.0 <= ratio <= MAX_RATIO:  # also refuses nan
        raise ValueError(f"method {spec!r}: ratio must be in [0, {MAX_RATIO}], got {value.strip()}")
    method = Method(kind, ratio, merges)
    try:
        method.check()
    except ValueError as e:
        raise ValueError(f"method {spec!r}: {e}") from None
    return method


def parse_methods(
    specs: Iterable[str], ratios: Iterable[float] | None = None, kinds: Sequence[str] = KINDS
) -> list[Method]:
    """Parse specs given as separate items and/or comma-separated; duplicates refused.

    Args:
        specs: method specs; with ``ratios``, a kind of :data:`RATIO_KINDS` without ``:R`` stands
            for that kind at every ratio (``agentsd`` with ratios 0.2, 0.4 -> agentsd:0.2, agentsd:0.4;
            ``agentsd+mlp`` -> agentsd:0.2+mlp, agentsd:0.4+mlp).
        ratios: the ratios of bare kinds, or ``None`` (every ratio kind needs its ``:R``).
        kinds: the kinds the caller runs (see :func:`parse_method`).

    Returns:
        The methods in the order given.
    """
    if isinstance(specs, str):
        specs = [specs]
    ratio_list = None if ratios is None else list(ratios)
    methods: list[Method] = []
    for item in specs:
        for spec in item.split(","):
            if not spec.strip():
                continue
            kind, merges = _split_merges(spec)
            if ratio_list is not None and ALIASES.get(kind, kind) in RATIO_KINDS:
                found = [parse_method(f"{kind}:{r!r}" + "".join("+" + m for m in merges), kinds)
                         for r in ratio_list]
            else:
                found = [parse_method(spec, kinds)]
            for method in found:
                if method in methods:
                    raise ValueError(f"method {method.name} is given twice")
                methods.append(method)
    if not methods:
        raise ValueError("no method given")
    return methods


# ------------------------------------------------------------------------------- applying a method


class ZeroSelfAttention:
    """An attention processor that costs nothing: it returns zeros, so the block's residual passes through."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return torch.zeros_like(hidden_states)


def agentsd_settings(method: Method, settings: Mapping[str, object] | None = None, seed: int = 0) -> dict:
    """The ``apply_patch`` keyword arguments of an AgentSD ``method``.

    Args:
        method: a method of an AgentSD kind (``agentsd``, ``agentsd-agent``, ``agentsd-tome``).
        settings: other AgentSD settings given for every AgentSD method of a run (e.g.
            ``{"max_downsample": 2}``); the method's own ratio, block merges and phase settings take
            precedence.
        seed: seed of the patch's own random choices.
    """
    if method.kind not in AGENTSD_PHASES:
        raise ValueError(f"{method.name} is not an AgentSD method")
    return {**(settings or {}), "ratio": method.ratio, "seed": seed, **method.settings,
            **AGENTSD_PHASES[method.kind]}


def patch_level(model, max_downsample: int | None = None) -> int:
    """The downsampling level AgentSD patches by default (1 for SD 1.x/2.x, 2 for SDXL).

    tomesd is given this level as ``max_downsample``, so both patch the same layers (tomesd's own
    default, 1, patches nothing on SDXL, whose first level has no attention).

    Args:
        model: a pipeline or UNet.
        max_downsample: an AgentSD ``max_downsample`` given by the user: returned as it is once
            AgentSD accepts it for ``model`` (``ValueError`` if it selects no level).
    """
    import agentsd

    if max_downsample is not None:
        agentsd.patch_targets(model, max_downsample=max_downsample)  # raises if it selects no level
        return max_downsample
    default = set(agentsd.patch_targets(model))
    for level in (1, 2, 4, 8):
        try:
            if set(agentsd.patch_targets(model, max_downsample=level)) == default:
                return level
        except ValueError:  # no layer at this level (SDXL's first level has no attention)
            continue
    raise RuntimeError("patch_targets() with no limit patches levels below /8")


def patcher(
    method: Method, model, seed: int = 0, settings: Mapping[str, object] | None = None
) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(apply, remove)`` of ``method`` on ``model`` (a pipeline or a UNet); both can run many times.

    Args:
        method: the method.
        model: a pipeline or UNet that no method is applied to.
        seed: seed of the patch's own random choices (AgentSD's random dst positions), so that every
            process of a sharded run makes the same images.
        settings: AgentSD settings for every AgentSD method (see :func:`agentsd_settings`). Their
            ``max_downsample`` also sets the level tomesd patches and the layers ``bound`` empties,
            so that every method works on the same layers.
    """
    max_downsample = (settings or {}).get("max_downsample")
    if method.kind == "unpatched":
        return (lambda: None), (lambda: None)
    if method.kind == "tomesd":
        import tomesd

        level = patch_level(model, max_downsample)
        return (
            lambda: tomesd.apply_patch(model, ratio=method.ratio, max_downsample=level, **method.settings),
            lambda: tomesd.remove_patch(model),
        )
    import agentsd

    if method.kind == "bound":
        targets = list(agentsd.patch_targets(model, max_downsample=max_downsample).values())
        saved: list = []

        def apply() -> None:
            saved[:] = [attn.processor for attn in targets]
            for attn in targets:
                attn.set_processor(ZeroSelfAttention())

        def remove() -> None:
            for attn, processor in zip(targets, saved, strict=True):
                attn.set_processor(processor)

        return apply, remove
    arguments = agentsd_settings(method, settings, seed)
    return (
        lambda: agentsd.apply_patch(model, **arguments),
        lambda: agentsd.remove_patch(model),
    )


def reseed(pipe, method: Method, seed: int) -> None:
    """Reset a method's own random state before a generation.

    tomesd forks one generator from torch's global RNG on first use and keeps drawing from it, so an
    image would depend on every generation before it (and differ between processes). Resetting it
    before each batch makes each batch draw the same dst positions, whichever images it holds.
    AgentSD needs nothing: its choices depend only on (seed, timestep, block).
    """
    if method.kind != "tomesd":
        return
    info = getattr(pipe.unet, "_tome_info", None)
    if info is not None:
        # tomesd replaces a generator that is not on the hidden states' device, so create it there.
        info["args"]["generator"] = torch.Generator(device=pipe.unet.device).manual_seed(seed)


@contextlib.contextmanager
def applied(model, method: Method, seed: int = 0) -> Iterator[None]:
    """Context manager: ``model`` patched for ``method`` inside, restored on exit (errors included)."""
    apply, remove = patcher(method, model, seed)
    apply()
    try:
        yield
    finally:
        remove()
