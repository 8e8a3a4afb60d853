"""apply_patch / remove_patch: install AgentSD on a diffusers UNet through its own extension points.

A forward pre-hook on the UNet reads the latent size and the timestep and sets the phase of the
call; a forward pre-hook on each patched transformer block hands its input (the merge metric) to
the block's :class:`~agentsd.attention.AgentSDProcessor`. Nothing of diffusers is copied or
subclassed, so the patch composes with other processors, LoRA, ControlNet and callbacks.
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from agentsd.attention import AgentSDProcessor

_STATE_ATTR = "_agentsd_state"


@dataclass
class PatchState:
    """Settings and per-call state shared by the hooks and processors of one patched UNet."""

    ratio: float
    agent_ratio: float
    sx: int
    sy: int
    late_sx: int
    late_sy: int
    agent_until: float
    merge_until: float
    k_scale2: float
    k_shortcut: float
    attn_precision: str | None
    use_rand: bool
    seed: int
    num_train_timesteps: int = 1000
    pipeline: weakref.ref | None = None
    # set at every UNet call
    phase: str = "full"
    latent_size: tuple[int, int] | None = None
    timestep: float = 0.0
    history: list[tuple[float, str]] = field(default_factory=list)  # (progress, phase) per call
    last_progress: float = -1.0
    # bookkeeping for removal
    processors: list = field(default_factory=list)  # (attention module, original, ours)
    hooks: list = field(default_factory=list)
    _timesteps: torch.Tensor | None = None
    _steps: torch.Tensor | None = None

    def grid(self, downsample: int) -> tuple[int, int] | None:
        """Token grid ``(h, w)`` of a level downsampled ``downsample`` times (ceil, as strided convs do)."""
        if self.latent_size is None:
            return None
        height, width = self.latent_size
        return math.ceil(height / downsample), math.ceil(width / downsample)

    def generator(self, block_index: int) -> torch.Generator:
        """A CPU generator for one block at the current timestep, independent of any other RNG.

        Seeding from (seed, timestep, block) makes the dst positions a pure function of those, so
        the same seed gives the same images however many generations ran before.
        """
        key = (self.seed * 1_000_003 + round(self.timestep * 64)) * 1_009 + block_index
        return torch.Generator().manual_seed(key % (2**63))

    def progress(self, timestep: float) -> float:
        """Denoising progress p in [0, 1) of a UNet call at ``timestep``.

        Inside a pipeline p is the position of the timestep among the denoising steps of
        ``pipe.scheduler.timesteps`` (index / number of steps); for a bare UNet (or a timestep the
        scheduler does not list) ``p = 1 - t / T``.
        """
        pipe = self.pipeline() if self.pipeline is not None else None
        scheduler = getattr(pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if isinstance(timesteps, torch.Tensor) and timesteps.numel() > 0:
            if timesteps is not self._timesteps:
                # PNDM's first PLMS step and second-order schedulers (Heun, DPM2) evaluate the UNet
                # twice at one timestep: the steps are the distinct consecutive timesteps.
                self._timesteps = timesteps
                self._steps = torch.unique_consecutive(timesteps.detach().float().cpu())
            matches = (self._steps == timestep).nonzero().flatten()
            if matches.numel():
                return matches[0].item() / len(self._steps)
        return 1.0 - timestep / self.num_train_timesteps

    def start_call(self, sample: torch.Tensor, timestep) -> None:
        """Set the phase for a UNet call (run from the UNet's forward pre-hook)."""
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.flatten()[0].item()
        self.timestep = float(timestep)
        self.latent_size = (sample.shape[-2], sample.shape[-1])
        p = self.progress(self.timestep)
        if p < self.last_progress:  # a new generation started
            self.history = []
        self.last_progress = p
        if p < self.agent_until:
            self.phase = "agent"
        elif p < self.merge_until:
            self.phase = "tome"
        else:
            self.phase = "full"
        self.history.append((p, self.phase))


def _find_unet(model) -> nn.Module:
    unet = getattr(model, "unet", None)
    if unet is None and hasattr(model, "down_blocks") and hasattr(model, "up_blocks"):
        unet = model
    if unet is None:
        kind = type(model).__name__
        if getattr(model, "transformer", None) is not None:
            raise ValueError(
                f"{kind} has a transformer (DiT) denoiser and no UNet: AgentSD supports UNet pipelines "
                "(Stable Diffusion 1.x / 2.x / SDXL and their variants); SD3, Flux and other DiT "
                "pipelines are not supported"
            )
        raise ValueError(
            f"{kind} is neither a diffusers pipeline with a .unet nor a UNet2DConditionModel; "
            "AgentSD patches the UNet of Stable Diffusion pipelines"
        )
    return unet


def _levels(unet: nn.Module):
    """Yield ``(downsample, stage)`` for each UNet stage, counting real down/upsamplers."""
    factor = 1
    for block in unet.down_blocks:
        yield factor, block
        if getattr(block, "downsamplers", None):
            factor *= 2
    if getattr(unet, "mid_block", None) is not None:
        yield factor, unet.mid_block
    for block in unet.up_blocks:
        yield factor, block
        if getattr(block, "upsamplers", None):
            factor //= 2


def _transformer_blocks(unet: nn.Module) -> list[tuple[int, nn.Module]]:
    """``(downsample, block)`` of every spatial BasicTransformerBlock whose attn1 is self-attention."""
    from diffusers.models.attention import BasicTransformerBlock

    found = []
    for factor, stage in _levels(unet):
        for transformer in getattr(stage, "attentions", None) or []:
            for block in getattr(transformer, "transformer_blocks", None) or []:
                if isinstance(block, BasicTransformerBlock) and not block.only_cross_attention:
                    found.append((factor, block))
    return found


def _select_blocks(unet: nn.Module, max_downsample: int | None) -> list[tuple[int, nn.Module]]:
    blocks = _transformer_blocks(unet)
    if not blocks:
        raise ValueError(
            f"{type(unet).__name__} has no BasicTransformerBlock with self-attention: nothing to patch "
            "(AgentSD needs a Stable Diffusion style UNet with spatial transformer blocks)"
        )
    if max_downsample is None:
        max_downsample = min(factor for factor, _ in blocks)
    return [(factor, block) for factor, block in blocks if factor <= max_downsample]


def patch_targets(model, max_downsample: int | None = None) -> dict[str, nn.Module]:
    """The self-attention modules (``attn1``) that :func:`apply_patch` patches, by processor name.

    Args:
        model: a diffusers pipeline with a ``.unet``, or the UNet itself.
        max_downsample: as in :func:`apply_patch`; ``None`` picks the highest-resolution level
            that has attention.

    Returns:
        ``{name: attention}``, with names as the keys of ``unet.attn_processors``.
    """
    _check_max_downsample(max_downsample)
    unet = _find_unet(model)
    selected = {id(block.attn1) for _, block in _select_blocks(unet, max_downsample)}
    return {
        f"{name}.processor": module for name, module in unet.named_modules() if id(module) in selected
    }


def _check_max_downsample(max_downsample) -> None:
    if max_downsample is not None and (
        isinstance(max_downsample, bool) or not isinstance(max_downsample, int) or max_downsample < 1
    ):
        raise ValueError(
            f"max_downsample must be None or an integer >= 1 (1, 2, 4, 8), got {max_downsample!r}"
        )


def _validate(
    ratio, agent_ratio, sx, sy, late_sx, late_sy, agent_until, merge_until, max_downsample,
    k_scale2, k_shortcut, attn_precision, seed, use_rand=True,
) -> None:
    def number(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")

    for name, value in (("ratio", ratio), ("agent_ratio", agent_ratio)):
        number(name, value)
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    for name, value in (("sx", sx), ("sy", sy), ("late_sx", late_sx), ("late_sy", late_sy)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name, value in (("agent_until", agent_until), ("merge_until", merge_until)):
        number(name, value)
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if agent_until > merge_until:
        raise ValueError(f"agent_until ({agent_until}) must not exceed merge_until ({merge_until})")
    # Only the strides of a phase that can run limit the ratio.
    phases = []
    if agent_until > 0:
        phases.append(("sx", "sy", sx, sy))
    if merge_until > agent_until:
        phases.append(("late_sx", "late_sy", late_sx, late_sy))
    for name_x, name_y, cell_x, cell_y in phases:
        limit = 1 - 1 / (cell_x * cell_y)
        if ratio > limit:
            raise ValueError(
                f"ratio {ratio} is too high for {name_x}={cell_x}, {name_y}={cell_y}: at most "
                f"1 - 1/({cell_x}*{cell_y}) = {limit:.4g} of the tokens can be merged"
            )
    _check_max_downsample(max_downsample)
    number("k_scale2", k_scale2)
    number("k_shortcut", k_shortcut)
    if attn_precision not in (None, "fp32"):
        raise ValueError(f'attn_precision must be None or "fp32", got {attn_precision!r}')
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be None or an integer, got {seed!r}")
    if not isinstance(use_rand, bool):
        raise ValueError(f"use_rand must be True or False, got {use_rand!r}")


def check_settings(**settings) -> None:
    """Raise ``ValueError`` if :func:`apply_patch` would reject these keyword settings.

    Lets a caller (e.g. a command line) validate settings before loading a model. Unknown names
    are rejected too. Takes the keyword arguments of :func:`apply_patch` (all optional).
    """
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(apply_patch).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ValueError(f"unknown AgentSD setting(s): {', '.join(unknown)}")
    _validate(**{**defaults, **settings})


def apply_patch(
    model,
    *,
    ratio: float = 0.4,
    agent_ratio: float = 0.95,
    sx: int = 4,
    sy: int = 4,
    late_sx: int = 2,
    late_sy: int = 2,
    agent_until: float = 0.4,
    merge_until: float = 1.0,
    max_downsample: int | None = None,
    k_scale2: float = 0.3,
    k_shortcut: float = 0.075,
    attn_precision: str | None = None,
    use_rand: bool = True,
    seed: int | None = None,
):
    """Patch a Stable Diffusion pipeline (or its UNet) with AgentSD, in place.

    The self-attention of the highest-resolution transformer blocks merges tokens with ToMe and,
    early in denoising, attends through a few agent tokens (Agent Attention, Han et al. ECCV 2024).
    The defaults are the paper's: on a 50-step run, steps 0-19 use agent attention with 4x4 cells,
    steps 20-49 ToMe only with 2x2 cells.

    Args:
        model: a diffusers pipeline with a ``.unet`` (SD 1.x / 2.x / SDXL and their img2img, inpaint
            and ControlNet variants) or a ``UNet2DConditionModel``. Patched again, the new settings
            replace the old ones.
        ratio: fraction of tokens merged away before attention, in [0, 1). Higher is faster and
            softer. 0.4 is the paper's default; 0.1-0.5 keep FID at or below the unpatched model's.
            At most ``1 - 1/(sx*sy)`` (and ``1 - 1/(late_sx*late_sy)``).
        agent_ratio: fraction of tokens merged away to form the agents, in [0, 1). It is capped at the
            src count, so with 4x4 cells 0.95 leaves one agent per cell (N/16 agents). Keep 0.95.
        sx, sy: cell size (in tokens) of the merge during the agent phase; one dst token per cell.
            4, 4 recommended.
        late_sx, late_sy: cell size during the ToMe-only phase. 2, 2 recommended (ToMeSD's).
        agent_until: progress (0 = first step, 1 = end) until which agent attention runs. 0.4 = the
            first 40% of the steps, as in the paper. 0 disables agents (ToMeSD only).
        merge_until: progress until which token merging runs; later steps use the original
            attention. 1.0 (merge to the end) recommended.
        max_downsample: patch blocks whose token grid is downsampled at most this many times from
            the latent (1, 2, 4 or 8). ``None`` (recommended) picks the highest-resolution level
            that has attention: 1 for SD 1.x/2.x, 2 for SDXL. Larger values patch more levels for
            little gain.
        k_scale2: the second softmax uses scale ``s**k_scale2`` (s = head_dim**-0.5). 0.3.
        k_shortcut: weight of the value shortcut added to the agent attention output. 0.075.
        attn_precision: ``"fp32"`` runs the agent attention in float32, needed for SD 2.1 in fp16
            (it overflows otherwise); ``None`` keeps the model's dtype.
        use_rand: pick the dst token at a random position in each cell (recommended); off, the top
            left one. Randomness is always off for odd batch sizes.
        seed: seed of the patch's own random choices. They never draw from torch's global RNG or the
            pipeline's generator, and depend only on (seed, timestep, block), so the same seed gives
            the same images. ``None`` takes ``torch.initial_seed()`` at patch time.

    Returns:
        ``model``, patched. Undo with :func:`remove_patch`.

    Raises:
        ValueError: for a parameter out of range or a model without a UNet / transformer blocks
            (e.g. SD3 or Flux); the model is then left exactly as it was.
    """
    _validate(
        ratio, agent_ratio, sx, sy, late_sx, late_sy, agent_until, merge_until, max_downsample,
        k_scale2, k_shortcut, attn_precision, seed, use_rand,
    )
    unet = _find_unet(model)
    blocks = _select_blocks(unet, max_downsample)
    remove_patch(model)

    scheduler = getattr(model, "scheduler", None)
    state = PatchState(
        ratio=float(ratio),
        agent_ratio=float(agent_ratio),
        sx=sx,
        sy=sy,
        late_sx=late_sx,
        late_sy=late_sy,
        agent_until=float(agent_until),
        merge_until=float(merge_until),
        k_scale2=float(k_scale2),
        k_shortcut=float(k_shortcut),
        attn_precision=attn_precision,
        use_rand=bool(use_rand),
        seed=torch.initial_seed() if seed is None else seed,
        num_train_timesteps=getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000),
        pipeline=weakref.ref(model) if model is not unet else None,
    )

    def unet_hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        state.start_call(sample, timestep)

    setattr(unet, _STATE_ATTR, state)
    try:
        state.hooks.append(unet.register_forward_pre_hook(unet_hook, with_kwargs=True))
        for index, (factor, block) in enumerate(blocks):
            attn = block.attn1
            processor = AgentSDProcessor(state, attn.processor, downsample=factor, block_index=index)
            state.processors.append((attn, attn.processor, processor))
            attn.set_processor(processor)
            hook = _metric_hook(state, attn, processor)
            state.hooks.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    except BaseException:
        remove_patch(model)  # never leave a half-patched model
        raise
    return model


def _metric_hook(state: PatchState, attn: nn.Module, processor: AgentSDProcessor):
    def hook(module, args, kwargs):
        if state.phase != "full" and attn.processor is processor:
            processor.metric = args[0] if args else kwargs["hidden_states"]

    return hook


def remove_patch(model):
    """Undo :func:`apply_patch` exactly; a no-op on a model that is not patched.

    Restores the processors that were set before patching (custom ones such as LoRA or IP-Adapter
    processors too) and removes every hook the patch added, so outputs are bit-identical to never
    having patched. A processor the user replaced after patching is left as the user set it.

    Args:
        model: the pipeline or UNet given to :func:`apply_patch`.

    Returns:
        ``model``.
    """
    try:
        unet = _find_unet(model)
    except ValueError:
        return model
    state = getattr(unet, _STATE_ATTR, None)
    if state is None:
        return model
    for handle in state.hooks:
        handle.remove()
    for attn, original, ours in state.processors:
        ours.metric = None
        if attn.processor is ours:
            attn.set_processor(original)
    delattr(unet, _STATE_ATTR)
    return model


def phase_history(model, per_call: bool = False) -> list[str]:
    """Phases run during the last generation: ``"agent"``, ``"tome"`` or ``"full"``.

    Args:
        model: the patched pipeline or UNet.
        per_call: ``False`` (default) gives one entry per denoising step: consecutive UNet calls at
            the same timestep (PNDM's first PLMS step, second-order schedulers) count once, so a
            50-step run with the defaults gives ``["agent"] * 20 + ["tome"] * 30``. ``True`` gives
            one entry per UNet call.

    A generation starts when the denoising progress goes back (a new run of the scheduler).
    Empty when the model is not patched.
    """
    try:
        unet = _find_unet(model)
    except ValueError:
        return []
    state = getattr(unet, _STATE_ATTR, None)
    if state is None:
        return []
    if per_call:
        return [phase for _, phase in state.history]
    steps = [entry for i, entry in enumerate(state.history) if i == 0 or entry[0] != state.history[i - 1][0]]
    return [phase for _, phase in steps]
