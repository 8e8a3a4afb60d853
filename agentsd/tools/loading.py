"""Pipeline plumbing shared by the command-line tools: device, dtype, scheduler, loading.

Nothing here parses command lines. Problems a user can fix are raised as
:class:`~agentsd.tools.errors.UsageError` (a ``ValueError``; :class:`ModelLoadError` for models) with
one line that names the problem, so a CLI can print them without a traceback. diffusers is
imported lazily: building the CLI parser stays fast.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from agentsd.tools.errors import UsageError, first_line

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# scheduler name -> diffusers class name (resolved lazily by scheduler_class)
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",  # PLMS (the paper's sampler) with SD's config: skip_prk_steps=True
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TASKS = ("text2img", "img2img")


class ModelLoadError(UsageError):
    """A model that cannot be found, fetched or loaded; the message says which and why in one line."""


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for ``name``.

    Args:
        name: ``"auto"`` (recommended: CUDA, then Apple MPS, then CPU), or any torch device string
            such as ``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"cpu"``.

    Raises:
        UsageError: for a malformed name or a device this machine does not have.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {name!r}: Apple MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device {name!r}: only cpu, cuda and mps are supported")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The weight dtype for ``name`` on ``device``.

    Args:
        name: ``None`` or ``"auto"`` (recommended: fp16 on CUDA, fp32 elsewhere, where half precision
            is slow or unsupported), or one of ``"fp32"``, ``"fp16"``, ``"bf16"``.
        device: the device the pipeline will run on.
    """
    if name in (None, "auto"):
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}: use auto, {', '.join(DTYPES)}") from None


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class registered as ``name`` in :data:`SCHEDULERS`."""
    if name not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")
    import diffusers

    return getattr(diffusers, SCHEDULERS[name])


# settings that make a registered name mean one sampler whatever the model's config says:
# "pndm" is PLMS, the paper's sampler; without skip_prk_steps PNDM runs Runge-Kutta warm-up steps
SCHEDULER_OVERRIDES = {"pndm": {"skip_prk_steps": True}}


def build_scheduler(name: str, config):
    """The scheduler ``name`` built from another scheduler's ``config``, with :data:`SCHEDULER_OVERRIDES`.

    ``from_config`` keeps the model's beta schedule and prediction type, so any scheduler works with
    any checkpoint; ``"pndm"`` always means PLMS (``skip_prk_steps=True``).
    """
    return scheduler_class(name).from_config(config, **SCHEDULER_OVERRIDES.get(name, {}))


def scheduler_name(name: str | None, config) -> str | None:
    """The registered scheduler a run uses: ``name``, or for the model's own (``None``) ``"pndm"`` when
    the model's (``config``) is PNDM: every tool runs a PNDM model as PLMS, as SD's own config says
    (``skip_prk_steps``; PNDM's Runge-Kutta warm-up fails below 4 steps); ``None`` otherwise."""
    return "pndm" if name is None and config.get("_class_name") == "PNDMScheduler" else name


def set_scheduler(pipe, name: str | None):
    """Swap ``pipe.scheduler`` for the scheduler ``name`` (see :func:`build_scheduler`).

    ``None`` keeps the model's own scheduler (PNDM as PLMS: :func:`scheduler_name`). Returns ``pipe``.
    """
    name = scheduler_name(name, pipe.scheduler.config)
    if name is not None:
        pipe.scheduler = build_scheduler(name, pipe.scheduler.config)
    return pipe


def scheduler_config(model: str) -> dict | None:
    """The model's ``scheduler/scheduler_config.json`` from its local folder or the hub cache, without
    loading the model; ``None`` where it is not at hand (e.g. a hub model not downloaded yet)."""
    from huggingface_hub import try_to_load_from_cache

    name = "scheduler/scheduler_config.json"
    path = Path(model).expanduser()
    found = path / name if path.is_dir() else try_to_load_from_cache(model, name)
    try:
        config = json.loads(Path(found).read_text(encoding="utf-8"))
    except (OSError, TypeError, ValueError):  # TypeError: not cached
        return None
    return config if isinstance(config, dict) else None


def model_key(model: str) -> str:
    """One spelling per model, for comparing settings: a local folder as its absolute resolved path
    (``./m/pipe``, ``m/pipe/`` and ``/abs/m/pipe`` are the same model), a hub id unchanged."""
    path = Path(model).expanduser()
    if path.exists() or _looks_like_path(model):
        return str(path.resolve())
    return model


def _looks_like_path(model: str) -> bool:
    """True when ``model`` can only be meant as a local path (a hub id is ``name`` or ``owner/name``)."""
    if model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1:
        return True
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        return True
    return False


def _is_network_error(error: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return True
    if isinstance(error, HfHubHTTPError):
        return False
    module = type(error).__module__.split(".")[0]
    return isinstance(error, (ConnectionError, TimeoutError)) or module in ("httpx", "httpx2", "requests")


def _hub_error(model: str, error: BaseException) -> ModelLoadError:
    """Translate a huggingface_hub error about ``model`` into one line naming the cause."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, GatedRepoError):
        return ModelLoadError(
            f"model {model!r}: the hub repository is gated; accept its licence on huggingface.co and log "
            "in with `hf auth login`"
        )
    if isinstance(error, RepositoryNotFoundError):
        return ModelLoadError(
            f"model {model!r}: no such model on the Hugging Face hub (check the id; private models need "
            "`hf auth login`), and no local folder of that name"
        )
    if isinstance(error, RevisionNotFoundError):
        return ModelLoadError(f"model {model!r}: the requested revision does not exist on the hub")
    if isinstance(error, EntryNotFoundError):
        return ModelLoadError(
            f"model {model!r}: the hub repository is not a diffusers pipeline (it has no model_index.json)"
        )
    if _is_network_error(error):
        return ModelLoadError(
            f"model {model!r}: cannot reach the Hugging Face hub (network unreachable or offline mode) and "
            "the model is not in the local cache; connect, or pass a local pipeline folder"
        )
    return ModelLoadError(f"model {model!r}: {first_line(error)}")


def check_model_reference(model: str) -> str:
    """Cheap check, before loading, that ``model`` names a diffusers pipeline that can be loaded.

    A local folder must contain ``model_index.json``. A hub id is looked up in the local cache, then
    (unless ``HF_HUB_OFFLINE`` is set) with one request for its ``model_index.json``: no weights are
    downloaded and nothing is retried.

    Args:
        model: a hub id (``owner/name``) or a path to a folder saved with ``save_pretrained``.

    Returns:
        ``"local"`` or ``"hub"``.

    Raises:
        ModelLoadError: one line saying whether the local path, the hub id or the network is at fault.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"model {model!r}: is a file; give a diffusers pipeline folder (save_pretrained) or a hub id"
            )
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"model {model!r}: the local folder is not a diffusers pipeline (no model_index.json)"
            )
        return "local"
    if _looks_like_path(model):
        raise ModelLoadError(f"model {model!r}: no such local folder (and not a valid hub id)")

    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        return "hub"
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(
            f"model {model!r}: offline mode (HF_HUB_OFFLINE) is on and the model is not in the local cache, "
            "and there is no local folder of that name"
        )
    try:
        get_hf_file_metadata(hf_hub_url(model, "model_index.json"), timeout=10)
    except Exception as error:  # every failure becomes one line naming its cause
        raise _hub_error(model, error) from error
    return "hub"


