"""Where the time of one UNet step goes: per kind of module (hooks), per operation inside the patched
blocks, and per operator (torch.profiler).

Used by ``agentsd bench --profile`` after the timed rounds, on one extra run of each method, and by
``benchmarks/bench_attention.py`` for its stage breakdown. Everything here reads the model from the
outside (module hooks, profiler ranges, the public ``agentsd.patch_targets``), so it works the same
whatever the core does inside a block.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import nn

from agentsd.tools import reports
from agentsd.tools.bench.timing import Case
from agentsd.tools.measure import Timer

# Module kinds. The first is the whole transformer block of each patched self-attention minus its
# cross-attention and feed-forward: so ToMe's merging, which tomesd does in the block's forward and
# AgentSD inside the processor, lands in the same place. "rest" is the step time outside all kinds.
KINDS = (
    "patched self-attention (with merging)", "other self-attention", "cross-attention", "feed-forward",
    "resnets",
)
_INNER = "_inside patched blocks"


def _kinds(unet: nn.Module, patched: set[int]) -> list[tuple[nn.Module, tuple[str, ...]]]:
    """``(module, kinds its time counts for)`` for every module to time."""
    names = {id(module): name for name, module in unet.named_modules()}
    blocks = {names[i].rsplit(".", 1)[0] for i in patched if i in names}
    found = []
    for name, module in unet.named_modules():
        parent = name.rsplit(".", 1)[0]
        kind = type(module).__name__
        if name in blocks:
            found.append((module, (KINDS[0],)))
        elif kind == "Attention" and name.endswith("attn1") and parent not in blocks:
            found.append((module, (KINDS[1],)))
        elif (kind == "Attention" and name.endswith("attn2")) or kind == "FeedForward":
            kinds = (KINDS[2] if kind == "Attention" else KINDS[3],)
            found.append((module, kinds + ((_INNER,) if parent in blocks else ())))
        elif kind == "ResnetBlock2D":
            found.append((module, (KINDS[4],)))
    return found


# Operations inside the patched blocks (their self-attention with its merging; the blocks'
# cross-attention and feed-forward are left out), by the torch operation the Python code called:
# what a stage of AgentSD's self-attention costs, without naming the core's functions.
STAGES = (
    "attention (SDPA, softmax)",
    "linear projections (q, k, v, agents, out)",
    "similarity scores (matmul)",
    "layer norms",
    "the rest: merging and unmerging (sort, gather, scatter, index), residual adds, reshapes",
)
_STAGE_OPS = (
    (STAGES[0], ("scaled_dot_product_attention", "softmax", "_efficient_attention", "_flash_attention")),
    (STAGES[1], ("aten::linear", "aten::addmm")),
    (STAGES[2], ("aten::matmul", "aten::bmm", "aten::mm", "aten::einsum", "aten::baddbmm")),
    (STAGES[3], ("layer_norm",)),
)
_PATCHED_RANGE = "agentsd.bench: patched block"
_LEFT_OUT_RANGE = "agentsd.bench: left out of the patched block"
_CALL_RANGE = "agentsd.bench: call "


def stage_of(operation: str) -> str:
    """The stage (one of :data:`STAGES`) of a torch operation called inside a patched block."""
    for stage, names in _STAGE_OPS:
        if any(name in operation for name in names):
            return stage
    return STAGES[-1]


class _Range:
    """A profiler range opened by a module's forward pre-hook and closed by its forward hook."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._open: list = []

    def enter(self, module, args) -> None:
        self._open.append(torch.profiler.record_function(self.name).__enter__())

    def exit(self, module, args, output) -> None:
        self._open.pop().__exit__(None, None, None)


class BlockRanges:
    """Profiler ranges around each patched transformer block, and around its cross-attention and
    feed-forward (which :func:`stage_seconds` leaves out). Remove them with :meth:`remove`."""

    def __init__(self, unet: nn.Module, patched: Iterable[nn.Module]) -> None:
        names = {id(module): name for name, module in unet.named_modules()}
        blocks = {names[id(m)].rsplit(".", 1)[0] for m in patched if id(m) in names}
        self._handles = []
        for name, module in unet.named_modules():
            parent = name.rsplit(".", 1)[0]
            if name in blocks:
                label = _PATCHED_RANGE
            elif parent in blocks and (name.endswith("attn2") or type(module).__name__ == "FeedForward"):
                label = _LEFT_OUT_RANGE
            else:
                continue
            opened = _Range(label)
            self._handles.append(module.register_forward_pre_hook(opened.enter))
            self._handles.append(module.register_forward_hook(opened.exit))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _ancestor(event, prefix: str):
    event = event.cpu_parent
    while event is not None and not event.name.startswith(prefix):
        event = event.cpu_parent
    return event


