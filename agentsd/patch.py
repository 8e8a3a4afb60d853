"""apply_patch / remove_patch: AgentSD wrapped around a diffusers UNet's transformer blocks.

- A pre-hook on the UNet decides the call's phase once, from the timestep's place in its schedule
  (the one place that reads the host; it runs outside ``torch.compile``), and makes the call's
  :class:`~agentsd.state.Call`, with the random dst positions of all its blocks (hashed on the device).
- A pre-hook on each patched block's parent hands that Call to the block in ``cross_attention_kwargs``:
  it travels with the block's arguments, so a checkpointed block recomputed in backward gets its own.
- Each patched block computes one merge :class:`~agentsd.state.Plan` from its input and lends it, while
  it runs, to its ``attn1`` (ToMe, or agent attention in the agent phase), ``attn2`` (``merge_crossattn``)
  and ``ff`` (``merge_mlp``), whose ``forward`` is wrapped.

The attention processors stay what the user set: plain ones run on the merged tokens (or give way to
agent attention), any other runs as it is, and the patch says once that it steps aside there.
"""

from __future__ import annotations

import copyreg
import functools
import inspect
import types
import warnings
from dataclasses import replace

import torch
from diffusers.models import attention_processor as _processors
from torch import nn

from agentsd.attention import agent_self_attention
from agentsd.merge import bipartite_soft_matching, block_salt, dst_positions, position_key
from agentsd.schedule import Locator
from agentsd.state import AgentSDConfig, Call, CallLocal, Plan, grid

_PATCH_ATTR = "_agentsd_patch"
_KEY = "_agentsd_call"  # the Call's key in the cross_attention_kwargs a parent hands its blocks


def _classes(*names: str) -> frozenset:
    return frozenset(getattr(_processors, name) for name in names if hasattr(_processors, name))


# Processors that compute plain attention: AgentSD runs them on merged tokens, or replaces them by
# agent attention. Anything else (a subclass too) may depend on every token, and is left alone.
_PLAIN = _classes("AttnProcessor", "AttnProcessor2_0", "SlicedAttnProcessor", "FusedAttnProcessor2_0",
                  "XFormersAttnProcessor", "AttnProcessorNPU")
_FUSED = getattr(_processors, "FusedAttnProcessor2_0", None)
# Cross-attention processors that treat each query on its own, so they can run on merged queries.
_QUERYWISE = _PLAIN | _classes("IPAdapterAttnProcessor", "IPAdapterAttnProcessor2_0",
                               "IPAdapterXFormersAttnProcessor")


class PlanMissingWarning(RuntimeWarning):
    """A patched block could not run its call's phase: a bug in agentsd (the tests make it an error)."""


