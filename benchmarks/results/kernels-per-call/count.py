"""Kernels one SD 1.5 / SDXL UNet call launches, unpatched and patched: what a launch-bound GPU pays.

On the first GPU run (H200) eager SD 1.5 steps took the same time at 512² and 1024²: the host's cost
per kernel, not the work, set the time, so the patch's extra small kernels showed. This counts the
operators a call dispatches that are not views (each one a kernel launch on a GPU), on the meta
device (no memory, no arithmetic: the real architectures run in a second). A scaled_dot_product_attention
call counts as one kernel, as the flash or memory-efficient kernel it is on a GPU (the meta device would
run SDPA's math decomposition, about ten operators). Run from the repository root:

    PYTHONPATH=. python benchmarks/results/kernels-per-call/count.py [ARCH ...]
"""

import sys

import tomesd
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import agentsd
from agentsd.tools import archs
from agentsd.tools.methods import patch_level

VIEWS = {"view", "_unsafe_view", "t", "transpose", "expand", "unsqueeze", "squeeze", "select", "slice",
         "split", "permute", "reshape", "alias", "detach", "as_strided", "chunk", "unbind", "flatten"}


class Kernels(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0
        self.in_attention = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in VIEWS and not self.in_attention:
            self.count += 1
        return func(*args, **(kwargs or {}))


class OneKernelAttention(TorchFunctionMode):
    """Counts each SDPA call as one kernel and hides the operators of its math decomposition."""

    def __init__(self, kernels: Kernels):
        super().__init__()
        self.kernels = kernels

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention or self.kernels.in_attention:
            return func(*args, **(kwargs or {}))
        self.kernels.count += 1
        self.kernels.in_attention = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.kernels.in_attention = False


def count(unet, side: int, t: int, context_dim: int, extra: dict) -> int:
    sample = torch.randn(2, 4, side // 8, side // 8, device="meta", dtype=torch.float16)
    context = torch.randn(2, 77, context_dim, device="meta", dtype=torch.float16)
    with torch.no_grad():
        unet(sample, t, encoder_hidden_states=context, **extra)  # lazy state (t: an int, read on the host)
        kernels = Kernels()
        with kernels, OneKernelAttention(kernels):
            unet(sample, t, encoder_hidden_states=context, **extra)
    return kernels.count


def count_pre_hook(unet, side: int, t: int, context_dim: int, extra: dict) -> int:
    """Kernels the patch's UNet pre-hook launches: counted between a pre-hook put before it and one
    after it (public module hooks; the patch's own pre-hook runs in between)."""
    kernels = Kernels()

    def start(*_) -> None:  # (a pre-hook returning a value would replace the call's arguments)
        kernels.count = 0  # the counted call's alone
        kernels.__enter__()

    def stop(*_) -> None:
        kernels.__exit__(None, None, None)

    first = unet.register_forward_pre_hook(start, prepend=True)
    last = unet.register_forward_pre_hook(stop)
    try:
        count(unet, side, t, context_dim, extra)  # its first call warms up, its second is counted
    finally:
        first.remove()
        last.remove()
    return kernels.count


def main() -> None:
    for arch in sys.argv[1:] or ["sd15", "sdxl"]:
        config = archs.unet_config(arch)
        unet = archs.build_unet(config, torch.float16, torch.device("meta"))
        extra = {}
        if arch == "sdxl":
            meta = dict(device="meta", dtype=torch.float16)
            extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 1280, **meta),
                                           "time_ids": torch.randn(2, 6, **meta)}}
        side = 1024
        base = count(unet, side, 999, config["cross_attention_dim"], extra)
        agentsd.apply_patch(unet)
        blocks = len(agentsd.patch_targets(unet))
        agent = count(unet, side, 999, config["cross_attention_dim"], extra)
        tome = count(unet, side, 400, config["cross_attention_dim"], extra)
        phases = agentsd.phase_history(unet, per_call=True)[-3:]
        hashed = count_pre_hook(unet, side, 400, config["cross_attention_dim"], extra)
        agentsd.remove_patch(unet)
        # tomesd at the same level and ratio, as agentsd bench runs it
        tomesd.apply_patch(unet, ratio=0.4, max_downsample=patch_level(unet, None))
        tome_sd = count(unet, side, 999, config["cross_attention_dim"], extra)
        tomesd.remove_patch(unet)
        print(f"{arch} {side}²: unpatched {base} kernels per UNet call; "
              f"agent phase {agent} (+{agent - base}, "
              f"+{(agent - base) / blocks:.0f} per patched block), ToMe phase {tome} (+{tome - base}, "
              f"+{(tome - base) / blocks:.0f} per block); {blocks} patched blocks; phases run {phases}; "
              f"tomesd {tome_sd} (+{tome_sd - base}, +{(tome_sd - base) / blocks:.0f} per block); "
              f"of AgentSD's, {hashed} in its pre-hook (the dst positions of every block)")


if __name__ == "__main__":
    main()
