"""Whole Stable Diffusion pipelines with random weights, built offline from the configs in ``configs/``.

Next to each UNet config (``<arch>.json``, see :mod:`agentsd.tools.archs`) the package ships the
configs of the rest of that checkpoint: ``<arch>-text_encoder.json`` (and ``-text_encoder_2`` for
SDXL), ``<arch>-vae.json`` and ``<arch>-scheduler.json``. With them a full pipeline of the real
architecture is built without downloading anything, to time whole generations (text encoding, every
denoising step, VAE decoding): speed does not depend on the weights. The images are noise.

The tokenizer cannot be the real CLIP BPE vocabulary (that is a download); a byte-level vocabulary
built in memory stands in for it. It splits a prompt into one token per byte, which changes nothing
for timing: the text encoders always see the padded 77 tokens.
"""

from __future__ import annotations

import json
import tempfile
from importlib import resources
from pathlib import Path

import torch

from agentsd.tools.archs import build_unet, unet_config

# Archs with configs for every component, and whether they are SDXL-shaped (two text encoders).
PIPELINE_ARCHS = {"sd15": False, "sd21": False, "sdxl": True, "tiny": False, "tiny-xl": True}
# CLIP's context length, which the SD text encoders' position embeddings are sized for.
TEXT_TOKENS = 77


def component_config(arch: str, component: str) -> dict:
    """The config of one component (``text_encoder``, ``text_encoder_2``, ``vae``, ``scheduler``) of ``arch``.

    Raises:
        ValueError: for an arch without shipped pipeline configs, or a component it does not have.
    """
    if arch not in PIPELINE_ARCHS:
        raise ValueError(f"no pipeline configs for arch {arch!r}: choose from {', '.join(PIPELINE_ARCHS)}")
    resource = resources.files("agentsd.tools").joinpath("configs", f"{arch}-{component}.json")
    if not resource.is_file():
        raise ValueError(f"arch {arch!r} has no {component}")
    config = json.loads(resource.read_text())
    config.pop("_comment", None)
    return config


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of the bytes in byte-level BPE (printable Latin-1 bytes stand for
    themselves; the others are shifted past 255), in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = iter(range(0x100, 0x200))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


def offline_tokenizer(model_max_length: int = TEXT_TOKENS):
    """A ``CLIPTokenizer`` whose vocabulary is built in memory: one token per byte, no merges.

    Token ids: the 256 byte symbols, then the same symbols ending a word (``</w>``), then
    ``<|startoftext|>`` (512) and ``<|endoftext|>`` (513, also the padding). End-of-text has the
    highest id, as in the real vocabulary, which is what CLIP's pooled output relies on.
    """
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    vocab.update({f"{symbol}</w>": 256 + i for i, symbol in enumerate(symbols)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=model_max_length)


def _text_encoder(config: dict, device: torch.device):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
    kind = config.get("architectures", ["CLIPTextModel"])[0]
    with torch.device(device):
        return classes[kind](CLIPTextConfig.from_dict(config))


def build_pipeline(
    arch: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0
):
    """A ``StableDiffusionPipeline`` (or ``StableDiffusionXLPipeline`` for ``sdxl``/``tiny-xl``) of
    ``arch`` with random weights, on ``device`` in ``dtype``.

    Args:
        arch: ``sd15``, ``sd21``, ``sdxl`` (the real architectures) or ``tiny``/``tiny-xl`` (tests).
        dtype: fp16 recommended on a GPU. The SDXL VAE is decoded in fp32 as its config asks
            (``force_upcast``), as with the real checkpoint.
        device: where the weights are created (a GPU initialises SDXL's 3.5B parameters fast).
        seed: seed of the random weights.

    Raises:
        ValueError: for an arch without shipped pipeline configs.
    """
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        schedulers,
    )
    from diffusers.utils import logging

    component_config(arch, "vae")  # the arch check, before anything is built
    device = torch.device(device)
    unet = build_unet(unet_config(arch), dtype, device, seed=seed)
    torch.manual_seed(seed + 1)
    vae_config = component_config(arch, "vae")
    with torch.device(device):
        vae = AutoencoderKL.from_config(vae_config)
    scheduler_config = component_config(arch, "scheduler")
    scheduler = getattr(schedulers, scheduler_config.pop("_class_name")).from_config(scheduler_config)
    tokenizer = offline_tokenizer()
    components = {
        "unet": unet,
        "vae": vae,
        "text_encoder": _text_encoder(component_config(arch, "text_encoder"), device),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }
    if PIPELINE_ARCHS[arch]:
        components["text_encoder_2"] = _text_encoder(component_config(arch, "text_encoder_2"), device)
        components["tokenizer_2"] = tokenizer
        pipe = StableDiffusionXLPipeline(**components)
    else:
        pipe = StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    # .to(dtype) warns about fp32 modules of loaded checkpoints; there are none here.
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        for module in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if module is not None:
                module.to(dtype=dtype).eval().requires_grad_(False)
    finally:
        logging.set_verbosity(level)
    return pipe
