import huggingface_hub
import pytest
import torch
from diffusers import StableDiffusionPipeline

from tests.tiny import build_pipeline, make_unet

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """Folder holding a tiny random-weight Stable Diffusion pipeline (loadable with from_pretrained)."""
    return build_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture
def tiny_pipe(tiny_sd_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_unet():
    return make_unet()


@pytest.fixture
def tiny_sdxl_unet():
    return make_unet(sdxl_like=True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread than on two contended ones; module-wide, because a
    different thread count changes float sums and so pixels between images compared in a module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline(monkeypatch):
    """Make any hub access fail fast instead of trying the network."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