@contextlib.contextmanager
def _quiet_loading(progress: bool) -> Iterator[None]:
    """Hide notices that are noise to a user loading a pipeline: transformers' warnings about optional
    backends (e.g. "requires torchvision") and diffusers' ``torch_dtype`` rename (it still accepts
    ``torch_dtype``, which older releases need); and, without ``progress``, the loading bars.
    Errors still show."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    bars = (diffusers_logging, transformers_logging) if not progress else ()
    for library in bars:
        library.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*`torch_dtype` is deprecated", category=FutureWarning)
            yield
    finally:
        transformers_logging.set_verbosity(level)
        for library in bars:
            library.enable_progress_bar()


def load_pipeline(
    model: str = DEFAULT_MODEL,
    *,
    task: str = "text2img",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
):
    """Load a diffusers pipeline by hub id or local folder, for text-to-image or image-to-image.

    diffusers' AutoPipeline classes read the pipeline class from the model itself, so SD 1.x / 2.x,
    SDXL and other UNet pipelines load alike.

    Args:
        model: hub id or local folder; checked first with :func:`check_model_reference`.
        task: ``"text2img"`` or ``"img2img"``.
        dtype: weight dtype; ``None`` = :func:`resolve_dtype` ``(None, device)``.
        device: where to move the pipeline; ``None`` = :func:`resolve_device` ``("auto")``.
        progress: show diffusers' and transformers' loading progress bars.

    Raises:
        ModelLoadError: the model cannot be found, fetched or loaded (one line naming the cause).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    device = resolve_device("auto") if device is None else torch.device(device)
    dtype = resolve_dtype(None, device) if dtype is None else dtype
    where = check_model_reference(model)
    source = str(Path(model).expanduser()) if where == "local" else model
    try:
        with _quiet_loading(progress):
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

            auto = AutoPipelineForText2Image if task == "text2img" else AutoPipelineForImage2Image
            pipe = auto.from_pretrained(source, torch_dtype=dtype)
    except Exception as error:  # reported as one line naming the cause
        if where == "hub":
            raise _hub_error(model, error) from error
        message = f"model {model!r}: cannot load the local pipeline: {first_line(error)}"
        raise ModelLoadError(message) from error
    return pipe.to(device)


