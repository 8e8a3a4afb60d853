"""Results of an evaluation: the paper-style Markdown table, a CSV and an FID-vs-time plot.

The results of a folder accumulate (the tools' policy, :mod:`agentsd.tools.reports`): :func:`write`
merges the rows of this run into those already in ``results.csv``, so adding a method to a finished
run keeps every earlier row.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from agentsd.tools import reports
from agentsd.tools.methods import Method, parse_method

if TYPE_CHECKING:
    from agentsd.tools.evaluate.config import Plan

CSV_FIELDS = (
    "method", "kind", "ratio", "images", "fid", "fid_reference", "fid_delta", "s_per_image", "speedup",
    "gb_per_image", "memory_reduction", "peak_gb", "clip_score",
)
FID_REFERENCES = ("real", "unpatched")


@dataclass
class Row:
    """Measurements of one method; ``None`` marks a value that was not measured."""

    method: Method
    images: int = 0  # the quality metrics were computed on
    fid: float | None = None
    # what fid compares with: "real" (--ref-dir), "unpatched" (the unpatched model's images; that
    # row itself is the reference) or None
    fid_reference: str | None = None
    clip: float | None = None  # mean CLIP score of the images against their prompts
    s_per_image: float | None = None  # synchronised time of whole generations / images
    gb_per_image: float | None = None  # growth of the peak when the batch grows by one image
    peak_gb: float | None = None  # peak memory added by a generation at the run's batch size


_MEASURED = ("fid", "clip", "s_per_image", "gb_per_image", "peak_gb")


def merge_rows(old: Sequence[Row], new: Sequence[Row]) -> list[Row]:
    """Rows of ``old`` and ``new`` by method, in table order.

    A method of ``new`` takes every value this run measured; what it did not measure (``None``:
    e.g. ``--time-batches 0`` or ``--no-fid``) keeps the value on disk. FID and its reference go
    together.
    """
    merged = {row.method: row for row in old}
    for row in new:
        before = merged.get(row.method)
        if before is not None:
            values = {f.name: getattr(row, f.name) for f in fields(Row)}
            for name in _MEASURED:
                if values[name] is None:
                    values[name] = getattr(before, name)
                    if name == "fid":
                        values["fid_reference"] = before.fid_reference
            row = Row(**values)
        merged[row.method] = row
    return sorted(merged.values(), key=lambda r: r.method.order)


def _number(text: str | None) -> float | None:
    if text in (None, ""):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def read_csv(path: Path) -> list[Row]:
    """The rows of a ``results.csv`` written by :func:`csv_text` (or before the method names were
    unified: ``baseline``, ``tome:R`` are read as ``unpatched``, ``tomesd:R``); ``[]`` if absent.

    Raises:
        ValueError: the file cannot be read as results (the message names it).
    """
    lines = reports.read_csv(path)
    rows = []
    try:
        # files written before the fid_reference column: the FID was to real images iff the
        # unpatched (baseline) row has one
        unpatched_fid = any(line["method"] in ("baseline", "unpatched") and line.get("fid") for line in lines)
        for line in lines:
            reference = line.get("fid_reference") or None
            if reference is None and line.get("fid"):
                reference = "real" if unpatched_fid else "unpatched"
            rows.append(Row(
                method=parse_method(line["method"]), images=int(line.get("images") or 0),
                fid=_number(line.get("fid")), fid_reference=reference, clip=_number(line.get("clip_score")),
                s_per_image=_number(line.get("s_per_image")), gb_per_image=_number(line.get("gb_per_image")),
                peak_gb=_number(line.get("peak_gb")),
            ))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is not a results file of agentsd eval ({error}): move it away") from None
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is not positive."""
    if a is None or b is None or b <= 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def relative(row: Row, reference: Row | None) -> dict[str, float | None]:
    """Speed-up (×-faster), memory reduction (×-less) and FID difference of ``row`` against unpatched."""
    if reference is None or row is reference:
        return {"speedup": None, "memory_reduction": None, "fid_delta": None}
    comparable = row.fid_reference == reference.fid_reference == "real"
    return {
        "speedup": _ratio(reference.s_per_image, row.s_per_image),
        "memory_reduction": _ratio(reference.gb_per_image, row.gb_per_image),
        "fid_delta": row.fid - reference.fid if comparable and None not in (row.fid, reference.fid) else None,
    }


