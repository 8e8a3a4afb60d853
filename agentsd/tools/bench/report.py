"""Results of ``agentsd bench``: the rows, a run's markdown report, its lines of the CSV, and the
speed-up plot of every run's lines, in the shared writers' tables (:mod:`agentsd.tools.reports`).

Nothing here imports the command or writes a file (:mod:`agentsd.tools.bench.output` does): the
report is built from :class:`Row` objects and the checked :class:`~agentsd.tools.bench.config.Plan`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agentsd.tools import reports
from agentsd.tools.methods import MAX_RATIO, Method, parse_method

if TYPE_CHECKING:
    from agentsd.tools.bench.cases import Phase
    from agentsd.tools.bench.config import Plan

CSV_FIELDS = (
    "arch", "width", "height", "method", "kind", "ratio", "compiled", "batch", "dtype", "device", "step_s",
    "step_s_rounds", "x_vs_unpatched", "bound_over_method", "peak_mib", "x_less_memory",
    "generate_s_per_image", "compile_s", "graphs", "graph_breaks", "note",
    "status", "sdpa_kernel", "agentsd_settings", "steps", "scheduler", "generate_s_rounds",
    "generate_x_vs_unpatched", "generate_gb_per_image", "generate_x_less_memory", "batch_size", "guidance",
    "run", "compile_mode", "host_share",
)
MEASURED, PENDING = "measured", "pending"
ASYNC_DEVICES = ("cuda", "mps")  # devices that run a step's kernels after the host has issued them
# a line of the plot each
CONDITIONS = ("device", "dtype", "batch", "sdpa_kernel", "agentsd_settings", "compile_mode")
GB = 1e9  # decimal, as the paper's GB/im
PLOT_COLUMNS = 4  # panels per row of speedup.png (a run of every method family has eight)

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
    # host seconds / device seconds of a step, where the device runs asynchronously (CUDA, MPS)
    host_share: float | None = None
    generate_s: float | None = None
    compiled: bool = False
    compile_s: float | None = None  # the first compiled call(s): tracing and code generation
    graphs: int | None = None  # dynamo graphs of the compiled first calls
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


def _fmt(value: float | None, pattern: str) -> str | None:
    return None if value is None else format(value, pattern)


def _resolution(row: Row) -> str:
    return f"{row.width}²" if row.width == row.height else f"{row.width}×{row.height}"


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def _gb(value: int | None) -> float | None:
    return None if value is None else value / GB


def _times(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}×"


def _ratio(method: Method) -> str | None:
    return None if method.ratio is None else f"{method.ratio:g}"


def markdown_table(rows: Sequence[Row]) -> str:
    """One line per row: method, ratio, arch, resolution, time, speed-up, % of bound, memory of a step."""
    compiled = any(row.compiled for row in rows)
    host = any(row.host_share is not None for row in rows)
    header = ["method", "ratio", "arch", "resolution", "s / step", "× vs unpatched", "% of bound",
              "peak MiB", "× less memory"] + ["host %"] * host + ["compile s", "graphs / breaks"] * compiled
    cells = [[
        row.label, _ratio(row.method), row.arch, _resolution(row),
        (_fmt(row.step_s, ".3g") or row.note) if row.measured else PENDING, _times(row.x_vs_unpatched),
        _percent(row.bound_fraction),
        _fmt(_mib(row.peak_bytes), ".0f") or ("n/a" if row.measured else None), _times(row.x_less_memory),
    ] + [_percent(row.host_share)] * host
        + [_fmt(row.compile_s, ".3g"), None if row.graphs is None else f"{row.graphs} / {row.graph_breaks}"]
        * compiled for row in rows]
    return reports.markdown_table(header, cells, align="llll" + "r" * (len(header) - 4))


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.0f}%"


def generation_table(rows: Sequence[Row]) -> str:
    """One line per row: method, ratio, arch, resolution, seconds and GB per image of whole generations."""
    header = ["method", "ratio", "arch", "resolution", "s / image", "× vs unpatched", "GB / image",
              "× less memory"]
    cells = [[
        row.label, _ratio(row.method), row.arch, _resolution(row),
        _fmt(row.generate_s, ".3g") if row.measured else PENDING, _times(row.generate_x),
        _fmt(_gb(row.generate_peak_bytes), ".2f") or ("n/a" if row.measured else None),
        _times(row.generate_x_less_memory),
    ] for row in rows]
    return reports.markdown_table(header, cells, align="llllrrrr")


def paper_table(rows: Sequence[Row], with_paper: bool) -> str:
    """The paper's layout (Method, r%, s/im, GB/im, with ×-faster and ×-less against unpatched).

    Args:
        rows: generation rows of one arch × size; the kinds of the paper's table are shown.
        with_paper: add the paper's own figures (for its setting: SD v1.5, 512², 50 PLMS steps; for
            the methods it measured: self-attention merged alone, no ``+mlp`` or ``+xattn``).
    """
    header = ["Method", "r%", "s/im ↓", "GB/im ↓"] + ["paper s/im (RTX 4090)", "paper GB/im"] * with_paper
    reference = PAPER[("unpatched", None)]
    cells = []
    for row in rows:
        if row.method.kind not in PAPER_KINDS or row.compiled:
            continue
        time = memory = PENDING
        if row.measured:
            time = _fmt(row.generate_s, ".2f") or reports.MISSING
            memory = _fmt(_gb(row.generate_peak_bytes), ".2f") or "n/a"
            if row.method.kind != "unpatched" and row.generate_x:
                time += f" ({row.generate_x:.2f}× faster)"
            if row.method.kind != "unpatched" and row.generate_x_less_memory:
                memory += f" ({row.generate_x_less_memory:.2f}× less)"
        line = [row.method.label, row.method.percent, time, memory]
        paper = None if row.method.merges else PAPER.get((row.method.kind, row.method.ratio))
        if with_paper and paper is not None and row.method.kind == "unpatched":
            line += [f"{paper[0]:.2f}", f"{paper[1]:.2f}"]
        elif with_paper and paper is not None:
            line += [f"{paper[0]:.2f} ({reference[0] / paper[0]:.2f}×)",
                     f"{paper[1]:.2f} ({reference[1] / paper[1]:.2f}× less)"]
        elif with_paper:
            line += [None, None]
        cells.append(line)
    return reports.markdown_table(header, cells, align="lr" + "r" * (len(header) - 2))


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
    images = f"{config.batch_size} image(s) per pipeline call"
    if plan.steps_timed:
        doubled = ", doubled by classifier-free guidance" if plan.unet_batch > config.batch_size else ""
        lines.append(
            f"- s / step: median over {config.repeats} timed round(s) of one UNet forward at batch "
            f"{plan.unet_batch} ({images}{doubled}), {plan.dtype_name}, on {plan.device}, timed with "
            f"{timer}; every round runs every method once (interleaved, alternating order) on the same "
            f"UNet and the same inputs, after {config.warmup} untimed warm-up round(s)"
        )
    if plan.generations_timed:
        lines.append(
            f"- s / image: median over {config.repeats} timed round(s) of one whole generation of "
            f"{config.steps} steps (text encoding, denoising with the pipeline's scheduler, VAE decode) "
            f"of {images}, divided by its images, guidance "
            f"{'the pipeline' + chr(39) + 's' if config.guidance is None else format(config.guidance, 'g')}, "
            f"{plan.dtype_name}, on "
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
    if any(method.merges for method in plan.methods):
        lines.append("- +mlp / +xattn: the patched blocks' feed-forward / cross-attention merged too, from "
                     "the same merge plan (merge_mlp / merge_crossattn of AgentSD and tomesd).")
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
        if plan.device.type in ASYNC_DEVICES:
            lines.append(
                "- host %: the host's time issuing a step (until it waits for the device) over the step's "
                "time on the device, median over rounds. Near 100%, the device waited for the host's "
                "kernel launches: the step is launch-bound, fewer FLOPs do not make it faster, and CUDA "
                "graphs (--compile --compile-mode reduce-overhead) remove the launches. (A host that fills "
                "the device's launch queue waits too, so only values near 100% mean launch-bound.)"
            )
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
            f"- (compiled): the UNet compiled as agentsd generate --compile does (backend "
            f"{config.compile_backend!r}, mode {config.compile_mode!r}): regional compilation of its "
            "transformer blocks (unet.compile_repeated_blocks; the rest runs eager) where diffusers "
            "offers it, else the whole UNet; the method applied, measured method by method (not "
            "interleaved: applying another patch would recompile); × and % compare with the compiled "
            "unpatched and bound rows. compile s: the first call (tracing and code generation; with "
            "agentsd, one first call per phase). graphs / breaks: the graphs and graph breaks dynamo "
            "made compiling those first calls (regional: the block graphs, of every phase); 0 breaks = "
            "every compiled region is one graph."
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


def csv_lines(rows: Sequence[Row], plan: Plan, run: str) -> list[dict[str, str]]:
    """This run's lines of results.csv, as text (as read back): every row, unrounded; ``status`` says
    which are still ``pending``; ``batch`` is the UNet batch of a timed step."""
    settings = ";".join(f"{name}={value}" for name, value in plan.patch.items())
    config = plan.config
    lines = []
    for row in rows:
        generation = plan.generations_timed and not row.compiled
        lines.append({
            "arch": row.arch, "width": row.width, "height": row.height, "method": row.method.name,
            "kind": row.method.kind, "ratio": row.method.ratio, "compiled": int(row.compiled),
            "batch": plan.unet_batch, "dtype": plan.dtype_name, "device": str(plan.device),
            "step_s": _fmt(row.step_s, ".6g"), "step_s_rounds": ";".join(f"{t:.6g}" for t in row.rounds),
            "x_vs_unpatched": _fmt(row.x_vs_unpatched, ".4f"),
            "bound_over_method": _fmt(row.bound_fraction, ".4f"),
            "peak_mib": _fmt(_mib(row.peak_bytes), ".1f"), "x_less_memory": _fmt(row.x_less_memory, ".4f"),
            "generate_s_per_image": _fmt(row.generate_s, ".6g"), "compile_s": _fmt(row.compile_s, ".6g"),
            "graphs": row.graphs, "graph_breaks": row.graph_breaks, "note": row.note, "status": row.status,
            "sdpa_kernel": config.sdpa_kernel, "agentsd_settings": settings,
            "steps": config.steps if generation else None, "scheduler": row.scheduler if generation else None,
            "generate_s_rounds": ";".join(f"{t:.6g}" for t in row.generate_rounds),
            "generate_x_vs_unpatched": _fmt(row.generate_x, ".4f"),
            "generate_gb_per_image": _fmt(_gb(row.generate_peak_bytes), ".4f"),
            "generate_x_less_memory": _fmt(row.generate_x_less_memory, ".4f"),
            "batch_size": config.batch_size, "guidance": config.guidance, "run": run,
            "compile_mode": config.compile_mode if row.compiled else None,
            "host_share": _fmt(row.host_share, ".4f"),
        })
    return [{key: "" if value is None else str(value) for key, value in line.items()} for line in lines]


def speedup_figure(lines: Sequence[Mapping[str, str]]):
    """speedup.png from the measured lines of results.csv (every run's): × vs unpatched against the ratio,
    a panel per arch × (method family, compiled, what was timed) that has points, a line per size (and
    per run conditions where they differ: only those are named in the legend, the shared ones in the
    title), the bound dashed; where runs measured one point twice, the later one."""
    curves: dict[tuple, dict[tuple, dict[float, float]]] = {}  # (arch, panel) -> line -> {ratio: ×}
    bounds: dict[tuple, float] = {}  # (arch, unit, compiled, line) -> ×
    for line in lines:
        try:
            method = parse_method(line["method"])
        except (KeyError, ValueError):
            continue
        if (line.get("status") or MEASURED) != MEASURED:
            continue
        size = line["width"] + ("²" if line["width"] == line["height"] else "×" + line["height"])
        series = (size, tuple((key, line[key]) for key in CONDITIONS if line.get(key)))
        for unit, column in (("step", "x_vs_unpatched"), ("generation", "generate_x_vs_unpatched")):
            if not line.get(column):
                continue
            compiled = " (compiled)" if line.get("compiled") == "1" else ""
            if method.kind == "bound":
                bounds[(line["arch"], unit, compiled, series)] = float(line[column])
            elif method.ratio is not None:
                panel = (line["arch"], (method.family, unit, compiled))
                curves.setdefault(panel, {}).setdefault(series, {})[method.ratio] = float(line[column])
    archs = list(dict.fromkeys(arch for arch, _ in curves))
    panels = {arch: [panel for a, panel in curves if a == arch] for arch in archs}
    lines_seen = list(dict.fromkeys(series for found in curves.values() for series in found))
    conditions = [dict(condition) for _, condition in lines_seen]
    keys = list(dict.fromkeys(key for condition in conditions for key in condition))
    varying = [key for key in keys if len({condition.get(key) for condition in conditions}) > 1]
    shared = ", ".join(f"{key} {conditions[0][key]}" for key in keys if key not in varying)

    def label(series: tuple) -> str:
        named = ", ".join(f"{key} {dict(series[1]).get(key, '–')}" for key in varying)
        return series[0] + (f" ({named})" if named else "")

    columns = max(1, min(PLOT_COLUMNS, max((len(found) for found in panels.values()), default=1)))
    starts, total = {}, 0  # each arch's first row: its panels wrap into rows of `columns`
    for arch in archs:
        starts[arch], total = total, total + -(-len(panels[arch]) // columns)
    fig = reports.figure(4.2 * columns, 3.4 * max(1, total) + 0.4, dpi=110)
    axes = fig.subplots(max(1, total), columns, squeeze=False, sharey=True)
    if not curves:
        axes[0][0].text(0.5, 0.5, "no speed-up against a ratio measured yet", ha="center", va="center")
    for arch in archs:
        found = panels[arch]
        for slot in range(len(found), -(-len(found) // columns) * columns):
            axes[starts[arch] + slot // columns][slot % columns].set_visible(False)
        for j, (family, unit, compiled) in enumerate(found):
            ax = axes[starts[arch] + j // columns][j % columns]
            ax.axhline(1.0, color="grey", linewidth=0.8)
            for series, points in curves[(arch, (family, unit, compiled))].items():
                colour, name = f"C{lines_seen.index(series) % 10}", label(series)
                ax.plot(*zip(*sorted(points.items()), strict=True), marker="o", color=colour, label=name)
                bound = bounds.get((arch, unit, compiled, series))
                if bound is not None:
                    ax.axhline(bound, color=colour, linestyle="--", linewidth=1, label=f"bound {name}")
            ax.set_xlim(0, MAX_RATIO + 0.05)
            ax.set_title(f"{arch} · {family}{compiled} · {unit}", fontsize=9)
            ax.set_xlabel("ratio")
            ax.set_ylabel("× vs unpatched" if j % columns == 0 else "")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, framealpha=0.6)
    if shared:
        fig.suptitle(f"× vs unpatched (dashed: the bound); {shared}", fontsize=10)
    fig.tight_layout()
    return fig
