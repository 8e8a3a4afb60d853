"""What ``agentsd bench`` times: AgentSD's schedule, one timing case per method, the restore check."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from agentsd.tools.bench.config import SCHEDULE_STEPS
from agentsd.tools.bench.timing import Case
from agentsd.tools.methods import Method, patcher


@dataclass
class Phase:
    """One phase of AgentSD's default schedule on a 50-step run."""

    name: str  # "agent", "tome" or "full"
    timestep: int  # the first timestep of the run in this phase; the one timed
    steps: int  # number of denoising steps in this phase

    @property
    def weight(self) -> float:
        return self.steps / SCHEDULE_STEPS


def default_schedule(seed: int = 0) -> list[Phase]:
    """Phases of ``apply_patch``'s default schedule over a 50-step PNDM (PLMS) run, as it really runs.

    A tiny UNet, patched with the defaults, is driven with the 51 UNet calls of Stable Diffusion's
    PNDM scheduler at 50 steps (a bare UNet's progress is ``1 - t/1000``), and the steps of each phase
    are counted from :func:`agentsd.phase_history`: 20 agent, 30 ToMe with the defaults. The phase of
    a step depends only on its timestep and the schedule, not on the UNet.
    """
    from diffusers import PNDMScheduler

    import agentsd
    from agentsd.tools.archs import build_unet, step_inputs, unet_config

    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        steps_offset=1, set_alpha_to_one=False,
    )
    scheduler.set_timesteps(SCHEDULE_STEPS)
    unet = build_unet(unet_config("tiny"), torch.float32, torch.device("cpu"), seed=seed)
    inputs = step_inputs(unet, batch=2, height=64, width=64, seed=seed)
    agentsd.apply_patch(unet, seed=seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads would only add hand-off latency
    try:
        with torch.inference_mode():
            for t in scheduler.timesteps:
                unet(timestep=t, **inputs)
    finally:
        torch.set_num_threads(threads)
    steps = agentsd.phase_history(unet)
    calls = agentsd.phase_history(unet, per_call=True)
    if len(steps) != SCHEDULE_STEPS or len(calls) != len(scheduler.timesteps):
        raise RuntimeError(
            f"phase_history gave {len(steps)} steps / {len(calls)} calls for a {SCHEDULE_STEPS}-step "
            f"run of {len(scheduler.timesteps)} UNet calls"
        )
    phases = []
    for name in dict.fromkeys(steps):
        first = calls.index(name)
        phases.append(Phase(name, int(scheduler.timesteps[first]), steps.count(name)))
    return phases


def fingerprint(unet) -> tuple:
    """What a patch changes: processors, module classes (tomesd swaps them) and hooks."""
    modules = list(unet.modules())
    return (
        tuple((name, id(processor)) for name, processor in unet.attn_processors.items()),
        tuple(type(module).__name__ for module in modules),
        sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules),
    )


def restoring(remove: Callable[[], None], unet, key: str) -> Callable[[], None]:
    """``remove``, then a check that the UNet is exactly as before the patch (processors, classes, hooks)."""
    reference = fingerprint(unet)

    def teardown() -> None:
        remove()
        if fingerprint(unet) != reference:
            raise RuntimeError(f"removing {key} did not restore the UNet exactly")

    return teardown


def expected_phases(method: Method, schedule: list[Phase]) -> list[str] | None:
    """The phases AgentSD must report for one timed step of ``method`` (None: not AgentSD)."""
    return {
        "agentsd-agent": ["agent"],
        "agentsd-tome": ["tome"],
        "agentsd": [phase.name for phase in schedule],
    }.get(method.kind)


Calls = list[tuple[Callable[[], object], float]]


def step_calls(method: Method, unet, inputs: dict, schedule: list[Phase]) -> Calls:
    """``(call, weight)`` of one UNet step of ``method``: one step of each phase for the schedule.

    ``unet`` is what is called: the UNet, or its ``torch.compile`` wrapper.
    """
    sample = inputs["sample"]
    rest = {name: value for name, value in inputs.items() if name != "sample"}

    def forward(t: int) -> Callable[[], object]:
        # sample and timestep positionally, as pipelines call the UNet (tomesd's hook needs it so)
        return lambda: unet(sample, t, return_dict=False, **rest)

    if method.kind == "agentsd":
        return [(forward(phase.timestep), phase.weight) for phase in schedule]
    return [(forward(schedule[0].timestep), 1.0)]


def step_case(method: Method, unet, inputs: dict, schedule: list[Phase], seed: int,
              settings: Mapping[str, object] | None = None) -> Case:
    """The timing case of one UNet step of ``method`` (two weighted steps for the schedule).

    Args:
        method: the method.
        unet: the UNet, no method applied.
        inputs: its inputs (see :func:`agentsd.tools.archs.step_inputs`).
        schedule: AgentSD's default schedule (:func:`default_schedule`).
        seed: seed of the patches.
        settings: AgentSD settings for every AgentSD method (see :func:`agentsd.tools.methods.patcher`).
    """
    import agentsd

    apply, remove = patcher(method, unet, seed, settings)
    expected = expected_phases(method, schedule)

    def check() -> None:
        ran = agentsd.phase_history(unet, per_call=True)
        if ran != expected:
            raise RuntimeError(f"{method.name} ran the phases {ran}, expected {expected}")

    return Case(key=method.name, calls=step_calls(method, unet, inputs, schedule), setup=apply,
                teardown=restoring(remove, unet, method.name), check=check if expected else None)


def generation_case(method: Method, pipe, *, device: torch.device, images: int, steps: int,
                    guidance: float | None, prompt: str, seed: int, width: int, height: int,
                    settings: Mapping[str, object] | None = None) -> Case:
    """The timing case of one whole generation of ``method`` (its weight makes it seconds per image).

    Args:
        method: the method.
        pipe: the pipeline, no method applied.
        device: where it runs.
        images: images of one generation (one pipeline call).
        steps: denoising steps.
        guidance: classifier-free guidance scale; ``None``: the pipeline's.
        prompt: the prompt.
        seed: seed of image 0 and of the patches; image ``i`` uses ``seed + i``.
        width: image width in pixels.
        height: image height in pixels.
        settings: AgentSD settings for every AgentSD method (see :func:`agentsd.tools.methods.patcher`).
    """
    import agentsd

    apply, remove = patcher(method, pipe, seed, settings)
    guided = {} if guidance is None else {"guidance_scale": guidance}

    def generate() -> None:
        generators = [torch.Generator(device).manual_seed(seed + i) for i in range(images)]
        pipe(prompt, height=height, width=width, num_inference_steps=steps, num_images_per_prompt=images,
             generator=generators, output_type="np", **guided)

    def check() -> None:
        ran = agentsd.phase_history(pipe)
        only = {"agentsd-agent": {"agent"}, "agentsd-tome": {"tome"}}.get(method.kind)
        if len(ran) != steps or (only is not None and set(ran) != only):
            raise RuntimeError(f"generation with {method.name} ran the phases {ran}")

    key = "generate:" + method.name
    return Case(key=key, calls=[(generate, 1.0 / images)], setup=apply,
                teardown=restoring(remove, pipe.unet, key),
                check=check if method.kind.startswith("agentsd") else None)
