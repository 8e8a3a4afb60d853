"""Results of an evaluation: the paper-style Markdown table, a CSV and an FID-vs-time plot."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agentsd.tools.methods import Method

CSV_FIELDS = (
    "method", "family", "ratio", "images", "fid", "fid_delta", "s_per_image", "speedup",
    "gb_per_image", "memory_reduction", "peak_gb", "clip_score",
)


@dataclass
class Row:
    """Measurements of one method. ``None`` marks a value that was not measured.

    Attributes:
        method: the method.
        images: number of images the quality metrics were computed on.
        fid: FID against the reference set (the real images, or the baseline's images).
        clip: mean CLIP score of the images against their prompts.
        s_per_image: seconds per image (synchronised wall time of whole generations / images).
        gb_per_image: growth of peak GPU memory, in GB, when the batch grows by one image.
        peak_gb: peak GPU memory of a generation at the run's batch size, in GB.
    """

    method: Method
    images: int = 0
    fid: float | None = None
    clip: float | None = None
    s_per_image: float | None = None
    gb_per_image: float | None = None
    peak_gb: float | None = None


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is not positive."""
    if a is None or b is None or b <= 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def relative(row: Row, baseline: Row | None) -> dict[str, float | None]:
    """Speed-up (×-faster), memory reduction (×-less) and FID difference of ``row`` against the baseline."""
    if baseline is None or row is baseline:
        return {"speedup": None, "memory_reduction": None, "fid_delta": None}
    fid_delta = None if row.fid is None or baseline.fid is None else row.fid - baseline.fid
    return {
        "speedup": _ratio(baseline.s_per_image, row.s_per_image),
        "memory_reduction": _ratio(baseline.gb_per_image, row.gb_per_image),
        "fid_delta": fid_delta,
    }


def _baseline(rows: Sequence[Row]) -> Row | None:
    return next((r for r in rows if r.method.family == "baseline"), None)


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[Row], fid_reference: str | None) -> str:
    """The table in the paper's layout, with ×-faster, ×-less and the FID difference in brackets.

    Args:
        rows: one per method, the baseline's first if it is there.
        fid_reference: ``"real"`` (FID to real images: the difference to the baseline is shown),
            ``"baseline"`` (FID to the baseline's own images: the baseline row is the reference) or
            ``None`` (no FID computed).
    """
    base = _baseline(rows)
    lines = [
        "| Method | r% | FID ↓ | Time (s/im) ↓ | Memory (GB/im) ↓ | CLIP ↑ |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        rel = relative(row, base)
        if row is base and fid_reference == "baseline":
            fid = "ref."
        else:
            fid = _num(row.fid)
            if rel["fid_delta"] is not None:
                fid += f" ({rel['fid_delta']:+.2f})"
        time = _num(row.s_per_image)
        if rel["speedup"] is not None:
            time += f" ({rel['speedup']:.2f}× faster)"
        memory = _num(row.gb_per_image)
        if rel["memory_reduction"] is not None:
            memory += f" ({rel['memory_reduction']:.2f}× less)"
        percent = f"{row.method.ratio * 100:g}"
        lines.append(
            f"| {row.method.label} | {percent} | {fid} | {time} | {memory} | {_num(row.clip)} |"
        )
    return "\n".join(lines) + "\n"


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


FID_NOTES = {
    "baseline": "distance to the baseline's own images (same prompts and seeds), not to real images: "
    "how far a method drifts from the unpatched model.",
    "real": "distance to the real images of --ref-dir; (±x.xx) is the difference to the baseline.",
    None: "not computed.",
}


def write_markdown(
    path: Path, rows: Sequence[Row], fid_reference: str | None, header: Sequence[str]
) -> None:
    """``results.md``: a title, the run's settings (``header`` lines), the table and notes.

    ``fid_reference`` is as in :func:`markdown_table`.
    """
    notes = [
        "",
        "FID: " + FID_NOTES[fid_reference],
        "Time: synchronised wall time of whole generations (all steps, VAE decode included) / images.",
        "Memory: growth of peak GPU memory when the batch grows by one image (– where not measured, "
        "e.g. on CPU).",
        "CLIP: torchmetrics CLIPScore, 100 × cosine similarity of image and prompt, mean over images.",
    ]
    text = "# AgentSD evaluation\n\n" + "".join(f"- {line}\n" for line in header) + "\n"
    text += markdown_table(rows, fid_reference) + "\n".join(notes) + "\n"
    _replace(Path(path), text)


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    """``results.csv``: one line per method with raw values and the ratios to the baseline."""
    base = _baseline(rows)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            values = {
                "method": row.method.name, "family": row.method.family, "ratio": row.method.ratio,
                "images": row.images, "fid": row.fid, "s_per_image": row.s_per_image,
                "gb_per_image": row.gb_per_image, "peak_gb": row.peak_gb, "clip_score": row.clip,
                **relative(row, base),
            }
            writer.writerow({k: "" if v is None else v for k, v in values.items()})
    os.replace(tmp, path)


def plot_fid_vs_time(path: Path, rows: Sequence[Row], fid_label: str) -> None:
    """``fid_vs_time.png``: FID against seconds per image, one line per method family (points
    labelled with r%); the baseline is a star, or a dashed vertical line when it has no FID."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    ax = fig.add_subplot()
    plotted = False
    for family in ("tome", "agentsd"):
        points = sorted(
            (r.s_per_image, r.fid, r.method.ratio)
            for r in rows
            if r.method.family == family and r.s_per_image is not None and r.fid is not None
        )
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=Method(family).label)
        for x, y, ratio in points:
            ax.annotate(f"{ratio * 100:g}%", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        plotted = True
    base = _baseline(rows)
    if base is not None and base.s_per_image is not None:
        if base.fid is not None:
            ax.plot([base.s_per_image], [base.fid], marker="*", markersize=12, linestyle="", label="Baseline")
        else:
            ax.axvline(base.s_per_image, linestyle="--", color="gray", label="Baseline time")
        plotted = True
    if not plotted:
        ax.text(0.5, 0.5, "no method has both an FID and a time", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("Time (s / image) ↓")
    ax.set_ylabel(f"{fid_label} ↓")
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
