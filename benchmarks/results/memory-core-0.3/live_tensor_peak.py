"""Peak bytes of the tensors one SD 1.5 UNet step (batch 2, random weights) allocates, unpatched and
patched, on the CPU: an allocator-independent reading (what CUDA's max_memory_allocated is on a GPU),
where the process's RSS varies by +-10% between runs.

Every operator's outputs are counted while alive (a TorchDispatchMode, each storage once); weights
and inputs, allocated before, are not. Run from the repository root:

    PYTHONPATH=. python benchmarks/results/memory-core-0.3/live_tensor_peak.py 1024 [METHOD ...]

METHOD: agent, tome, agent+mlp, tome+mlp (AgentSD's phases, ratio 0.4), tomesd, tomesd+mlp (all by
default).
"""

import sys

import torch

import agentsd
from agentsd.tools import archs
from tests.test_memory import LiveTensorBytes  # the suite's probe: one implementation


def main() -> None:
    side = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    names = sys.argv[2:] or ["agent", "tome", "agent+mlp", "tome+mlp", "tomesd", "tomesd+mlp"]
    torch.manual_seed(0)
    unet = archs.build_unet(archs.unet_config("sd15"), torch.float32, torch.device("cpu"))
    sample, context = torch.randn(2, 4, side // 8, side // 8), torch.randn(2, 77, 768)

    def peak_mib() -> float:
        with torch.no_grad():
            unet(sample, torch.tensor(999), encoder_hidden_states=context)  # warm-up
            with LiveTensorBytes() as probe:
                unet(sample, torch.tensor(999), encoder_hidden_states=context)
        return probe.peak / 2**20

    unpatched = peak_mib()
    print(f"{side}: unpatched {unpatched:.0f} MiB")
    for name in names:
        settings = dict(agent_until=1.0 if name.startswith("agent") else 0.0, merge_mlp=name.endswith("+mlp"))
        if name.startswith("tomesd"):
            import tomesd

            tomesd.apply_patch(unet, ratio=0.4, merge_mlp=settings["merge_mlp"])
        else:
            agentsd.apply_patch(unet, **settings)
        peak = peak_mib()
        print(f"{side}: {name} {peak:.0f} MiB ({peak / unpatched:.3f}x)")
        (tomesd.remove_patch if name.startswith("tomesd") else agentsd.remove_patch)(unet)


if __name__ == "__main__":
    main()
