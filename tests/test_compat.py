"""The README's "Works with" table: AgentSD combined with what diffusers users combine it with.

Every entry builds a tiny random-weight model offline and shows two things:
  (a) the patch took effect: the output differs from the same generation unpatched, and
      ``agentsd.phase_history`` gives the default schedule for the step count (agent attention
      while progress < 0.4, ToMe after: 5 steps -> agent, agent, tome, tome, tome);
  (b) ``agentsd.remove_patch`` gives output bit-identical to never patching (same seeds).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoPipelineForImage2Image,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    MotionAdapter,
    PNDMScheduler,
    StableDiffusionAdapterPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    StableVideoDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

import agentsd
from tests import tiny_compat
from tests.tiny import CROSS_DIM, make_sdxl_pipeline

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # numpy 2 deprecations inside diffusers' schedulers, thousands per run
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

PROMPT = "a cat"


def phases(steps: int) -> list[str]:
    """The default schedule written out: agent for the first 40% of the steps, then ToMe."""
    return {
        1: ["agent"],
        2: ["agent", "tome"],
        3: ["agent", "agent", "tome"],
        4: ["agent", "agent", "tome", "tome"],
        5: ["agent", "agent", "tome", "tome", "tome"],
    }[steps]


def as_tensor(output) -> torch.Tensor:
    """The generated latents / frames of a pipeline output as one tensor."""
    for name in ("images", "frames"):
        value = getattr(output, name, None)
        if value is not None:
            return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    raise AssertionError(f"no images or frames in {type(output).__name__}")


def assert_differs(patched: torch.Tensor, unpatched: torch.Tensor) -> None:
    assert patched.shape == unpatched.shape
    assert torch.isfinite(patched).all()
    assert (patched - unpatched).abs().max() > 1e-3, "the patch did not change the output"


def assert_bit_identical(restored: torch.Tensor, unpatched: torch.Tensor) -> None:
    assert torch.equal(restored, unpatched), (
        f"remove_patch is not bit-exact: max difference {(restored - unpatched).abs().max().item()}"
    )


def check_patched_run(pipe, generate, steps: int, unpatched: torch.Tensor) -> torch.Tensor:
    """Run ``generate`` on the patched ``pipe``: output differs from ``unpatched``, phases right."""
    patched = generate()
    assert agentsd.phase_history(pipe) == phases(steps)
    assert_differs(patched, unpatched)
    return patched


def check_composes(pipe, generate, steps: int, **settings) -> None:
    """Unpatched run, patched run (differs, right phases), removed run (bit-identical)."""
    unpatched = generate()
    agentsd.apply_patch(pipe, **settings)
    check_patched_run(pipe, generate, steps, unpatched)
    agentsd.remove_patch(pipe)
    assert_bit_identical(generate(), unpatched)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def txt2img(pipe, steps: int = 5, **kwargs):
    """A generation function for a text-to-image pipeline: 32x32 image (16x16 latent), latents out."""
    kwargs = {"height": 32, "width": 32, "output_type": "latent", **kwargs}

    def generate() -> torch.Tensor:
        return as_tensor(pipe(PROMPT, num_inference_steps=steps, generator=seeded(), **kwargs))

    return generate


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rgb_image(size: int = 32, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def sd_pipe(tiny_sd_dir):
    """The tiny SD 1.x pipeline (epsilon prediction, PNDM/PLMS), loaded with from_pretrained."""
    return quiet(StableDiffusionPipeline.from_pretrained(tiny_sd_dir))


@pytest.fixture
def components(sd_pipe):
    """The SD 1.x pipeline's parts, for pipelines built around the same UNet/VAE/text encoder."""
    parts = dict(sd_pipe.components)
    parts.pop("image_encoder", None)
    return parts


# --- schedulers ------------------------------------------------------------------------------------

SCHEDULERS = {
    "DDIM": (DDIMScheduler, {}),
    "PNDM-PLMS": (PNDMScheduler, {"skip_prk_steps": True}),
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler-a": (EulerAncestralDiscreteScheduler, {}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "DDPM": (DDPMScheduler, {}),
    "Heun": (HeunDiscreteScheduler, {}),
    "KDPM2": (KDPM2DiscreteScheduler, {}),
    "LCM": (LCMScheduler, {}),
}


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler(sd_pipe, name, steps):
    """One phase_history entry per step, also for second-order schedulers (Heun, KDPM2: two UNet
    calls per step) and PLMS (two calls at its first timestep). Trailing timestep spacing, as
    few-step runs use: with "leading" a 1-step run denoises at t=1, where no attention matters."""
    scheduler_class, overrides = SCHEDULERS[name]
    sd_pipe.scheduler = scheduler_class.from_config(
        sd_pipe.scheduler.config, timestep_spacing="trailing", **overrides
    )
    check_composes(sd_pipe, txt2img(sd_pipe, steps), steps)


