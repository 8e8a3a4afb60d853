"""Prompts for an evaluation run: ImageNet-1k class names or the lines of a text file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

IMAGENET = "imagenet"
DEFAULT_TEMPLATE = "a photo of a {name}"


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names, in class-index order (the first WordNet lemma of each class)."""
    data = resources.files("agentsd.tools.evaluate").joinpath("data/imagenet_classes.txt")
    text = data.read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_prompts(source: str, num_images: int, template: str = DEFAULT_TEMPLATE) -> list[str]:
    """The prompt of every image of a run: image ``i`` gets prompt ``i % len(prompts)``.

    Args:
        source: ``"imagenet"`` for ``template`` filled with each ImageNet-1k class name (2000 images
            give two per class, the paper's setting), or the path of a UTF-8 text file with one
            prompt per line (e.g. COCO captions); blank lines are skipped.
        num_images: how many images the run makes (at least 1).
        template: format string with a ``{name}`` field, used for ``"imagenet"`` only.

    Returns:
        ``num_images`` prompts.

    Raises:
        ValueError: the file is missing, unreadable or has no prompt, or the template has no
            ``{name}`` field.
    """
    if num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {num_images}")
    if source == IMAGENET:
        if "{name}" not in template:
            raise ValueError(f"prompt template {template!r} has no {{name}} field for the class name")
        try:
            base = [template.format(name=name) for name in imagenet_classes()]
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"prompt template {template!r} is not a valid format string ({e})") from None
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"prompt file {source} does not exist (or use --prompts imagenet)")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read prompt file {source}: {e}") from None
        base = [line.strip() for line in lines if line.strip()]
        if not base:
            raise ValueError(f"prompt file {source} has no prompts (it is empty or blank)")
    return [base[i % len(base)] for i in range(num_images)]
