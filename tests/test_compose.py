"""A patched model composes with what diffusers users do, and never fails silently (issue 9)."""

import copy
import functools
import io
import pickle
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import agentsd
from tests.test_patch import hook_count, processors, run_unet, unet_inputs


def _generate(pipe, steps=5, **kw):
    return pipe("a cat", num_inference_steps=steps, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(0), **kw).images


FIVE_STEPS = ["agent", "agent", "tome", "tome", "tome"]


def _leftovers(unet) -> int:
    """Hooks and wrapped forwards on the UNet: 0 for a model never patched (tiny models have none)."""
    return hook_count(unet)


# --- reproducible default ------------------------------------------------------------------------

_CHILD = """
import sys, torch, agentsd
from diffusers import StableDiffusionPipeline
torch.set_num_threads(1)
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
agentsd.apply_patch(pipe)
torch.manual_seed(int(sys.argv[2]))  # unrelated global seeding must not matter
image = pipe("a cat", num_inference_steps=3, height=32, width=32, output_type="pt",
             generator=torch.Generator().manual_seed(0)).images
print(image.double().sum().item(), image.double().pow(2).sum().item())
"""


def test_default_seed_gives_the_same_pixels_in_a_new_process(tiny_sd_dir, one_thread):
    command = [sys.executable, "-c", _CHILD, str(tiny_sd_dir), "1"]
    child = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-2:]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    agentsd.apply_patch(pipe)
    torch.manual_seed(2)
    image = pipe("a cat", num_inference_steps=3, height=32, width=32, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert child == [str(image.double().sum().item()), str(image.double().pow(2).sum().item())]


# --- processors replaced by other code -----------------------------------------------------------


def test_attention_slicing_and_plain_processors_keep_the_patch(tiny_pipe, one_thread):
    expected = _generate(tiny_pipe)
    agentsd.apply_patch(tiny_pipe)
    patched = _generate(tiny_pipe)
    for replace in (tiny_pipe.enable_attention_slicing,
                    lambda: tiny_pipe.unet.set_attn_processor(AttnProcessor2_0()),
                    lambda: tiny_pipe.unet.set_attn_processor(AttnProcessor())):
        replace()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the patch stays on top: nothing to warn about
            out = _generate(tiny_pipe)
        assert agentsd.phase_history(tiny_pipe) == FIVE_STEPS
        torch.testing.assert_close(out, patched, rtol=1e-4, atol=1e-4)
    tiny_pipe.disable_attention_slicing()
    agentsd.remove_patch(tiny_pipe)
    assert not _leftovers(tiny_pipe.unet)
    assert torch.equal(_generate(tiny_pipe), expected)


class _Custom(AttnProcessor2_0):
    """A user's own processor (e.g. one that records attention maps)."""


def test_a_custom_processor_is_left_alone_and_reported_once(tiny_pipe, one_thread):
    """A processor AgentSD does not know runs as it is, in every phase; the patch says so once, and
    takes the layer back as soon as a plain processor is set again (no apply_patch needed)."""
    expected = _generate(tiny_pipe)
    agentsd.apply_patch(tiny_pipe)
    patched = _generate(tiny_pipe)
    tiny_pipe.unet.set_attn_processor(_Custom())
    with pytest.warns(UserWarning, match=r"steps aside on 3 layer.*_Custom.*run as they are"):
        out = _generate(tiny_pipe)
    assert torch.equal(out, expected)  # the user's processor ran, untouched
    assert agentsd.phase_history(tiny_pipe) == ["full"] * 5  # what actually ran
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        _generate(tiny_pipe)
    tiny_pipe.unet.set_attn_processor(AttnProcessor2_0())
    torch.testing.assert_close(_generate(tiny_pipe), patched, rtol=1e-4, atol=1e-4)
    assert agentsd.phase_history(tiny_pipe) == FIVE_STEPS


def _count_fused_projections(pipe) -> list[int]:
    counts = [0] * len(agentsd.patch_targets(pipe))

    def count(index, *_):
        counts[index] += 1

    for index, attention in enumerate(agentsd.patch_targets(pipe).values()):
        attention.to_qkv.register_forward_hook(functools.partial(count, index))
    return counts


def test_fuse_qkv_in_any_order(tiny_pipe, one_thread):
    agentsd.apply_patch(tiny_pipe)
    patched = _generate(tiny_pipe)
    tiny_pipe.fuse_qkv_projections()  # after patching: kept, on the fused projection
    counts = _count_fused_projections(tiny_pipe)
    fused = _generate(tiny_pipe)
    assert agentsd.phase_history(tiny_pipe) == FIVE_STEPS
    calls = len(agentsd.phase_history(tiny_pipe, per_call=True))
    assert counts and all(n == calls for n in counts)  # every call: agent attention and ToMe alike
    torch.testing.assert_close(fused, patched, rtol=1e-4, atol=1e-4)
    tiny_pipe.unfuse_qkv_projections()
    torch.testing.assert_close(_generate(tiny_pipe), patched, rtol=1e-4, atol=1e-4)
    assert agentsd.phase_history(tiny_pipe) == FIVE_STEPS

    # fused, patched, removed, unfused: nothing of the patch is left
    tiny_pipe.fuse_qkv_projections()
    agentsd.remove_patch(tiny_pipe)
    tiny_pipe.unfuse_qkv_projections()
    assert not agentsd.is_patched(tiny_pipe)

    # fused before patching, unfused after: the patch stays
    tiny_pipe.fuse_qkv_projections()
    agentsd.apply_patch(tiny_pipe)
    tiny_pipe.unfuse_qkv_projections()
    torch.testing.assert_close(_generate(tiny_pipe), patched, rtol=1e-4, atol=1e-4)
    assert agentsd.phase_history(tiny_pipe) == FIVE_STEPS


def test_unload_ip_adapter_recreating_processors_keeps_the_patch(tiny_pipe, one_thread):
    agentsd.apply_patch(tiny_pipe)
    patched = _generate(tiny_pipe)
    tiny_pipe.unload_ip_adapter()  # re-creates every processor from its class
    assert torch.equal(_generate(tiny_pipe), patched)
    assert agentsd.phase_history(tiny_pipe) == FIVE_STEPS
    agentsd.remove_patch(tiny_pipe)
    assert not _leftovers(tiny_pipe.unet)


def test_set_default_attn_processor_keeps_the_patch_on_top(tiny_unet):
    reference = copy.deepcopy(tiny_unet)
    reference.set_default_attn_processor()
    expected = run_unet(agentsd.apply_patch(reference, agent_until=1.0))
    agentsd.apply_patch(tiny_unet, agent_until=1.0)
    tiny_unet.set_default_attn_processor()
    assert torch.equal(run_unet(tiny_unet), expected)
    agentsd.remove_patch(tiny_unet)
    assert all(type(p) is AttnProcessor for p in processors(tiny_unet).values())
    tiny_unet.set_default_attn_processor()  # diffusers' own method again


def test_extra_cross_attention_kwargs_reach_the_wrapped_processor(tiny_unet, caplog):
    class Scaled(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     out_scale=1.0):
            out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            return out * out_scale

    tiny_unet.set_attn_processor(Scaled())
    sample, context = unet_inputs()

    def call(t):
        with torch.no_grad():
            return tiny_unet(sample, t, encoder_hidden_states=context,
                             cross_attention_kwargs={"out_scale": 3.0}).sample

    expected = call(50)
    agentsd.apply_patch(tiny_unet, merge_until=0.5)  # t=50 is in the full phase
    assert torch.equal(call(50), expected)
    assert "not expected" not in caplog.text


# --- no empty patch, clear errors ------------------------------------------------------------------


def test_max_downsample_below_the_first_attention_level(tiny_sdxl_unet):
    before, hooks = processors(tiny_sdxl_unet), hook_count(tiny_sdxl_unet)
    with pytest.raises(ValueError, match=r"max_downsample=1 selects no layer.*downsampled 2 times"):
        agentsd.apply_patch(tiny_sdxl_unet, max_downsample=1)
    assert processors(tiny_sdxl_unet) == before and hook_count(tiny_sdxl_unet) == hooks


def test_models_whose_unet_is_missing_or_not_a_unet(tiny_pipe):
    class Holder:
        unet = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="Holder.unet is a Linear, not a diffusers UNet"):
        agentsd.apply_patch(Holder())
    tiny_pipe.unet = None
    with pytest.raises(ValueError, match="unet is None"):
        agentsd.apply_patch(tiny_pipe)