def test_scheduler_pndm_with_prk_warm_up(sd_pipe):
    """PNDM's Runge-Kutta warm-up (skip_prk_steps=False; diffusers needs at least 4 steps for it):
    13 UNet calls for 4 steps, still one phase per step."""
    sd_pipe.scheduler = PNDMScheduler.from_config(sd_pipe.scheduler.config, skip_prk_steps=False)
    check_composes(sd_pipe, txt2img(sd_pipe, 4), 4)


def test_back_to_back_one_step_generations(sd_pipe):
    sd_pipe.scheduler = LCMScheduler.from_config(sd_pipe.scheduler.config)
    generate = txt2img(sd_pipe, steps=1)
    agentsd.apply_patch(sd_pipe)
    first = generate()
    second = generate()
    assert agentsd.phase_history(sd_pipe, per_call=True) == ["agent"]  # the second run's one call
    assert_bit_identical(second, first)


# --- LoRA ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    """Two different random LoRAs for the tiny SD UNet, written with save_lora_weights."""
    pytest.importorskip("peft", reason="LoRA needs peft (pip install -e '.[dev]')")
    return [tiny_compat.save_lora(tmp_path_factory.mktemp(f"lora{i}"), seed=20 + i) for i in range(2)]


def test_lora_peft_add_adapter(sd_pipe):
    LoraConfig = pytest.importorskip("peft", reason="LoRA needs peft (pip install -e '.[dev]')").LoraConfig

    torch.manual_seed(0)
    sd_pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"]),
        adapter_name="style",
    )
    check_composes(sd_pipe, txt2img(sd_pipe), 5)


@pytest.mark.parametrize("order", ["lora_then_patch", "patch_then_lora"])
def test_lora_load_lora_weights(sd_pipe, tiny_sd_dir, lora_dirs, order):
    """A LoRA loaded from a file, before or after patching; the reference is a never-patched twin."""
    twin = quiet(StableDiffusionPipeline.from_pretrained(tiny_sd_dir))
    twin.load_lora_weights(lora_dirs[0], adapter_name="a")
    unpatched = txt2img(twin)()
    assert_differs(unpatched, txt2img(sd_pipe)())  # the LoRA itself changes the output

    if order == "lora_then_patch":
        sd_pipe.load_lora_weights(lora_dirs[0], adapter_name="a")
        agentsd.apply_patch(sd_pipe)
    else:
        agentsd.apply_patch(sd_pipe)
        sd_pipe.load_lora_weights(lora_dirs[0], adapter_name="a")
    generate = txt2img(sd_pipe)
    check_patched_run(sd_pipe, generate, 5, unpatched)
    agentsd.remove_patch(sd_pipe)
    assert_bit_identical(generate(), unpatched)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # two LoRAs: intended
def test_lora_fuse_unfuse_and_set_adapters(sd_pipe, tiny_sd_dir, lora_dirs):
    twin = quiet(StableDiffusionPipeline.from_pretrained(tiny_sd_dir))
    for pipe in (twin, sd_pipe):
        pipe.load_lora_weights(lora_dirs[0], adapter_name="a")
        pipe.load_lora_weights(lora_dirs[1], adapter_name="b")
    generate = txt2img(sd_pipe)
    agentsd.apply_patch(sd_pipe)

    # set_adapters: two LoRAs mixed with weights
    for pipe in (twin, sd_pipe):
        pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 1.0])
    mixed = txt2img(twin)()
    check_patched_run(sd_pipe, generate, 5, mixed)

    # fuse_lora while patched, then unfuse
    twin.fuse_lora()
    fused = txt2img(twin)()
    sd_pipe.fuse_lora()
    check_patched_run(sd_pipe, generate, 5, fused)
    # unfusing subtracts the LoRA again, which is not bit-exact: the twin went the same way
    twin.unfuse_lora()
    unfused = txt2img(twin)()
    sd_pipe.unfuse_lora()
    check_patched_run(sd_pipe, generate, 5, unfused)

    agentsd.remove_patch(sd_pipe)
    assert_bit_identical(generate(), unfused)
    sd_pipe.fuse_lora()
    twin.fuse_lora()
    assert_bit_identical(generate(), txt2img(twin)())


