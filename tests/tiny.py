"""Tiny random-weight Stable Diffusion parts, built offline for the tests.

Everything is saved to a folder and loaded back with ``from_pretrained`` so the tests go through the
same loading path a user does with a hub id or a local checkpoint.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

CROSS_DIM = 32


def tiny_unet_config(sdxl_like: bool = False) -> dict:
    """An SD-shaped UNet (attention at the first level), or an SDXL-shaped one (none at the first level)."""
    if sdxl_like:
        down = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
        up = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
        channels = (16, 32, 32)
    else:
        down = ("CrossAttnDownBlock2D", "DownBlock2D")
        up = ("UpBlock2D", "CrossAttnUpBlock2D")
        channels = (32, 64)
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def make_unet(sdxl_like: bool = False, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(sdxl_like)).eval()
    # Random init leaves the attention outputs tiny next to the residual stream; scale the output
    # projections up so a wrong attention shows up clearly in the UNet output.
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn1.to_out.0"):
                module.weight.mul_(20)
    return unet


def _write_char_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer with a byte-level, merge-free vocabulary (one token per character)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codes]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def build_pipeline(folder: Path, seed: int = 0) -> Path:
    """Build a tiny StableDiffusionPipeline and save it to ``folder``; returns the folder."""
    folder = Path(folder)
    unet = make_unet(seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
            hidden_size=CROSS_DIM,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=514,
            max_position_embeddings=16,
        )
    )
    with tempfile.TemporaryDirectory() as vocab_dir:
        tokenizer = _write_char_tokenizer(Path(vocab_dir))
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def make_sdxl_pipeline(seed: int = 0):
    """A tiny StableDiffusionXLPipeline: two text encoders, a text_time UNet without attention at level 1."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    config = tiny_unet_config(sdxl_like=True)
    config.update(
        cross_attention_dim=2 * CROSS_DIM,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + CROSS_DIM,
    )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).eval()
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
    )
    text_config = CLIPTextConfig(
        bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=CROSS_DIM, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=514, max_position_embeddings=16,
        projection_dim=CROSS_DIM,
    )
    with tempfile.TemporaryDirectory() as vocab_dir:
        tokenizer = _write_char_tokenizer(Path(vocab_dir))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    )