class Patch:
    """The AgentSD patch of one UNet: its settings, what it installed, and the record of its calls."""

    def __init__(self, config: AgentSDConfig, pipeline=None):
        self.config = config
        self.locator = Locator(pipeline)
        self.local = CallLocal()
        self.history: list[tuple[float, str]] = []  # (progress, phase) per call: the latest generation
        self.blocks: list[tuple[str, nn.Module]] = []
        self.uncarried: list[nn.Module] = []  # parents that cannot hand their blocks a Call
        self.handles, self.wrapped, self.announced = [], [], set()
        self.salts: dict[int, torch.Tensor] = {}  # per level: its blocks' salts, on the model's device
        self.arguments: list[str] = []  # the UNet forward's parameter names, to read a call's masks

    def begin(self, sample: torch.Tensor, timestep, masks: frozenset = frozenset()) -> None:
        """Decide the phase of one UNet call, record it, and publish it to this thread's blocks.

        ``masks``: the masks the call carries (``"attention_mask"``, ``"ip_adapter_masks"``); a masked
        layer keeps every token, so it runs unmerged.
        """
        schedule, progress = self.locator.locate(timestep)
        phases = {self._phase(p) for p in progress}
        if len(phases) > 1:
            raise ValueError(
                "AgentSD decides one phase per UNet call, but this batch has timesteps in several phases "
                f"({', '.join(sorted(phases))}): call the UNet once per timestep, or "
                "agentsd.remove_patch(model) first"
            )
        progress, phase = progress[0], phases.pop()
        if phase != "full" and not self._layers_run(masks):
            phase = "full"  # every patched layer steps aside
        recomputed = torch.is_grad_enabled() and any(p.gradient_checkpointing for p in self.uncarried)
        if phase != "full" and recomputed:
            raise ValueError(
                f"AgentSD cannot follow gradient checkpointing in {type(self.uncarried[0]).__name__}: its "
                "blocks get no per-call arguments, so a recomputed block would see another call. Disable "
                "gradient checkpointing, or agentsd.remove_patch(model) while training"
            )
        local = self.local
        if schedule is not local.where[0] or progress < local.where[1]:
            local.history = []  # a new generation
        local.where = (schedule, progress)
        local.history.append((progress, phase))
        self.history = local.history
        local.call = None
        if phase != "full":
            if not torch.is_tensor(timestep):
                timestep = torch.tensor(float(timestep), device=sample.device)
            timestep = timestep.to(sample.device)  # (a schedule on the CPU with a model on a GPU)
            latent_size = tuple(sample.shape[-2:])
            local.call = Call(phase, latent_size, self._dst_positions(phase, latent_size, timestep))

    def _dst_positions(self, phase: str, latent_size: tuple[int, int], timestep: torch.Tensor):
        """Every patched block's dst positions for one call: one hash per level, not one per block."""
        device = timestep.device
        if not self.salts or next(iter(self.salts.values())).device != device:
            levels: dict[int, list[int]] = {}
            for index, (_, block) in enumerate(self.blocks):
                state, row = block._agentsd, levels.setdefault(block._agentsd.downsample, [])
                # a tensor, not an int: compiled blocks of a level share one graph whatever their row
                state.row = torch.tensor([len(row)], device=device)
                row.append(block_salt(self.config.seed, index))
            self.salts = {level: torch.tensor(salts, device=device) for level, salts in levels.items()}
        c = self.config
        sx, sy = (c.sx, c.sy) if phase == "agent" else (c.late_sx, c.late_sy)
        dst = {}
        for level, salts in self.salts.items():
            key = position_key(salts, timestep) if c.use_rand else None
            dst[level] = dst_positions(*grid(latent_size, level), sx, sy, key, device).expand(len(salts), -1)
        return dst

    def _phase(self, progress: float) -> str:
        c = self.config
        return "agent" if progress < c.agent_until else "tome" if progress < c.merge_until else "full"

    def _layers_run(self, masks: frozenset = frozenset()) -> bool:
        """Whether any patched layer can run merged; says once for each one that steps aside, and why."""
        c, live, aside = self.config, False, {}
        for name, block in self.blocks:
            if "attention_mask" in masks:
                layers = [("attn1", False, _MASKED)]
            else:  # (the reason is worded only for a layer that steps aside: this runs every call)
                runs = _self_attention_runs(block.attn1)
                layers = [("attn1", runs, None if runs else _processor(block.attn1))]
            if c.merge_crossattn and block.attn2 is not None:
                processor = type(block.attn2.processor)
                if "ip_adapter_masks" in masks and processor not in _PLAIN:
                    layers.append(("attn2", False, _IP_MASKED))
                else:
                    runs = processor in _QUERYWISE
                    layers.append(("attn2", runs, None if runs else _processor(block.attn2)))
            if c.merge_mlp:
                layers.append(("ff", getattr(block, "_chunk_size", None) is None, _CHUNKED))
            for layer, runs, why in layers:
                live = live or runs
                if not runs and (name, layer, why) not in self.announced:
                    self.announced.add((name, layer, why))
                    aside.setdefault(why, []).append(f"{name}.{layer}")
        for (why, remedy), names in aside.items():
            warnings.warn(
                f"AgentSD steps aside on {len(names)} layer(s) ({', '.join(names[:3])}"
                f"{', ...' if len(names) > 3 else ''}): {why}, so they run as they are{remedy}; "
                "agentsd.remove_patch(...) drops the patch",
                UserWarning, stacklevel=5,
            )
        return live

    def not_run(self, reason: str) -> None:
        """A block of this call could not run its phase: say so, and record the call as ``full``."""
        if self.local.history:
            self.local.history[-1] = (self.local.history[-1][0], "full")
        warnings.warn(
            f"AgentSD could not run a patched block ({reason}), and records this call as 'full'. This is "
            "a bug in agentsd: please report it", PlanMissingWarning, stacklevel=3,
        )