def _unpatched(rows: Sequence[Row]) -> Row | None:
    return next((r for r in rows if r.method.kind == "unpatched"), None)


def _num(value: float | None, digits: int = 2) -> str | None:
    return None if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[Row]) -> str:
    """The table in the paper's layout, with ×-faster, ×-less and the FID difference in brackets.

    FID to the unpatched model's images shows ``ref.`` on the unpatched row; FID to real images
    shows its difference to the unpatched row. A row whose FID has another reference than the
    others is marked with its reference.
    """
    base = _unpatched(rows)
    references = {r.fid_reference for r in rows if r.fid is not None}
    cells = []
    for row in rows:
        rel = relative(row, base)
        if row is base and row.fid is None and "unpatched" in references:
            fid = "ref."
        else:
            fid = _num(row.fid) or reports.MISSING
            if rel["fid_delta"] is not None:
                fid += f" ({rel['fid_delta']:+.2f})"
            if row.fid is not None and len(references) > 1:
                fid += f" (to {row.fid_reference})"
        time_ = _num(row.s_per_image) or reports.MISSING
        if rel["speedup"] is not None:
            time_ += f" ({rel['speedup']:.2f}× faster)"
        memory = _num(row.gb_per_image) or reports.MISSING
        if rel["memory_reduction"] is not None:
            memory += f" ({rel['memory_reduction']:.2f}× less)"
        cells.append([row.method.label, row.method.percent, fid, time_, memory, _num(row.clip)])
    header = ["Method", "r%", "FID ↓", "Time (s/im) ↓", "Memory (GB/im) ↓", "CLIP ↑"]
    return reports.markdown_table(header, cells, align="lrrrrr")


FID_NOTES = {
    "unpatched": "FID to the unpatched model's own images (same prompts and seeds), not to real images: "
    "how far a method drifts from the unpatched model.",
    "real": "FID to the real images of --ref-dir; (±x.xx) is the difference to the unpatched model.",
}


def markdown_text(rows: Sequence[Row], header: Sequence[str], memory_note: str) -> str:
    """``results.md``: a title, the run's settings (``header`` lines), the table and notes."""
    used = {r.fid_reference for r in rows if r.fid is not None}
    references = [ref for ref in FID_REFERENCES if ref in used]
    notes = [""]
    notes += [FID_NOTES[ref] for ref in references] or ["FID: not computed."]
    notes += [
        "Time: synchronised time of whole generations (all steps, VAE decode included) / images.",
        f"Memory: growth of the peak when the batch grows by one image; peak read as {memory_note}.",
        "CLIP: torchmetrics CLIPScore, 100 × cosine similarity of image and prompt, mean over images.",
        "Rows of earlier runs into this folder are kept; a method run again takes the values it measured.",
    ]
    text = "# AgentSD evaluation\n\n" + "".join(f"- {line}\n" for line in header) + "\n"
    return text + markdown_table(rows) + "\n".join(notes) + "\n"


def csv_text(rows: Sequence[Row]) -> str:
    """``results.csv``: one line per method with raw values and the ratios to unpatched."""
    base = _unpatched(rows)
    return reports.csv_text(CSV_FIELDS, ({
        "method": row.method.name, "kind": row.method.kind, "ratio": row.method.ratio or 0.0,
        "images": row.images, "fid": row.fid,
        "fid_reference": row.fid_reference if row.fid is not None else None,
        "s_per_image": row.s_per_image, "gb_per_image": row.gb_per_image, "peak_gb": row.peak_gb,
        "clip_score": row.clip, **relative(row, base),
    } for row in rows))


