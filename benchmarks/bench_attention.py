"""AgentSD's agent phase against the unpatched UNet, tomesd and the attainable bound, on one UNet level.

The UNet has SD 1.5's first attention level only (320 channels, 8 heads of 40, context 768, two
down and three up transformer blocks), random weights, so the self-attentions at that level
dominate as they do in SD 1.5 at high resolution. Methods are interleaved round by round with the
same inputs. "bound" is the same UNet with those self-attentions costing nothing (a processor that
returns zeros): no patch of them can be faster.

With ``--compile`` the unpatched UNet, AgentSD's agent phase and the bound are also timed compiled
(``torch.compile``, inductor, fullgraph where it holds), interleaved with the eager rows; compile
time (the first call) is reported apart. tomesd is tried compiled too and its graph breaks reported.

Then one patched self-attention call is split into its stages to show where the time goes.

    python benchmarks/bench_attention.py --resolution 1024 --batch 2 --repeats 3 [--compile]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import tomesd
import torch
from diffusers import UNet2DConditionModel

import agentsd
from agentsd.attention import agent_attention
from agentsd.merge import _best_match, bipartite_soft_matching, position_key


class ZeroAttention:
    """A self-attention that costs nothing: the block's residual passes through unchanged."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        return torch.zeros_like(hidden_states)


def level_one_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(320,),
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        mid_block_type=None,
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,  # SD 1.5's config name for the number of heads
        norm_num_groups=32,
    ).eval()


def timed(fn, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=1024, help="image side in pixels (latent = /8)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with CFG)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--compile", action="store_true", help="add compiled rows (torch.compile, inductor)")
    args = parser.parse_args()

    torch.manual_seed(0)
    side = args.resolution // 8
    sample = torch.randn(args.batch, 4, side, side)
    context = torch.randn(args.batch, 77, 768)
    timestep = 999  # p = 0.001: the agent phase

    base = level_one_unet()
    targets = list(agentsd.patch_targets(base))
    models = {"unpatched": base}
    models["tomesd"] = tomesd.apply_patch(copy.deepcopy(base), ratio=args.ratio, max_downsample=1)
    models["agentsd"] = agentsd.apply_patch(copy.deepcopy(base), ratio=args.ratio)
    bound = copy.deepcopy(base)
    bound.set_attn_processor({name: ZeroAttention() if name in targets else p
                              for name, p in bound.attn_processors.items()})
    models["bound"] = bound

    def forward(model):
        with torch.no_grad():
            model(sample, timestep, encoder_hidden_states=context)

    compile_seconds, breaks, compiled = {}, {}, {}
    if args.compile:
        for name in ("unpatched", "agentsd", "bound", "tomesd"):
            model = copy.deepcopy(models[name])
            if name == "agentsd":
                agentsd.apply_patch(model, ratio=args.ratio)  # a deep copy keeps its own patch
            compiled[name] = model
        # explain() resets dynamo, so every graph break count comes before any compilation
        for name, model in compiled.items():
            breaks[name] = torch._dynamo.explain(model)(
                sample, timestep, encoder_hidden_states=context).graph_break_count
        for name, model in compiled.items():
            compiled[name] = torch.compile(model, fullgraph=breaks[name] == 0)
            compile_seconds[name] = timed(lambda m=compiled[name]: forward(m))
            models[f"{name} (compiled)"] = compiled[name]
            print(f"compiled {name}: {breaks[name]} graph breaks, first call {compile_seconds[name]:.1f} s",
                  flush=True)

    times: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(args.repeats + 1):
        for name, model in models.items():
            elapsed = timed(lambda m=model: forward(m))
            if round_index:  # round 0 warms up
                times[name].append(elapsed)
            print(f"round {round_index} {name:10s} {elapsed:7.2f} s", flush=True)
    assert agentsd.phase_history(models["agentsd"]) == ["agent"]

    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {len(targets)} patched self-attentions, "
          f"{side * side} tokens, batch {args.batch}, ratio {args.ratio}\n")
    print("| method | s / forward | × vs unpatched (same mode) | bound / method | graph breaks | compile s |")
    print("|---|---|---|---|---|---|")
    for name, value in median.items():
        base_name = name.removesuffix(" (compiled)")
        suffix = " (compiled)" if name != base_name else ""
        reference, limit = median["unpatched" + suffix], median["bound" + suffix]
        compiled_cells = (f"{breaks[base_name]} | {compile_seconds[base_name]:.0f}" if suffix else "— | —")
        print(f"| {name} | {value:.2f} | {reference / value:.2f}× | {limit / value:.0%} | {compiled_cells} |")
    if args.compile:
        gain = median["agentsd"] / median["agentsd (compiled)"]
        print(f"\ncompiled agent phase vs eager agent phase: {gain:.2f}×")

    breakdown(args, side)


