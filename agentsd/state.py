"""The patch's settings (a frozen, validated config) and its per-call state.

:class:`AgentSDConfig` is what a user chooses; it is checked once, when it is built. :class:`Call`
is what one UNet call decided (phase, token grid, timestep, merge metrics): it travels with the call
in thread-local storage, so threads calling one patched UNet never see each other's values.
"""

from __future__ import annotations

import math
import numbers
import operator
import threading
from dataclasses import dataclass, field, fields

import torch

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
        "fraction of tokens merged away before attention, in [0, 1); higher is faster and softer. "
        "0.4 (paper); 0.1-0.5 keep FID at or below the unpatched model's"))
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
        if not isinstance(self.use_rand, bool):
            raise ValueError(f"use_rand must be True or False, got {self.use_rand!r}")
        _in_range("seed", self.seed, 0, 2**63, high_open=True)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The setting names, in order."""
        return tuple(f.name for f in fields(cls))


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


@dataclass(eq=False)
class Call:
    """What one UNet call decided, read by the patched blocks of that call.

    Attributes:
        phase: ``"agent"``, ``"tome"`` or ``"full"``.
        latent_size: ``(height, width)`` of the latent, in tokens of the first level.
        timestep: the call's timestep as a tensor on the model's device (the dst positions are
            hashed from it on the device, so no value is read on the host).
        metrics: block index -> that block's input hidden states (the merge metric), handed from
            the block's pre-hook to its attention processor within the call.
    """

    phase: str = "full"
    latent_size: tuple[int, int] = (0, 0)
    timestep: torch.Tensor | None = None
    metrics: dict = field(default_factory=dict)

    def grid(self, downsample: int) -> tuple[int, int]:
        """Token grid ``(h, w)`` of a level downsampled ``downsample`` times (ceil, as strided convs)."""
        height, width = self.latent_size
        return -(-height // downsample), -(-width // downsample)


class CallLocal(threading.local):
    """Per-thread slot for the current :class:`Call`. Copies and pickles start empty."""

    call: Call | None = None

    def __reduce__(self):
        return (type(self), ())

    def __deepcopy__(self, memo):
        return type(self)()
