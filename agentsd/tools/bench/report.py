"""Results of ``agentsd bench``: the rows, the markdown report, the CSV, the speed-up plot, and writing them.

Nothing here imports the command: the report is built from :class:`Row` objects and the checked
:class:`~agentsd.tools.bench.config.Plan`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from agentsd.tools.methods import RATIO_KINDS, Method

if TYPE_CHECKING:
    from agentsd.tools.bench.cases import Phase
    from agentsd.tools.bench.config import Plan

CSV_FIELDS = (
    "arch", "width", "height", "method", "kind", "ratio", "compiled", "batch", "dtype", "device", "step_s",
    "step_s_rounds", "x_vs_unpatched", "bound_over_method", "peak_mib", "x_less_memory",
    "generate_s_per_image", "compile_s", "graphs", "graph_breaks", "note",
)


@dataclass
class Row:
    """The measurements of one method on one arch at one size.

    ``step_s`` is ``None`` for a compiled row that could not be timed (``note`` says why).
    """

    arch: str
    width: int
    height: int
    method: Method
    step_s: float | None
    rounds: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    generate_s: float | None = None
    compiled: bool = False
    compile_s: float | None = None  # the first compiled call(s): tracing and code generation
    graphs: int | None = None  # from torch._dynamo.explain
    graph_breaks: int | None = None
    note: str | None = None
    x_vs_unpatched: float | None = None
    bound_fraction: float | None = None
    x_less_memory: float | None = None

    @property
    def label(self) -> str:
        return self.method.name + (" (compiled)" if self.compiled else "")


def relate(group: Sequence[Row]) -> None:
    """Fill the ratios of each row of one arch × size against unpatched and bound.

    Compiled rows are compared with the compiled unpatched and bound rows, eager ones with eager ones.
    """
    for compiled in (False, True):
        rows = [row for row in group if row.compiled == compiled]
        reference = next((row for row in rows if row.method.kind == "unpatched"), None)
        bound = next((row for row in rows if row.method.kind == "bound"), None)
        if reference is None:
            continue
        for row in rows:
            if row.step_s is None or row.step_s <= 0 or reference.step_s is None:
                continue
            row.x_vs_unpatched = reference.step_s / row.step_s
            if bound is not None and bound.step_s is not None:
                row.bound_fraction = bound.step_s / row.step_s
            if reference.peak_bytes and row.peak_bytes and row.peak_bytes > 0:
                row.x_less_memory = reference.peak_bytes / row.peak_bytes


def _fmt(value: float | None, pattern: str, missing: str = "—") -> str:
    return missing if value is None else format(value, pattern)


def _resolution(row: Row) -> str:
    return f"{row.width}²" if row.width == row.height else f"{row.width}×{row.height}"


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def markdown_table(rows: Sequence[Row]) -> str:
    """One line per row: method, ratio, arch, resolution, time, speed-up, % of bound, memory."""
    generation = any(row.generate_s is not None for row in rows)
    compiled = any(row.compiled for row in rows)
    header = ["method", "ratio", "arch", "resolution", "s / step", "× vs unpatched", "% of bound",
              "peak MiB", "× less memory"]
    if generation:
        header.append("s / image")
    if compiled:
        header += ["compile s", "graphs / breaks"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row.label,
            "—" if row.method.ratio is None else f"{row.method.ratio:g}",
            row.arch,
            _resolution(row),
            _fmt(row.step_s, ".3g", row.note or "—"),
            _fmt(row.x_vs_unpatched, ".2f") + ("×" if row.x_vs_unpatched is not None else ""),
            _fmt(None if row.bound_fraction is None else 100 * row.bound_fraction, ".0f")
            + ("%" if row.bound_fraction is not None else ""),
            _fmt(_mib(row.peak_bytes), ".0f", "n/a"),
            _fmt(row.x_less_memory, ".2f") + ("×" if row.x_less_memory is not None else ""),
        ]
        if generation:
            cells.append(_fmt(row.generate_s, ".3g"))
        if compiled:
            cells.append(_fmt(row.compile_s, ".3g"))
            cells.append("—" if row.graphs is None else f"{row.graphs} / {row.graph_breaks}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def footer(plan: Plan, schedule: Sequence[Phase], notes: dict[str, str]) -> list[str]:
    """The definitions and measurement conditions printed under the table."""
    from agentsd.tools.measure import memory_method

    config = plan.config
    agent = next((p for p in schedule if p.name == "agent"), None)
    weights = " + ".join(f"{p.steps}/{sum(q.steps for q in schedule)} × {p.name} step (t={p.timestep})"
                         for p in schedule)
    timer = "CUDA events" if plan.device.type == "cuda" else "a wall clock around the synchronised call"
    lines = [
        f"- s / step: median over {config.repeats} timed round(s) of one UNet forward at batch "
        f"{config.batch} (2 = one image with CFG), {plan.dtype_name}, on {plan.device}, timed with {timer}; "
        f"every round runs every method once (interleaved, alternating order) on the same UNet and the "
        f"same inputs, after {config.warmup} untimed warm-up round(s)",
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
        f"- peak MiB: {memory_method(plan.device)}. × less memory = unpatched peak / method peak.",
    ]
    if agent is None:
        lines.append("- note: the default schedule ran no agent phase")
    lines += [f"- {note}." for note in notes.values()]
    if config.model and config.steps:
        lines.append(
            f"- s / image: one whole generation of {config.steps} steps (text encoding, denoising with "
            "the pipeline's own scheduler, VAE decode), divided by its images, median of the rounds; the "
            "patches are applied to the pipeline, so the agentsd schedule follows its real steps."
        )
    if config.compile:
        lines.append(
            f"- (compiled): the UNet compiled with torch.compile(unet, backend={config.compile_backend!r}) "
            "with the method applied, measured method by method (not interleaved: applying another patch "
            "would recompile); × and % compare with the compiled unpatched and bound rows. compile s: the "
            "first call (tracing and code generation; with agentsd, one first call per phase). graphs / "
            "breaks: torch._dynamo.explain of one step (per phase for agentsd: the larger count), 1 / 0 = "
            "the whole UNet is one graph."
        )
    return lines


def report_text(rows: Sequence[Row], plan: Plan, schedule: Sequence[Phase], notes: dict[str, str],
                command: str) -> str:
    """results.md: machine, versions, command, table, footer."""
    from agentsd.tools.env import machine_description, versions_line

    return "\n".join([
        "# agentsd bench",
        "",
        f"- machine: {machine_description(plan.device)}",
        f"- versions: {versions_line()}",
        f"- command: `{command}`",
        "",
        markdown_table(rows),
        "",
        *footer(plan, schedule, notes),
        "",
    ])


def csv_text(rows: Sequence[Row], plan: Plan) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({
            "arch": row.arch, "width": row.width, "height": row.height, "method": row.method.name,
            "kind": row.method.kind, "ratio": "" if row.method.ratio is None else row.method.ratio,
            "compiled": int(row.compiled), "batch": plan.config.batch, "dtype": plan.dtype_name,
            "device": str(plan.device), "step_s": _fmt(row.step_s, ".6g", ""),
            "step_s_rounds": ";".join(f"{t:.6g}" for t in row.rounds),
            "x_vs_unpatched": _fmt(row.x_vs_unpatched, ".4f", ""),
            "bound_over_method": _fmt(row.bound_fraction, ".4f", ""),
            "peak_mib": _fmt(_mib(row.peak_bytes), ".1f", ""),
            "x_less_memory": _fmt(row.x_less_memory, ".4f", ""),
            "generate_s_per_image": _fmt(row.generate_s, ".6g", ""),
            "compile_s": _fmt(row.compile_s, ".6g", ""),
            "graphs": "" if row.graphs is None else row.graphs,
            "graph_breaks": "" if row.graph_breaks is None else row.graph_breaks,
            "note": row.note or "",
        })
    return buffer.getvalue()


def plot(rows: Sequence[Row], plan: Plan, file) -> None:
    """Speed-up against ratio: a panel per arch × method kind, a line per resolution, the bound dashed."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    archs = list(dict.fromkeys(row.arch for row in rows))
    panels = [(kind, compiled) for compiled in (False, True) for kind in RATIO_KINDS
              if any(row.method.kind == kind and row.compiled == compiled for row in rows)]
    panels = panels or [("bound", False)]
    resolutions = list(dict.fromkeys((row.width, row.height) for row in rows))
    colours = [f"C{i}" for i in range(10)]
    fig = Figure(figsize=(4.2 * len(panels), 3.4 * len(archs)))
    axes = fig.subplots(len(archs), len(panels), squeeze=False, sharey=True)
    ratios = [r.method.ratio for r in rows if r.method.ratio is not None]
    for i, arch in enumerate(archs):
        for j, (kind, compiled) in enumerate(panels):
            ax = axes[i][j]
            ax.axhline(1.0, color="grey", linewidth=0.8)
            for k, (width, height) in enumerate(resolutions):
                colour = colours[k % len(colours)]
                label = f"{width}²" if width == height else f"{width}×{height}"
                here = [r for r in rows if r.arch == arch and (r.width, r.height) == (width, height)
                        and r.compiled == compiled]
                points = sorted((r.method.ratio, r.x_vs_unpatched) for r in here
                                if r.method.kind == kind and r.x_vs_unpatched is not None)
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", color=colour, label=label)
                bound = next((r for r in here if r.method.kind == "bound" and r.x_vs_unpatched), None)
                if bound is not None:
                    ax.axhline(bound.x_vs_unpatched, color=colour, linestyle="--", linewidth=1,
                               label=f"bound {label}")
            ax.set_xlim(0, max([0.55, *(ratio + 0.05 for ratio in ratios)]))
            ax.set_title(f"{arch} · {kind}" + (" (compiled)" if compiled else ""))
            ax.set_xlabel("ratio")
            if j == 0:
                ax.set_ylabel("× vs unpatched (UNet step)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle(f"UNet step speed-up, batch {plan.config.batch}, {plan.dtype_name}, {plan.device}")
    fig.tight_layout()
    fig.savefig(file, format="png", dpi=110)


def publish(out: Path, files: dict[str, bytes | str], overwrite: bool) -> dict[str, Path]:
    """Write ``files`` (name -> content) into ``out`` as one unit; never lose a run.

    With ``overwrite`` the files replace those in ``out``. Without, if a file of the same name
    appeared since the run was checked (a concurrent run into the same folder), the whole set is
    written under the next free suffix instead (``results-2.md``, ``results-2.csv``, ...), so both
    runs keep their results.

    Returns:
        name -> the path it was written to.
    """
    from agentsd.tools.files import write_unit

    out.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        suffix = "" if attempt == 1 else f"-{attempt}"
        paths = {name: out / (Path(name).stem + suffix + Path(name).suffix) for name in files}
        if not overwrite and any(path.exists() for path in paths.values()):
            continue
        try:
            write_unit([(paths[name], data) for name, data in files.items()], overwrite=overwrite)
        except FileExistsError:  # lost a race for these names: take the next ones
            continue
        return paths
    raise FileExistsError(f"{out}: results-2 to results-999 all exist")
