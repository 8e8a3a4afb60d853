"""Tables, CSV and the speed-up plot of ``agentsd bench``."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agentsd.tools.bench.command import Phase, Row, Settings

CSV_FIELDS = (
    "arch", "width", "height", "method", "ratio", "batch", "dtype", "device", "step_s", "step_s_rounds",
    "x_vs_unpatched", "bound_over_method", "peak_mib", "x_less_memory", "generate_s_per_image",
)


def _fmt(value: float | None, pattern: str, missing: str = "—") -> str:
    return missing if value is None else format(value, pattern)


def _resolution(row: Row) -> str:
    return f"{row.width}²" if row.width == row.height else f"{row.width}×{row.height}"


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def markdown_table(rows: Sequence[Row]) -> str:
    """One line per row: method, ratio, arch, resolution, time, speed-up, % of bound, memory."""
    generation = any(row.generate_s is not None for row in rows)
    header = ["method", "ratio", "arch", "resolution", "s / step", "× vs unpatched", "% of bound",
              "peak MiB", "× less memory"]
    if generation:
        header.append("s / image")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row.method,
            _fmt(row.ratio, "g"),
            row.arch,
            _resolution(row),
            _fmt(row.step_s, ".3g"),
            _fmt(row.x_vs_unpatched, ".2f") + ("×" if row.x_vs_unpatched is not None else ""),
            _fmt(None if row.bound_fraction is None else 100 * row.bound_fraction, ".0f")
            + ("%" if row.bound_fraction is not None else ""),
            _fmt(_mib(row.peak_bytes), ".0f", "n/a"),
            _fmt(row.x_less_memory, ".2f") + ("×" if row.x_less_memory is not None else ""),
        ]
        if generation:
            cells.append(_fmt(row.generate_s, ".3g"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def footer(settings: Settings, schedule: Sequence[Phase], notes: dict[str, str]) -> list[str]:
    """The definitions and measurement conditions printed under the table."""
    from agentsd.tools.bench.timing import memory_method

    agent = next((p for p in schedule if p.name == "agent"), None)
    weights = " + ".join(f"{p.steps}/{sum(q.steps for q in schedule)} × {p.name} step (t={p.timestep})"
                         for p in schedule)
    lines = [
        f"- s / step: median over {settings.repeats} timed round(s) of one UNet forward at batch "
        f"{settings.batch} (2 = one image with CFG), {settings.dtype_name}, on {settings.device}; every "
        f"round runs every method once (interleaved, alternating order) on the same UNet and the same "
        f"inputs, after {settings.warmup} untimed warm-up round(s)"
        + (" and CUDA synchronisation, timed with CUDA events" if settings.device.type == "cuda" else ""),
        "- × vs unpatched = unpatched time / method time. % of bound = bound time / method time: the share "
        "of the attainable speed reached (100% = as fast as removing the patched self-attentions).",
        "- unpatched: diffusers' default attention processor (AttnProcessor2_0, SDPA).",
        "- bound: the self-attentions AgentSD patches replaced by a processor that returns zeros (the "
        "block's residual passes unchanged), found with agentsd.patch_targets; no patch of those layers "
        "can be faster.",
        "- agentsd-agent: apply_patch(ratio, agent_until=1, merge_until=1), every step in the agent phase "
        "(4×4 cells, agent_ratio 0.95). agentsd-tome: apply_patch(ratio, agent_until=0), the late phase "
        "(ToMe, 2×2 cells).",
        f"- agentsd: apply_patch(ratio) with the default schedule, one step averaged over a "
        f"{sum(p.steps for p in schedule)}-step PNDM run = {weights}; each round times one "
        "step of each phase (phase counts taken from agentsd.phase_history over the 51 PNDM UNet calls; "
        "the phase actually run is checked on the benchmarked UNet).",
        f"- peak MiB: {memory_method(settings.device)}. × less memory = unpatched peak / method peak.",
    ]
    if agent is None:
        lines.append("- note: the default schedule ran no agent phase")
    lines += [f"- {note}." for note in notes.values()]
    if settings.model and settings.steps:
        lines.append(
            f"- s / image: one whole generation of {settings.steps} steps (text encoding, denoising with "
            "the pipeline's own scheduler, VAE decode), divided by its images, median of the rounds; the "
            "patches are applied to the pipeline, so the agentsd schedule follows its real steps."
        )
    return lines


def write_outputs(
    rows: Sequence[Row], settings: Settings, schedule: Sequence[Phase], notes: dict[str, str], command: str
) -> str:
    """Write results.csv, results.md and speedup.png to ``settings.out``; return the markdown report.

    Files are opened exclusively (mode ``x``) unless ``settings.overwrite``, so an existing result is
    never replaced silently.
    """
    from agentsd.tools.bench.command import machine_description, versions

    table = markdown_table(rows)
    report = "\n".join([
        "# agentsd bench",
        "",
        f"- machine: {machine_description(settings.device)}",
        f"- versions: {versions()}",
        f"- command: `{command}`",
        "",
        table,
        "",
        *footer(settings, schedule, notes),
        "",
    ])
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    mode = "w" if settings.overwrite else "x"
    with open(out / "results.md", mode, encoding="utf-8") as f:
        f.write(report)
    with open(out / "results.csv", mode, newline="", encoding="utf-8") as f:
        f.write(csv_text(rows, settings))
    with open(out / "speedup.png", mode + "b") as f:
        plot(rows, settings, f)
    return report


def csv_text(rows: Sequence[Row], settings: Settings) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({
            "arch": row.arch, "width": row.width, "height": row.height, "method": row.method,
            "ratio": "" if row.ratio is None else row.ratio, "batch": settings.batch,
            "dtype": settings.dtype_name, "device": str(settings.device), "step_s": f"{row.step_s:.6g}",
            "step_s_rounds": ";".join(f"{t:.6g}" for t in row.rounds),
            "x_vs_unpatched": _fmt(row.x_vs_unpatched, ".4f", ""),
            "bound_over_method": _fmt(row.bound_fraction, ".4f", ""),
            "peak_mib": _fmt(_mib(row.peak_bytes), ".1f", ""),
            "x_less_memory": _fmt(row.x_less_memory, ".4f", ""),
            "generate_s_per_image": _fmt(row.generate_s, ".6g", ""),
        })
    return buffer.getvalue()


def plot(rows: Sequence[Row], settings: Settings, file) -> None:
    """Speed-up against ratio: a panel per arch × method, a line per resolution, the bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agentsd.tools.bench.command import RATIO_METHODS

    archs = list(dict.fromkeys(row.arch for row in rows))
    methods = [m for m in RATIO_METHODS if any(row.method == m for row in rows)] or ["bound"]
    resolutions = list(dict.fromkeys((row.width, row.height) for row in rows))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(
        len(archs), len(methods), figsize=(4.2 * len(methods), 3.4 * len(archs)), squeeze=False, sharey=True
    )
    for i, arch in enumerate(archs):
        for j, method in enumerate(methods):
            ax = axes[i][j]
            ax.axhline(1.0, color="grey", linewidth=0.8)
            for k, (width, height) in enumerate(resolutions):
                colour = colours[k % len(colours)]
                label = f"{width}²" if width == height else f"{width}×{height}"
                here = [r for r in rows if r.arch == arch and (r.width, r.height) == (width, height)]
                points = sorted((r.ratio, r.x_vs_unpatched) for r in here if r.method == method)
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", color=colour, label=label)
                bound = next((r for r in here if r.method == "bound"), None)
                if bound is not None:
                    ax.axhline(bound.x_vs_unpatched, color=colour, linestyle="--", linewidth=1,
                               label=f"bound {label}")
            ratios = [r.ratio for r in rows if r.ratio is not None]
            ax.set_xlim(0, max([0.55, *(ratio + 0.05 for ratio in ratios)]))
            ax.set_title(f"{arch} · {method}")
            ax.set_xlabel("ratio")
            if j == 0:
                ax.set_ylabel("× vs unpatched (UNet step)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"UNet step speed-up, batch {settings.batch}, {settings.dtype_name}, {settings.device}")
    fig.tight_layout()
    fig.savefig(file, format="png", dpi=110)
    plt.close(fig)
