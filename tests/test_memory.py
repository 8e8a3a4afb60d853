"""Peak memory of a patched UNet call, read at the tensor level on the CPU.

What CUDA's ``max_memory_allocated`` reads on a GPU: the bytes of the tensors alive at once, not what
the allocator keeps cached. Every operator's outputs are counted while alive (each storage once);
weights and inputs, made before, are not.
"""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import agentsd
from tests.tiny import CROSS_DIM, make_unet


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the storages that operators made and that are still alive; ``peak`` is their maximum."""

    def __init__(self):
        super().__init__()
        self.holders: dict[int, list[int]] = {}  # data pointer -> [live tensors, bytes]
        self.live = self.peak = 0

    def _release(self, pointer: int) -> None:
        entry = self.holders[pointer]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.holders[pointer]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
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


def _peak_bytes(unet, t: int) -> int:
    g = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 7, CROSS_DIM, generator=g)
    with torch.no_grad():
        unet(sample, torch.tensor(t), encoder_hidden_states=context)  # warm-up: lazily made state
        with LiveTensorBytes() as probe:
            unet(sample, torch.tensor(t), encoder_hidden_states=context)
    return probe.peak


@pytest.mark.parametrize(("t", "phase", "cell"), [(990, "agent", 4), (300, "tome", 2)])
def test_patched_call_peak_is_unpatched_plus_the_calls_dst_positions(one_thread, t, phase, cell):
    """The merge plan's indices are let go before the feed-forward, the block's peak: on the first
    CUDA run (H200, SD 1.5, fp16) they were still alive there, 0.7 MiB above unpatched at 1024². What
    stays alive is the call's dst positions (int64, one per cell of each patched block): every block's
    are hashed at once, since on a GPU each small kernel costs host time."""
    unet = make_unet()
    unpatched = _peak_bytes(unet, t)
    agentsd.apply_patch(unet)
    patched = _peak_bytes(unet, t)
    assert agentsd.phase_history(unet, per_call=True)[-1] == phase
    dst_bytes = len(agentsd.patch_targets(unet)) * (64 // cell) ** 2 * 8  # the 64x64 latent's first level
    assert patched <= unpatched + dst_bytes, f"{phase}: patched {patched} B, unpatched {unpatched} B"
