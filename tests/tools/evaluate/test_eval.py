"""agentsd eval: prompts, method specs, torchmetrics FID / CLIP, full runs, resuming, sharding.

Everything runs offline on CPU with the tiny pipeline (2 steps, 32 px), a small FID feature extractor
module and a tiny random CLIP model saved to a folder and loaded by path.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from agentsd.tools.cli import main
from agentsd.tools.evaluate import images as imgs
from agentsd.tools.evaluate.command import EvalConfig, run_eval
from agentsd.tools.evaluate.metrics import clip_metric, clip_score, fid_metric, fid_score
from agentsd.tools.prompts import imagenet_classes, load_prompts
from tests.tiny import _write_char_tokenizer

REPO = Path(__file__).resolve().parents[3]
TINY = dict(steps=2, resolution=32, num_images=4, batch_size=2, progress=False)


class TinyFeatures(nn.Module):
    """FID features for tests: mean colour of each cell of a 2x2 grid (12 numbers per image)."""

    num_features = 12

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        return F.adaptive_avg_pool2d(x, 2).flatten(1)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIPModel + CLIPProcessor saved to a folder.

    The final layer norms get a positive bias and the projections positive weights, so image and text
    embeddings share a positive direction and the CLIP score (clipped at 0) is well above 0.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = _write_char_tokenizer(folder / "tokenizer")
    tokenizer.model_max_length = 64
    text = dict(vocab_size=514, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                num_hidden_layers=2, max_position_embeddings=64, bos_token_id=512, eos_token_id=513,
                pad_token_id=513)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    with torch.no_grad():
        model.vision_model.post_layernorm.bias.fill_(2.0)
        model.text_model.final_layer_norm.bias.fill_(2.0)
        model.visual_projection.weight.abs_()
        model.text_projection.weight.abs_()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(folder / "clip")
    processor.save_pretrained(folder / "clip")
    return folder / "clip"


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def method_images(out: Path, method: str, count: int = 4) -> list[np.ndarray]:
    return [pixels(imgs.image_path(out / method, i)) for i in range(count)]


# ---------------------------------------------------------------- prompts and methods


def test_imagenet_classes_are_the_1000_in_index_order():
    names = imagenet_classes()
    assert len(names) == 1000
    assert all(name and name == name.strip() for name in names)
    assert names[0] == "tench" and names[1] == "goldfish" and names[207] == "golden retriever"
    assert names[999] == "toilet tissue"


def test_imagenet_prompts_cycle_through_classes():
    prompts = load_prompts("imagenet", 2000)
    assert len(prompts) == 2000
    assert prompts[1] == "a photo of a goldfish"
    assert prompts[1001] == prompts[1] and prompts[999] == "a photo of a toilet tissue"
    assert load_prompts("imagenet", 3, "{name}, high quality") == ["tench, high quality",
                                                                   "goldfish, high quality",
                                                                   "great white shark, high quality"]


def test_prompt_file_and_its_errors(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red cube\n\n  a blue ball  \n", encoding="utf-8")
    assert load_prompts(str(path), 5) == ["a red cube", "a blue ball"] * 2 + ["a red cube"]
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="has no prompts"):
        load_prompts(str(tmp_path / "empty.txt"), 4)
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"), 4)
    with pytest.raises(ValueError, match="no {name} field"):
        load_prompts("imagenet", 4, "a photo")


# ---------------------------------------------------------------- metrics through torchmetrics


def test_fid_with_a_feature_extractor_module():
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 200, (24, 3, 16, 16), generator=g, dtype=torch.uint8)
    metric = fid_metric(TinyFeatures())
    metric.update(real, real=True)
    same = fid_score(metric, [real[:12], real[12:]])
    shifted = fid_score(metric, [(real.int() + 50).clamp(max=255).to(torch.uint8)])
    assert abs(same) < 1e-4
    assert shifted > 0.1
    assert fid_score(metric, [real]) == pytest.approx(same, abs=1e-6)  # the reference survives resets


def test_inception_fid_needs_torch_fidelity(monkeypatch):
    import torchmetrics.utilities.imports as tm_imports

    monkeypatch.setattr(tm_imports, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(ValueError, match=r"needs the torch-fidelity package: pip install 'agentsd\[eval\]'"):
        fid_metric(2048)


def test_clip_score_from_a_local_folder(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 40, 48), generator=g, dtype=torch.uint8)
    texts = ["a red cube", "a blue ball", "a photo of a tench"]
    score = clip_score(clip_metric(str(tiny_clip_dir)), [(images[:2], texts[:2]), (images[2:], texts[2:])])

    model, processor = CLIPModel.from_pretrained(tiny_clip_dir), CLIPProcessor.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        pixel_values = processor(images=list(images), return_tensors="pt")["pixel_values"]
        tokens = processor(text=texts, return_tensors="pt", padding=True)
        image_emb = model.get_image_features(pixel_values=pixel_values)
        text_emb = model.get_text_features(**tokens)
    image_emb = getattr(image_emb, "pooler_output", image_emb)
    text_emb = getattr(text_emb, "pooler_output", text_emb)
    expected = (100 * F.cosine_similarity(image_emb, text_emb)).mean().item()
    assert expected > 10  # the fixture makes the score informative, not clipped to 0
    assert score == pytest.approx(expected, rel=1e-4)


def test_clip_model_that_cannot_load(tmp_path):
    with pytest.raises(ValueError, match="cannot load CLIP model"):
        clip_metric(str(tmp_path / "nothing-here"))


# ---------------------------------------------------------------- full runs


@pytest.fixture(scope="module")
def first_run(tiny_sd_dir, tiny_clip_dir, tmp_path_factory):
    """One full evaluation: unpatched, ToMeSD and AgentSD at 50%, FID to unpatched, CLIP, timing.

    It runs on one thread, as each process of the 2-process test does (torchrun's default): another
    thread count sums floats in another order and can move a pixel by one level.
    """
    out = tmp_path_factory.mktemp("eval") / "run"
    cfg = EvalConfig(model=str(tiny_sd_dir), out=str(out), methods=["unpatched", "tomesd:0.5", "agentsd:0.5"],
                     clip_model=str(tiny_clip_dir), time_batches=1, **TINY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = run_eval(cfg, fid_feature=TinyFeatures()).rows
    finally:
        torch.set_num_threads(threads)
    return cfg, rows, out


def test_full_run_writes_every_row(first_run):
    cfg, rows, out = first_run
    assert [r.method.name for r in rows] == ["unpatched", "tomesd:0.5", "agentsd:0.5"]
    for slug in ("unpatched", "tomesd-0.5", "agentsd-0.5"):
        assert sorted(p.name for p in (out / slug).iterdir()) == [f"{i:05d}.png" for i in range(4)]
        assert all(imgs.is_complete_png(imgs.image_path(out / slug, i), (32, 32)) for i in range(4))
    # the patches change the images, the unpatched model is the FID reference
    base = method_images(out, "unpatched")
    for slug in ("tomesd-0.5", "agentsd-0.5"):
        assert any(np.abs(a - b).max() > 0 for a, b in zip(base, method_images(out, slug), strict=True))

    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| Method | r% | FID ↓ | Time (s/im) ↓ | Memory (GB/im) ↓ | CLIP ↑ |" in table
    assert "| Unpatched | 0 | ref. |" in table
    assert "| ToMeSD | 50 |" in table and "| AgentSD | 50 |" in table
    assert "× faster" in table

    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        lines = list(csv.DictReader(f))
    assert [line["method"] for line in lines] == ["unpatched", "tomesd:0.5", "agentsd:0.5"]
    assert lines[0]["fid"] == "" and lines[0]["speedup"] == ""
    for line in lines:
        assert float(line["s_per_image"]) > 0 and float(line["clip_score"]) > 0
        # CPU: the process's sampled RSS (agentsd.tools.measure), a number of either sign for tiny models
        assert float(line["peak_gb"]) > 0.05 and line["gb_per_image"] != ""
    for line in lines[1:]:
        assert float(line["fid"]) > 0 and float(line["speedup"]) > 0
    with Image.open(out / "fid_vs_time.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 300


def test_rerun_with_real_images_reuses_images_and_reports_bad_files(first_run, tmp_path, capsys):
    cfg, _, out = first_run
    ref = tmp_path / "real"
    ref.mkdir()
    g = torch.Generator().manual_seed(3)
    for i in range(5):
        array = torch.randint(0, 256, (40, 56, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(array).save(ref / f"real{i}.jpg")
    (ref / "broken.png").write_bytes(b"not an image")
    (ref / "notes.txt").write_text("ignored: not an image suffix")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if p.parent != out}

    cfg = EvalConfig(**{**cfg.__dict__, "ref_dir": str(ref), "clip": False, "time_batches": 0})
    rows = run_eval(cfg, fid_feature=TinyFeatures()).rows

    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing regenerated
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image(s) in --ref-dir" in err
    assert "--ref-dir has 5 readable images; FID with 12 features needs at least 12" in err
    assert all(r.fid is not None and r.fid > 0 for r in rows)  # unpatched has an FID to real images
    assert "| Unpatched | 0 | " in (out / "results.md").read_text(encoding="utf-8")


def test_resume_regenerates_only_missing_or_broken_images(first_run, tmp_path):
    cfg, _, first = first_run
    out = tmp_path / "copy"
    shutil.copytree(first, out)  # copy2 keeps the mtimes
    expected = {slug: method_images(first, slug) for slug in ("unpatched", "tomesd-0.5", "agentsd-0.5")}
    imgs.image_path(out / "agentsd-0.5", 1).unlink()
    imgs.image_path(out / "tomesd-0.5", 3).unlink()
    broken = imgs.image_path(out / "unpatched", 2)
    broken.write_bytes(broken.read_bytes()[:60])  # a half-written file must not count as finished
    (out / "unpatched" / ".00000.png.123.tmp").write_bytes(b"left over by a crash")
    redo = {imgs.image_path(out / "agentsd-0.5", 1), imgs.image_path(out / "tomesd-0.5", 3), broken}
    before = {p: p.stat().st_mtime_ns for p in out.rglob("[0-9]*.png") if p not in redo}

    cfg = EvalConfig(**{**cfg.__dict__, "out": str(out), "fid": False, "clip": False, "time_batches": 0})
    run_eval(cfg)

    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert all(p.is_file() for p in redo)
    for slug, images in expected.items():
        # remade alone in a batch of one, each image is still the image of its seed (exact here; one
        # level of tolerance because a batch of another size may use other float kernels)
        assert all(np.abs(a - b).max() <= 1 for a, b in zip(images, method_images(out, slug), strict=True))


def test_two_processes_make_the_same_images_as_one(first_run, tmp_path):
    """`accelerate launch` with 2 CPU processes, methods in reverse order, vs the one-process run.

    accelerate 1.15's `--cpu` launcher starts a single process unless MPI is set up, so the two CPU
    processes are started through the torchrun launcher (`--multi_gpu`); agentsd eval then uses gloo.
    """
    cfg, _, one = first_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), "-m", "agentsd", "eval", "--model", cfg.model, "--out", str(two),
           "--methods", "agentsd:0.5", "tomesd:0.5", "unpatched", "--num-images", "4", "--batch-size", "2",
           "--steps", "2", "--resolution", "32", "--no-fid", "--no-clip", "--time-batches", "0",
           "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(2 process(es) generating)" in (two / "results.md").read_text(encoding="utf-8")
    for slug in ("unpatched", "tomesd-0.5", "agentsd-0.5"):
        for a, b in zip(method_images(one, slug), method_images(two, slug), strict=True):
            assert np.array_equal(a, b), slug


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "unpatched", "warp:0.3"], "unknown method 'warp:0.3'"),
        (["--methods", "tomesd:0.4"], "FID to the unpatched model needs the unpatched method"),
        (["--prompts", "{empty}"], "has no prompts"),
        (["--ref-dir", "{nowhere}"], "is not a folder"),
        (["--resolution", "30"], "--resolution 30: sizes must be positive multiples of 8"),
        (["--num-images", "1"], "FID needs at least 2 images"),
        (["--model", "{nowhere}"], "no such local folder"),
        (["--fid-weights", "{nowhere}"], "is not a file"),
        (["--time-batches", "-1"], "--time-batches must be non-negative"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tiny_sd_dir, tmp_path, capsys, extra, message):
    (tmp_path / "empty.txt").write_text("\n")
    extra = [e.format(empty=tmp_path / "empty.txt", nowhere=tmp_path / "nowhere") for e in extra]
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(tiny_sd_dir), "--out", str(out), "--no-clip", "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_ref_dir_without_readable_images(tiny_sd_dir, tmp_path, capsys):
    ref = tmp_path / "real"
    ref.mkdir()
    (ref / "a.jpg").write_bytes(b"garbage")
    rc = main(["eval", "--model", str(tiny_sd_dir), "--out", str(tmp_path / "out"), "--ref-dir", str(ref),
               "--methods", "unpatched", "--no-clip", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 2  # the warning about the skipped file, then the error
    assert "skipped 1 unreadable image(s)" in err and "has 0 readable image(s); FID needs at least 2" in err
    assert not (tmp_path / "out").exists()


def test_output_folder_made_with_other_settings_is_refused(first_run, capsys):
    cfg, _, out = first_run
    before = sorted(p.stat().st_mtime_ns for p in out.rglob("*"))
    rc = main(["eval", "--model", cfg.model, "--out", str(out), "--steps", "3", "--resolution", "32",
               "--num-images", "4", "--no-fid", "--no-clip", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds images made with other settings (steps 2 -> 3)" in err
    assert sorted(p.stat().st_mtime_ns for p in out.rglob("*")) == before
