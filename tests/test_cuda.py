"""The patch on CUDA: same function as on the CPU, low precisions, determinism, removal, host syncs,
peak memory, torch.compile and CUDA graphs.

Every check is a plain function of a device, so the ones that mean something on a CPU run there too
(the tests at the end) and the module is exercised on machines without a GPU. The CUDA tests are
skipped there, with a reason saying so.

A bare UNet's phase is forced through the public API: its denoising progress is ``p = 1 - t/1000``,
so with ``agent_until=0.5`` a call at ``t=999`` runs the agent phase and a call at ``t=100`` the ToMe
phase. Every check asserts that the phase it meant to test really ran.
"""

from __future__ import annotations

import contextlib
import copy
import os

# cuBLAS is deterministic only with a fixed workspace; the variable must be set before cuBLAS starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

import agentsd  # noqa: E402
from agentsd.tools.archs import build_unet, step_inputs, unet_config  # noqa: E402
from tests.tiny import make_unet, tiny_unet_config  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA GPU; none here"
cuda = pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)

# Settings and timesteps that put a bare UNet's call in each phase (p = 1 - t/1000).
PHASE_SETTINGS = {"agent_until": 0.5, "merge_until": 1.0, "seed": 0}
TIMESTEPS = {"agent": 999, "tome": 100}
PHASES = tuple(TIMESTEPS)
# Latent size of the tiny checks: not square, and not a multiple of the 4x4 agent cells in height.
TINY_LATENT = (22, 32)


# --- building blocks ---------------------------------------------------------------------------


def tiny_sd21_unet(seed: int = 0) -> UNet2DConditionModel:
    """A tiny SD 2.1-shaped UNet: linear projections, upcast attention, per-level head counts."""
    config = tiny_unet_config()
    config.update(use_linear_projection=True, upcast_attention=True, attention_head_dim=(2, 4))
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval().requires_grad_(False)


def tiny(kind: str = "sd") -> UNet2DConditionModel:
    """A tiny random-weight UNet of ``kind`` (``sd``, ``sdxl`` or ``sd21``), fp32, on the CPU."""
    if kind == "sd21":
        return tiny_sd21_unet()
    return make_unet(sdxl_like=kind == "sdxl").requires_grad_(False)


def cast(unet, dtype: torch.dtype):
    """``unet.to(dtype)`` without diffusers' warning about fp32 modules of loaded checkpoints (none here)."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return unet.to(dtype)
    finally:
        diffusers_logging.set_verbosity(level)


def inputs_for(unet, latent=TINY_LATENT, batch: int = 2, seed: int = 0) -> dict:
    """UNet inputs drawn on the CPU and then moved, so every device and dtype gets the same values."""
    height, width = latent
    return step_inputs(unet, batch, height * 8, width * 8, seed=seed)


def timestep(phase: str, device) -> torch.Tensor:
    """The timestep of ``phase`` as pipelines pass it: a tensor on the UNet's device."""
    return torch.tensor(TIMESTEPS[phase], device=device)


def call(unet, inputs: dict, phase: str) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs, timestep=timestep(phase, inputs["sample"].device)).sample


def patched_call(unet, inputs: dict, phase: str, **settings) -> torch.Tensor:
    """Output of ``unet`` patched with ``settings`` at a timestep of ``phase``; the patch is removed after."""
    agentsd.apply_patch(unet, **{**PHASE_SETTINGS, **settings})
    try:
        out = call(unet, inputs, phase)
        ran = agentsd.phase_history(unet, per_call=True)
        assert ran[-1:] == [phase], f"meant to run the {phase} phase, ran {ran}"
        return out
    finally:
        agentsd.remove_patch(unet)


@contextlib.contextmanager
def patched(unet, **settings):
    """``unet`` patched inside (compile it inside, so the compiled graphs see the patch's hooks)."""
    agentsd.apply_patch(unet, **{**PHASE_SETTINGS, **settings})
    try:
        yield unet
    finally:
        agentsd.remove_patch(unet)


def compiled_call(unet, compiled, inputs: dict, phase: str) -> torch.Tensor:
    out = call(compiled, inputs, phase).clone()  # a CUDA graph's output is overwritten by its next replay
    ran = agentsd.phase_history(unet, per_call=True)
    assert ran[-1:] == [phase], f"meant to run the {phase} phase, ran {ran}"
    return out


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm()).item()


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls and convolutions in full fp32 (TF32 on Ampere+ would cost ~1e-3 relative error)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def deterministic():
    """``torch.use_deterministic_algorithms(True)`` (and deterministic cuDNN) inside, restored after."""
    saved = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.deterministic = saved[1]


# --- checks (each a function of the device) -----------------------------------------------------


