"""apply_patch / remove_patch on tiny real UNets and pipelines."""

import copy

import pytest
import tomesd
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DiTPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    Transformer2DModel,
    UNet2DModel,
)
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import agentsd
from tests.tiny import make_sdxl_pipeline


def unet_inputs(h=16, w=16, batch=2, seed=1, sdxl=False):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, h, w, generator=g)
    context = torch.randn(batch, 7, 32, generator=g)
    return sample, context


def run_unet(unet, t=800, **kw):
    sample, context = unet_inputs(**kw)
    with torch.no_grad():
        return unet(sample.to(unet.dtype), t, encoder_hidden_states=context.to(unet.dtype)).sample


def processors(unet):
    return dict(unet.attn_processors)


def hook_count(unet):
    """Hooks and wrapped forwards on the UNet and its modules (what a patch could leave behind)."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + ("forward" in m.__dict__)
               for m in unet.modules())


# --- ToMe phase against tomesd ------------------------------------------------------------------


@pytest.mark.parametrize("size", [(16, 16), (13, 21), (24, 8)])
def test_tome_phase_matches_tomesd(tiny_unet, size):
    h, w = size
    reference = copy.deepcopy(tiny_unet)
    tomesd.apply_patch(reference, ratio=0.5, sx=2, sy=2, use_rand=False, max_downsample=1)
    agentsd.apply_patch(tiny_unet, ratio=0.5, late_sx=2, late_sy=2, agent_until=0.0, use_rand=False)
    ours = run_unet(tiny_unet, h=h, w=w)
    expected = run_unet(reference, h=h, w=w)
    unpatched = run_unet(agentsd.remove_patch(tiny_unet), h=h, w=w)
    assert (expected - unpatched).abs().max() > 1e-3  # merging really changes the output
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("crossattn,mlp", [(True, False), (False, True), (True, True)])
def test_whole_block_merge_matches_tomesd(tiny_unet, crossattn, mlp):
    """merge_crossattn / merge_mlp: one plan per block shared by attn1, attn2 and ff, as tomesd's own."""
    reference = copy.deepcopy(tiny_unet)
    attn_only = copy.deepcopy(tiny_unet)
    tomesd.apply_patch(reference, ratio=0.5, sx=2, sy=2, use_rand=False, max_downsample=1,
                       merge_crossattn=crossattn, merge_mlp=mlp)
    tomesd.apply_patch(attn_only, ratio=0.5, sx=2, sy=2, use_rand=False, max_downsample=1)
    agentsd.apply_patch(tiny_unet, ratio=0.5, late_sx=2, late_sy=2, agent_until=0.0, use_rand=False,
                        merge_crossattn=crossattn, merge_mlp=mlp)
    expected, ours = run_unet(reference, h=13, w=21), run_unet(tiny_unet, h=13, w=21)
    assert (expected - run_unet(attn_only, h=13, w=21)).abs().max() > 1e-3  # the flags change the output
    assert ((ours - expected).norm() / expected.norm()).item() <= 1e-5


# --- removal, idempotence ------------------------------------------------------------------------


def test_processors_are_never_touched_and_removal_is_bit_exact(tiny_unet):
    custom = AttnProcessor()  # a non-default processor set by the user before patching
    name = next(iter(agentsd.patch_targets(tiny_unet)))
    dict(tiny_unet.named_modules())[name.removesuffix(".processor")].set_processor(custom)
    before = processors(tiny_unet)
    hooks = hook_count(tiny_unet)
    expected = run_unet(tiny_unet)

    agentsd.apply_patch(tiny_unet, agent_until=1.0)
    assert (run_unet(tiny_unet) - expected).abs().max() > 1e-3  # the patch runs on the user's AttnProcessor
    assert all(processors(tiny_unet)[k] is v for k, v in before.items())
    assert hook_count(tiny_unet) > hooks

    agentsd.remove_patch(tiny_unet)
    after = processors(tiny_unet)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert after[name] is custom
    assert hook_count(tiny_unet) == hooks
    assert torch.equal(run_unet(tiny_unet), expected)


def test_patched_output_differs_and_removal_restores(tiny_unet):
    expected = run_unet(tiny_unet)
    agentsd.apply_patch(tiny_unet, agent_until=1.0)
    assert (run_unet(tiny_unet) - expected).abs().max() > 1e-3
    agentsd.remove_patch(tiny_unet)
    assert torch.equal(run_unet(tiny_unet), expected)


