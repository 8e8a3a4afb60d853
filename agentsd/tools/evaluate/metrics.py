"""Image-quality metrics of an evaluation, from torchmetrics: FID and CLIP score.

Nothing here computes a metric by hand: these are thin constructors and feeding loops around
``torchmetrics.image.fid.FrechetInceptionDistance`` and ``torchmetrics.multimodal.CLIPScore``, and
the main process's pass over a run's images (:func:`compute_metrics`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from agentsd.tools.errors import UsageError, first_line
from agentsd.tools.evaluate import images as imgs
from agentsd.tools.methods import Method

if TYPE_CHECKING:
    from agentsd.tools.evaluate.config import Plan
    from agentsd.tools.evaluate.report import Row

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
FID_FEATURES = 2048
METRIC_BATCH = 32


def warn(message: str) -> None:
    print(f"agentsd eval: warning: {message}", file=sys.stderr)


def fid_metric(feature: int | nn.Module = FID_FEATURES, weights_path: str | Path | None = None):
    """A ``FrechetInceptionDistance`` that keeps its reference (real) features across ``reset()``.

    Args:
        feature: 2048 (recommended, the standard pool3 features of InceptionV3; 64, 192 and 768 are
            the other torch-fidelity layers), or an ``nn.Module`` mapping uint8 images
            ``(B, 3, H, W)`` to ``(B, D)`` features (for tests or other backbones).
        weights_path: local InceptionV3 weights (torch-fidelity's ``pt_inception-2015-12-05``
            file) to use instead of downloading them; InceptionV3 only.

    Raises:
        UsageError: torch-fidelity (needed for InceptionV3) is missing, the weights file does not
            exist, or the feature extractor cannot be built.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    kwargs = {}
    if isinstance(feature, int):
        if not _TORCH_FIDELITY_AVAILABLE:
            raise UsageError(
                "FID with InceptionV3 needs the torch-fidelity package: pip install 'agentsd[eval]' "
                "(or pass --no-fid)"
            )
        if weights_path is not None:
            if not Path(weights_path).is_file():
                raise UsageError(f"--fid-weights {weights_path} is not a file")
            kwargs["feature_extractor_weights_path"] = str(weights_path)
    elif weights_path is not None:
        raise UsageError("weights_path applies to the InceptionV3 feature extractor only")
    try:
        return FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=False, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:  # e.g. no network to download the weights
        raise UsageError(f"cannot build the FID feature extractor: {first_line(e)}") from None


