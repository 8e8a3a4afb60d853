"""UNet architectures for benchmarking without weights, and the inputs of one denoising step.

The configs in ``agentsd/configs/`` are the ``unet/config.json`` of the public checkpoints:

- ``sd15``: stable-diffusion-v1-5 (860M parameters, attention at latent /1, /2, /4)
- ``sd21``: stable-diffusion-2-1 (866M, linear projections, upcast attention, context 1024)
- ``sdxl``: stable-diffusion-xl-base-1.0 (2.6B, no attention at /1, ``text_time`` conditioning)
- ``tiny`` / ``tiny-xl``: tiny SD- and SDXL-shaped UNets for tests and quick checks.

Speed and memory do not depend on the weights, so a UNet built from one of these configs with
random weights times exactly like the trained one.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

ARCHS = ("sd15", "sd21", "sdxl", "tiny", "tiny-xl")
# Pixels per latent cell of the Stable Diffusion VAEs (all three downsample 8x).
VAE_SCALE_FACTOR = 8
# Token count of the CLIP text encoders' output that the cross-attentions read.
TEXT_TOKENS = 77


def unet_config(arch: str) -> dict:
    """The UNet config of ``arch``: a name from :data:`ARCHS` or a path to a UNet ``config.json``.

    Raises:
        ValueError: for an unknown name, or a file that is missing or not a JSON object.
    """
    if arch in ARCHS:
        text = resources.files("agentsd.tools").joinpath("configs", f"{arch}.json").read_text()
        return json.loads(text)
    path = Path(arch)
    if not path.suffix == ".json":
        raise ValueError(f"unknown arch {arch!r}: choose from {', '.join(ARCHS)} or give a UNet config.json")
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read arch config {arch}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"arch config {arch} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or "block_out_channels" not in config:
        raise ValueError(f"arch config {arch} is not a UNet2DConditionModel config (no block_out_channels)")
    return config


def arch_label(arch: str) -> str:
    """Short name of an arch for tables: the name itself, or a config file's stem."""
    return arch if arch in ARCHS else Path(arch).stem


def build_unet(config: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A ``UNet2DConditionModel`` of ``config`` with random weights, in eval mode.

    Built directly on ``device`` (random init of a 2.6B-parameter SDXL UNet is much faster on a GPU),
    in float32 and then cast, so every dtype gets the same values.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config)
    if dtype != torch.float32:
        # .to(dtype) logs a warning aimed at loaded checkpoints (modules kept in fp32); none here
        level = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            unet = unet.to(dtype=dtype)
        finally:
            logging.set_verbosity(level)
    return unet.eval().requires_grad_(False)


def step_inputs(
    unet, batch: int, height: int, width: int, vae_scale_factor: int = VAE_SCALE_FACTOR, seed: int = 0
) -> dict:
    """Keyword inputs of one UNet call (all but the timestep) for an image of ``height`` x ``width`` px.

    ``sample`` is ``[batch, in_channels, height / f, width / f]``; ``encoder_hidden_states`` are 77 text
    tokens; an SDXL-style UNet (``addition_embed_type="text_time"``) also gets pooled text embeddings
    and the six size/crop conditioning numbers. ``batch`` is the UNet batch: 2 for one image with CFG.

    Raises:
        ValueError: for a UNet conditioning this function cannot build (other addition embeddings).
    """
    check_conditioning(unet.config)
    config = unet.config
    param = next(unet.parameters())
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=param.device, dtype=param.dtype)

    inputs = {
        "sample": randn(batch, config.in_channels, height // vae_scale_factor, width // vae_scale_factor),
        "encoder_hidden_states": randn(batch, TEXT_TOKENS, config.cross_attention_dim),
    }
    embed = config.addition_embed_type
    if embed == "text_time":
        time_dims = 6 * config.addition_time_embed_dim
        text_dims = config.projection_class_embeddings_input_dim - time_dims
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=param.dtype)
        inputs["added_cond_kwargs"] = {
            "text_embeds": randn(batch, text_dims),
            "time_ids": time_ids.to(param.device).repeat(batch, 1),
        }
    return inputs


def check_conditioning(config) -> None:
    """Raise ``ValueError`` for a UNet config whose conditioning :func:`step_inputs` cannot build.

    Needs only the config (a dict or a diffusers ``FrozenDict``), so it runs before any UNet is
    built: text-only UNets (SD 1.x/2.x) and SDXL's ``text_time`` are supported; other addition
    embeddings (``image``, ``text_image``, ...) and class embeddings are not.
    """
    embed = config.get("addition_embed_type")
    if embed not in (None, "text_time"):
        raise ValueError(f"UNets with addition_embed_type={embed!r} are not supported by the benchmark")
    if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
        raise ValueError("UNets with class embeddings are not supported by the benchmark")


def meta_unet(config: dict):
    """The ``UNet2DConditionModel`` of ``config`` on the meta device: its structure, no memory, no time.

    Used to check a config and find the layers a patch targets before building the real UNet.

    Raises:
        ValueError: diffusers cannot build a UNet from ``config`` (one line with its reason).
    """
    from diffusers import UNet2DConditionModel

    try:
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(config)
    except Exception as error:  # any failure of diffusers' constructor is the config's fault
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"diffusers cannot build a UNet from this config: {reason}") from None


def latent_side(pixels: int, level: int, vae_scale_factor: int = VAE_SCALE_FACTOR) -> int:
    """Tokens along one side at downsampling ``level`` (1, 2, 4, ...) of an image ``pixels`` wide.

    Each stride-2 downsampler (kernel 3, padding 1) maps a side ``s`` to ``ceil(s / 2)``.
    """
    side = pixels // vae_scale_factor
    while level > 1:
        side, level = -(-side // 2), level // 2
    return side