def test_numpy_scalars_are_accepted(tiny_unet):
    agentsd.apply_patch(tiny_unet, ratio=np.float32(0.5), sx=np.int64(2), sy=np.int64(2), seed=np.uint32(3))
    assert isinstance(agentsd.AgentSDConfig(sx=np.int64(2)).sx, int)
    run_unet(tiny_unet)


# --- progress from the calling pipeline's scheduler ------------------------------------------------


def test_derived_pipelines_with_their_own_scheduler(tiny_pipe, one_thread):
    agentsd.apply_patch(tiny_pipe)
    _generate(tiny_pipe, steps=20)  # the patched pipeline's scheduler now holds 20 stale timesteps
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(tiny_pipe, scheduler=DDIMScheduler.from_config(
        tiny_pipe.scheduler.config))
    init = torch.rand(1, 3, 32, 32)
    # 7 steps: timesteps that the stale 20-step schedule does not list
    img2img("a cat", image=init, strength=1.0, num_inference_steps=7, output_type="pt")
    assert agentsd.phase_history(tiny_pipe) == ["agent"] * 3 + ["tome"] * 4
    euler = EulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    shared = StableDiffusionPipeline(**{**tiny_pipe.components, "scheduler": euler})
    shared.set_progress_bar_config(disable=True)
    _generate(shared, steps=10)
    assert agentsd.phase_history(tiny_pipe) == ["agent"] * 4 + ["tome"] * 6


