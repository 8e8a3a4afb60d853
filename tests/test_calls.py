"""Per-call state: what a block sees belongs to its call, through recomputation, batching and any
calling pattern; and a block that cannot run its call's phase is never silent (core 0.3, issue 15)."""

import copy
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionSAGPipeline, UNetSpatioTemporalConditionModel

import agentsd
from agentsd.patch import PlanMissingWarning
from tests.test_patch import unet_inputs

FIVE_STEPS = ["agent", "agent", "tome", "tome", "tome"]


# --- gradient checkpointing ----------------------------------------------------------------------


def _gradients(unet, checkpointing: bool) -> dict:
    unet = copy.deepcopy(unet)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    agentsd.apply_patch(unet, merge_crossattn=True, merge_mlp=True)
    loss = 0
    for t, seed in ((990, 1), (300, 2)):  # an agent-phase call, then a ToMe-phase call
        sample, context = unet_inputs(seed=seed)
        loss = loss + unet(sample, t, encoder_hidden_states=context).sample.square().mean()
    assert agentsd.phase_history(unet, per_call=True) == ["agent", "tome"]
    loss.backward()  # recomputes the first call's blocks after the second call ran
    return {name: p.grad for name, p in unet.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_recomputes_each_call_in_its_own_phase(tiny_unet, one_thread):
    expected = _gradients(tiny_unet, checkpointing=False)
    got = _gradients(tiny_unet, checkpointing=True)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        error = ((got[name] - grad).norm() / grad.norm().clamp_min(1e-12)).item()
        assert error <= 1e-5, (name, error)


def _svd_unet() -> UNetSpatioTemporalConditionModel:
    torch.manual_seed(0)
    return UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=(2, 4), addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,
    )


def test_gradient_checkpointing_where_blocks_get_no_call_is_refused():
    """SVD's spatial blocks are called without cross_attention_kwargs: a recompute could not know its
    call, so AgentSD refuses up front instead of computing wrong gradients."""
    unet = agentsd.apply_patch(_svd_unet())
    sample, context, time_ids = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 1, 32), torch.randn(1, 3)
    unet.enable_gradient_checkpointing()
    with pytest.raises(ValueError, match="cannot follow gradient checkpointing.*TransformerSpatioTemporal"):
        unet(sample, 990, encoder_hidden_states=context, added_time_ids=time_ids)
    with torch.no_grad():  # nothing is recomputed without gradients: fine
        unet(sample, 990, encoder_hidden_states=context, added_time_ids=time_ids)
    assert agentsd.phase_history(unet) == ["agent"]


# --- an image depends on its seed, not on its batch -----------------------------------------------


def test_without_cfg_an_image_does_not_depend_on_its_batch(tiny_pipe, one_thread):
    """guidance_scale=1: the UNet's batch is the number of images, odd or even. Image 0 made alone
    equals image 0 made beside another (to the CPU kernels' own last-bit differences between batch
    sizes, which the unpatched pipeline has too)."""
    agentsd.apply_patch(tiny_pipe)

    def images(n):
        generators = [torch.Generator().manual_seed(seed) for seed in range(n)]
        return tiny_pipe(["a cat"] * n, num_inference_steps=5, height=32, width=32, guidance_scale=1.0,
                         generator=generators, output_type="pt").images

    alone, pair, three = images(1), images(2), images(3)
    assert agentsd.phase_history(tiny_pipe) == FIVE_STEPS
    torch.testing.assert_close(pair[0], alone[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(three[:2], pair, rtol=0, atol=1e-4)


# --- several UNet calls per step -------------------------------------------------------------------


def test_two_calls_per_step_at_one_timestep(tiny_unet):
    """A loop making separate unconditional and conditional calls: one history entry per step, one
    per call."""
    agentsd.apply_patch(tiny_unet)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(5)
    sample, context = unet_inputs(batch=1)
    with torch.no_grad():
        for t in scheduler.timesteps:
            tiny_unet(sample, t, encoder_hidden_states=torch.zeros_like(context))
            tiny_unet(sample, t, encoder_hidden_states=context)
    assert agentsd.phase_history(tiny_unet) == FIVE_STEPS
    assert agentsd.phase_history(tiny_unet, per_call=True) == [p for p in FIVE_STEPS for _ in range(2)]


def test_self_attention_guidance_pipeline(tiny_pipe, one_thread):
    """StableDiffusionSAGPipeline calls the UNet twice per step (the guided batch, then the degraded
    latents) at one timestep."""
    pipe = StableDiffusionSAGPipeline(**tiny_pipe.components)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    agentsd.apply_patch(pipe)
    pipe("a cat", num_inference_steps=5, height=32, width=32, sag_scale=0.75, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    assert agentsd.phase_history(pipe) == FIVE_STEPS
    assert agentsd.phase_history(pipe, per_call=True) == [p for p in FIVE_STEPS for _ in range(2)]


# --- a block that cannot run its phase is reported --------------------------------------------------


def _drop_cross_attention_kwargs(unet):
    """Other code between a patched block and its parent that drops the call's arguments."""
    for module in unet.modules():
        if type(module).__name__ == "Transformer2DModel":
            module.register_forward_pre_hook(
                lambda m, args, kwargs: (args, {**kwargs, "cross_attention_kwargs": None}), with_kwargs=True
            )


def test_a_block_missing_its_call_is_reported_never_silent(tiny_unet):
    agentsd.apply_patch(tiny_unet)
    _drop_cross_attention_kwargs(tiny_unet)
    sample, context = unet_inputs()
    # the tests turn this warning into an error (pyproject.toml): a bug fails the test that meets it
    with pytest.raises(PlanMissingWarning, match="could not run a patched block.*bug in agentsd"):
        with torch.no_grad():
            tiny_unet(sample, 990, encoder_hidden_states=context)
    with warnings.catch_warnings():
        warnings.simplefilter("always", PlanMissingWarning)  # as a user sees it: a warning
        with pytest.warns(PlanMissingWarning):
            with torch.no_grad():
                tiny_unet(sample, 990, encoder_hidden_states=context)
    assert agentsd.phase_history(tiny_unet) == ["full"]  # the phase that did not run is not reported


# --- the dst positions ---------------------------------------------------------------------------


@pytest.mark.parametrize(("t", "cell"), [(990, 4), (300, 2)])
def test_each_block_gets_the_dst_positions_of_its_own_seed_and_index(tiny_unet, one_thread, t, cell):
    """The call hashes every block's positions at once; each block must still get those of (seed,
    its index, timestep), as when each block hashed its own."""
    from agentsd.merge import block_salt, dst_positions, position_key
    from agentsd.patch import _KEY

    unet = agentsd.apply_patch(copy.deepcopy(tiny_unet), seed=7)
    seen = []

    def record(block, args, kwargs):
        call = kwargs["cross_attention_kwargs"][_KEY]
        seen.append(call.dst[block._agentsd.downsample][block._agentsd.row][0])

    blocks = [block for _, block in unet._agentsd_patch.blocks]
    handles = [block.register_forward_pre_hook(record, with_kwargs=True) for block in blocks]
    sample, context = unet_inputs()
    with torch.no_grad():
        unet(sample, t, encoder_hidden_states=context)
    for handle in handles:
        handle.remove()
    expected = [dst_positions(16, 16, cell, cell, position_key(block_salt(7, i), torch.tensor(float(t))))
                for i in range(len(blocks))]
    assert len(seen) == len(blocks) == 3
    for got, want in zip(seen, expected, strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(seen[0], seen[1])
