"""The patch under torch.compile: whole-UNet and regional compilation, recompiles, parity, no host work.

Graph counts and recompiles are checked with the ``aot_eager`` backend (dynamo traces exactly as with
inductor, without paying C++ compile time); numerical parity is checked with inductor itself.
"""

import re

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code
from torch.utils._python_dispatch import TorchDispatchMode

import agentsd
from tests.tiny import make_unet


def _generate(pipe, steps=10):
    return pipe(
        "a cat", num_inference_steps=steps, height=32, width=32, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images


TEN_STEPS = ["agent"] * 4 + ["tome"] * 6


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _unet_call(unet, t, batch=2):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, 16, 16, generator=g)
    context = torch.randn(batch, 7, 32, generator=g)
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=context).sample


@pytest.mark.parametrize("t,phase", [(990, "agent"), (300, "tome")])
def test_one_graph_and_no_break_per_phase(fresh_dynamo, t, phase):
    unet = agentsd.apply_patch(make_unet())
    explained = torch._dynamo.explain(unet)(
        torch.randn(2, 4, 16, 16), torch.tensor(t), encoder_hidden_states=torch.randn(2, 7, 32)
    )
    assert agentsd.phase_history(unet) == [phase]
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_whole_unet_fullgraph_compiles_once_per_phase(tiny_pipe, one_thread, fresh_dynamo):
    agentsd.apply_patch(tiny_pipe)
    eager = _generate(tiny_pipe)
    tiny_pipe.unet = torch.compile(tiny_pipe.unet, fullgraph=True, backend="aot_eager")
    compiled = _generate(tiny_pipe)
    assert agentsd.phase_history(tiny_pipe) == TEN_STEPS
    assert _graphs() == 2  # one per phase: the timestep's value is never guarded on
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    _generate(tiny_pipe)
    assert _graphs() == 2 and not counters["recompiles"]  # a second generation compiles nothing

    # remove_patch on the compiled UNet: unpatched outputs again; then patch again
    agentsd.remove_patch(tiny_pipe)
    assert agentsd.phase_history(tiny_pipe) == []
    unpatched = _generate(tiny_pipe)
    agentsd.apply_patch(tiny_pipe)
    repatched = _generate(tiny_pipe)
    assert agentsd.is_patched(tiny_pipe.unet)
    agentsd.remove_patch(tiny_pipe.unet)  # the compiled module itself: its inner UNet is unpatched
    tiny_pipe.unet = tiny_pipe.unet._orig_mod
    torch.testing.assert_close(unpatched, _generate(tiny_pipe), rtol=1e-5, atol=1e-6)
    assert (unpatched - eager).abs().max() > 1e-3
    torch.testing.assert_close(repatched, eager, rtol=1e-5, atol=1e-6)


def test_fifty_steps_stay_under_the_recompile_limit(tiny_pipe, one_thread, fresh_dynamo):
    agentsd.apply_patch(tiny_pipe)
    tiny_pipe.unet = torch.compile(tiny_pipe.unet, fullgraph=True, backend="aot_eager")
    _generate(tiny_pipe, steps=50)
    assert agentsd.phase_history(tiny_pipe) == ["agent"] * 20 + ["tome"] * 30
    assert _graphs() == 2 and not counters["recompiles"]


def test_regional_compile_fullgraph(tiny_pipe, one_thread, fresh_dynamo):
    agentsd.apply_patch(tiny_pipe)
    eager = _generate(tiny_pipe)
    tiny_pipe.unet.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    compiled = _generate(tiny_pipe)
    assert agentsd.phase_history(tiny_pipe) == TEN_STEPS
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    graphs = _graphs()
    _generate(tiny_pipe)
    assert _graphs() == graphs and not counters["recompiles"]


def test_regional_compile_shares_one_graph_per_phase_across_blocks(one_thread, fresh_dynamo):
    """Five patched blocks (SD 1.5's first level has five): one graph per phase for all of them. A graph
    per block and phase (agentsd 0.2) passes dynamo's recompile limit (8): fullgraph=True then fails."""
    from diffusers import UNet2DConditionModel

    from tests.tiny import tiny_unet_config

    torch.manual_seed(0)
    unet = agentsd.apply_patch(UNet2DConditionModel(**{**tiny_unet_config(), "layers_per_block": 2}).eval())
    assert len(agentsd.patch_targets(unet)) == 5
    unet.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    for t, phase in ((990, "agent"), (300, "tome")) * 2:
        _unet_call(unet, torch.tensor(t))
        assert agentsd.phase_history(unet, per_call=True)[-1] == phase
    assert _graphs() == 3  # agent and tome for the five patched blocks, and the (unpatched) mid block's


def test_inductor_matches_eager_in_both_phases(one_thread, fresh_dynamo):
    """A patched transformer block (it holds the whole patched path) compiled by inductor, fp32.

    The generated kernels' index arithmetic stays within int32: Triton computes index expressions in
    int32 for tensors that small, and a larger constant there (the dst-position hash multiplied the
    cell index by 2654435769) failed to compile on the first CUDA run, an H200. The CPU kernels show
    the same index expressions.
    """
    unet = agentsd.apply_patch(make_unet())
    expected = {t: _unet_call(unet, torch.tensor(t)) for t in (990, 300)}
    block = next(m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")
    block.compile(fullgraph=True)
    for t, phase in ((990, "agent"), (300, "tome")):
        out, code = run_and_get_code(_unet_call, unet, torch.tensor(t))
        assert agentsd.phase_history(unet, per_call=True)[-1] == phase
        error = (out - expected[t]).norm() / expected[t].norm()
        assert error <= 1e-4, (phase, error.item())
        assert code, "inductor generated no kernel for the patched block"
        index_constants = [int(c) for c in re.findall(r"\b(\d+)L?\s*\*\s*x\d+\b", "\n".join(code))]
        assert all(c < 2**31 for c in index_constants), (phase, max(index_constants))


class _DeviceLog(TorchDispatchMode):
    """Records the devices of every tensor an operator reads or makes, and every host read."""

    def __init__(self):
        super().__init__()
        self.devices, self.reads = set(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in (*args, *(kwargs or {}).values(), *(out if isinstance(out, (tuple, list)) else [out])):
            if isinstance(value, torch.Tensor):
                self.devices.add(value.device.type)
        if func in (torch.ops.aten._local_scalar_dense.default,):
            self.reads.append(func)
        return out


@pytest.mark.parametrize("t", [990, 300])
def test_patched_blocks_do_no_host_work(t):
    """On the meta device, any CPU tensor made or value read inside a patched block would show."""
    unet = agentsd.apply_patch(make_unet()).to("meta")
    log = _DeviceLog()
    targets = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    for block in targets:  # log inside the blocks only (the hooks return None: arguments untouched)
        block.register_forward_pre_hook(lambda *_: log.__enter__() and None)
        block.register_forward_hook(lambda *_: log.__exit__(None, None, None))
    with torch.no_grad():
        context = torch.randn(2, 7, 32, device="meta")
        unet(torch.randn(2, 4, 16, 16, device="meta"), t, encoder_hidden_states=context)
    assert agentsd.phase_history(unet, per_call=True)[-1] == ("agent" if t == 990 else "tome")
    assert log.devices == {"meta"} and not log.reads
