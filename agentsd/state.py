"""The patch's settings (a frozen, validated config) and its per-call state.

:class:`AgentSDConfig` is what a user chooses; it is checked once, when it is built. :class:`Call` is
what one UNet call decided (phase, latent size, dst positions) and :class:`Plan` what one block computed
from its input (the merges its sub-modules share). Both belong to the call, never to the module: a
Call travels to the blocks as an argument, so a checkpointed block recomputed during backward sees
the call it recomputes, and two threads calling one UNet never see each other's values.
"""

from __future__ import annotations

import math
import numbers
import operator
import textwrap
import threading
from dataclasses import dataclass, field, fields

import torch

from agentsd.merge import TokenMerge

# Cells larger than this hold more tokens than any first level of a real UNet has rows.
_MAX_CELL = 64


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass(frozen=True)
class AgentSDConfig:
    """Settings of one AgentSD patch; every field is checked when the config is built.

    The defaults are the paper's (Han et al., ECCV 2024): on a 50-step run, steps 0-19 use agent
    attention with 4x4 cells, steps 20-49 ToMe only with 2x2 cells. Each field's ``metadata["help"]``
    is a one-line description (the command line builds its flags from it).
    """

    ratio: float = field(default=0.4, metadata=_help(
        "fraction of tokens merged away before attention, in [0, 1) and at most 1 - 1/(sx*sy) (and "
        "1 - 1/(late_sx*late_sy)); higher is faster and softer. 0.4 (paper); 0.1-0.5 keep FID at or "
        "below the unpatched model's"))
    agent_ratio: float = field(default=0.95, metadata=_help(
        "fraction of tokens merged away to form the agents, in [0, 1); capped at the src count, so "
        "with 4x4 cells 0.95 leaves one agent per cell. Keep 0.95"))
    sx: int = field(default=4, metadata=_help(
        f"cell width in tokens of the merge in the agent phase (one dst token per cell), 1-{_MAX_CELL}; 4"))
    sy: int = field(default=4, metadata=_help(
        f"cell height in tokens of the merge in the agent phase, 1-{_MAX_CELL}; 4"))
    late_sx: int = field(default=2, metadata=_help(
        f"cell width in the ToMe-only phase, 1-{_MAX_CELL}; 2 (ToMeSD's)"))
    late_sy: int = field(default=2, metadata=_help(
        f"cell height in the ToMe-only phase, 1-{_MAX_CELL}; 2 (ToMeSD's)"))
    agent_until: float = field(default=0.4, metadata=_help(
        "denoising progress (0 = first step, 1 = end) until which agent attention runs; 0.4 (paper); "
        "0 disables agents (ToMeSD only)"))
    merge_until: float = field(default=1.0, metadata=_help(
        "progress until which tokens are merged; later steps use the original attention. 1.0"))
    max_downsample: int | None = field(default=None, metadata=_help(
        "patch blocks whose token grid is downsampled at most this many times (1, 2, 4, 8); "
        "default: the highest-resolution level that has attention (1 for SD 1.x/2.x, 2 for SDXL)"))
    k_scale2: float = field(default=0.3, metadata=_help(
        "the second softmax uses scale s**k_scale2 (s = head_dim**-0.5), in [0, 2]; 0.3 (paper)"))
    k_shortcut: float = field(default=0.075, metadata=_help(
        "weight of the value shortcut added to the agent attention output, in [0, 1]; 0.075 (paper)"))
    attn_precision: str | None = field(default=None, metadata=_help(
        'run the agent attention in float32 ("fp32"; needed for SD 2.1 in fp16) or in the model dtype',
        choices=(None, "fp32")))
    use_rand: bool = field(default=True, metadata=_help(
        "pick each cell's dst token at a random position (recommended); off: the top-left one"))
    seed: int = field(default=0, metadata=_help(
        "seed of the patch's own random choices (the dst positions), in [0, 2**63); they are a pure "
        "function of (seed, timestep, block) and draw from no RNG stream"))
    merge_crossattn: bool = field(default=False, metadata=_help(
        "also merge the image tokens entering the cross-attention (attn2) with the block's plan, as "
        "tomesd's merge_crossattn; off (tomesd's and the paper's default)"))
    merge_mlp: bool = field(default=False, metadata=_help(
        "also merge the tokens entering the feed-forward (ff) with the block's plan, as tomesd's "
        "merge_mlp; off (tomesd's and the paper's default). Faster, softer"))

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise numpy scalars to Python numbers once
        for name in ("ratio", "agent_ratio", "agent_until", "merge_until", "k_scale2", "k_shortcut"):
            set_(self, name, _real(name, getattr(self, name)))
        for name in ("sx", "sy", "late_sx", "late_sy", "seed"):
            set_(self, name, _integer(name, getattr(self, name)))
        if self.max_downsample is not None:
            set_(self, "max_downsample", _integer("max_downsample", self.max_downsample))
        _in_range("ratio", self.ratio, 0, 1, high_open=True)
        _in_range("agent_ratio", self.agent_ratio, 0, 1, high_open=True)
        for name in ("sx", "sy", "late_sx", "late_sy"):
            _in_range(name, getattr(self, name), 1, _MAX_CELL)
        _in_range("agent_until", self.agent_until, 0, 1)
        _in_range("merge_until", self.merge_until, 0, 1)
        if self.agent_until > self.merge_until:
            raise ValueError(
                f"agent_until ({self.agent_until}) must not exceed merge_until ({self.merge_until})"
            )
        # Only the cells of a phase that can run limit the ratio.
        cells = []
        if self.agent_until > 0:
            cells.append(("sx", "sy", self.sx, self.sy))
        if self.merge_until > self.agent_until:
            cells.append(("late_sx", "late_sy", self.late_sx, self.late_sy))
        for name_x, name_y, cell_x, cell_y in cells:
            limit = 1 - 1 / (cell_x * cell_y)
            if self.ratio > limit:
                raise ValueError(
                    f"ratio {self.ratio} is too high for {name_x}={cell_x}, {name_y}={cell_y}: at most "
                    f"1 - 1/({cell_x}*{cell_y}) = {limit:.4g} of the tokens can be merged"
                )
        if self.max_downsample is not None and self.max_downsample not in (1, 2, 4, 8, 16, 32, 64):
            raise ValueError(
                f"max_downsample must be None or a power of two >= 1 (1, 2, 4, 8), got {self.max_downsample}"
            )
        _in_range("k_scale2", self.k_scale2, 0, 2)
        _in_range("k_shortcut", self.k_shortcut, 0, 1)
        if self.attn_precision not in (None, "fp32"):
            raise ValueError(f'attn_precision must be None or "fp32", got {self.attn_precision!r}')
        for name in ("use_rand", "merge_crossattn", "merge_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _in_range("seed", self.seed, 0, 2**63, high_open=True)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The setting names, in order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def describe(cls, indent: str = "") -> str:
        """Each setting, its default and its help: the list in :func:`agentsd.apply_patch`'s docstring."""
        return "\n".join(
            textwrap.fill(f"- ``{f.name}`` ({f.default!r}): {f.metadata['help']}", 100, initial_indent=indent,
                          subsequent_indent=indent + "  ")
            for f in fields(cls)
        )


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def _integer(name: str, value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # int and numpy integers; not floats
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _in_range(name: str, value, low, high, high_open: bool = False) -> None:
    if not (low <= value < high if high_open else low <= value <= high):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")


@dataclass(frozen=True, eq=False)
class Call:
    """What one UNet call decided, handed to the patched blocks of that call.

    Attributes:
        phase: ``"agent"`` or ``"tome"`` (a ``"full"`` call hands nothing to the blocks).
        latent_size: ``(height, width)`` of the latent, in tokens of the first level.
        dst: the dst positions of the call's patched blocks, for each level (downsample factor): a
            ``[blocks of the level, cells]`` tensor on the model's device, hashed there from the
            timestep (no value is read on the host). Made once per call, not by each block: on a GPU
            every small kernel costs host time (benchmarks/results/kernels-per-call/).
    """

    phase: str
    latent_size: tuple[int, int]
    dst: dict[int, torch.Tensor]


def grid(latent_size: tuple[int, int], downsample: int) -> tuple[int, int]:
    """Token grid ``(h, w)`` of a level downsampled ``downsample`` times (ceil, as strided convs)."""
    height, width = latent_size
    return -(-height // downsample), -(-width // downsample)


@dataclass(frozen=True, eq=False)
class Plan:
    """One block's merges for one call, computed once from the block's input.

    Attributes:
        agent: whether the call is in the agent phase.
        merge: the token merge attn1 (and attn2, ff when enabled) run on, or ``None`` when it
            merges nothing.
        agents: the agent merge (agent phase, and only when the agents are fewer than half the
            merged tokens), else ``None``.
    """

    agent: bool
    merge: TokenMerge | None
    agents: TokenMerge | None


class CallLocal(threading.local):
    """This thread's current :class:`Call` (set by the UNet) and :class:`Plan` (set by a block).

    Copies and pickles start empty. Both attributes are set in ``__init__`` so that
    ``torch.compile`` sees them in every thread.
    """

    def __init__(self):
        self.call: Call | None = None
        self.plan: Plan | None = None
        self.history: list[tuple[float, str]] = []
        self.where: tuple[object, float] = (None, -1.0)

    def __reduce__(self):
        return (type(self), ())

    def __deepcopy__(self, memo):
        return type(self)()