def test_apply_twice_equals_once(tiny_unet):
    agentsd.apply_patch(tiny_unet, ratio=0.3, seed=3)
    once = run_unet(tiny_unet)
    hooks = hook_count(tiny_unet)
    agentsd.apply_patch(tiny_unet, ratio=0.3, seed=3)
    assert hook_count(tiny_unet) == hooks
    assert torch.equal(run_unet(tiny_unet), once)
    # the saved originals are the real ones, not the first patch's processors
    agentsd.remove_patch(tiny_unet)
    assert all(type(p) is AttnProcessor2_0 for p in processors(tiny_unet).values())


def test_remove_on_unpatched_is_noop(tiny_unet):
    before = processors(tiny_unet)
    assert agentsd.remove_patch(tiny_unet) is tiny_unet
    assert all(processors(tiny_unet)[k] is v for k, v in before.items())
    assert agentsd.phase_history(tiny_unet) == []


def test_full_phase_is_bit_exact(tiny_unet):
    expected = run_unet(tiny_unet, t=50)
    agentsd.apply_patch(tiny_unet, agent_until=0.5, merge_until=0.9)
    assert torch.equal(run_unet(tiny_unet, t=50), expected)  # p = 0.95 >= merge_until
    assert agentsd.phase_history(tiny_unet) == ["full"]


# --- schedule -------------------------------------------------------------------------------------


def test_bare_unet_progress_from_timestep(tiny_unet):
    agentsd.apply_patch(tiny_unet, agent_until=0.4, merge_until=0.9)
    for t in (999, 700, 500, 200, 50):
        run_unet(tiny_unet, t=t)
    # p = 1 - t/1000: 0.001, 0.3 agent; 0.5, 0.8 tome; 0.95 full
    assert agentsd.phase_history(tiny_unet) == ["agent", "agent", "tome", "tome", "full"]
    run_unet(tiny_unet, t=990)  # progress went back: a new generation
    assert agentsd.phase_history(tiny_unet) == ["agent"]


def test_fifty_step_pipeline_runs_20_agent_then_30_tome_steps(tiny_pipe):
    agentsd.apply_patch(tiny_pipe)
    tiny_pipe("a cat", num_inference_steps=50, height=32, width=32, guidance_scale=7.5,
              generator=torch.Generator().manual_seed(0), output_type="latent")
    assert agentsd.phase_history(tiny_pipe) == ["agent"] * 20 + ["tome"] * 30
    # PLMS evaluates its first step twice: 51 UNet calls, the extra one in step 0
    assert agentsd.phase_history(tiny_pipe, per_call=True) == ["agent"] * 21 + ["tome"] * 30
    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)  # swapped scheduler
    tiny_pipe("a cat", num_inference_steps=10, height=32, width=32, output_type="latent")
    assert agentsd.phase_history(tiny_pipe) == ["agent"] * 4 + ["tome"] * 6


# --- determinism, randomness ---------------------------------------------------------------------


def test_same_seed_same_images_and_pipeline_generator_untouched(tiny_pipe):
    def generate(generator):
        return tiny_pipe("a dog", num_inference_steps=4, height=32, width=32, generator=generator,
                         output_type="np").images

    generator = torch.Generator().manual_seed(0)
    generate(generator)
    unpatched_state = generator.get_state()

    agentsd.apply_patch(tiny_pipe, agent_until=0.5, seed=7)
    global_state = torch.get_rng_state()
    generator = torch.Generator().manual_seed(0)
    first = generate(generator)
    assert torch.equal(generator.get_state(), unpatched_state)  # the patch drew nothing from it
    assert torch.equal(torch.get_rng_state(), global_state)
    second = generate(torch.Generator().manual_seed(0))
    assert (first == second).all()

    agentsd.apply_patch(tiny_pipe, agent_until=0.5, seed=8)
    assert not (generate(torch.Generator().manual_seed(0)) == first).all()