def plot_fid_vs_time(rows: Sequence[Row]):
    """``fid_vs_time.png``: FID against seconds per image, one line per method family (kind and block
    merges, e.g. ``agentsd+mlp``; points labelled with r%);
    unpatched is a star, or a dashed vertical line when it has no FID."""
    fig = reports.figure(6.4, 4.4)
    ax = fig.add_subplot()
    plotted = False
    for family in dict.fromkeys(r.method.family for r in rows if r.method.ratio is not None):
        points = sorted(
            ((r.s_per_image, r.fid, r.method) for r in rows
             if r.method.family == family and r.s_per_image is not None and r.fid is not None),
            key=lambda point: point[:2],
        )
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=points[0][2].label)
        for x, y, method in points:
            ax.annotate(f"{method.percent}%", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        plotted = True
    base = _unpatched(rows)
    if base is not None and base.s_per_image is not None:
        if base.fid is not None:
            ax.plot([base.s_per_image], [base.fid], marker="*", markersize=12, linestyle="",
                    label="Unpatched")
        else:
            ax.axvline(base.s_per_image, linestyle="--", color="gray", label="Unpatched time")
        plotted = True
    if not plotted:
        ax.text(0.5, 0.5, "no method has both an FID and a time", ha="center", va="center",
                transform=ax.transAxes)
    references = {r.fid_reference for r in rows if r.fid is not None}
    ax.set_xlabel("Time (s / image) ↓")
    ax.set_ylabel(("FID" if references == {"real"} else "FID to unpatched") + " ↓")
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend()
    fig.tight_layout()
    return fig


def header(plan: Plan, dtype, fid, fid_feature, real_count: int | None, device, processes: int) -> list[str]:
    """The settings lines at the top of results.md."""
    import torch

    from agentsd.tools.env import versions_line

    cfg = plan.config
    against = (f"{real_count} real images in `{cfg.ref_dir}`" if real_count is not None
               else "the unpatched model's own images")
    extractor = (f"InceptionV3, {fid_feature} features" if isinstance(fid_feature, int)
                 else f"feature extractor {type(fid_feature).__name__}")
    timing = (f"timing: batch size {cfg.batch_size}, {cfg.time_batches} timed batch(es) after a warm-up"
              if cfg.time_batches else "timing: not measured in this run")
    prompts = cfg.prompts + (f' ("{cfg.template}")' if cfg.prompts == "imagenet" else "")
    guidance = "the pipeline's" if cfg.guidance is None else f"{cfg.guidance:g}"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return [
        f"model: `{cfg.model}`, {plan.size[1]}×{plan.size[0]}, {cfg.steps} steps "
        f"({cfg.scheduler or 'its own scheduler'}), guidance {guidance}, {str(dtype).removeprefix('torch.')}"
        f", seeds {cfg.seed}…{cfg.seed + cfg.num_images - 1}",
        f"prompts: {prompts}, {cfg.num_images} images per method",
        "FID: not computed in this run" if fid is None else f"FID: against {against}; {extractor}",
        f"CLIP model: {cfg.clip_model if cfg.clip else 'not computed in this run'}",
        f"{timing}, on {device_name} ({processes} process(es) generating)",
        f"{versions_line(('agentsd', 'diffusers', 'torch'))}, {time.strftime('%Y-%m-%d %H:%M')}",
    ]


def write(
    out: Path, rows: Sequence[Row], lines: Sequence[str], memory_note: str
) -> tuple[list[Row], list[Path]]:
    """Merge ``rows`` into the results in ``out`` and write results.csv, the plot and results.md
    (with the ``lines`` of :func:`header`) as one unit; returns the whole table and the paths."""

    return reports.update_results(out, rows, lambda folder: read_csv(folder / "results.csv"), merge_rows,
                                  lambda table: [("results.csv", csv_text(table)),
                                                 ("fid_vs_time.png", reports.png(plot_fid_vs_time(table))),
                                                 ("results.md", markdown_text(table, lines, memory_note))])