# Why a layer steps aside, and what lets AgentSD run there again (see Patch._layers_run).
_MASKED = ("the UNet call carries an attention_mask, and a masked self-attention keeps every token",
           " in each call that carries one")
_IP_MASKED = ("the UNet call carries IP-Adapter masks, which weigh every image token",
              " in each call that carries them")
_CHUNKED = ("their feed-forward runs in chunks (enable_forward_chunking), which AgentSD cannot merge",
            "; disable_forward_chunking() lets AgentSD merge it again")


def _processor(attn: nn.Module) -> tuple[str, str]:
    return (f"they run {type(attn.processor).__name__}, which AgentSD cannot merge for",
            "; a plain processor (e.g. AttnProcessor2_0) set on them lets AgentSD run there again")


def _self_attention_runs(attn: nn.Module) -> bool:
    return type(attn.processor) in _PLAIN and all(
        getattr(attn, name, None) is None for name in ("group_norm", "spatial_norm", "norm_q", "norm_k")
    )


_MASKS = ("attention_mask", "ip_adapter_masks")


@torch.compiler.disable
def _begin(patch: Patch, module, args, kwargs) -> None:
    names = patch.arguments

    def argument(name: str):
        position = names.index(name) if name in names else len(args)
        return args[position] if position < len(args) else kwargs.get(name)

    extra = argument("cross_attention_kwargs") or {}
    masks = frozenset(m for m in _MASKS if argument(m) is not None or extra.get(m) is not None)
    patch.begin(argument("sample"), argument("timestep"), masks)


def _end(patch: Patch, module, args, output) -> None:
    patch.local.call = None


def _carry(patch: Patch, position: int, module, args, kwargs):
    """Pre-hook of a patched block's parent: the call's Call rides in its ``cross_attention_kwargs``."""
    call = patch.local.call
    if call is None:
        return None
    if len(args) > position:
        args = (*args[:position], {**(args[position] or {}), _KEY: call}, *args[position + 1:])
    else:
        kwargs["cross_attention_kwargs"] = {**(kwargs.get("cross_attention_kwargs") or {}), _KEY: call}
    return args, kwargs


class _State:
    """What AgentSD keeps on a module whose ``forward`` it wraps (as ``module._agentsd``).

    The wrapped ``forward`` is one shared function bound to the module, and what differs between
    blocks is a tensor (the row of its dst positions in the call's): so ``compile_repeated_blocks``
    compiles one graph per phase for all the patched blocks of a level, not one per block.
    """

    def __init__(self, patch: Patch | None, module: nn.Module, **info):
        self.patch = patch  # None once removed under another wrapper: the forward passes through
        self.inner = module.__dict__.get("forward")  # a forward other code set before us, if any
        self.function = type(module).forward  # a plain function: what dynamo and pickle handle best
        self.__dict__.update(info)

    def forward(self, module: nn.Module, *args, **kwargs):
        """The module's own forward (or the one other code had set)."""
        if self.inner is None:
            return self.function(module, *args, **kwargs)
        return self.inner(*args, **kwargs)


def _block_forward(self: nn.Module, *args, **kwargs):
    """A patched transformer block: one Plan from its input, lent to its sub-modules while it runs."""
    state = self._agentsd
    patch, call = state.patch, None
    if patch is not None:
        call, args, kwargs = _take_call(state, args, kwargs)
    plan = None if call is None else _plan(state, call, args[0] if args else kwargs["hidden_states"])
    if plan is None:
        return state.forward(self, *args, **kwargs)
    local = patch.local
    previous, local.plan = local.plan, plan
    del plan  # its last user lets it go: the indices are not alive at the feed-forward's peak
    try:
        return state.forward(self, *args, **kwargs)
    finally:
        local.plan = previous