# torch.compile modes of inductor: reduce-overhead records CUDA graphs (a GPU replays a graph's kernel
# launches at once), which is what eager SD lacks where the host's launches set the step time
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
COMPILE_MODE_HELP = ("torch.compile mode of --compile (inductor): default; reduce-overhead (CUDA graphs: "
                     "recommended on a GPU where eager steps are launch-bound, as SD 1.5 up to 1024² on an "
                     "H200); max-autotune-no-cudagraphs")


def check_compile_mode(compile: bool, mode: str, backend: str = "inductor") -> None:
    """Refuse a ``--compile-mode`` that would do nothing: without ``--compile``, or with a backend
    other than inductor (which ignores modes)."""
    if mode == "default":
        return
    if mode not in COMPILE_MODES:
        raise UsageError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if not compile:
        raise UsageError(f"--compile-mode {mode} applies to a compiled UNet: add --compile")
    if backend != "inductor":
        raise UsageError(f"--compile-mode {mode} needs --compile-backend inductor (the {backend} backend "
                         "ignores modes)")


def compile_unet(unet, backend: str = "inductor", mode: str = "default") -> str:
    """Compile ``unet`` in place as diffusers recommends; returns the scope, ``"regional"`` or ``"whole"``.

    Regional compilation (diffusers' ``compile_repeated_blocks``) compiles the transformer blocks, where
    agentsd and tomesd work, and leaves the rest of the UNet eager: blocks of one shape share their
    graphs, so compiling costs a few block graphs rather than one graph of the whole UNet. A UNet that
    declares no repeated blocks is compiled whole (``nn.Module.compile``). Both compile the modules in
    place, so a patch applied before or after is traced with them (a patch change recompiles); tomesd
    must be applied after, since it swaps the blocks' class. Graph breaks are allowed, so a method that
    has them (tomesd) still compiles; agentsd has none (``tests/test_compile.py``). ``agentsd generate
    --compile`` and ``agentsd bench --compile`` both compile through here.

    Args:
        unet: a diffusers UNet (or any ``nn.Module``).
        backend: the ``torch.compile`` backend: ``"inductor"`` (generated kernels, recommended),
            ``"aot_eager"`` or ``"eager"`` (tracing only, to check what dynamo sees).
        mode: inductor's mode: ``"default"``; ``"reduce-overhead"`` (CUDA graphs, for GPUs where the
            host's kernel launches set the step time); ``"max-autotune-no-cudagraphs"``.
    """
    settings = {"backend": backend, **({"mode": mode} if mode != "default" else {})}
    if getattr(unet, "_repeated_blocks", None) and hasattr(unet, "compile_repeated_blocks"):
        unet.compile_repeated_blocks(**settings)
        return "regional"
    unet.compile(**settings)
    return "whole"


def uncompile_unet(unet) -> None:
    """Undo :func:`compile_unet`: every module of ``unet`` runs eagerly again."""
    for module in unet.modules():
        # nn.Module.compile keeps its compiled call here; torch has no public way to drop it
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