class _ClipFeatures(nn.Module):
    """A CLIPModel whose ``get_*_features`` return the projected embeddings as tensors.

    transformers 5 returns a ``BaseModelOutputWithPooling`` (embeddings in ``pooler_output``) where
    torchmetrics 1.9 expects a tensor (Lightning-AI/torchmetrics PR #3428, open); this adapter
    works with both transformers 4 and 5.
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _tensor(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.clip.get_text_features(*args, **kwargs))


def _load_clip(name: str):
    from transformers import CLIPModel, CLIPProcessor

    return _ClipFeatures(CLIPModel.from_pretrained(name).eval()), CLIPProcessor.from_pretrained(name)


def clip_metric(model: str = DEFAULT_CLIP_MODEL):
    """A ``CLIPScore`` with a CLIP model loaded by transformers from a hub id or a local folder.

    torchmetrics (1.9) only takes the hub ids it lists by name, so the model and processor are
    handed to it through its loader-callable argument instead; any CLIP checkpoint works.

    Args:
        model: hub id or folder of a ``CLIPModel`` + ``CLIPProcessor``. ViT-L/14
            (``openai/clip-vit-large-patch14``, the torchmetrics default) is recommended;
            ``openai/clip-vit-base-patch16`` is a smaller alternative. Scores are only comparable
            between runs with the same CLIP model.

    Raises:
        UsageError: the model cannot be loaded (missing folder, no network, not a CLIP model).
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    try:
        return CLIPScore(model_name_or_path=functools.partial(_load_clip, str(model)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"cannot load CLIP model {model}: {first_line(e)}") from None


@torch.no_grad()
def feed_fid(metric, batches: Iterable[torch.Tensor], real: bool) -> int:
    """Add uint8 image batches ``(B, 3, H, W)`` to one side of an FID metric; returns the image count."""
    device = metric.device
    count = 0
    for images in batches:
        if len(images):
            metric.update(images.to(device), real=real)
            count += len(images)
    return count


@torch.no_grad()
def fid_score(metric, fake_batches: Iterable[torch.Tensor]) -> float:
    """FID between the metric's reference features and ``fake_batches`` (which replace any before)."""
    metric.reset()  # drops the previous method's features, keeps the reference
    feed_fid(metric, fake_batches, real=False)
    return float(metric.compute())


@torch.no_grad()
def clip_score(metric, batches: Iterable[tuple[torch.Tensor, Sequence[str]]]) -> float:
    """Mean CLIP score (100 x cosine similarity, clipped at 0) of uint8 image batches and their prompts."""
    metric.reset()
    for images, prompts in batches:
        metric.update(images.to(metric.device), list(prompts))
    return float(metric.compute())


# ---------------------------------------------------------------- a run's metrics (main process)


def feed_reference(ref_dir: str, size: tuple[int, int], fid=None, device: torch.device | None = None) -> int:
    """Decode the images of ``--ref-dir`` into ``fid``'s real features; returns how many were used.

    Images are decoded completely (a truncated JPEG passes Pillow's ``verify``). Without ``fid`` it
    stops at the second good one: the check that fails fast, before any model is built.

    Raises:
        UsageError: fewer than 2 images decode (unreadable ones are skipped with a warning).
    """
    good, bad = 0, []
    if fid is not None:
        fid.to(device)
    try:
        paths = imgs.list_images(Path(ref_dir))
        for batch, skipped in imgs.iter_batches(paths, METRIC_BATCH if fid is not None else 1, size):
            good, bad = good + len(batch), bad + skipped
            if fid is not None:
                feed_fid(fid, [batch], real=True)
            elif good >= 2:
                return good
    finally:
        if fid is not None:
            fid.cpu()
    if bad:
        warn(f"skipped {len(bad)} unreadable image(s) in --ref-dir {ref_dir} (e.g. {bad[0]})")
    if good < 2:
        raise UsageError(f"--ref-dir {ref_dir} has {good} readable image(s); FID needs at least 2")
    return good


def _generated(folder: Path, count: int, size: tuple[int, int] | None) -> Iterator[torch.Tensor]:
    """The images ``0 .. count - 1`` of a method's folder, in uint8 batches."""
    for start in range(0, count, METRIC_BATCH):
        try:
            batch = [imgs.load_uint8(imgs.image_path(folder, i), size)
                     for i in range(start, min(start + METRIC_BATCH, count))]
        except UsageError as e:
            raise UsageError(f"{e} (run the same command again to remake it)") from None
        yield torch.stack(batch)


def compute_metrics(plan: Plan, rows: dict[Method, Row], fid, clip, real_count: int | None,
                    device: torch.device, progress: bool) -> None:
    """FID and CLIP score of every method's images into ``rows`` (a metric of ``None`` is skipped);
    ``real_count`` is how many ``--ref-dir`` images ``fid`` holds, ``None``: the unpatched model's are the
    reference."""
    from tqdm import tqdm

    n = plan.config.num_images
    steps = (1 if fid is not None else 0) + len(plan.methods) * ((fid is not None) + (clip is not None))
    if steps == 0:
        return
    bar = tqdm(total=steps, desc="metrics", unit="set", disable=not progress)
    if fid is not None:
        fid.to(device)
        reference = "real" if real_count is not None else "unpatched"
        if real_count is None:  # the real features of --ref-dir are in already
            feed_fid(fid, _generated(plan.out / Method("unpatched").slug, n, plan.size), real=True)
        bar.update()
        for method in plan.methods:
            if reference == "real" or method.kind != "unpatched":
                rows[method].fid = fid_score(fid, _generated(plan.out / method.slug, n, plan.size))
                rows[method].fid_reference = reference
            bar.update()
        fid.cpu()
    if clip is not None:
        clip.to(device)
        for method in plan.methods:
            prompts = (plan.prompts[i : i + METRIC_BATCH] for i in range(0, n, METRIC_BATCH))
            batches = zip(_generated(plan.out / method.slug, n, None), prompts, strict=True)
            rows[method].clip = clip_score(clip, batches)
            bar.update()
        clip.cpu()
    bar.close()
