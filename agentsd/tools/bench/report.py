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
    "status", "sdpa_kernel", "agentsd_settings", "steps", "scheduler", "generate_s_rounds",
    "generate_x_vs_unpatched", "generate_gb_per_image", "generate_x_less_memory",
)
MEASURED, PENDING = "measured", "pending"
GB = 1e9  # decimal, as the paper's GB/im

# The paper's own speed table (Han et al. 2024, Table 5: SD v1.5, 512², 50 PLMS steps, RTX 4090; its
# baseline attention was no flash kernel): (kind, ratio) -> (seconds per image, GB per image).
PAPER = {
    ("unpatched", None): (2.62, 3.13),
    **{("tomesd", r): v for r, v in zip((0.1, 0.2, 0.3, 0.4, 0.5), (
        (2.40, 2.55), (2.15, 2.03), (1.90, 2.09), (1.71, 1.69), (1.53, 1.47)), strict=True)},
    **{("agentsd", r): v for r, v in zip((0.1, 0.2, 0.3, 0.4, 0.5), (
        (1.97, 1.77), (1.80, 1.60), (1.65, 2.05), (1.54, 1.55), (1.42, 1.21)), strict=True)},
}
PAPER_KINDS = ("unpatched", "tomesd", "agentsd")


@dataclass
class Row:
    """The measurements of one method on one arch at one size.

    ``step_s`` is ``None`` where no step was timed: a run of generations only, a row still
    ``pending`` (``status``), or a compiled row that could not be timed (``note`` says why).
    ``generate_*`` are whole generations (per image), ``None`` where none was timed.
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
    status: str = MEASURED  # or PENDING: planned, not measured (yet)
    generate_rounds: list[float] = field(default_factory=list)  # seconds per image, one per round
    generate_peak_bytes: int | None = None  # peak memory a generation adds, per image
    generate_x: float | None = None
    generate_x_less_memory: float | None = None
    scheduler: str | None = None  # of the generations

    @property
    def label(self) -> str:
        return self.method.name + (" (compiled)" if self.compiled else "")

    @property
    def measured(self) -> bool:
        return self.status == MEASURED


def relate(group: Sequence[Row]) -> None:
    """Fill the ratios of each row of one arch × size against unpatched and bound.

    Compiled rows are compared with the compiled unpatched and bound rows, eager ones with eager ones;
    generations with the unpatched generations.
    """
    for compiled in (False, True):
        rows = [row for row in group if row.compiled == compiled]
        reference = next((row for row in rows if row.method.kind == "unpatched"), None)
        bound = next((row for row in rows if row.method.kind == "bound"), None)
        if reference is None:
            continue
        for row in rows:
            if reference.generate_s and row.generate_s:
                row.generate_x = reference.generate_s / row.generate_s
                if reference.generate_peak_bytes and row.generate_peak_bytes and row.generate_peak_bytes > 0:
                    row.generate_x_less_memory = reference.generate_peak_bytes / row.generate_peak_bytes
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


def _times(value: float | None, suffix: str = "×") -> str:
    return _fmt(value, ".2f") + (suffix if value is not None else "")


def markdown_table(rows: Sequence[Row]) -> str:
    """One line per row: method, ratio, arch, resolution, time, speed-up, % of bound, memory of a step."""
    compiled = any(row.compiled for row in rows)
    header = ["method", "ratio", "arch", "resolution", "s / step", "× vs unpatched", "% of bound",
              "peak MiB", "× less memory"]
    if compiled:
        header += ["compile s", "graphs / breaks"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row.label,
            "—" if row.method.ratio is None else f"{row.method.ratio:g}",
            row.arch,
            _resolution(row),
            PENDING if not row.measured else _fmt(row.step_s, ".3g", row.note or "—"),
            _times(row.x_vs_unpatched),
            _fmt(None if row.bound_fraction is None else 100 * row.bound_fraction, ".0f")
            + ("%" if row.bound_fraction is not None else ""),
            _fmt(_mib(row.peak_bytes), ".0f", "n/a" if row.measured else "—"),
            _times(row.x_less_memory),
        ]
        if compiled:
            cells.append(_fmt(row.compile_s, ".3g"))
            cells.append("—" if row.graphs is None else f"{row.graphs} / {row.graph_breaks}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gb(value: int | None) -> float | None:
    return None if value is None else value / GB


def generation_table(rows: Sequence[Row]) -> str:
    """One line per row: method, ratio, arch, resolution, seconds and GB per image of whole generations."""
    header = ["method", "ratio", "arch", "resolution", "s / image", "× vs unpatched", "GB / image",
              "× less memory"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row.label,
            "—" if row.method.ratio is None else f"{row.method.ratio:g}",
            row.arch,
            _resolution(row),
            _fmt(row.generate_s, ".3g") if row.measured else PENDING,
            _times(row.generate_x),
            _fmt(_gb(row.generate_peak_bytes), ".2f", "n/a" if row.measured else "—"),
            _times(row.generate_x_less_memory),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_table(rows: Sequence[Row], with_paper: bool) -> str:
    """The paper's layout (Method, r%, s/im, GB/im, with ×-faster and ×-less against unpatched).

    Args:
        rows: generation rows of one arch × size; the kinds of the paper's table are shown.
        with_paper: add the paper's own figures (for its setting: SD v1.5, 512², 50 PLMS steps).
    """
    header = "| Method | r% | s/im ↓ | GB/im ↓ |"
    rule = "|---|---:|---:|---:|"
    if with_paper:
        header += " paper s/im (RTX 4090) | paper GB/im |"
        rule += "---:|---:|"
    lines = [header, rule]
    reference = PAPER[("unpatched", None)]
    for row in rows:
        if row.method.kind not in PAPER_KINDS or row.compiled:
            continue
        if not row.measured:
            time = memory = PENDING
        else:
            time = _fmt(row.generate_s, ".2f")
            memory = _fmt(_gb(row.generate_peak_bytes), ".2f", "n/a")
            if row.method.kind != "unpatched" and row.generate_x:
                time += f" ({row.generate_x:.2f}× faster)"
            if row.method.kind != "unpatched" and row.generate_x_less_memory:
                memory += f" ({row.generate_x_less_memory:.2f}× less)"
        line = f"| {row.method.label} | {row.method.percent} | {time} | {memory} |"
        if with_paper:
            paper = PAPER.get((row.method.kind, row.method.ratio))
            if paper is None:
                line += " — | — |"
            elif row.method.kind == "unpatched":
                line += f" {paper[0]:.2f} | {paper[1]:.2f} |"
            else:
                line += (f" {paper[0]:.2f} ({reference[0] / paper[0]:.2f}×) |"
                         f" {paper[1]:.2f} ({reference[1] / paper[1]:.2f}× less) |")
        lines.append(line)
    return "\n".join(lines)


def paper_setting(plan: Plan, row: Row) -> bool:
    """Whether ``row`` was measured in the paper's setting: SD v1.5, 512², 50 PLMS steps."""
    scheduler = plan.config.scheduler in (None, "pndm")
    return (plan.config.model is None and row.arch == "sd15" and (row.width, row.height) == (512, 512)
            and plan.config.steps == 50 and scheduler)


