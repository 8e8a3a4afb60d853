"""Agent attention against a plain einsum of the paper's formula, written independently here."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from tomesd.merge import bipartite_soft_matching_random2d

import agentsd.attention as attention_mod
from agentsd.attention import AgentSDProcessor, agent_attention
from agentsd.patch import Patch
from agentsd.state import AgentSDConfig, Call


def einsum_agent_attention(q, k, v, a, s, k_scale2, k_shortcut):
    """O = softmax(Q Aᵀ s^k_scale2) softmax(A Kᵀ s) V + k_shortcut V, matrices built explicitly."""
    agent_v = torch.einsum("bhnm,bhmd->bhnd", torch.einsum("bhnd,bhmd->bhnm", a, k).mul(s).softmax(-1), v)
    weights = torch.einsum("bhnd,bhmd->bhnm", q, a).mul(s**k_scale2).softmax(-1)
    return torch.einsum("bhnm,bhmd->bhnd", weights, agent_v) + k_shortcut * v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_agent_attention_matches_einsum(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 16, generator=g, dtype=dtype) for _ in range(3))
    a = torch.randn(2, 3, 7, 16, generator=g, dtype=dtype)
    s = 16**-0.5
    out = agent_attention(q, k, v, a, scale=s, k_scale2=0.3, k_shortcut=0.075)
    torch.testing.assert_close(out, einsum_agent_attention(q, k, v, a, s, 0.3, 0.075))


def _processor(h, w, phase, metric, **overrides):
    """A processor of a patch whose current call (this thread's) is in ``phase`` on an h x w grid."""
    settings = dict(use_rand=False)
    settings.update(overrides)
    patch = Patch(AgentSDConfig(**settings))
    metrics = {} if metric is None else {0: metric}
    patch.local.call = Call(phase=phase, latent_size=(h, w), timestep=torch.tensor(500.0), metrics=metrics)
    return AgentSDProcessor(patch, AttnProcessor2_0(), downsample=1, block_index=0)


def _reference_self_attention(attn, x, metric, h, w, state):
    """AgentSD's attn1 written from the paper with tomesd's merge and explicit einsums."""
    n = x.shape[1]
    m, u = bipartite_soft_matching_random2d(metric, w, h, state.sx, state.sy, int(n * state.ratio),
                                            no_rand=True)
    m_agent, _ = bipartite_soft_matching_random2d(metric, w, h, state.sx, state.sy,
                                                  int(n * state.agent_ratio), no_rand=True)
    tokens, agents = m(x), m_agent(x)

    def heads(t):
        return t.view(t.shape[0], t.shape[1], attn.heads, -1).transpose(1, 2)

    q, k, v = heads(attn.to_q(tokens)), heads(attn.to_k(tokens)), heads(attn.to_v(tokens))
    a = heads(attn.to_q(agents))
    assert a.shape[2] * 2 < q.shape[2]
    out = einsum_agent_attention(q, k, v, a, q.shape[-1] ** -0.5, state.k_scale2, state.k_shortcut)
    out = out.transpose(1, 2).reshape(x.shape[0], tokens.shape[1], -1)
    return u(attn.to_out[0](out))


@pytest.mark.parametrize("h,w", [(16, 16), (13, 22)])
def test_agent_phase_processor_matches_reference(h, w):
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8).eval()
    x = torch.randn(2, h * w, 32)
    metric = torch.randn(2, h * w, 32)
    processor = _processor(h, w, "agent", metric)
    with torch.no_grad():
        out = processor(attn, x)
        expected = _reference_self_attention(attn, x, metric, h, w, processor.patch.config)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert not processor.patch.local.call.metrics  # the metric is consumed, not kept alive


def test_full_phase_and_missing_metric_defer_to_original():
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(1, 64, 16)
    expected = AttnProcessor2_0()(attn, x)
    for phase, metric in (("full", None), ("agent", None)):
        assert torch.equal(_processor(8, 8, phase, metric)(attn, x), expected)
    # a processor diffusers re-creates from its class (load_ip_adapter) is plain attention
    assert torch.equal(AgentSDProcessor()(attn, x), expected)


def test_too_many_agents_falls_back_to_softmax_on_merged_tokens(monkeypatch):
    # 2x2 cells leave N/4 = 16 agents, not fewer than half of the 20 tokens left at ratio 0.7.
    called = []
    monkeypatch.setattr(attention_mod, "agent_attention", lambda *a, **k: called.append(1))
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(2, 64, 16)
    out = _processor(8, 8, "agent", x, sx=2, sy=2, ratio=0.7)(attn, x)
    assert not called and out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("precision", [None, "fp32"])
def test_attn_precision(monkeypatch, precision):
    seen = []
    original = attention_mod.agent_attention
    monkeypatch.setattr(
        attention_mod, "agent_attention", lambda q, *a, **k: seen.append(q.dtype) or original(q, *a, **k)
    )
    attn = Attention(query_dim=32, heads=4, dim_head=8).eval().to(torch.bfloat16)
    x = torch.randn(2, 256, 32, dtype=torch.bfloat16)
    processor = _processor(16, 16, "agent", x, attn_precision=precision)
    with torch.no_grad():
        out = processor(attn, x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert seen == [torch.float32 if precision == "fp32" else torch.bfloat16]