def check_same_function(device: str, kind: str, phase: str, tolerance: float = 1e-4) -> None:
    """The patched UNet on ``device`` computes what it computes on the CPU (fp32, same seed)."""
    cpu_unet = tiny(kind)
    inputs = inputs_for(cpu_unet)
    with exact_fp32():
        expected = patched_call(cpu_unet, inputs, phase)
        unpatched = call(cpu_unet, inputs, phase)
        unet = copy.deepcopy(cpu_unet).to(device)
        moved = {k: _to(v, device) for k, v in inputs.items()}
        actual = patched_call(unet, moved, phase)
        floor = rel_err(call(unet, moved, phase), unpatched)
    assert rel_err(expected, unpatched) > 1e-3, "the patch changed nothing: the check would be empty"
    error = rel_err(actual, expected)
    assert error <= tolerance, (
        f"{kind} {phase} phase: patched UNet on {device} differs from the CPU by {error:.2e} relative "
        f"(the unpatched UNet by {floor:.2e})"
    )


def check_low_precision(device: str, kind: str, dtype: torch.dtype, phase: str, **settings) -> None:
    """In ``dtype`` the patched UNet is finite and not much further from fp32 than the unpatched one."""
    unet32 = tiny(kind).to(device)
    inputs32 = {k: _to(v, device) for k, v in inputs_for(unet32).items()}
    with exact_fp32():
        patched32 = patched_call(unet32, inputs32, phase, **settings)
        unpatched32 = call(unet32, inputs32, phase)
    unet = cast(unet32, dtype)
    inputs = {k: _to(v, device, dtype) for k, v in inputs32.items()}
    patched = patched_call(unet, inputs, phase, **settings)
    assert patched.dtype == dtype
    assert torch.isfinite(patched).all(), f"{kind} in {dtype} ({phase} phase, {settings}): non-finite output"
    # A different merge in low precision (a near tie flipping) moves a few tokens to another dst;
    # allow that, but not a broken low-precision path (which is off by O(1)).
    model_error = rel_err(call(unet, inputs, phase), unpatched32)
    error = rel_err(patched, patched32)
    assert error <= max(0.1, 4 * model_error), (
        f"{kind} in {dtype} ({phase} phase): patched output is {error:.3f} from fp32 "
        f"(unpatched: {model_error:.3f})"
    )


def check_same_pixels(device: str, pipe_dir, steps: int = 4) -> None:
    """Under deterministic algorithms, the same seeds give bit-identical images, also after re-patching."""
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir).to(device)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        generator = torch.Generator(device).manual_seed(0)
        return pipe(
            "a photo of a corgi", num_inference_steps=steps, guidance_scale=7.5, height=88, width=128,
            generator=generator, output_type="np",
        ).images

    with deterministic():
        agentsd.apply_patch(pipe, **PHASE_SETTINGS)
        first = generate()
        assert set(agentsd.phase_history(pipe)) == {"agent", "tome"}
        second = generate()
        agentsd.remove_patch(pipe)
        agentsd.apply_patch(pipe, **PHASE_SETTINGS)
        third = generate()
        agentsd.remove_patch(pipe)
        unpatched = generate()
    assert (first == second).all() and (first == third).all(), "same seed, different pixels"
    assert not (first == unpatched).all(), "the patch changed nothing: the check would be empty"


def check_remove_exact(device: str, kind: str) -> None:
    """After patching, running both phases and removing, the UNet's output is bit-identical."""
    unet = tiny(kind).to(device)
    inputs = {k: _to(v, device) for k, v in inputs_for(unet).items()}
    with deterministic():
        before = {phase: call(unet, inputs, phase) for phase in PHASES}
        patched = {phase: patched_call(unet, inputs, phase) for phase in PHASES}
        after = {phase: call(unet, inputs, phase) for phase in PHASES}
    for phase in PHASES:
        assert not torch.equal(patched[phase], before[phase]), f"{phase}: the patch changed nothing"
        assert torch.equal(after[phase], before[phase]), f"{phase}: output not restored bit-exactly"


def _to(value, device, dtype=None):
    """Move a tensor (or a dict of them, as ``added_cond_kwargs``) to ``device``; floats to ``dtype``."""
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    if dtype is not None and value.is_floating_point():
        return value.to(device=device, dtype=dtype)
    return value.to(device)


def _patched_blocks(unet) -> list[torch.nn.Module]:
    """The transformer blocks whose self-attention the patch replaces (parents of patch_targets)."""
    names = [name.removesuffix(".attn1.processor") for name in agentsd.patch_targets(unet)]
    return [unet.get_submodule(name) for name in names]


