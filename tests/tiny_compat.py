"""Tiny random-weight models for the compatibility tests (tests/test_compat.py).

Each builder makes the smallest model of its kind that still has the structure that matters to the
patch (spatial transformer blocks at the patched level, the pipeline's own conditioning), built
offline. LoRA and IP-Adapter weights are written to a folder in the format diffusers loads, so the
tests go through ``load_lora_weights`` / ``load_ip_adapter`` as a user does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    MotionAdapter,
    StableDiffusionPipeline,
    T2IAdapter,
    UNet2DConditionModel,
    UNetSpatioTemporalConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from tests.tiny import CROSS_DIM, tiny_unet_config

IMAGE_EMBED_DIM = 16


def amplify_self_attention(unet: torch.nn.Module) -> torch.nn.Module:
    """Scale the self-attention output projections up, as tests.tiny.make_unet does.

    Random init leaves attention outputs tiny next to the residual stream, so a patch that did not
    run could hide behind float noise; scaled up, any change in attn1 shows in the UNet output.
    """
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn1.to_out.0"):
                module.weight.mul_(20)
    return unet


def make_unet_like_sd(seed: int = 0, **overrides) -> UNet2DConditionModel:
    """The tiny SD-shaped UNet of tests.tiny with some config fields changed (in_channels, ...)."""
    config = tiny_unet_config()
    config.update(overrides)
    torch.manual_seed(seed)
    return amplify_self_attention(UNet2DConditionModel(**config).eval())


def build_sd2_pipeline(folder: Path, sd_dir: Path) -> Path:
    """An SD 2.x-style pipeline saved to ``folder``: v-prediction, upcast attention, linear projections.

    Text encoder, tokenizer and VAE come from the tiny SD 1.x pipeline in ``sd_dir``.
    """
    base = StableDiffusionPipeline.from_pretrained(sd_dir)
    unet = make_unet_like_sd(seed=2, upcast_attention=True, use_linear_projection=True)
    scheduler = DDIMScheduler(
        prediction_type="v_prediction", steps_offset=1, clip_sample=False, set_alpha_to_one=False,
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    )
    pipe = StableDiffusionPipeline(**{**base.components, "unet": unet, "scheduler": scheduler})
    pipe.save_pretrained(folder)
    return Path(folder)


def save_lora(folder: Path, seed: int, rank: int = 4) -> Path:
    """Write a random LoRA for the tiny SD UNet's attention projections with ``save_lora_weights``.

    ``init_lora_weights=False`` makes both LoRA matrices random, so the LoRA changes the output.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel(**tiny_unet_config())
    torch.manual_seed(seed)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                   target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
    )
    return Path(folder)


def tiny_clip_vision(
    projection_dim: int, seed: int = 0, image_size: int = 32, patch_size: int = 8
) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        image_size=image_size, patch_size=patch_size, projection_dim=projection_dim,
    )
    return CLIPVisionModelWithProjection(config).eval()


def save_ip_adapter(folder: Path, unet: UNet2DConditionModel, seed: int = 3) -> Path:
    """Write a tiny IP-Adapter for ``unet`` (``ip_adapter.safetensors``) and its CLIP image encoder.

    The layout is the one diffusers' ``load_ip_adapter`` reads: ``image_proj.*`` (the ImageProjection
    of the plain IP-Adapter: 4 image tokens) and ``ip_adapter.{i}.to_k_ip/to_v_ip`` for each
    cross-attention, numbered 1, 3, 5, ... in the order of ``unet.attn_processors``.
    The image encoder goes to ``folder/image_encoder``.
    """
    folder = Path(folder)
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    tensors = {
        "image_proj.proj.weight": randn(4 * CROSS_DIM, IMAGE_EMBED_DIM),
        "image_proj.proj.bias": randn(4 * CROSS_DIM),
        "image_proj.norm.weight": torch.ones(CROSS_DIM),
        "image_proj.norm.bias": torch.zeros(CROSS_DIM),
    }
    modules = dict(unet.named_modules())
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = modules[name.removesuffix(".processor")].to_q.in_features
            tensors[f"ip_adapter.{key}.to_k_ip.weight"] = randn(hidden, CROSS_DIM)
            tensors[f"ip_adapter.{key}.to_v_ip.weight"] = randn(hidden, CROSS_DIM)
            key += 2
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "ip_adapter.safetensors")
    tiny_clip_vision(IMAGE_EMBED_DIM).save_pretrained(folder / "image_encoder")
    return folder