def test_odd_batches_use_the_seed_too(tiny_unet):
    """The dst positions are shared by the whole batch: nothing turns them off for odd batches."""
    agentsd.apply_patch(tiny_unet, agent_until=0.0, use_rand=True, seed=0)
    a = run_unet(tiny_unet, batch=3)
    agentsd.apply_patch(tiny_unet, agent_until=0.0, use_rand=True, seed=1)
    assert not torch.equal(run_unet(tiny_unet, batch=3), a)


@pytest.mark.parametrize("agent_until", [1.0, 0.0])
def test_a_sample_does_not_depend_on_its_batch(tiny_unet, agent_until):
    """Sample 0 alone, in a batch of 2 and in a batch of 3: the same output. The CPU's kernels already
    differ in the last bits between batch sizes (the unpatched UNet by ~1e-6 here), so: to 1e-5."""
    agentsd.apply_patch(tiny_unet, agent_until=agent_until)
    sample, context = unet_inputs(batch=3)
    with torch.no_grad():
        outs = [tiny_unet(sample[:n], 900, encoder_hidden_states=context[:n]).sample[0] for n in (1, 2, 3)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-5)


# --- shapes, dtypes, architectures ---------------------------------------------------------------


@pytest.mark.parametrize("batch,h,w", [(1, 16, 16), (3, 13, 21), (2, 65, 97), (4, 9, 12)])
@pytest.mark.parametrize("agent_until", [1.0, 0.0])
def test_any_latent_size_and_batch(tiny_unet, batch, h, w, agent_until):
    agentsd.apply_patch(tiny_unet, agent_until=agent_until)
    out = run_unet(tiny_unet, batch=batch, h=h, w=w)
    assert out.shape == (batch, 4, h, w) and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("precision", [None, "fp32"])
def test_half_precisions(tiny_unet, dtype, precision):
    reference = run_unet(agentsd.apply_patch(copy.deepcopy(tiny_unet), agent_until=1.0, use_rand=False))
    unet = agentsd.apply_patch(tiny_unet.to(dtype), agent_until=1.0, use_rand=False,
                               attn_precision=precision)
    out = run_unet(unet)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.15)


def test_sdxl_shaped_unet_patched_at_first_attention_level(tiny_sdxl_unet):
    targets = agentsd.patch_targets(tiny_sdxl_unet)
    assert targets and all(name.startswith(("down_blocks.1.", "up_blocks.1.")) for name in targets)
    assert len(agentsd.patch_targets(tiny_sdxl_unet, max_downsample=4)) > len(targets)
    sample, context = unet_inputs(h=16, w=16)
    with torch.no_grad():
        expected = tiny_sdxl_unet(sample, 900, encoder_hidden_states=context).sample
        agentsd.apply_patch(tiny_sdxl_unet, agent_until=1.0)
        patched = tiny_sdxl_unet(sample, 900, encoder_hidden_states=context).sample
    assert (patched - expected).abs().max() > 1e-4
    assert agentsd.phase_history(tiny_sdxl_unet) == ["agent"]


