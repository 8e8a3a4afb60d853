"""Agent attention against a plain einsum of the paper's formula, written independently here."""

import pytest
import torch
from diffusers.models.attention_processor import Attention
from tomesd.merge import bipartite_soft_matching_random2d

import agentsd
import agentsd.attention as attention_mod
from agentsd.attention import agent_attention, agent_self_attention
from agentsd.merge import bipartite_soft_matching
from agentsd.state import AgentSDConfig, Plan


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


def _plan(metric, h, w, config):
    """The agent-phase Plan a patched block computes from ``metric`` (no random positions)."""
    n = metric.shape[1]
    merge, agents = bipartite_soft_matching(metric, h, w, config.sx, config.sy, r=int(n * config.ratio),
                                            agent_r=int(n * config.agent_ratio))
    return Plan(True, merge, agents)


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
def test_agent_self_attention_matches_reference(h, w):
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8).eval()
    x = torch.randn(2, h * w, 32)
    metric = torch.randn(2, h * w, 32)
    config = AgentSDConfig(use_rand=False)
    with torch.no_grad():
        out = agent_self_attention(attn, x, _plan(metric, h, w, config), config)
        expected = _reference_self_attention(attn, x, metric, h, w, config)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_too_many_agents_falls_back_to_softmax_on_merged_tokens(tiny_unet, monkeypatch):
    """2x2 cells leave N/4 agents, not fewer than half of the tokens left at ratio 0.7: the layer's
    own processor runs on the merged tokens instead."""
    called = []
    monkeypatch.setattr(attention_mod, "agent_attention", lambda *a, **k: called.append(1))
    agentsd.apply_patch(tiny_unet, agent_until=1.0, sx=2, sy=2, ratio=0.7)
    with torch.no_grad():
        out = tiny_unet(torch.randn(2, 4, 16, 16), 900, encoder_hidden_states=torch.randn(2, 7, 32)).sample
    assert agentsd.phase_history(tiny_unet) == ["agent"]
    assert not called and torch.isfinite(out).all()


@pytest.mark.parametrize("precision", [None, "fp32"])
def test_attn_precision(monkeypatch, precision):
    seen = []
    original = attention_mod.agent_attention
    monkeypatch.setattr(
        attention_mod, "agent_attention", lambda q, *a, **k: seen.append(q.dtype) or original(q, *a, **k)
    )
    attn = Attention(query_dim=32, heads=4, dim_head=8).eval().to(torch.bfloat16)
    x = torch.randn(2, 256, 32, dtype=torch.bfloat16)
    config = AgentSDConfig(use_rand=False, attn_precision=precision)
    with torch.no_grad():
        out = agent_self_attention(attn, x, _plan(x, 16, 16, config), config)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert seen == [torch.float32 if precision == "fp32" else torch.bfloat16]