@contextlib.contextmanager
def sync_errors_inside_patched_blocks(unet):
    """``torch.cuda.set_sync_debug_mode("error")`` from the entry to the exit of every patched block.

    The hooks go in front of the patch's own, so the plan the block computes (its wrapped forward) is
    in the checked region too.
    """
    previous = torch.cuda.get_sync_debug_mode()
    handles = []
    for block in _patched_blocks(unet):
        handles.append(block.register_forward_pre_hook(
            lambda *_: torch.cuda.set_sync_debug_mode("error"), prepend=True))
        handles.append(block.register_forward_hook(lambda *_: torch.cuda.set_sync_debug_mode(previous)))
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def sync_errors():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def step_peak_bytes(unet, inputs: dict, phase: str) -> int:
    """Memory a UNet call adds at its peak (``max_memory_allocated`` minus what was allocated before)."""
    call(unet, inputs, phase)  # warm-up: cuDNN workspaces, lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = call(unet, inputs, phase)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


# --- on CUDA -----------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd21"])
def test_cuda_computes_what_the_cpu_computes(kind, phase):
    check_same_function("cuda", kind, phase)


@cuda
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_cuda_half_precisions_are_finite(kind, dtype, phase):
    check_low_precision("cuda", kind, dtype, phase)


@cuda
@pytest.mark.parametrize("phase", PHASES)
def test_cuda_attn_precision_fp32_keeps_sd21_finite_in_fp16(phase):
    check_low_precision("cuda", "sd21", torch.float16, phase, attn_precision="fp32")
    # The real SD 2.1 architecture at its native 768 px, random weights.
    unet = build_unet(unet_config("sd21"), torch.float16, torch.device("cuda"))
    inputs = step_inputs(unet, 2, 768, 768)
    out = patched_call(unet, inputs, phase, attn_precision="fp32")
    assert torch.isfinite(out).all(), f"SD 2.1, 768 px, fp16, attn_precision='fp32' ({phase}): non-finite"


@cuda
def test_cuda_same_seed_same_pixels(tiny_sd_dir):
    check_same_pixels("cuda", tiny_sd_dir)


@cuda
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_cuda_remove_patch_is_bit_exact(kind):
    check_remove_exact("cuda", kind)


@cuda
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_cuda_patched_blocks_never_sync_with_the_host(kind, phase):
    unet = cast(tiny(kind), torch.float16).to("cuda")
    inputs = {k: _to(v, "cuda", torch.float16) for k, v in inputs_for(unet).items()}
    agentsd.apply_patch(unet, **PHASE_SETTINGS)
    try:
        call(unet, inputs, phase)  # warm-up outside the checked region (lazy CUDA initialisation)
        with sync_errors_inside_patched_blocks(unet):
            call(unet, inputs, phase)
        assert agentsd.phase_history(unet, per_call=True)[-1] == phase
    finally:
        agentsd.remove_patch(unet)


@cuda
@pytest.mark.parametrize("phase", PHASES)
def test_cuda_patched_unet_call_never_syncs_with_the_host(phase):
    """The whole call, hooks included, with the timestep as pipelines pass it: an element of a
    schedule tensor on the GPU (``for t in scheduler.timesteps``)."""
    unet = cast(tiny("sd"), torch.float16).to("cuda")
    inputs = {k: _to(v, "cuda", torch.float16) for k, v in inputs_for(unet).items()}
    # A two-step schedule: step 0 (progress 0) is in the agent phase, step 1 (progress 0.5) in the
    # ToMe phase with agent_until=0.5. Made outside the checked region: creating it copies to the GPU.
    schedule = torch.tensor([TIMESTEPS["agent"], TIMESTEPS["tome"]], device="cuda")
    t = schedule[PHASES.index(phase)]

    def run() -> None:
        with torch.no_grad():
            unet(**inputs, timestep=t)

    run()  # warm-up (lazy initialisation)
    try:
        with sync_errors():
            run()
    except RuntimeError as error:
        pytest.skip(f"the unpatched UNet call itself syncs with the host here (diffusers): {error}")
    with patched(unet):
        run()
        with sync_errors():
            run()
        assert agentsd.phase_history(unet, per_call=True)[-1] == phase