def footer(plan: Plan, schedule: Sequence[Phase], notes: dict[str, str]) -> list[str]:
    """The definitions and measurement conditions printed under the tables."""
    from agentsd.tools.measure import memory_method

    config = plan.config
    agent = next((p for p in schedule if p.name == "agent"), None)
    weights = " + ".join(f"{p.steps}/{sum(q.steps for q in schedule)} × {p.name} step (t={p.timestep})"
                         for p in schedule)
    timer = "CUDA events" if plan.device.type == "cuda" else "a wall clock around the synchronised call"
    lines = []
    if plan.steps_timed:
        lines.append(
            f"- s / step: median over {config.repeats} timed round(s) of one UNet forward at batch "
            f"{config.batch} (2 = one image with CFG), {plan.dtype_name}, on {plan.device}, timed with "
            f"{timer}; every round runs every method once (interleaved, alternating order) on the same "
            f"UNet and the same inputs, after {config.warmup} untimed warm-up round(s)"
        )
    if plan.generations_timed:
        lines.append(
            f"- s / image: median over {config.repeats} timed round(s) of one whole generation of "
            f"{config.steps} steps (text encoding, denoising with the pipeline's scheduler, VAE decode) "
            f"of {max(1, config.batch // 2)} image(s), divided by its images, {plan.dtype_name}, on "
            f"{plan.device}, timed with {timer}; methods interleaved round by round, after "
            f"{config.warmup} untimed warm-up round(s); the patches are applied to the pipeline, so "
            "the agentsd schedule follows its real steps. "
            + ("Random weights: the real architecture's text encoder(s), UNet and VAE from the configs in "
               "agentsd/tools/configs/, a byte-level stand-in tokenizer (the text encoders see 77 "
               "tokens either way); the images are noise." if config.model is None else "")
        )
    lines += [
        "- × vs unpatched = unpatched time / method time. % of bound = bound time / method time: the share "
        "of the attainable speed reached (100% = as fast as removing the patched self-attentions).",
        "- unpatched: diffusers' default attention processor (AttnProcessor2_0, SDPA).",
        f"- SDPA kernel: {_KERNELS[config.sdpa_kernel]}, for every method.",
        "- bound: the self-attentions AgentSD patches replaced by a processor that returns zeros (the "
        "block's residual passes unchanged), found with agentsd.patch_targets; no patch of those layers "
        "can be faster.",
        "- agentsd-agent: apply_patch(ratio, agent_until=1, merge_until=1), every step in the agent phase "
        "(4×4 cells, agent_ratio 0.95). agentsd-tome: apply_patch(ratio, agent_until=0), the late phase "
        "(ToMe, 2×2 cells).",
    ]
    if plan.patch:
        settings = ", ".join(f"{name}={value!r}" for name, value in plan.patch.items())
        lines.append(f"- AgentSD settings of every AgentSD method: {settings}.")
    if plan.steps_timed:
        lines.append(
            f"- agentsd: apply_patch(ratio) with the default schedule, one step averaged over a "
            f"{sum(p.steps for p in schedule)}-step PNDM run = {weights}; each round times one "
            "step of each phase (phase counts taken from agentsd.phase_history over the 51 PNDM UNet calls; "
            "the phase actually run is checked on the benchmarked UNet)."
        )
        lines.append(f"- peak MiB: {memory_method(plan.device)}. × less memory = unpatched peak / method "
                     "peak.")
        if agent is None:
            lines.append("- note: the default schedule ran no agent phase")
    if plan.generations_timed:
        lines.append(
            f"- GB / image (GB/im): the peak memory one generation adds above the loaded pipeline, divided "
            f"by its images, in GB (10⁹ bytes); read as {memory_method(plan.device)}; measured in the last "
            "warm-up round. (agentsd eval's GB/im is the growth of that peak when the batch grows by one "
            "image instead.)"
        )
    lines += [f"- {note}." for note in notes.values()]
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