# --- other features --------------------------------------------------------------------------------


def test_freeu(sd_pipe):
    sd_pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    check_composes(sd_pipe, txt2img(sd_pipe), 5)


@pytest.mark.parametrize("order", ["deepcache_then_patch", "patch_then_deepcache"])
def test_deepcache(sd_pipe, order):
    """DeepCache (PyPI `DeepCache`) wraps the UNet's and its blocks' forward; the patch's hooks and
    processors sit below, so both run, enabled and disabled in either order."""
    DeepCacheSDHelper = pytest.importorskip(
        "DeepCache", reason="needs DeepCache (pip install -e '.[dev]')"
    ).DeepCacheSDHelper

    generate = txt2img(sd_pipe)
    plain = generate()
    helper = DeepCacheSDHelper(pipe=sd_pipe)
    helper.set_params(cache_interval=2, cache_branch_id=0)
    helper.enable()
    cached = generate()
    assert_differs(cached, plain)  # DeepCache itself is on
    if order == "deepcache_then_patch":
        agentsd.apply_patch(sd_pipe)
    else:
        helper.disable()
        agentsd.apply_patch(sd_pipe)
        helper.enable()
    check_patched_run(sd_pipe, generate, 5, cached)
    if order == "deepcache_then_patch":
        agentsd.remove_patch(sd_pipe)
        assert_bit_identical(generate(), cached)
        helper.disable()
    else:
        helper.disable()
        check_patched_run(sd_pipe, generate, 5, plain)
        agentsd.remove_patch(sd_pipe)
    assert_bit_identical(generate(), plain)


@pytest.mark.parametrize("order", ["offload_then_patch", "patch_then_offload"])
def test_enable_model_cpu_offload(sd_pipe, order):
    """`device="cpu"`: without it diffusers refuses on a machine with no accelerator
    (RuntimeError: `enable_model_cpu_offload` requires accelerator)."""
    generate = txt2img(sd_pipe)
    unpatched = generate()
    if order == "offload_then_patch":
        sd_pipe.enable_model_cpu_offload(device="cpu")
        agentsd.apply_patch(sd_pipe)
    else:
        agentsd.apply_patch(sd_pipe)
        sd_pipe.enable_model_cpu_offload(device="cpu")
    check_patched_run(sd_pipe, generate, 5, unpatched)
    agentsd.remove_patch(sd_pipe)
    assert_bit_identical(generate(), unpatched)


@pytest.mark.parametrize("order", ["offload_then_patch", "patch_then_offload"])
def test_accelerate_cpu_offload(sd_pipe, order):
    """accelerate's `cpu_offload`: the UNet's weights live off-device and are streamed in per module."""
    from accelerate import cpu_offload

    generate = txt2img(sd_pipe)
    unpatched = generate()
    if order == "offload_then_patch":
        cpu_offload(sd_pipe.unet, execution_device=torch.device("cpu"))
        agentsd.apply_patch(sd_pipe)
    else:
        agentsd.apply_patch(sd_pipe)
        cpu_offload(sd_pipe.unet, execution_device=torch.device("cpu"))
    assert sd_pipe.unet.conv_in.weight.device.type == "meta"  # really offloaded
    check_patched_run(sd_pipe, generate, 5, unpatched)
    agentsd.remove_patch(sd_pipe)
    assert_bit_identical(generate(), unpatched)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
@pytest.mark.parametrize("order", ["offload_then_patch", "patch_then_offload"])
def test_group_offloading(sd_pipe, order, offload_type):
    """diffusers' group offloading (its own hooks on the UNet's blocks or leaf modules), CPU to CPU
    here: the same hooks run as on a GPU, which onloads from the CPU."""
    generate = txt2img(sd_pipe)
    unpatched = generate()

    def offload():
        sd_pipe.unet.enable_group_offload(torch.device("cpu"), offload_type=offload_type,
                                          num_blocks_per_group=1)

    if order == "offload_then_patch":
        offload()
        agentsd.apply_patch(sd_pipe)
    else:
        agentsd.apply_patch(sd_pipe)
        offload()
    check_patched_run(sd_pipe, generate, 5, unpatched)
    agentsd.remove_patch(sd_pipe)
    assert_bit_identical(generate(), unpatched)