def _take_call(state: _State, args, kwargs):
    """The block's Call, and its arguments without it."""
    if not state.carried:  # e.g. SVD's spatial blocks: this thread's call
        return state.patch.local.call, args, kwargs
    # BasicTransformerBlock's cross_attention_kwargs: 6th positional (under checkpointing) or keyword
    extra = args[5] if len(args) > 5 else kwargs.get("cross_attention_kwargs")
    if not extra or _KEY not in extra:
        if state.patch.local.call is not None:
            state.patch.not_run("its parent did not hand it the call")
        return None, args, kwargs
    extra = dict(extra)
    call = extra.pop(_KEY)
    if len(args) > 5:
        return call, (*args[:5], extra, *args[6:]), kwargs
    return call, args, {**kwargs, "cross_attention_kwargs": extra}


def _plan(state: _State, call: Call, x: torch.Tensor) -> Plan | None:
    h, w = grid(call.latent_size, state.downsample)
    if x.ndim != 3 or x.shape[1] != h * w:
        state.patch.not_run(f"{tuple(x.shape)} input is not the {h}x{w} token grid")
        return None
    c, tokens, agent = state.patch.config, x.shape[1], call.phase == "agent"
    merge, agents = bipartite_soft_matching(
        x, h, w, *((c.sx, c.sy) if agent else (c.late_sx, c.late_sy)), r=int(tokens * c.ratio),
        agent_r=int(tokens * c.agent_ratio) if agent else None,
        dst=call.dst[state.downsample].index_select(0, state.row)[0],
    )
    if agents is not None and agents.size * 2 >= merge.size:
        agents = None  # agents pay off only when they are few next to the merged tokens
    return Plan(agent, merge if merge.size < tokens else None, agents)


def _merged_forward(self: nn.Module, hidden_states, *args, **kwargs):
    """attn1, attn2 (``merge_crossattn``) or ff (``merge_mlp``) of a patched block, run on the block's
    merged tokens; attn1 in the agent phase runs agent attention instead of its processor."""
    state = self._agentsd
    plan = None if state.patch is None else state.patch.local.plan
    merge = None if plan is None else plan.merge
    used = plan is not None and _runs(self, state.kind, kwargs)
    if used and state.kind == "attn1" and plan.agents is not None:
        fused = type(self.processor) is _FUSED
        out = agent_self_attention(self, hidden_states, plan, state.patch.config, fused)
    elif used and merge is not None and hidden_states.shape[:2] == (merge.batch, merge.num_tokens):
        out = merge.unmerge(state.forward(self, merge.merge(hidden_states), *args, **kwargs))
    else:  # (also ff run in chunks: not the block's tokens)
        out = state.forward(self, hidden_states, *args, **kwargs)
    if plan is not None and state.last:  # let the plan's indices go before the block's next peak
        state.patch.local.plan = None
    return out


def _runs(module: nn.Module, kind: str, kwargs) -> bool:
    if kind == "ff":
        return True
    if kind == "attn1":  # (a masked self-attention keeps every token)
        return kwargs.get("attention_mask") is None and _self_attention_runs(module)
    processor = type(module.processor)
    return processor in _PLAIN or processor in _QUERYWISE and kwargs.get("ip_adapter_masks") is None


_FORWARDS = (_block_forward, _merged_forward)


def _bind(function, module: nn.Module):
    return types.MethodType(function, module)


def _reduce_method(method):
    """Pickle our bound forwards by reference to their function (Python's own way looks the method
    up by name on the module, where it does not exist); every other method as Python does."""
    if method.__func__ in _FORWARDS:
        return _bind, (method.__func__, method.__self__)
    return method.__reduce__()


copyreg.pickle(types.MethodType, _reduce_method)


def _find_unet(model) -> nn.Module:
    unet = getattr(model, "_orig_mod", model)  # torch.compile'd
    if not _is_unet(unet):
        kind = type(model).__name__
        if not hasattr(model, "unet"):
            dit = getattr(model, "transformer", None) is not None
            raise ValueError(
                f"{kind} has a transformer (DiT) denoiser and no UNet: SD3, Flux and other DiT pipelines are "
                "not supported" if dit else f"{kind} is neither a diffusers pipeline with a .unet nor a UNet"
            )
        if model.unet is None:
            raise ValueError(f"{kind}.unet is None: there is no UNet to patch")
        unet = getattr(model.unet, "_orig_mod", model.unet)
        if not _is_unet(unet):
            raise ValueError(f"{kind}.unet is a {type(unet).__name__}, not a diffusers UNet (down/up blocks)")
    return unet