_KERNELS = {
    "default": "torch's own choice (flash or memory-efficient attention where they apply)",
    "math": "the math kernel only (torch.nn.attention.sdpa_kernel(SDPBackend.MATH): the softmax "
            "materialised, as the paper's baseline)",
}


def status_line(rows: Sequence[Row], stopped: str | None) -> str:
    """Whether the table is complete; else how many rows are still missing and why."""
    missing = sum(not row.measured for row in rows)
    if not missing:
        return f"- status: complete, {len(rows)} rows"
    why = (f"the run stopped ({stopped})" if stopped is not None
           else "the run was still measuring when this was written; if it is no longer running, it was "
                "killed")
    return (f"- status: **incomplete**: {len(rows) - missing} of {len(rows)} rows measured; the {missing} "
            f"rows marked {PENDING} are missing ({why})")


def report_text(rows: Sequence[Row], plan: Plan, schedule: Sequence[Phase], notes: dict[str, str],
                command: str, stopped: str | None = None) -> str:
    """results.md: machine, versions, command, status, tables, footer.

    Args:
        rows: every planned row, the ones not measured yet with status ``pending``.
        plan: the run.
        schedule: AgentSD's default schedule (the ``agentsd`` rows' weights).
        notes: a note per model (which level tomesd patched).
        command: the command line of the run.
        stopped: why the run stopped before measuring every row, or ``None``.
    """
    from agentsd.tools.env import machine_description, versions_line

    lines = [
        "# agentsd bench",
        "",
        f"- machine: {machine_description(plan.device)}",
        f"- versions: {versions_line()}",
        f"- command: `{command}`",
        status_line(rows, stopped),
        "",
    ]
    if plan.steps_timed:
        lines += ["## One UNet step", "", markdown_table(rows), ""]
    if plan.generations_timed:
        eager = [row for row in rows if not row.compiled]
        lines += ["## Whole generations", "", generation_table(eager), ""]
        groups = list(dict.fromkeys((row.arch, row.width, row.height) for row in eager))
        for arch, width, height in groups:
            group = [row for row in eager if (row.arch, row.width, row.height) == (arch, width, height)]
            if not any(row.method.kind in ("tomesd", "agentsd") for row in group):
                continue
            here = group[0]
            with_paper = paper_setting(plan, here)
            lines += [f"### In the paper's layout: {arch}, {_resolution(here)}, {plan.config.steps} steps, "
                      f"SDPA kernel {plan.config.sdpa_kernel}", "", paper_table(group, with_paper), ""]
            if with_paper:
                lines += ["The paper's columns are its own figures (Han et al. 2024: RTX 4090, a baseline "
                          "attention that was no flash kernel); × against its unpatched row.", ""]
    return "\n".join([*lines, *footer(plan, schedule, notes), ""])