@pytest.mark.parametrize("order", ["cast_then_patch", "patch_then_cast"])
def test_layerwise_casting(sd_pipe, order):
    """diffusers' layerwise casting: weights stored in float8, each layer upcast when it runs. The
    reference is the cast model without the patch (casting is lossy), made after remove_patch."""
    generate = txt2img(sd_pipe)

    def cast():
        sd_pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)

    never = None
    if order == "cast_then_patch":
        cast()
        never = generate()
        agentsd.apply_patch(sd_pipe)
    else:
        agentsd.apply_patch(sd_pipe)
        cast()
    assert sd_pipe.unet.conv_in.weight.dtype == torch.float8_e4m3fn  # really cast
    patched = generate()
    assert agentsd.phase_history(sd_pipe) == phases(5)
    agentsd.remove_patch(sd_pipe)
    restored = generate()
    assert_differs(patched, restored)
    if never is not None:
        assert_bit_identical(restored, never)
    agentsd.apply_patch(sd_pipe)
    assert_bit_identical(generate(), patched)


def test_callback_on_step_end(sd_pipe):
    """The phase of each step is already in phase_history when the step's callback runs, and a
    callback that edits the latents composes with the patch. (DDIM: one callback per step; PLMS
    makes one more for its repeated first timestep.)"""
    sd_pipe.scheduler = DDIMScheduler.from_config(sd_pipe.scheduler.config)
    seen = []

    def callback(pipe, step, timestep, tensors):
        seen.append(agentsd.phase_history(pipe)[-1] if agentsd.phase_history(pipe) else None)
        return {"latents": tensors["latents"] * 0.98}

    generate = txt2img(sd_pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
    check_composes(sd_pipe, generate, 5)
    assert seen == [None] * 5 + phases(5) + [None] * 5


# --- IP-Adapter and other code that replaces attention processors ----------------------------------


@pytest.fixture(scope="module")
def ip_adapter_dir(tmp_path_factory, tiny_sd_dir):
    """A tiny IP-Adapter (ip_adapter.safetensors + image_encoder/) for the tiny SD UNet."""
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    return tiny_compat.save_ip_adapter(tmp_path_factory.mktemp("ip-adapter"), unet)


def load_ip_adapter(pipe, folder) -> None:
    pipe.load_ip_adapter(folder, subfolder="", weight_name="ip_adapter.safetensors")


def with_ip_image(pipe):
    return txt2img(pipe, ip_adapter_image=rgb_image())


def test_ip_adapter_loaded_before_patch(sd_pipe, ip_adapter_dir):
    plain = txt2img(sd_pipe)()
    load_ip_adapter(sd_pipe, ip_adapter_dir)
    generate = with_ip_image(sd_pipe)
    assert_differs(generate(), plain)  # the IP-Adapter itself is active
    check_composes(sd_pipe, generate, 5)


def test_ip_adapter_loaded_on_patched_pipeline(sd_pipe, tiny_sd_dir, ip_adapter_dir):
    twin = quiet(StableDiffusionPipeline.from_pretrained(tiny_sd_dir))
    load_ip_adapter(twin, ip_adapter_dir)
    unpatched = with_ip_image(twin)()
    agentsd.apply_patch(sd_pipe)
    load_ip_adapter(sd_pipe, ip_adapter_dir)
    generate = with_ip_image(sd_pipe)
    check_patched_run(sd_pipe, generate, 5, unpatched)  # the patch stays on top
    agentsd.remove_patch(sd_pipe)
    assert_bit_identical(generate(), unpatched)


def test_ip_adapter_unloaded_on_patched_pipeline(sd_pipe, tiny_sd_dir, ip_adapter_dir):
    twin = quiet(StableDiffusionPipeline.from_pretrained(tiny_sd_dir))
    load_ip_adapter(twin, ip_adapter_dir)
    twin.unload_ip_adapter()
    unpatched = txt2img(twin)()
    load_ip_adapter(sd_pipe, ip_adapter_dir)
    agentsd.apply_patch(sd_pipe)
    sd_pipe.unload_ip_adapter()
    generate = txt2img(sd_pipe)
    check_patched_run(sd_pipe, generate, 5, unpatched)  # the patch stays on top
    agentsd.remove_patch(sd_pipe)
    assert_bit_identical(generate(), unpatched)


def test_ip_adapter_masks_keep_cross_attention_unmerged_and_say_so(sd_pipe, tiny_sd_dir, ip_adapter_dir):
    """merge_crossattn cannot merge an IP-Adapter cross-attention given masks (they weigh every image
    token): it runs unmerged, with a warning, and the rest of the patch still runs, so the result is
    the patch without merge_crossattn."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    mask = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1)))
    masks = [IPAdapterMaskProcessor().preprocess([mask], height=32, width=32)]
    twin = quiet(StableDiffusionPipeline.from_pretrained(tiny_sd_dir))
    generated = []
    for pipe, merge_crossattn in ((twin, False), (sd_pipe, True)):
        load_ip_adapter(pipe, ip_adapter_dir)
        agentsd.apply_patch(pipe, merge_crossattn=merge_crossattn)
        generate = txt2img(pipe, ip_adapter_image=rgb_image(),
                           cross_attention_kwargs={"ip_adapter_masks": masks})
        if merge_crossattn:
            with pytest.warns(UserWarning, match=r"steps aside on 3 layer.*attn2\).*IP-Adapter masks"):
                generated.append(generate())
        else:
            generated.append(generate())
        assert agentsd.phase_history(pipe) == phases(5)
    assert_bit_identical(generated[1], generated[0])


def test_ip_adapter_masks_do_not_stop_plain_cross_attentions_merging(tiny_unet):
    """Plain processors ignore ip_adapter_masks (diffusers drops them), so merge_crossattn still merges
    there: the call equals the same call without the masks, and nothing steps aside."""
    sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    masks = {"ip_adapter_masks": [torch.ones(1, 1, 32, 32)]}
    agentsd.apply_patch(tiny_unet, merge_crossattn=True)
    with torch.no_grad():
        plain = tiny_unet(sample, 981, context).sample
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="AgentSD steps aside")
            masked = tiny_unet(sample, 981, context, cross_attention_kwargs=masks).sample
    assert_bit_identical(masked, plain)


def test_attention_mask_keeps_self_attention_unmerged_and_says_so(tiny_sd_dir):
    """A UNet call with an attention_mask (it masks the self-attentions' keys) runs them unmerged, with
    a warning; the call is recorded as full when nothing else is merged."""
    config = dict(UNet2DConditionModel.load_config(tiny_sd_dir, subfolder="unet"), mid_block_type=None)
    unet = UNet2DConditionModel.from_config(config).eval()  # one attention level: one mask fits all
    sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    mask = torch.ones(2, 256)
    mask[:, ::3] = 0
    with torch.no_grad():
        unpatched = unet(sample, 981, context, attention_mask=mask).sample
        agentsd.apply_patch(unet)
        with pytest.warns(UserWarning, match=r"steps aside on 3 layer.*attention_mask.*keeps every token"):
            patched = unet(sample, 981, context, attention_mask=mask).sample
        assert agentsd.phase_history(unet, per_call=True) == ["full"]
        assert_bit_identical(patched, unpatched)
        unet(sample, 981, context)  # the same call without a mask merges
        assert agentsd.phase_history(unet, per_call=True)[-1] == "agent"


def check_kept_on_top(pipe, twin, replace, after_patched_run=None) -> None:
    """``replace(pipe)`` sets diffusers' own plain-attention processors after patching: the patch
    stays on top of them (issue 9: no silent loss), without a warning.

    The reference is ``twin`` after the same ``replace``, never patched; ``remove_patch`` then leaves
    the pipeline bit-identical to it. ``after_patched_run()``, if given, runs right after the
    patched generation.
    """
    replace(twin)
    unpatched = txt2img(twin)()
    agentsd.apply_patch(pipe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        replace(pipe)
        check_patched_run(pipe, txt2img(pipe), 5, unpatched)
    assert not [w for w in caught if "agentsd" in str(w.message).lower()]
    if after_patched_run is not None:
        after_patched_run()
    agentsd.remove_patch(pipe)
    assert_bit_identical(txt2img(pipe)(), unpatched)


@pytest.fixture
def twin(tiny_sd_dir):
    """A second, never-patched copy of the tiny SD pipeline, for references."""
    return quiet(StableDiffusionPipeline.from_pretrained(tiny_sd_dir))


def test_attention_slicing_before_patch(sd_pipe):
    sd_pipe.enable_attention_slicing(1)
    check_composes(sd_pipe, txt2img(sd_pipe), 5)


def test_attention_slicing_after_patch(sd_pipe, twin):
    check_kept_on_top(sd_pipe, twin, lambda pipe: pipe.enable_attention_slicing(1))


def test_set_attn_processor_after_patch(sd_pipe, twin):
    check_kept_on_top(sd_pipe, twin, lambda pipe: pipe.unet.set_attn_processor(AttnProcessor2_0()))


def test_set_default_attn_processor_after_patch(sd_pipe, twin):
    check_kept_on_top(sd_pipe, twin, lambda pipe: pipe.unet.set_default_attn_processor())


class HalfOutputProcessor:
    """A user's own attention processor (plain attention, output halved): not one AgentSD can wrap
    on its own initiative."""

    def __init__(self):
        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return 0.5 * self.inner(attn, hidden_states, *args, **kwargs)


def test_custom_processor_after_patch_is_announced(sd_pipe, twin):
    """A processor AgentSD does not know runs as it is: AgentSD steps aside on those layers with one
    warning naming them and what to do, phase_history stops reporting AgentSD phases, and a plain
    processor set back lets AgentSD run there again, with no apply_patch needed."""

    def replace(pipe, processor):
        for attention in agentsd.patch_targets(pipe).values():
            attention.set_processor(processor())

    replace(twin, HalfOutputProcessor)
    custom = txt2img(twin)()
    agentsd.apply_patch(sd_pipe)
    replace(sd_pipe, HalfOutputProcessor)
    with pytest.warns(UserWarning, match="AgentSD steps aside on 3 layer.*HalfOutputProcessor.*as they are"):
        out = txt2img(sd_pipe)()
    assert_bit_identical(out, custom)  # the user's processor ran, not AgentSD
    assert not {"agent", "tome"} & set(agentsd.phase_history(sd_pipe))

    replace(twin, AttnProcessor2_0)
    replace(sd_pipe, AttnProcessor2_0)
    check_patched_run(sd_pipe, txt2img(sd_pipe), 5, txt2img(twin)())
    agentsd.remove_patch(sd_pipe)
    assert_bit_identical(txt2img(sd_pipe)(), txt2img(twin)())


def count_fused_projection_calls(pipe) -> list[int]:
    """Forward hooks counting calls of ``to_qkv`` in each patched attention layer."""
    counts = []
    for attention in agentsd.patch_targets(pipe).values():
        counts.append(0)
        index = len(counts) - 1

        def hook(module, args, output, index=index):
            counts[index] += 1

        attention.to_qkv.register_forward_hook(hook)
    return counts


def test_fuse_qkv_projections_before_patch(sd_pipe):
    """The patched layers use the fused QKV projection (issue 9: faster where it exists)."""
    sd_pipe.fuse_qkv_projections()
    generate = txt2img(sd_pipe)
    unpatched = generate()
    agentsd.apply_patch(sd_pipe)
    counts = count_fused_projection_calls(sd_pipe)
    check_patched_run(sd_pipe, generate, 5, unpatched)
    assert counts and all(counts)
    agentsd.remove_patch(sd_pipe)
    assert_bit_identical(generate(), unpatched)


def test_fuse_qkv_projections_after_patch(sd_pipe, twin):
    counters, seen = [], []

    def fuse(pipe):
        pipe.fuse_qkv_projections()
        if pipe is sd_pipe:
            counters.append(count_fused_projection_calls(pipe))

    check_kept_on_top(sd_pipe, twin, fuse, after_patched_run=lambda: seen.extend(counters[0]))
    assert seen and all(seen)  # the patched layers used the fused projection


def test_unfuse_qkv_projections_after_patch(sd_pipe, twin):
    """Fused before patching, unfused after: unfusing restores the processors saved at fuse time."""
    sd_pipe.fuse_qkv_projections()
    twin.fuse_qkv_projections()
    check_kept_on_top(sd_pipe, twin, lambda pipe: pipe.unfuse_qkv_projections())


# --- pipelines -------------------------------------------------------------------------------------


def test_sd1_text_to_image_epsilon(sd_pipe):
    assert sd_pipe.scheduler.config.prediction_type == "epsilon"
    check_composes(sd_pipe, txt2img(sd_pipe), 5)


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory, tiny_sd_dir):
    return tiny_compat.build_sd2_pipeline(tmp_path_factory.mktemp("tiny-sd2"), tiny_sd_dir)


def test_sd2_text_to_image_v_prediction_upcast(sd2_dir):
    pipe = quiet(StableDiffusionPipeline.from_pretrained(sd2_dir))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.upcast_attention and pipe.unet.config.use_linear_projection
    check_composes(pipe, txt2img(pipe), 5, attn_precision="fp32")


def test_sdxl():
    pipe = quiet(make_sdxl_pipeline())
    check_composes(pipe, txt2img(pipe, height=64, width=64), 5)


def img2img(pipe):
    def generate():
        return as_tensor(pipe(PROMPT, image=rgb_image(), strength=0.8, num_inference_steps=10,
                              output_type="latent", generator=seeded()))

    return generate


# strength 0.8 of 10 steps runs the last 8: progress 0.2, 0.3 (agent), 0.4 ... 0.9 (ToMe)
IMG2IMG_PHASES = ["agent"] * 2 + ["tome"] * 6


def test_img2img(components):
    pipe = quiet(StableDiffusionImg2ImgPipeline(**components))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    generate = img2img(pipe)
    unpatched = generate()
    agentsd.apply_patch(pipe)
    patched = generate()
    assert agentsd.phase_history(pipe) == IMG2IMG_PHASES
    assert_differs(patched, unpatched)
    agentsd.remove_patch(pipe)
    assert_bit_identical(generate(), unpatched)


@pytest.mark.parametrize("scheduler", ["shared", "own"])
def test_img2img_from_pipe_of_patched_pipeline(sd_pipe, scheduler):
    """AutoPipelineForImage2Image.from_pipe(patched text-to-image pipeline), sharing its scheduler or
    given its own: the phases follow the derived pipeline's steps."""
    sd_pipe.scheduler = DDIMScheduler.from_config(sd_pipe.scheduler.config)
    own = {"scheduler": DDIMScheduler.from_config(sd_pipe.scheduler.config)} if scheduler == "own" else {}
    derived = quiet(AutoPipelineForImage2Image.from_pipe(sd_pipe, **own))
    generate = img2img(derived)
    unpatched = generate()
    agentsd.apply_patch(sd_pipe)
    txt2img(sd_pipe)()  # a 5-step text-to-image run first, as a user would
    patched = generate()
    assert agentsd.phase_history(derived) == IMG2IMG_PHASES
    assert_differs(patched, unpatched)
    agentsd.remove_patch(sd_pipe)
    assert_bit_identical(generate(), unpatched)


def test_inpaint(components):
    pipe = quiet(StableDiffusionInpaintPipeline(**components))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    check_composes(pipe, txt2img(pipe, image=rgb_image(), mask_image=mask), 5)


def test_controlnet(components):
    controlnet = tiny_compat.make_controlnet(components["unet"])
    pipe = quiet(StableDiffusionControlNetPipeline(**components, controlnet=controlnet))
    check_composes(pipe, txt2img(pipe, image=rgb_image(seed=1)), 5)


def test_t2i_adapter(components):
    pipe = quiet(StableDiffusionAdapterPipeline(**components, adapter=tiny_compat.make_t2i_adapter()))
    check_composes(pipe, txt2img(pipe, image=rgb_image(seed=1)), 5)


def test_instruct_pix2pix(components):
    unet = tiny_compat.make_unet_like_sd(seed=13, in_channels=8)
    pipe = quiet(StableDiffusionInstructPix2PixPipeline(**{**components, "unet": unet}))

    def generate():
        return as_tensor(pipe(PROMPT, image=rgb_image(), num_inference_steps=5, image_guidance_scale=1.5,
                              output_type="latent", generator=seeded()))

    check_composes(pipe, generate, 5)


def test_x4_upscaler(components):
    parts = tiny_compat.make_upscaler_components()
    pipe = quiet(StableDiffusionUpscalePipeline(
        text_encoder=components["text_encoder"], tokenizer=components["tokenizer"], **parts
    ))
    # only_cross_attention above the lowest level: the first self-attention is at downsample 4,
    # and that is what the default max_downsample=None picks
    targets = agentsd.patch_targets(pipe)
    lowest_level = ("down_blocks.2.", "mid_block.", "up_blocks.0.")
    assert targets and all(name.startswith(lowest_level) for name in targets)

    def generate():
        return as_tensor(pipe(PROMPT, image=rgb_image(16), noise_level=20, num_inference_steps=5,
                              output_type="latent", generator=seeded()))

    check_composes(pipe, generate, 5)


def test_x4_upscaler_max_downsample_below_first_attention_level_raises():
    """tomesd's habit max_downsample=1 (or 2) would patch nothing here: refused, naming level 4."""
    unet = tiny_compat.make_upscaler_unet()
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    for max_downsample in (1, 2):
        with pytest.raises(ValueError, match="first level with attention is downsampled 4"):
            agentsd.apply_patch(unet, max_downsample=max_downsample)
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before
    assert agentsd.phase_history(unet) == []


@pytest.fixture(scope="module")
def motion_adapter_dir(tmp_path_factory):
    return tiny_compat.save_motion_adapter(tmp_path_factory.mktemp("motion-adapter"))


def test_animatediff(components, motion_adapter_dir):
    """AnimateDiffPipeline turns the SD UNet into a UNetMotionModel: the spatial transformer blocks
    are patched, the temporal motion modules are not."""
    adapter = MotionAdapter.from_pretrained(motion_adapter_dir)
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False, steps_offset=1)
    pipe = quiet(AnimateDiffPipeline(
        vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
        unet=components["unet"], motion_adapter=adapter, scheduler=scheduler,
    ))
    assert type(pipe.unet).__name__ == "UNetMotionModel"
    assert not any("motion_modules" in name for name in agentsd.patch_targets(pipe))
    check_composes(pipe, txt2img(pipe, num_frames=2), 5)


def test_stable_video_diffusion():
    """SVD's UNetSpatioTemporalConditionModel: the spatial BasicTransformerBlocks of its
    TransformerSpatioTemporalModel are patched; progress comes from the pipeline's EDM timesteps."""
    pipe = quiet(StableVideoDiffusionPipeline(**tiny_compat.make_svd_components()))
    targets = agentsd.patch_targets(pipe)
    assert targets and not any("temporal" in name for name in targets)

    def generate():
        return as_tensor(pipe(rgb_image(), height=32, width=32, num_frames=2, num_inference_steps=5,
                              decode_chunk_size=2, output_type="latent", generator=seeded()))

    check_composes(pipe, generate, 5)


def test_stable_video_diffusion_bare_unet_edm_timesteps():
    """Called without its pipeline, at the first and last of SVD's own 5 EDM timesteps."""
    parts = tiny_compat.make_svd_components()
    unet, scheduler = parts["unet"], parts["scheduler"]
    scheduler.set_timesteps(5)
    generator = seeded()
    sample = torch.randn(1, 2, 8, 16, 16, generator=generator)
    context = torch.randn(1, 1, CROSS_DIM, generator=generator)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]])
    agentsd.apply_patch(unet)
    seen = []
    with torch.no_grad():
        for t in (scheduler.timesteps[0], scheduler.timesteps[-1]):
            unet(sample, t, encoder_hidden_states=context, added_time_ids=time_ids)
            seen += agentsd.phase_history(unet, per_call=True)[-1:]
    assert seen == ["agent", "tome"]


