"""The core's speed check: AgentSD's agent phase against the unpatched UNet, tomesd and the bound, on a
UNet of SD 1.5's first attention level only, with the time of the patched blocks split into stages.

The UNet (320 channels, 8 heads of 40, context 768, two down and three up transformer blocks, random
weights) makes the self-attentions at that level dominate, as they do in SD 1.5 at high resolution.
Everything is measured by ``agentsd bench`` (this script is a thin caller of its Python API: the
same methods, interleaved timing, bound and report) with ``--profile``, whose stage table splits the
patched blocks into attention (SDPA), linear projections, similarity scores and the rest (merging
and unmerging), from the profiler's view of the torch operations inside them: no internal name of
the core is used, so the script times any checkout's core.

A/B of two cores (old and new checkouts, both with this version's ``agentsd.tools.bench``), in
alternating processes so that drift of the machine hits both alike:

    for i in 1 2 3; do
        PYTHONPATH=/path/to/old python benchmarks/bench_attention.py --resolution 1024
        PYTHONPATH=/path/to/new python benchmarks/bench_attention.py --resolution 1024
    done

Each run ends with one line, ``A/B: agent phase S s/step, ...``, to compare.

    python benchmarks/bench_attention.py --resolution 1024 --batch-size 1 --repeats 3 [--compile]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import agentsd
from agentsd.tools.bench import BenchConfig, run_bench
from agentsd.tools.bench.profiling import stage_table
from agentsd.tools.errors import UsageError

ARCH = "sd15-level1"
# SD 1.5's first attention level alone (its config names the number of heads attention_head_dim)
LEVEL_ONE = {
    "block_out_channels": [320], "down_block_types": ["CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D"], "mid_block_type": None, "layers_per_block": 2,
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "sample_size": 64,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_attention.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels (latent = /8) (1024)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per pipeline call: the UNet batch is twice that, with CFG (1)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round (3)")
    p.add_argument("--ratio", type=float, default=0.4, help="merge ratio of tomesd and AgentSD (0.4)")
    p.add_argument("--compile", action="store_true", help="add compiled rows (torch.compile, inductor)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="auto (fp16 on CUDA, fp32 elsewhere; default)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (torch's choice)")
    p.add_argument("--out", default=None, help="keep results.md, results.csv and profile.md in this folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        arch = Path(scratch) / f"{ARCH}.json"
        arch.write_text(json.dumps(LEVEL_ONE))
        config = BenchConfig(
            archs=[str(arch)], methods=["tomesd", "agentsd-agent", "bound"], ratios=[args.ratio],
            resolution=[args.resolution], batch_size=args.batch_size, dtype=args.dtype, device=args.device,
            repeats=args.repeats, threads=args.threads, compile=args.compile, profile=True,
            out=args.out or Path(scratch) / "out", progress=False,
        )
        try:
            result = run_bench(config)
        except UsageError as error:
            print(f"bench_attention.py: error: {error}", file=sys.stderr)
            return 2
    print(result.report)
    print("The patched blocks (self-attention with its merging), by the torch operation called, one step "
          "(ms, share of the blocks):\n")
    for title, found in result.profiles.items():
        print(f"{title}\n\n{stage_table(found)}\n")
    step = {(row.method.kind, row.compiled): row.step_s for row in result.rows}
    agent = next(row for row in result.rows if row.method.kind == "agentsd-agent" and not row.compiled)
    line = (f"A/B: agent phase {step[('agentsd-agent', False)]:.4g} s/step, unpatched "
            f"{step[('unpatched', False)]:.4g}, tomesd {step[('tomesd', False)]:.4g}, bound "
            f"{step[('bound', False)]:.4g} ({agent.bound_fraction:.0%} of the bound)")
    if args.compile:
        line += (f"; compiled agent phase {step[('agentsd-agent', True)]:.4g}, unpatched "
                 f"{step[('unpatched', True)]:.4g}")
    print(f"{line}; agentsd {agentsd.__version__} from {Path(agentsd.__file__).parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
