"""agentsd.tools.loading: device/dtype resolution, schedulers, model reference checks, loading, measuring."""

import json

import huggingface_hub
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from huggingface_hub.errors import GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import _http

from agentsd.tools import loading
from agentsd.tools.loading import ModelLoadError

# the HTTP client huggingface_hub was built on (httpx, or a vendored fork of it)
httpx = getattr(_http, "httpx2", None) or _http.httpx


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert loading.resolve_device("auto").type == expected
    assert loading.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        loading.resolve_device("gpu0")
    # one index past the last CUDA device: "not available" here, "has N device(s)" on a GPU machine
    with pytest.raises(ValueError, match="CUDA"):
        loading.resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_resolve_dtype():
    assert loading.resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert loading.resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert loading.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert loading.resolve_dtype("fp32", torch.device("cuda")) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        loading.resolve_dtype("fp8", torch.device("cpu"))


def test_every_scheduler_builds_from_the_model_config(tiny_pipe):
    original = dict(tiny_pipe.scheduler.config)
    for name in loading.SCHEDULERS:
        loading.set_scheduler(tiny_pipe, name)
        assert type(tiny_pipe.scheduler).__name__ == loading.SCHEDULERS[name]
        # from_config keeps the model's training schedule
        for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule"):
            assert tiny_pipe.scheduler.config[key] == original[key]
    assert isinstance(loading.set_scheduler(tiny_pipe, "dpm++").scheduler, DPMSolverMultistepScheduler)
    assert isinstance(loading.set_scheduler(tiny_pipe, "euler-a").scheduler, EulerAncestralDiscreteScheduler)
    loading.set_scheduler(tiny_pipe, None)  # None keeps the current one
    assert isinstance(tiny_pipe.scheduler, EulerAncestralDiscreteScheduler)
    with pytest.raises(ValueError, match="unknown scheduler 'plms2'"):
        loading.set_scheduler(tiny_pipe, "plms2")


def test_check_local_references(tiny_sd_dir, tmp_path):
    assert loading.check_model_reference(str(tiny_sd_dir)) == "local"
    with pytest.raises(ModelLoadError, match="no such local folder"):
        loading.check_model_reference(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="no such local folder"):
        loading.check_model_reference("./not/here")
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline"):
        loading.check_model_reference(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        loading.check_model_reference(str(tmp_path / "model.safetensors"))


def test_check_hub_reference_offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="offline mode"):
        loading.check_model_reference("someone/some-model")


def _response(status: int):
    request = httpx.Request("HEAD", "https://huggingface.co/someone/some-model/resolve/main/model_index.json")
    return httpx.Response(status, request=request)


@pytest.mark.parametrize(
    "error, message",
    [
        (lambda: RepositoryNotFoundError("404", response=_response(404)), "no such model on the"),
        (lambda: GatedRepoError("403", response=_response(403)), "gated"),
        (lambda: RemoteEntryNotFoundError("404", response=_response(404)), "not a diffusers pipeline"),
        (lambda: httpx.ConnectError("[Errno -2] Name or service not known"), "cannot reach the"),
    ],
)
def test_check_hub_reference_names_the_cause(monkeypatch, error, message):
    """The one request the check makes fails in each way the hub can fail (no network is touched)."""

    def fail(*args, **kwargs):
        raise error()

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", fail)
    with pytest.raises(ModelLoadError, match=message) as info:
        loading.check_model_reference("someone/some-model")
    assert "\n" not in str(info.value)


def test_load_pipeline(tiny_sd_dir):
    pipe = loading.load_pipeline(str(tiny_sd_dir), device="cpu")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    pipe = loading.load_pipeline(str(tiny_sd_dir), task="img2img", dtype=torch.bfloat16, device="cpu")
    assert isinstance(pipe, StableDiffusionImg2ImgPipeline)
    assert pipe.unet.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown task"):
        loading.load_pipeline(str(tiny_sd_dir), task="inpaint")


def test_load_broken_local_pipeline(tmp_path):
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    with pytest.raises(ModelLoadError, match="cannot load the local pipeline") as info:
        loading.load_pipeline(str(tmp_path), device="cpu")
    assert "\n" not in str(info.value)


def test_pndm_means_plms_even_when_the_model_config_lacks_skip_prk_steps(tiny_pipe):
    # a config saved without skip_prk_steps: PNDM's default is the Runge-Kutta warm-up, not PLMS
    config = {k: v for k, v in tiny_pipe.scheduler.config.items() if k != "skip_prk_steps"}
    tiny_pipe.scheduler = PNDMScheduler.from_config(config)
    assert not tiny_pipe.scheduler.config.skip_prk_steps
    loading.set_scheduler(tiny_pipe, "pndm")
    assert tiny_pipe.scheduler.config.skip_prk_steps
    calls = []
    tiny_pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    tiny_pipe("a cat", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2 + 1  # PLMS: one UNet call per step plus its one repeated first step


def test_model_key_is_one_spelling_per_local_folder(tiny_sd_dir, monkeypatch):
    monkeypatch.chdir(tiny_sd_dir.parent)
    relative = f"./{tiny_sd_dir.name}"
    assert loading.model_key(relative) == loading.model_key(str(tiny_sd_dir)) == str(tiny_sd_dir.resolve())
    assert loading.model_key(f"{tiny_sd_dir.name}/") == str(tiny_sd_dir.resolve())
    assert loading.model_key("stable-diffusion-v1-5/stable-diffusion-v1-5") == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )


def _compiled_classes(module) -> list[str]:
    return sorted({type(m).__name__ for m in module.modules() if getattr(m, "_compiled_call_impl", None)})


def test_compile_unet_is_regional_and_undone(tiny_unet):
    """The one compile of the tools (generate --compile, bench --compile): the transformer blocks, in
    place, same output; uncompile_unet leaves every module eager."""
    sample, context = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        eager = tiny_unet(sample, 10, encoder_hidden_states=context).sample
        try:
            assert loading.compile_unet(tiny_unet, "eager") == "regional"
            assert _compiled_classes(tiny_unet) == ["BasicTransformerBlock"]
            compiled = tiny_unet(sample, 10, encoder_hidden_states=context).sample
        finally:
            loading.uncompile_unet(tiny_unet)
            torch._dynamo.reset()
    assert _compiled_classes(tiny_unet) == []
    torch.testing.assert_close(compiled, eager)


def test_compile_unet_compiles_the_whole_model_without_repeated_blocks(tiny_unet):
    tiny_unet._repeated_blocks = []  # a UNet class that declares none
    try:
        assert loading.compile_unet(tiny_unet, "eager") == "whole"
        assert _compiled_classes(tiny_unet) == ["UNet2DConditionModel"]
    finally:
        loading.uncompile_unet(tiny_unet)
    assert _compiled_classes(tiny_unet) == []
