"""Random-weight whole pipelines built from the shipped configs, and the offline tokenizer."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

import agentsd
from agentsd.tools.archs import unet_config
from agentsd.tools.pipelines import (
    PIPELINE_ARCHS,
    _text_encoder,
    build_pipeline,
    component_config,
    offline_tokenizer,
)


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


# Parameter counts of the published checkpoints' components.
PUBLISHED = {
    ("sd15", "text_encoder"): 123_060_480,  # CLIP ViT-L/14 text
    ("sd21", "text_encoder"): 340_387_840,  # OpenCLIP ViT-H/14 text, 23 layers
    ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840,  # OpenCLIP ViT-bigG/14 text with projection
}
VAE_PARAMETERS = 83_653_863


@pytest.mark.parametrize(("arch", "component"), sorted(PUBLISHED))
def test_real_text_encoders_have_the_published_size(arch, component):
    encoder = _text_encoder(component_config(arch, component), torch.device("meta"))
    assert parameters(encoder) == PUBLISHED[arch, component]


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_real_vaes_have_the_published_size(arch):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(component_config(arch, "vae"))
    assert parameters(vae) == VAE_PARAMETERS


@pytest.mark.parametrize("arch", list(PIPELINE_ARCHS))
def test_components_fit_the_unet(arch):
    unet = unet_config(arch)
    sdxl = PIPELINE_ARCHS[arch]
    encoders = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
    widths = [component_config(arch, name)["hidden_size"] for name in encoders]
    assert sum(widths) == unet["cross_attention_dim"]  # SDXL concatenates both encoders' states
    if sdxl:
        pooled = component_config(arch, "text_encoder_2")["projection_dim"]
        assert pooled + 6 * unet["addition_time_embed_dim"] == unet["projection_class_embeddings_input_dim"]
    vae = component_config(arch, "vae")
    assert vae["latent_channels"] == unet["in_channels"]
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 8  # the VAE scale factor archs.step_inputs assumes
    with torch.device("meta"):
        UNet2DConditionModel.from_config(unet)  # diffusers builds it


def test_unknown_arch_or_component_is_a_value_error():
    with pytest.raises(ValueError, match="no pipeline configs for arch 'sd3'"):
        build_pipeline("sd3")
    with pytest.raises(ValueError, match="has no text_encoder_2"):
        component_config("sd15", "text_encoder_2")


def test_offline_tokenizer_pads_to_77_with_end_of_text_highest():
    tokenizer = offline_tokenizer()
    ids = tokenizer("a corgi, ü", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == 512 and ids[-1] == 513 == max(ids)  # CLIP's pooled output takes the argmax
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.replace(" ", "") == "acorgi,ü"  # every byte survives (one token each, words end in </w>)
    long = tokenizer("x" * 200, truncation=True, max_length=77).input_ids
    assert len(long) == 77 and long[-1] == 513


@pytest.mark.parametrize(
    ("arch", "kind"), [("tiny", StableDiffusionPipeline), ("tiny-xl", StableDiffusionXLPipeline)]
)
def test_tiny_pipeline_generates_and_takes_the_patch(arch, kind, one_thread):
    pipe = build_pipeline(arch, seed=3)
    assert type(pipe) is kind
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe("a corgi", num_inference_steps=2, height=64, width=96, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    unpatched = generate()
    assert unpatched.shape == (1, 64, 96, 3)
    agentsd.apply_patch(pipe, seed=0)
    patched = generate()
    assert agentsd.phase_history(pipe) == ["agent", "tome"]
    assert not (patched == unpatched).all()
    agentsd.remove_patch(pipe)
    # the same seed gives the same weights
    again = build_pipeline(arch, seed=3)
    assert torch.equal(next(again.unet.parameters()), next(pipe.unet.parameters()))
    assert torch.equal(next(again.vae.parameters()), next(pipe.vae.parameters()))