def breakdown(args, side: int) -> None:
    """Time the stages of one agent-phase self-attention call at the first level."""
    unet = level_one_unet()
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    tokens = side * side
    x = torch.randn(args.batch, tokens, 320)
    metric = torch.randn(args.batch, tokens, 320)
    r, agent_r = int(tokens * args.ratio), int(tokens * 0.95)
    key = position_key(0, 0, torch.tensor(999))
    heads = attn.heads

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    with torch.no_grad():
        merge, agents = bipartite_soft_matching(metric, side, side, 4, 4, r, agent_r, key)
        merged = merge.merge(x)
        agent_tokens = agents.merge(x)
        q, k, v = split(attn.to_q(merged)), split(attn.to_k(merged)), split(attn.to_v(merged))
        a = split(attn.to_q(agent_tokens))
        out = agent_attention(q, k, v, a, scale=attn.scale)
        flat = out.transpose(1, 2).reshape(args.batch, merged.shape[1], -1)
        projected = attn.to_out[0](flat)
        # the similarity scores inside the plan, alone
        dst = torch.arange(0, tokens, 16)[: (side // 4) ** 2]
        a_rows = metric[:, : tokens - dst.numel()]
        b_rows = metric[:, dst]
        repeats = 3
        stages = {
            "similarity scores (one GEMM for both merges)": timed(
                lambda: _best_match(a_rows, b_rows), repeats),
            "merge plan (partition, scores, argsort, index maps)": timed(
                lambda: bipartite_soft_matching(metric, side, side, 4, 4, r, agent_r, key), repeats),
            "merge tokens + agents": timed(lambda: (merge.merge(x), agents.merge(x)), repeats),
            "q, k, v, agent projections": timed(
                lambda: (attn.to_q(merged), attn.to_k(merged), attn.to_v(merged), attn.to_q(agent_tokens)),
                repeats),
            "agent attention (two SDPA calls)": timed(
                lambda: agent_attention(q, k, v, a, scale=attn.scale), repeats),
            "output projection": timed(lambda: attn.to_out[0](flat), repeats),
            "unmerge": timed(lambda: merge.unmerge(projected), repeats),
        }
    stages["merge plan without scores"] = (stages["merge plan (partition, scores, argsort, index maps)"]
                                           - stages["similarity scores (one GEMM for both merges)"])
    total = sum(value for name, value in stages.items()
                if name not in ("similarity scores (one GEMM for both merges)", "merge plan without scores"))
    bookkeeping = (stages["merge plan without scores"] + stages["merge tokens + agents"]
                   + stages["unmerge"])
    print(f"\nOne agent-phase self-attention call ({tokens} tokens, batch {args.batch}, "
          f"{merge.size} merged tokens, {agents.size} agents):\n")
    print("| stage | ms | share |")
    print("|---|---|---|")
    for name, value in stages.items():
        print(f"| {name} | {value * 1e3:.1f} | {value / total:.0%} |")
    print(f"| **total of the stages** | {total * 1e3:.1f} | 100% |")
    print(f"\nbookkeeping (plan without scores + merges + unmerge): {bookkeeping / total:.1%} of the "
          f"patched attention; with the scores: {(bookkeeping + stages[next(iter(stages))]) / total:.1%}")


if __name__ == "__main__":
    main()