def test_img2img_and_controlnet_pipelines(tiny_pipe):
    components = dict(tiny_pipe.components)
    img2img = StableDiffusionImg2ImgPipeline(**components)
    img2img.scheduler = DDIMScheduler.from_config(img2img.scheduler.config)
    img2img.set_progress_bar_config(disable=True)
    agentsd.apply_patch(img2img)
    image = torch.rand(1, 3, 32, 32)
    img2img("a cat", image=image, strength=0.5, num_inference_steps=10, output_type="np")
    # strength 0.5 starts halfway through the schedule: only ToMe steps remain
    assert agentsd.phase_history(img2img) == ["tome"] * 5
    agentsd.remove_patch(img2img)

    controlnet = ControlNetModel.from_unet(tiny_pipe.unet, conditioning_embedding_out_channels=(8, 16))
    pipe = StableDiffusionControlNetPipeline(**components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    agentsd.apply_patch(pipe)
    out = pipe("a cat", image=torch.rand(1, 3, 32, 32), num_inference_steps=5, output_type="np").images
    assert out.shape == (1, 32, 32, 3)
    assert agentsd.phase_history(pipe) == ["agent"] * 2 + ["tome"] * 3


def test_inpaint_pipeline(tiny_pipe):
    pipe = StableDiffusionInpaintPipeline(**tiny_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    agentsd.apply_patch(pipe)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    out = pipe("a cat", image=torch.rand(1, 3, 32, 32), mask_image=mask, num_inference_steps=5,
               output_type="np").images
    assert out.shape == (1, 32, 32, 3)
    assert "agent" in agentsd.phase_history(pipe)


def test_sdxl_pipeline():
    pipe = make_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe("a cat", num_inference_steps=5, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    expected = generate()
    agentsd.apply_patch(pipe)
    patched = generate()
    assert agentsd.phase_history(pipe) == ["agent"] * 2 + ["tome"] * 3
    assert not (patched == expected).all()
    agentsd.remove_patch(pipe)
    assert (generate() == expected).all()


# --- bad input -----------------------------------------------------------------------------------

BAD = [
    (dict(ratio=1.0), "ratio must be in"),
    (dict(ratio=-0.1), "ratio must be in"),
    (dict(agent_ratio=1.0), "agent_ratio must be in"),
    (dict(ratio=0.95), "too high for sx=4"),
    (dict(ratio=0.8, sx=8, sy=8), "too high for late_sx=2"),
    (dict(sx=0), r"sx must be in \[1, 64\], got 0"),
    (dict(sx=2**32), r"sx must be in \[1, 64\]"),
    (dict(late_sx=2**32), r"late_sx must be in \[1, 64\]"),
    (dict(k_scale2=-1e30), r"k_scale2 must be in \[0, 2\]"),
    (dict(k_shortcut=1e30), r"k_shortcut must be in \[0, 1\]"),
    (dict(k_shortcut=-1e30), r"k_shortcut must be in \[0, 1\]"),
    (dict(k_shortcut=float("nan")), "k_shortcut must be a finite number"),
    (dict(seed=-1), "seed must be in"),
    (dict(seed=2**64), "seed must be in"),
    (dict(max_downsample=3), "max_downsample must be None or a power of two"),
    (dict(sy=1.5), "sy must be an integer"),
    (dict(late_sx=0), "late_sx must be"),
    (dict(late_sy=-1), "late_sy must be"),
    (dict(agent_until=1.5), "agent_until must be in"),
    (dict(merge_until=-0.1), "merge_until must be in"),
    (dict(agent_until=0.6, merge_until=0.5), "must not exceed merge_until"),
    (dict(max_downsample=0), "max_downsample"),
    (dict(attn_precision="fp16"), "attn_precision"),
    (dict(seed="x"), "seed"),
    (dict(use_rand="yes"), "use_rand"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_parameters_raise_and_leave_model_untouched(tiny_unet, kwargs, message):
    for already_patched in (False, True):
        if already_patched:
            agentsd.apply_patch(tiny_unet)
        before, hooks = processors(tiny_unet), hook_count(tiny_unet)
        with pytest.raises(ValueError, match=message):
            agentsd.apply_patch(tiny_unet, **kwargs)
        assert all(processors(tiny_unet)[k] is v for k, v in before.items())
        assert hook_count(tiny_unet) == hooks


@pytest.mark.parametrize("kwargs,message", BAD)
def test_check_settings_rejects_what_apply_patch_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        agentsd.check_settings(**kwargs)


def test_check_settings_accepts_defaults_and_rejects_unknown_names():
    agentsd.check_settings()
    agentsd.check_settings(ratio=0.5, sx=2, sy=2, seed=3)
    with pytest.raises(ValueError, match="unknown AgentSD setting.*rato"):
        agentsd.check_settings(rato=0.5)


def test_ratio_limit_only_for_phases_that_run(tiny_unet):
    agentsd.apply_patch(tiny_unet, ratio=0.9, sx=4, sy=4, agent_until=1.0)  # no ToMe-only phase
    assert run_unet(tiny_unet).isfinite().all()


def test_models_without_unet_or_transformer_blocks():
    vae = AutoencoderKL(block_out_channels=(16,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    transformer = Transformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
                                     num_attention_heads=2, in_channels=4, out_channels=8,
                                     num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
                                     norm_elementwise_affine=False)
    dit = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    with pytest.raises(ValueError, match="DiT.*not supported"):
        agentsd.apply_patch(dit)
    with pytest.raises(ValueError, match="no UNet|neither"):
        agentsd.apply_patch(torch.nn.Linear(2, 2))
    plain_unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=8,
                             down_block_types=("DownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(ValueError, match="no BasicTransformerBlock"):
        agentsd.apply_patch(plain_unet)