def csv_text(rows: Sequence[Row], plan: Plan) -> str:
    """results.csv: every row, unrounded; ``status`` says which are still ``pending``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    settings = ";".join(f"{name}={value}" for name, value in plan.patch.items())
    for row in rows:
        generation = plan.generations_timed and not row.compiled
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
            "status": row.status,
            "sdpa_kernel": plan.config.sdpa_kernel,
            "agentsd_settings": settings,
            "steps": plan.config.steps if generation else "",
            "scheduler": (row.scheduler or "") if generation else "",
            "generate_s_rounds": ";".join(f"{t:.6g}" for t in row.generate_rounds),
            "generate_x_vs_unpatched": _fmt(row.generate_x, ".4f", ""),
            "generate_gb_per_image": _fmt(_gb(row.generate_peak_bytes), ".4f", ""),
            "generate_x_less_memory": _fmt(row.generate_x_less_memory, ".4f", ""),
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
    unit = "UNet step" if plan.steps_timed else "whole generation"

    def speedup(row: Row) -> float | None:
        return row.x_vs_unpatched if plan.steps_timed else row.generate_x

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
                points = sorted((r.method.ratio, speedup(r)) for r in here
                                if r.method.kind == kind and speedup(r) is not None)
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", color=colour, label=label)
                bound = next((r for r in here if r.method.kind == "bound" and speedup(r)), None)
                if bound is not None:
                    ax.axhline(speedup(bound), color=colour, linestyle="--", linewidth=1,
                               label=f"bound {label}")
            ax.set_xlim(0, max([0.55, *(ratio + 0.05 for ratio in ratios)]))
            ax.set_title(f"{arch} · {kind}" + (" (compiled)" if compiled else ""))
            ax.set_xlabel("ratio")
            if j == 0:
                ax.set_ylabel(f"× vs unpatched ({unit})")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle(f"{unit} speed-up, batch {plan.config.batch}, {plan.dtype_name}, {plan.device}, "
                 f"SDPA kernel {plan.config.sdpa_kernel}")
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