def make_controlnet(unet: UNet2DConditionModel) -> ControlNetModel:
    torch.manual_seed(4)
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()


def make_t2i_adapter() -> T2IAdapter:
    """A full T2I-Adapter whose features match the tiny SD UNet (channels 32/64, latent = image / 2)."""
    torch.manual_seed(5)
    return T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=2).eval()


def make_upscaler_unet() -> UNet2DConditionModel:
    """An x4-upscaler-shaped UNet: 7 input channels (latent + low-res image), noise-level class
    embedding, linear projections, and, as in stabilityai/stable-diffusion-x4-upscaler, only
    cross-attention in the attention blocks above the lowest level (``only_cross_attention``), so
    the first self-attention is at the third level (downsample 4; 8 in the real model)."""
    torch.manual_seed(6)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=7, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        only_cross_attention=(True, True, False),
        mid_block_only_cross_attention=False,
        cross_attention_dim=CROSS_DIM, attention_head_dim=8, use_linear_projection=True,
        num_class_embeds=100, norm_num_groups=8,
    ).eval()
    return amplify_self_attention(unet)


def make_upscaler_components() -> dict:
    """UNet, VAE (with the x4 upscaler's latent scaling 0.08333) and the two schedulers."""
    torch.manual_seed(12)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
        scaling_factor=0.08333,
    ).eval()
    return dict(
        unet=make_upscaler_unet(),
        vae=vae,
        low_res_scheduler=DDPMScheduler(),
        scheduler=DDIMScheduler(prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False),
    )


def save_motion_adapter(folder: Path) -> Path:
    """A MotionAdapter for the tiny SD UNet (one motion module per resnet, as layers_per_block=1)."""
    torch.manual_seed(7)
    adapter = MotionAdapter(
        block_out_channels=(32, 64), motion_layers_per_block=1, motion_norm_num_groups=8,
        motion_num_attention_heads=4, motion_max_seq_length=8,
    )
    adapter.save_pretrained(folder)
    return Path(folder)


def make_svd_components() -> dict:
    """A tiny StableVideoDiffusionPipeline: spatio-temporal UNet, temporal-decoder VAE, CLIP image
    encoder, and SVD's EDM Euler scheduler (continuous timesteps 0.25·log σ)."""
    torch.manual_seed(8)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=16, in_channels=8, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=CROSS_DIM, num_attention_heads=(4, 8), layers_per_block=1,
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=24, num_frames=2,
    ).eval()
    amplify_self_attention(unet)
    torch.manual_seed(9)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        latent_channels=4,
    ).eval()
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, interpolation_type="linear",
        prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
        timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
    )
    # the pipeline resizes the conditioning image to CLIP's 224x224 itself
    image_encoder = tiny_clip_vision(CROSS_DIM, seed=10, image_size=224, patch_size=32)
    return dict(
        unet=unet, vae=vae, scheduler=scheduler, image_encoder=image_encoder,
        feature_extractor=CLIPImageProcessor(size=224, crop_size=224),
    )


def make_lcm_unet() -> UNet2DConditionModel:
    """The tiny SD UNet with LCM's guidance embedding (``time_cond_proj_dim``)."""
    return make_unet_like_sd(seed=11, time_cond_proj_dim=32)


def lcm_scheduler() -> LCMScheduler:
    return LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
