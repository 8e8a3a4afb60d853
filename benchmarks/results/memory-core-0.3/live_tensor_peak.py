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
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import agentsd
from agentsd.tools import archs


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the storages that operators made and that are still alive; ``peak`` is their maximum."""

    def __init__(self):
        super().__init__()
        self.holders: dict[int, list[int]] = {}  # data pointer -> [live tensors, bytes]
        self.live = self.peak = 0

    def _release(self, pointer: int) -> None:
        entry = self.holders.get(pointer)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self.holders[pointer]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            pointer, size = storage.data_ptr(), storage.nbytes()
            if not pointer or not size:
                continue
            if pointer in self.holders:
                self.holders[pointer][0] += 1
            else:
                self.holders[pointer] = [1, size]
                self.live += size
                self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._release, pointer)
        return out


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