@pytest.mark.parametrize("scheduler", [
    KDPM2DiscreteScheduler(),
    PNDMScheduler(skip_prk_steps=False, steps_offset=1),
])
@pytest.mark.parametrize("steps", [5, 10])
def test_schedulers_with_several_calls_per_step(tiny_pipe, one_thread, scheduler, steps):
    tiny_pipe.scheduler = scheduler
    agentsd.apply_patch(tiny_pipe)
    _generate(tiny_pipe, steps=steps)
    agent_steps = int(np.ceil(0.4 * steps))
    assert agentsd.phase_history(tiny_pipe) == ["agent"] * agent_steps + ["tome"] * (steps - agent_steps)


def test_back_to_back_one_step_generations(tiny_pipe, one_thread):
    tiny_pipe.scheduler = EulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    agentsd.apply_patch(tiny_pipe)
    for _ in range(3):
        _generate(tiny_pipe, steps=1)
        assert agentsd.phase_history(tiny_pipe, per_call=True) == ["agent"]


def test_bare_svd_unet_in_a_loop_over_its_edm_schedule():
    """A hand-written loop over an EDM scheduler's timesteps (ln(sigma)/4, as SVD's pipeline uses):
    placed by their index in the schedule like any other."""
    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=(2, 4), addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,
    ).eval()
    with torch.no_grad():  # random init leaves attention tiny next to the residual stream
        for name, module in unet.named_modules():
            if name.endswith("attn1.to_out.0"):
                module.weight.mul_(20)
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 3, 4, 16, 16, generator=g)
    context, time_ids = torch.randn(2, 1, 32, generator=g), torch.randn(2, 3, generator=g)

    scheduler = EulerDiscreteScheduler(
        prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, timestep_type="continuous",
        use_karras_sigmas=True,
    )
    scheduler.set_timesteps(2)

    def loop():
        with torch.no_grad():
            return [unet(sample, t, encoder_hidden_states=context, added_time_ids=time_ids).sample
                    for t in scheduler.timesteps]

    expected = loop()
    agentsd.apply_patch(unet)
    out = loop()
    assert agentsd.phase_history(unet) == ["agent", "tome"]
    assert all((o - e).abs().max() > 1e-4 for o, e in zip(out, expected, strict=True))
    agentsd.remove_patch(unet)
    assert all(torch.equal(o, e) for o, e in zip(loop(), expected, strict=True))