def stage_seconds(events, weights: list[float], device: torch.device) -> dict[str, float]:
    """Seconds per stage inside the patched blocks, from the events of a profile taken with
    :class:`BlockRanges` and calls wrapped in ``record_function(f"{_CALL_RANGE}{i}")``.

    Each operation called directly inside a patched block counts with its children (device time on
    CUDA, CPU time elsewhere), weighted like its call.
    """
    seconds = dict.fromkeys(STAGES, 0.0)
    attribute = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    for event in events:
        parent = event.cpu_parent
        if parent is None or parent.name != _PATCHED_RANGE or event.name.startswith("agentsd.bench"):
            continue
        call = _ancestor(event, _CALL_RANGE)
        weight = weights[int(call.name[len(_CALL_RANGE):])] if call is not None else 1.0
        seconds[stage_of(event.name)] += weight * getattr(event, attribute) / 1e6
    return seconds


class ModuleTimer:
    """Wall time spent inside each kind of module during the calls, via forward pre/post hooks.

    Each module is timed with :class:`agentsd.tools.measure.Timer`, which synchronises on entry: on
    CUDA that slows the step a little but attributes time correctly.
    Remove the hooks with :meth:`remove` before checking that a patch was undone.
    """

    def __init__(self, unet: nn.Module, patched: Iterable[nn.Module], device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._handles = []
        self._timers: list[Timer] = []
        for module, kinds in _kinds(unet, {id(module) for module in patched}):
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._exit(kinds)))

    def _enter(self, module, args) -> None:
        self._timers.append(Timer(self.device).__enter__())

    def _exit(self, kinds: tuple[str, ...]) -> Callable:
        def hook(module, args, output) -> None:
            timer = self._timers.pop()
            timer.__exit__(None, None, None)
            for kind in kinds:
                self.seconds[kind] += timer.seconds

        return hook

    def totals(self) -> dict[str, float]:
        """Seconds per kind, the patched blocks' cross-attention and feed-forward taken out."""
        seconds = {kind: self.seconds.get(kind, 0.0) for kind in KINDS}
        seconds[KINDS[0]] -= self.seconds.get(_INNER, 0.0)
        return seconds

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


Profile = tuple[dict[str, float], float, str, dict[str, float]]


def profile_case(
    case: Case, unet: nn.Module, patched: Iterable[nn.Module], device: torch.device, top: int = 15
) -> Profile:
    """Run ``case`` once more (set up and torn down as in timing) under hooks and torch.profiler.

    Args:
        case: the method's timing case.
        unet: the UNet its calls run.
        patched: the self-attentions (``attn1``) AgentSD patches (``agentsd.patch_targets``).
        device: where it runs.
        top: operators in the operator table.

    Returns:
        ``(seconds per module kind, total seconds, operator table, seconds per stage inside the
        patched blocks)``; module, stage and total times are weighted like the case's calls (e.g.
        20/50 agent step + 30/50 late step), the operator table sums the calls unweighted.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    patched = list(patched)
    seconds: dict[str, float] = defaultdict(float)
    total = 0.0
    case.setup()
    try:
        modules = ModuleTimer(unet, patched, device)
        ranges = BlockRanges(unet, patched)
        try:
            with torch.profiler.profile(activities=activities) as prof:
                for index, (fn, weight) in enumerate(case.calls):
                    modules.seconds.clear()
                    with Timer(device) as step, torch.profiler.record_function(f"{_CALL_RANGE}{index}"):
                        fn()
                    total += weight * step.seconds
                    for kind, value in modules.totals().items():
                        seconds[kind] += weight * value
        finally:
            modules.remove()
            ranges.remove()
    finally:
        case.teardown()
    seconds["rest"] = max(0.0, total - sum(seconds.values()))
    stages = stage_seconds(prof.events(), [weight for _, weight in case.calls], device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=60)
    return dict(seconds), total, table, stages


def stage_table(results: dict[str, Profile]) -> str:
    """Markdown: the stages inside the patched blocks per method (ms and share of those blocks)."""
    cells = []
    for key, (_, _, _, stages) in results.items():
        inside = sum(stages.values())
        shares = [f"{1e3 * stages[stage]:.1f} ({stages[stage] / inside:.0%})" if inside else None
                  for stage in STAGES]
        cells.append([key, f"{1e3 * inside:.1f}", *shares])
    return reports.markdown_table(["method", "patched blocks ms", *STAGES], cells).rstrip("\n")


def profile_report(results: dict[str, Profile], title: str) -> str:
    """Markdown: a table of module kinds (ms and share) per method, the stages inside the patched
    blocks, then each method's top operators."""
    lines = [f"## {title}", "", "Time inside each kind of module, one step (ms, share of the step):", ""]
    kinds = [*KINDS, "rest"]
    cells = [[key, f"{1e3 * total:.0f}", *(f"{1e3 * seconds[kind]:.0f} ({seconds[kind] / total:.0%})"
                                           for kind in kinds)]
             for key, (seconds, total, _, _) in results.items()]
    lines.append(reports.markdown_table(["method", "step ms", *kinds], cells).rstrip("\n"))
    lines += ["", "Inside the patched blocks (their self-attention with its merging; their cross-attention "
              "and feed-forward left out), by the torch operation called, one step (ms, share of those "
              "blocks; profiler time, which adds overhead to small operations):", "", stage_table(results)]
    for key, (_, _, table, _) in results.items():
        lines += ["", f"### {key}: top operators by self time", "", "```", table.rstrip(), "```"]
    return "\n".join(lines) + "\n"