def test_pag(components):
    """Perturbed-attention guidance on the mid block (its default); AgentSD on the first level."""
    pipe = quiet(StableDiffusionPAGPipeline(**components, pag_applied_layers=["mid"]))
    check_composes(pipe, txt2img(pipe, pag_scale=3.0), 5)


def test_pag_on_the_patched_layers_is_announced(components):
    """PAG applied to a patched layer swaps in its own processor there for the call: AgentSD says so,
    keeps running in the other patched layers, and remove_patch is still bit-exact."""
    pipe = quiet(StableDiffusionPAGPipeline(**components, pag_applied_layers=["down_blocks.0"]))
    generate = txt2img(pipe, pag_scale=3.0)
    unpatched = generate()
    agentsd.apply_patch(pipe)
    with pytest.warns(UserWarning, match=r"AgentSD.*PAG"):
        check_patched_run(pipe, generate, 5, unpatched)
    agentsd.remove_patch(pipe)
    assert_bit_identical(generate(), unpatched)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_few_step(components, steps):
    parts = {**components, "unet": tiny_compat.make_lcm_unet(), "scheduler": tiny_compat.lcm_scheduler()}
    pipe = quiet(LatentConsistencyModelPipeline(**parts))
    check_composes(pipe, txt2img(pipe, steps), steps)


def test_turbo_one_step():
    """SDXL-Turbo style: one Euler-a step with trailing timestep spacing, no guidance."""
    pipe = quiet(make_sdxl_pipeline())
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing"
    )
    check_composes(pipe, txt2img(pipe, 1, height=64, width=64, guidance_scale=0.0), 1)