# --- a patched model behaves like a model ----------------------------------------------------------


def test_threads_get_the_results_of_serial_calls(tiny_unet, one_thread):
    agentsd.apply_patch(tiny_unet)
    jobs = [dict(t=990, h=16, w=16, seed=1), dict(t=300, h=12, w=12, seed=2), dict(t=600, h=20, w=8, seed=3)]
    serial = [run_unet(tiny_unet, **job) for job in jobs] * 3
    results, errors = [None] * 9, []
    barrier = threading.Barrier(3)

    def work(i):
        try:
            barrier.wait()
            for k in range(3):
                results[i + 3 * k] = run_unet(tiny_unet, **jobs[i])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for got, want in zip(results, serial, strict=True):
        assert torch.equal(got, want)


def test_deepcopy_is_patched_on_its_own_state(tiny_pipe, one_thread):
    agentsd.apply_patch(tiny_pipe)
    patched = _generate(tiny_pipe)
    copied = copy.deepcopy(tiny_pipe)
    agentsd.remove_patch(tiny_pipe)
    assert agentsd.phase_history(copied) == FIVE_STEPS  # the copy's history, copied
    torch.testing.assert_close(_generate(copied, steps=10), _generate(copied, steps=10))
    assert agentsd.phase_history(copied) == ["agent"] * 4 + ["tome"] * 6
    assert torch.equal(_generate(copied), patched)
    assert agentsd.phase_history(tiny_pipe) == []
    assert not torch.equal(_generate(tiny_pipe), patched)


def test_pickle_and_torch_save(tiny_unet):
    agentsd.apply_patch(tiny_unet)
    expected = run_unet(tiny_unet, t=990)
    for load in (lambda: pickle.loads(pickle.dumps(tiny_unet)), lambda: _torch_roundtrip(tiny_unet)):
        loaded = load()
        assert torch.equal(run_unet(loaded, t=990), expected)
        assert agentsd.phase_history(loaded) == ["agent"]
        agentsd.remove_patch(loaded)
        assert hook_count(loaded) == 0


def _torch_roundtrip(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("t,phase", [(990, "agent"), (300, "tome"), (20, "full")])
def test_backward_in_every_phase(tiny_unet, t, phase):
    agentsd.apply_patch(tiny_unet, merge_until=0.9)
    sample, context = unet_inputs()
    sample.requires_grad_(True)
    tiny_unet(sample, t, encoder_hidden_states=context).sample.square().mean().backward()
    assert agentsd.phase_history(tiny_unet) == [phase]
    assert torch.isfinite(sample.grad).all() and sample.grad.abs().sum() > 0
    assert all(p.grad is not None for p in tiny_unet.parameters() if p.requires_grad)


def test_per_sample_timesteps(tiny_unet):
    agentsd.apply_patch(tiny_unet)
    sample, context = unet_inputs()
    with torch.no_grad():
        tiny_unet(sample, torch.tensor([990, 980]), encoder_hidden_states=context)  # one phase: fine
        assert agentsd.phase_history(tiny_unet, per_call=True)[-1] == "agent"
        with pytest.raises(ValueError, match="timesteps in several phases.*once per timestep"):
            tiny_unet(sample, torch.tensor([990, 100]), encoder_hidden_states=context)
