"""Where the time of one UNet step goes: per kind of module (hooks) and per operator (torch.profiler).

Used by ``agentsd bench --profile`` after the timed rounds, on one extra run of each method.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import nn

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


def profile_case(
    case: Case, unet: nn.Module, patched: Iterable[nn.Module], device: torch.device, top: int = 15
) -> tuple[dict[str, float], float, str]:
    """Run ``case`` once more (set up and torn down as in timing) under hooks and torch.profiler.

    Returns:
        ``(seconds per module kind, total seconds, operator table)``; module and total times are
        weighted like the case's calls (e.g. 20/50 agent step + 30/50 late step), the operator table
        sums the calls unweighted.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    seconds: dict[str, float] = defaultdict(float)
    total = 0.0
    case.setup()
    try:
        modules = ModuleTimer(unet, patched, device)
        try:
            with torch.profiler.profile(activities=activities) as prof:
                for fn, weight in case.calls:
                    modules.seconds.clear()
                    with Timer(device) as step:
                        fn()
                    total += weight * step.seconds
                    for kind, value in modules.totals().items():
                        seconds[kind] += weight * value
        finally:
            modules.remove()
    finally:
        case.teardown()
    seconds["rest"] = max(0.0, total - sum(seconds.values()))
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=60)
    return dict(seconds), total, table


def profile_report(results: dict[str, tuple[dict[str, float], float, str]], title: str) -> str:
    """Markdown: a table of module kinds (ms and share) per method, then each method's top operators."""
    lines = [f"## {title}", "", "Time inside each kind of module, one step (ms, share of the step):", ""]
    kinds = [*KINDS, "rest"]
    lines.append("| method | step ms | " + " | ".join(kinds) + " |")
    lines.append("|---|---|" + "---|" * len(kinds))
    for key, (seconds, total, _) in results.items():
        cells = [f"{1e3 * seconds[kind]:.0f} ({seconds[kind] / total:.0%})" for kind in kinds]
        lines.append(f"| {key} | {1e3 * total:.0f} | " + " | ".join(cells) + " |")
    for key, (_, _, table) in results.items():
        lines += ["", f"### {key}: top operators by self time", "", "```", table.rstrip(), "```"]
    return "\n".join(lines) + "\n"