def _is_unet(model) -> bool:
    return isinstance(model, nn.Module) and hasattr(model, "down_blocks") and hasattr(model, "up_blocks")


def _select_blocks(unet: nn.Module, max_downsample: int | None) -> list[tuple[int, nn.Module, nn.Module]]:
    """``(downsample, parent, block)`` of the spatial self-attention BasicTransformerBlocks to patch."""
    from diffusers.models.attention import BasicTransformerBlock

    found, factor = [], 1
    mid = [(unet.mid_block, None)] if getattr(unet, "mid_block", None) is not None else []
    ups = [(b, "upsamplers") for b in unet.up_blocks]
    for stage, resampler in [(b, "downsamplers") for b in unet.down_blocks] + mid + ups:
        for parent in getattr(stage, "attentions", None) or []:
            found += [(factor, parent, block) for block in getattr(parent, "transformer_blocks", None) or []
                      if isinstance(block, BasicTransformerBlock) and not block.only_cross_attention]
        if resampler and getattr(stage, resampler, None):  # only real down/upsamplers change the grid
            factor = factor * 2 if resampler == "downsamplers" else factor // 2
    if not found:
        raise ValueError(
            f"{type(unet).__name__} has no BasicTransformerBlock with self-attention: nothing to patch "
            "(AgentSD needs a Stable Diffusion style UNet with spatial transformer blocks)"
        )
    first = min(entry[0] for entry in found)
    if max_downsample is not None and max_downsample < first:
        raise ValueError(
            f"max_downsample={max_downsample} selects no layer of this {type(unet).__name__}: its first "
            f"level with attention is downsampled {first} times; use max_downsample={first} (or None)"
        )
    return [entry for entry in found if entry[0] <= (max_downsample or first)]


def patch_targets(model, max_downsample: int | None = None) -> dict[str, nn.Module]:
    """The self-attention modules (``attn1``) that :func:`apply_patch` patches, by processor name.

    Args:
        model: a diffusers pipeline with a ``.unet``, or the UNet itself.
        max_downsample: as in :func:`apply_patch`; ``None`` picks the highest-resolution level
            that has attention.

    Returns:
        ``{name: attention}``, with names as the keys of ``unet.attn_processors``.
    """
    max_downsample = AgentSDConfig(max_downsample=max_downsample).max_downsample
    unet = _find_unet(model)
    selected = {id(block.attn1) for _, _, block in _select_blocks(unet, max_downsample)}
    return {f"{name}.processor": m for name, m in unet.named_modules() if id(m) in selected}


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
            f"unknown AgentSD setting(s): {', '.join(unknown)}; "
            f"the settings are {', '.join(AgentSDConfig.names())}"
        )
    if config is None:
        return AgentSDConfig(**settings)
    if not isinstance(config, AgentSDConfig):
        raise ValueError(f"config must be an agentsd.AgentSDConfig, got {type(config).__name__}")
    return replace(config, **settings) if settings else config


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
        **settings: the fields of :class:`~agentsd.AgentSDConfig`, with their defaults and
            recommended values:

{settings}

    Progress comes from the calling pipeline's schedule: a call's place among the scheduler's
    timesteps (the calls of one step, as in Heun, KDPM2 or PNDM, count once). A UNet called with
    timesteps that are not elements of a schedule uses ``p = 1 - t / 1000``.

    Returns:
        ``model``, patched. Undo with :func:`remove_patch`.

    Raises:
        ValueError: for a setting out of range, a ``max_downsample`` that selects no layer, or a model
            without a UNet / transformer blocks (e.g. SD3 or Flux); the model is then left exactly as
            it was.
    """
    config = _config(config, settings)
    unet = _find_unet(model)
    blocks = _select_blocks(unet, config.max_downsample)
    remove_patch(unet)
    patch = Patch(config, model if model is not unet else None)
    setattr(unet, _PATCH_ATTR, patch)
    try:
        _install(unet, patch, blocks)
    except BaseException:
        remove_patch(unet)  # never leave a half-patched model
        raise
    return model


if apply_patch.__doc__:  # each setting is described once, in AgentSDConfig (also the CLI's --help)
    apply_patch.__doc__ = apply_patch.__doc__.replace("{settings}", AgentSDConfig.describe(" " * 12))


def _install(unet: nn.Module, patch: Patch, blocks: list) -> None:
    names = {id(m): name for name, m in unet.named_modules()}
    patch.arguments = list(inspect.signature(type(unet).forward).parameters)[1:]  # (without self)
    patch.handles.append(unet.register_forward_pre_hook(functools.partial(_begin, patch), with_kwargs=True))
    patch.handles.append(unet.register_forward_hook(functools.partial(_end, patch), always_call=True))
    for parent in {id(parent): parent for _, parent, _ in blocks}.values():
        parameters = list(inspect.signature(type(parent).forward).parameters)
        if "cross_attention_kwargs" in parameters:
            hook = functools.partial(_carry, patch, parameters.index("cross_attention_kwargs") - 1)
            patch.handles.append(parent.register_forward_pre_hook(hook, with_kwargs=True))
        else:  # e.g. SVD's TransformerSpatioTemporalModel: its blocks read the thread's Call
            patch.uncarried.append(parent)
    c, wrapped = patch.config, []
    for factor, parent, block in blocks:
        patch.blocks.append((names[id(block)], block))
        carried = not any(parent is p for p in patch.uncarried)
        wrapped.append((block, _block_forward, dict(downsample=factor, carried=carried, row=None)))
        subs = [("attn1", block.attn1)]
        subs += [("attn2", block.attn2)] if c.merge_crossattn and block.attn2 is not None else []
        subs += [("ff", block.ff)] if c.merge_mlp else []
        last = subs[-1][1]  # the plan's last user in the block's forward
        wrapped += [(module, _merged_forward, dict(kind=kind, last=module is last)) for kind, module in subs]
    for module, function, info in wrapped:
        module._agentsd = _State(patch, module, **info)
        module.forward = _bind(function, module)
        patch.wrapped.append(module)


def remove_patch(model):
    """Undo :func:`apply_patch` exactly (a no-op on a model that is not patched), and return ``model``.

    Removes every hook and wrapper the patch added, so outputs are bit-identical to never having
    patched. The attention processors were never touched: they stay whatever was set.
    """
    try:
        unet = _find_unet(model)
    except ValueError:
        return model
    patch = unet.__dict__.pop(_PATCH_ATTR, None)
    for handle in patch.handles if patch else []:
        handle.remove()
    for module in patch.wrapped if patch else []:
        state, forward = module._agentsd, module.__dict__.get("forward")
        ours = getattr(forward, "__self__", None) is module and getattr(forward, "__func__", 0) in _FORWARDS
        if not ours:
            state.patch = None  # other code wrapped it since: stay in its chain, inert
            continue
        del module.__dict__["_agentsd"]
        if state.inner is None:
            del module.__dict__["forward"]
        else:
            module.forward = state.inner
    return model


def is_patched(model) -> bool:
    """Whether ``model`` (a pipeline or UNet) carries an AgentSD patch."""
    try:
        return _PATCH_ATTR in _find_unet(model).__dict__
    except ValueError:
        return False


def phase_history(model, per_call: bool = False) -> list[str]:
    """Phases run during the last generation: ``"agent"``, ``"tome"`` or ``"full"`` (empty if unpatched).

    Args:
        model: the patched pipeline or UNet.
        per_call: ``False`` (default) gives one entry per denoising step: the UNet calls of one step
            (PNDM's doubled first step, second-order schedulers, a pipeline calling the UNet several
            times at one timestep) count once, so a 50-step run with the defaults gives
            ``["agent"] * 20 + ["tome"] * 30``. ``True`` gives one entry per UNet call.

    A call in which every patched layer stepped aside (other processors) is ``"full"``: only what
    ran counts. A generation starts when the schedule changes or its progress goes back.
    """
    try:
        patch = _find_unet(model).__dict__.get(_PATCH_ATTR)
    except ValueError:
        return []
    history = list(patch.history) if patch is not None else []
    if per_call:
        return [phase for _, phase in history]
    return [phase for i, (step, phase) in enumerate(history) if i == 0 or step != history[i - 1][0]]


__all__ = ["apply_patch", "remove_patch", "phase_history", "patch_targets", "check_settings", "is_patched"]