@cuda
@pytest.mark.parametrize(("arch", "size"), [("sd15", 512), ("sd15", 1024), ("sdxl", 1024)])
def test_cuda_patched_step_peak_is_unpatched_plus_the_dst_positions(arch, size):
    unet = build_unet(unet_config(arch), torch.float16, torch.device("cuda"))
    inputs = step_inputs(unet, 2, size, size)
    unpatched = step_peak_bytes(unet, inputs, "agent")
    agentsd.apply_patch(unet, **PHASE_SETTINGS)
    try:
        peaks = {phase: step_peak_bytes(unet, inputs, phase) for phase in PHASES}
        blocks = len(agentsd.patch_targets(unet))
    finally:
        agentsd.remove_patch(unet)
    # What a patched call keeps alive: its dst positions (int64, one per cell of each patched block, in
    # one allocation: 512-byte granules). SD 1.5 patches its first level, SDXL its second.
    grid = size // 8 // (1 if arch == "sd15" else 2)
    cells = {"agent": (grid // 4) ** 2, "tome": (grid // 2) ** 2}
    allowed = {phase: unpatched + -(-blocks * cells[phase] * 8 // 512) * 512 for phase in PHASES}
    mib = {p: f"{peaks[p] / 2**20:.2f} MiB (at most {allowed[p] / 2**20:.2f})" for p in PHASES}
    assert all(peaks[phase] <= allowed[phase] for phase in PHASES), (
        f"{arch} {size}px: unpatched {unpatched / 2**20:.2f} MiB, patched {mib}"
    )


@cuda
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_cuda_compiled_patched_unet_equals_eager(kind):
    torch._dynamo.reset()
    unet = tiny(kind).to("cuda")
    inputs = {k: _to(v, "cuda") for k, v in inputs_for(unet).items()}
    with exact_fp32():
        eager = {phase: patched_call(unet, inputs, phase) for phase in PHASES}
        with patched(unet):
            compiled = torch.compile(unet)
            for phase in PHASES:
                error = rel_err(compiled_call(unet, compiled, inputs, phase), eager[phase])
                assert error <= 1e-4, f"{kind} {phase}: compiled differs from eager by {error:.2e} relative"


@cuda
def test_cuda_reduce_overhead_compile_works_with_the_patch():
    torch._dynamo.reset()
    unet = cast(tiny("sd"), torch.float16).to("cuda")
    inputs = {k: _to(v, "cuda", torch.float16) for k, v in inputs_for(unet).items()}
    eager = {phase: patched_call(unet, inputs, phase) for phase in PHASES}
    with patched(unet):
        compiled = torch.compile(unet, mode="reduce-overhead")
        # CUDA graphs are recorded after warm-up runs and replayed after; alternating the phases
        # shows a replay of the other phase's graph.
        for _ in range(4):
            for phase in PHASES:
                error = rel_err(compiled_call(unet, compiled, inputs, phase), eager[phase])
                assert error <= 1e-2, f"{phase} phase under CUDA graphs differs from eager by {error:.2e}"


@cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_compiled_pipeline_equals_eager(tiny_sd_dir, mode):
    """As users compile: ``pipe.unet = torch.compile(pipe.unet, fullgraph=True)`` on a patched pipeline;
    a second generation replays what the first compiled (and, with reduce-overhead, recorded)."""
    torch._dynamo.reset()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir).to("cuda")
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe(
            "a photo of a corgi", num_inference_steps=10, height=88, width=128, output_type="pt",
            generator=torch.Generator("cuda").manual_seed(0),
        ).images.clone()

    with exact_fp32(), patched(pipe):
        eager = generate()
        phases = agentsd.phase_history(pipe)
        assert set(phases) == {"agent", "tome"}
        pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
        for _ in range(2):
            error = rel_err(generate(), eager)
            assert agentsd.phase_history(pipe) == phases
            assert error <= 1e-3, f"compiled ({mode}) generation differs from eager by {error:.2e} relative"
    torch._dynamo.reset()


# --- the same checks on the CPU (not skipped: they keep the checks themselves working) ----------


def test_cpu_same_seed_same_pixels(tiny_sd_dir, one_thread):
    check_same_pixels("cpu", tiny_sd_dir, steps=2)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_cpu_remove_patch_is_bit_exact(kind, one_thread):
    check_remove_exact("cpu", kind)


@pytest.mark.parametrize("phase", PHASES)
def test_cpu_bfloat16_is_finite_and_attn_precision_fp32_on_sd21_shape(phase, one_thread):
    check_low_precision("cpu", "sd", torch.bfloat16, phase)
    check_low_precision("cpu", "sd21", torch.bfloat16, phase, attn_precision="fp32")


def test_cuda_tests_say_why_they_skip():
    if HAS_CUDA:
        pytest.skip("CUDA is here: the CUDA tests run instead of skipping")
    assert cuda.kwargs["reason"] == NO_CUDA and cuda.args == (True,)


def test_sync_check_covers_exactly_the_patched_blocks(tiny_unet):
    from diffusers.models.attention import BasicTransformerBlock

    blocks = _patched_blocks(tiny_unet)
    targets = list(agentsd.patch_targets(tiny_unet).values())
    assert blocks and all(isinstance(block, BasicTransformerBlock) for block in blocks)
    assert [block.attn1 for block in blocks] == targets
