"""apply_patch / remove_patch: install AgentSD on a diffusers UNet through its own extension points.

A forward pre-hook on the UNet decides the phase of the call once, from the timestep's place in the
calling scheduler's schedule, and puts it (with the latent size and the timestep tensor) in the
patch's per-thread :class:`~agentsd.state.Call`. A forward pre-hook on each patched transformer block
hands its input (the merge metric) to the block's :class:`~agentsd.attention.AgentSDProcessor`
through that call. Nothing of diffusers is copied or subclassed.

The UNet hook is the one place that looks at the host: it runs outside ``torch.compile`` (one graph
break at the UNet's entry when the whole UNet is compiled, none with regional compilation), so the
compiled blocks guard only on the phase and the grid, never on the timestep's value.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from dataclasses import dataclass, replace

import torch
from torch import nn

from agentsd.attention import AgentSDProcessor
from agentsd.state import AgentSDConfig, Call, CallLocal

_PATCH_ATTR = "_agentsd_patch"

# Processors that compute plain attention: the patch stays on top of them when other code sets
# them (attention slicing, fused QKV, set_default_attn_processor, ...).
_PLAIN_PROCESSORS = (
    "AttnProcessor", "AttnProcessor2_0", "SlicedAttnProcessor", "FusedAttnProcessor2_0",
    "XFormersAttnProcessor", "AttnProcessorNPU", "FusedAttnProcessor",
)

# EDM noise levels of video UNets (SVD): timestep = ln(sigma) / 4 with sigma in [0.002, 700].
_EDM_LOG_SIGMA = (math.log(0.002), math.log(700.0))


@dataclass(eq=False)
class _Slot:
    attention: nn.Module
    processor: AgentSDProcessor
    lost: bool = False


@dataclass(frozen=True)
class _Schedule:
    """Where the calls of one denoising schedule fall: call index -> step."""

    length: int  # UNet calls in the schedule
    steps: int  # denoising steps
    warmup_calls: int = 0  # PNDM's Runge-Kutta warm-up: 4 calls per step

    def step(self, index: int) -> int:
        if index < self.warmup_calls:
            return index // 4
        if self.warmup_calls:
            return self.warmup_calls // 4 + index - self.warmup_calls
        # Several calls per step (Heun, KDPM2, PNDM's doubled first PLMS step): spread evenly.
        return index * self.steps // self.length


class Patch:
    """The AgentSD patch of one UNet: its config, what it installed, and the per-thread call slot."""

    def __init__(self, config: AgentSDConfig, unet: nn.Module | None = None, pipeline=None):
        self.config = config
        self.slots: list[_Slot] = []
        self.hooks: list = []
        self.local = CallLocal()
        self.pipeline = None if pipeline is None else weakref.ref(pipeline)
        self.edm = type(unet).__name__ == "UNetSpatioTemporalConditionModel"
        scheduler_config = getattr(getattr(pipeline, "scheduler", None), "config", None)
        self.num_train_timesteps = getattr(scheduler_config, "num_train_timesteps", None) or 1000
        self.history: list[tuple[int, str]] = []  # (step, phase) of the last generation
        self._lock = threading.Lock()
        self._schedules: dict[int, tuple[weakref.ref, _Schedule | None]] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(pipeline=None, _lock=None, _schedules={})
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # --- the UNet pre-hook ------------------------------------------------------------------------

    def start_call(self, sample: torch.Tensor, timestep) -> None:
        """Decide the phase of one UNet call and publish it to this thread's patched blocks."""
        active = self._sync_processors()
        generation, position, step, p = self._progress(timestep)
        local = self.local
        previous = getattr(local, "generation", None)
        by_index = not isinstance(generation, _ByValue)
        if previous is not generation or (by_index and position <= local.position):
            local.history = []  # a new generation
        local.generation, local.position = generation, position
        phase = self._phase_of(p) if active else "full"
        call = local.call
        if call is None:
            call = local.call = Call()
        call.phase = phase
        call.latent_size = (sample.shape[-2], sample.shape[-1])
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(float(timestep), device=sample.device)
        call.timestep = timestep
        call.metrics.clear()
        local.history.append((step, phase))
        self.history = local.history

    def _progress(self, timestep) -> tuple[object, float, int, float]:
        """``(generation, position, step, progress)`` of a call, progress p in [0, 1).

        A timestep that is an element of a schedule (pipelines iterate over
        ``scheduler.timesteps``) is placed by its index in that schedule, read from the tensor's
        storage offset: no value crosses to the host. Other timesteps (numbers, fresh tensors) are
        placed by value, ``p = 1 - t / T`` (EDM noise levels for video UNets): one read per call.
        """
        if isinstance(timestep, torch.Tensor):
            base = timestep._base
            if base is not None and timestep.numel() >= 1:
                located = self._locate(timestep, base)
                if located is not None:
                    return located
            values = timestep.detach().reshape(-1).unique().tolist()
            phases = {self._phase_of(self._value_progress(v)) for v in values}
            if len(phases) > 1:
                raise ValueError(
                    "AgentSD decides one phase per UNet call, but this batch has timesteps in several "
                    f"phases ({', '.join(sorted(phases))}): call the UNet once per timestep, or "
                    "agentsd.remove_patch(model) first"
                )
            value = values[0]
        else:
            value = float(timestep)
        p = self._value_progress(value)
        local = self.local
        generation = getattr(local, "generation", None)
        if not isinstance(generation, _ByValue) or p < local.position:  # progress went back
            generation = _ByValue()
        return generation, p, round(p * 1_000_000), p

    def _phase_of(self, p: float) -> str:
        c = self.config
        return "agent" if p < c.agent_until else "tome" if p < c.merge_until else "full"

    def _value_progress(self, value: float) -> float:
        if self.edm:
            low, high = _EDM_LOG_SIGMA
            p = (high - 4 * value) / (high - low)
        else:
            p = 1.0 - value / self.num_train_timesteps
        return min(max(p, 0.0), 1.0 - 1e-9)

    def _locate(self, timestep: torch.Tensor, base: torch.Tensor):
        reference, schedule = self._schedule(base)
        if schedule is None or reference.stride(0) == 0:
            return None
        index, rest = divmod(timestep.storage_offset() - reference.storage_offset(), reference.stride(0))
        if rest or not 0 <= index < schedule.length:
            return None
        step = schedule.step(index)
        return reference, index, step, step / schedule.steps

    def _schedule(self, base: torch.Tensor) -> tuple[torch.Tensor, _Schedule | None]:
        """The schedule a timestep's base tensor holds, worked out once per schedule."""
        key = id(base)
        cached = self._schedules.get(key)
        if cached is not None and cached[0]() is base:
            return cached[1]
        result = self._read_schedule(base)
        if len(self._schedules) > 8:
            self._schedules.clear()
        self._schedules[key] = (weakref.ref(base), result)
        return result

    def _read_schedule(self, base: torch.Tensor) -> tuple[torch.Tensor, _Schedule | None]:
        scheduler = self._scheduler_of(base)
        if scheduler is not None:
            # The patched pipeline's own scheduler: its step count, without reading any value.
            reference = scheduler.timesteps
            length = reference.shape[0]
            steps = getattr(scheduler, "num_inference_steps", None) or length
            prk = getattr(scheduler, "prk_timesteps", None)  # PNDM's Runge-Kutta warm-up, if any
            warmup = 0 if prk is None or len(prk) % 4 else len(prk)
            return reference, _Schedule(length, int(steps), warmup)
        if base.ndim != 1 or base.shape[0] < 1:
            return base, None
        # Another scheduler (a derived pipeline, a hand-written loop): read its timesteps once.
        values = base.detach().float().cpu()
        falling = values[1:] <= values[:-1]
        if values.shape[0] < 2 or not bool(falling.all()) or bool((values[1:] == values[:-1]).all()):
            return base, None  # not a denoising schedule (e.g. a batch of per-sample timesteps)
        steps = torch.unique_consecutive(values).shape[0]
        return base, _Schedule(values.shape[0], steps)

    def _scheduler_of(self, base: torch.Tensor):
        pipe = self.pipeline() if self.pipeline is not None else None
        scheduler = getattr(pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if (
            isinstance(timesteps, torch.Tensor)
            and timesteps.ndim == 1
            and timesteps.numel() > 0
            and timesteps.device == base.device
            and timesteps.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        ):
            return scheduler
        return None

    # --- processors replaced by other code --------------------------------------------------------

    def _sync_processors(self) -> bool:
        """Keep the patch on top of processors other code set; say once when it is gone somewhere.

        Returns whether any patched layer still runs AgentSD.
        """
        if all(slot.attention.processor is slot.processor and not slot.lost for slot in self.slots):
            return True  # the per-call fast path: identity checks only
        with self._lock:
            newly_lost = []
            for slot in self.slots:
                current = slot.attention.processor
                if current is slot.processor:
                    slot.lost = False
                    continue
                if isinstance(current, AgentSDProcessor) and current.patch is None:
                    # diffusers re-created the processor from its class (IP-Adapter loading)
                    slot.processor.set_original(current.original)
                elif type(current).__name__ in _PLAIN_PROCESSORS:
                    slot.processor.set_original(current)
                else:
                    if not slot.lost:
                        newly_lost.append(type(current).__name__)
                    slot.lost = True
                    continue
                slot.attention.set_processor(slot.processor)
                slot.lost = False
        if newly_lost:
            warnings.warn(
                f"AgentSD is no longer active in {len(newly_lost)} of its {len(self.slots)} layers: their "
                f"attention processors were replaced by {', '.join(sorted(set(newly_lost)))}. Call "
                "agentsd.apply_patch(...) again to patch on top of the new processors, or "
                "agentsd.remove_patch(...) to drop the patch.",
                stacklevel=4,
            )
        return not all(slot.lost for slot in self.slots)


class _ByValue:
    """Marks a generation whose calls are placed by timestep value (no schedule tensor)."""


class _UNetHook:
    def __init__(self, patch: Patch):
        self.patch = patch

    @torch.compiler.disable
    def __call__(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.patch.start_call(sample, timestep)


class _MetricHook:
    def __init__(self, patch: Patch, block_index: int):
        self.patch = patch
        self.block_index = block_index

    def __call__(self, module, args, kwargs):
        call = self.patch.local.call
        if call is not None and call.phase != "full":
            call.metrics[self.block_index] = args[0] if args else kwargs["hidden_states"]


class _SetDefaultProcessors:
    """``unet.set_default_attn_processor()`` on a patched UNet: default processors, patch on top.

    diffusers refuses that call when it meets a processor class it does not know, so while patched
    the UNet's method is shadowed by this one, which removes the patch, sets the defaults and
    patches again with the same config.
    """

    def __init__(self, unet: nn.Module):
        self.unet = unet

    def __call__(self):
        patch = getattr(self.unet, _PATCH_ATTR)
        pipeline = patch.pipeline() if patch.pipeline is not None else None
        remove_patch(self.unet)
        type(self.unet).set_default_attn_processor(self.unet)
        _install(self.unet, patch.config, pipeline)


def _find_unet(model) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # a UNet compiled with torch.compile
    if _is_unet(model):
        return model
    if not hasattr(model, "unet"):
        kind = type(model).__name__
        if getattr(model, "transformer", None) is not None:
            raise ValueError(
                f"{kind} has a transformer (DiT) denoiser and no UNet: AgentSD supports UNet pipelines "
                "(Stable Diffusion 1.x / 2.x / SDXL and their variants); SD3, Flux and other DiT "
                "pipelines are not supported"
            )
        raise ValueError(
            f"{kind} is neither a diffusers pipeline with a .unet nor a UNet; "
            "AgentSD patches the UNet of Stable Diffusion pipelines"
        )
    unet = model.unet
    if unet is None:
        raise ValueError(f"{type(model).__name__}.unet is None: there is no UNet to patch")
    unet = getattr(unet, "_orig_mod", unet)  # a UNet compiled with torch.compile
    if not _is_unet(unet):
        raise ValueError(
            f"{type(model).__name__}.unet is a {type(unet).__name__}, not a diffusers UNet "
            "(with down_blocks and up_blocks)"
        )
    return unet


def _is_unet(model) -> bool:
    return isinstance(model, nn.Module) and hasattr(model, "down_blocks") and hasattr(model, "up_blocks")


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
    first = min(factor for factor, _ in blocks)
    if max_downsample is None:
        max_downsample = first
    if max_downsample < first:
        raise ValueError(
            f"max_downsample={max_downsample} selects no layer of this {type(unet).__name__}: its first "
            f"level with attention is downsampled {first} times; use max_downsample={first} (or None)"
        )
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
    if max_downsample is not None:
        max_downsample = AgentSDConfig(max_downsample=max_downsample).max_downsample
    unet = _find_unet(model)
    selected = {id(block.attn1) for _, block in _select_blocks(unet, max_downsample)}
    return {
        f"{name}.processor": module for name, module in unet.named_modules() if id(module) in selected
    }


def check_settings(**settings) -> None:
    """Raise ``ValueError`` if :func:`apply_patch` would reject these keyword settings.

    Lets a caller (e.g. a command line) validate settings before loading a model. Unknown names
    are rejected too. Takes the keyword arguments of :func:`apply_patch` (all optional).
    """
    _config(None, settings)


def _config(config: AgentSDConfig | None, settings: dict) -> AgentSDConfig:
    unknown = sorted(set(settings) - set(AgentSDConfig.names()))
    if unknown:
        raise ValueError(
            f"unknown AgentSD setting(s): {', '.join(unknown)}; the settings are "
            f"{', '.join(AgentSDConfig.names())}"
        )
    if config is None:
        return AgentSDConfig(**settings)
    if not isinstance(config, AgentSDConfig):
        raise ValueError(f"config must be an agentsd.AgentSDConfig, got {type(config).__name__}")
    if settings:
        return replace(config, **settings)
    return config


def apply_patch(model, config: AgentSDConfig | None = None, **settings):
    """Patch a Stable Diffusion pipeline (or its UNet) with AgentSD, in place.

    The self-attention of the highest-resolution transformer blocks merges tokens with ToMe and,
    early in denoising, attends through a few agent tokens (Agent Attention, Han et al. ECCV 2024).
    The defaults are the paper's: on a 50-step run, steps 0-19 use agent attention with 4x4 cells,
    steps 20-49 ToMe only with 2x2 cells.

    Args:
        model: a diffusers pipeline with a ``.unet`` (SD 1.x / 2.x / SDXL and their img2img, inpaint,
            ControlNet, ... variants) or a ``UNet2DConditionModel``. Patched again, the new settings
            replace the old ones.
        config: an :class:`~agentsd.AgentSDConfig`; keyword settings override its fields.
        **settings: the fields of :class:`~agentsd.AgentSDConfig`:

            - ``ratio`` (0.4): fraction of tokens merged away before attention, in [0, 1). Higher is
              faster and softer; 0.1-0.5 keep FID at or below the unpatched model's. At most
              ``1 - 1/(sx*sy)`` (and ``1 - 1/(late_sx*late_sy)``).
            - ``agent_ratio`` (0.95): fraction merged away to form the agents; capped at the src
              count, so with 4x4 cells 0.95 leaves one agent per cell (N/16 agents). Keep 0.95.
            - ``sx``, ``sy`` (4, 4): cell size in tokens of the merge in the agent phase (1-64).
            - ``late_sx``, ``late_sy`` (2, 2): cell size in the ToMe-only phase (ToMeSD's).
            - ``agent_until`` (0.4): progress (0 = first step, 1 = end) until which agent attention
              runs; the paper's first 40% of the steps. 0 disables agents (ToMeSD only).
            - ``merge_until`` (1.0): progress until which tokens are merged; later steps use the
              original attention.
            - ``max_downsample`` (None): patch blocks whose grid is downsampled at most this many
              times (1, 2, 4, 8). None picks the highest-resolution level with attention (1 for SD
              1.x/2.x, 2 for SDXL); a value below that level is an error.
            - ``k_scale2`` (0.3) and ``k_shortcut`` (0.075): the paper's constants, in [0, 2] and [0, 1].
            - ``attn_precision`` (None): ``"fp32"`` runs the agent attention in float32, needed for
              SD 2.1 in fp16.
            - ``use_rand`` (True): random dst position in each cell; off, the top-left one. Always off
              for odd batch sizes.
            - ``seed`` (0): seed of the dst positions, which are a pure function of (seed, timestep,
              block): the same pipeline seed gives the same images in every process.

    Progress comes from the calling pipeline's schedule: a call's place among the scheduler's
    timesteps (several calls per step, as in Heun, KDPM2 or PNDM, count as one step). A UNet called
    with timesteps that are not elements of a schedule uses ``p = 1 - t / 1000``.

    Returns:
        ``model``, patched. Undo with :func:`remove_patch`.

    Raises:
        ValueError: for a setting out of range, a ``max_downsample`` that selects no layer, or a model
            without a UNet / transformer blocks (e.g. SD3 or Flux); the model is then left exactly as
            it was.
    """
    config = _config(config, settings)
    unet = _find_unet(model)
    _install(unet, config, model if model is not unet else None)
    return model


def _install(unet: nn.Module, config: AgentSDConfig, pipeline) -> None:
    blocks = _select_blocks(unet, config.max_downsample)
    remove_patch(unet)
    patch = Patch(config, unet, pipeline)
    setattr(unet, _PATCH_ATTR, patch)
    try:
        patch.hooks.append(unet.register_forward_pre_hook(_UNetHook(patch), with_kwargs=True))
        for index, (factor, block) in enumerate(blocks):
            attn = block.attn1
            processor = AgentSDProcessor(patch, attn.processor, downsample=factor, block_index=index)
            patch.slots.append(_Slot(attn, processor))
            attn.set_processor(processor)
            patch.hooks.append(block.register_forward_pre_hook(_MetricHook(patch, index), with_kwargs=True))
        unet.set_default_attn_processor = _SetDefaultProcessors(unet)
    except BaseException:
        remove_patch(unet)  # never leave a half-patched model
        raise


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
    patch = unet.__dict__.get(_PATCH_ATTR)
    if patch is None:
        return model
    for handle in patch.hooks:
        handle.remove()
    for slot in patch.slots:
        current = slot.attention.processor
        if current is slot.processor or (isinstance(current, AgentSDProcessor) and current.patch is None):
            slot.attention.set_processor(slot.processor.original)
    # fuse_qkv_projections() saved the processors it replaced, ours among them, for unfuse.
    saved = getattr(unet, "original_attn_processors", None)
    if isinstance(saved, dict):
        for name, processor in saved.items():
            if isinstance(processor, AgentSDProcessor) and processor.patch is patch:
                saved[name] = processor.original
    unet.__dict__.pop("set_default_attn_processor", None)
    del unet.__dict__[_PATCH_ATTR]
    return model


def is_patched(model) -> bool:
    """Whether ``model`` (a pipeline or UNet) carries an AgentSD patch."""
    try:
        return _PATCH_ATTR in _find_unet(model).__dict__
    except ValueError:
        return False


def phase_history(model, per_call: bool = False) -> list[str]:
    """Phases run during the last generation: ``"agent"``, ``"tome"`` or ``"full"``.

    Args:
        model: the patched pipeline or UNet.
        per_call: ``False`` (default) gives one entry per denoising step: the UNet calls of one step
            (PNDM's doubled first PLMS step, second-order schedulers) count once, so a 50-step run
            with the defaults gives ``["agent"] * 20 + ["tome"] * 30``. ``True`` gives one entry per
            UNet call.

    Only calls that ran through AgentSD count as ``"agent"``/``"tome"``: a call whose patched
    processors had all been replaced by other code is ``"full"``. A generation starts when the
    schedule restarts. Empty when the model is not patched.
    """
    try:
        unet = _find_unet(model)
    except ValueError:
        return []
    patch = unet.__dict__.get(_PATCH_ATTR)
    if patch is None:
        return []
    history = list(patch.history)
    if per_call:
        return [phase for _, phase in history]
    return [phase for i, (step, phase) in enumerate(history) if i == 0 or step != history[i - 1][0]]


__all__ = ["apply_patch", "remove_patch", "phase_history", "patch_targets", "check_settings", "is_patched"]
