"""Agent attention: the paper's formula as two SDPA calls, and AgentSD's self-attention built on it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

    from agentsd.state import AgentSDConfig, Plan


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    *,
    scale: float,
    k_scale2: float = 0.3,
    k_shortcut: float = 0.075,
) -> torch.Tensor:
    """Agent attention of the paper, as two softmax attentions through SDPA.

    ``V_A = softmax(A Kᵀ·s) V`` (the agents gather from all keys) and
    ``O = softmax(Q Aᵀ·s^k_scale2) V_A + k_shortcut·V`` (the queries read from the agents).

    Args:
        q, k, v: ``[B, heads, N, d]`` queries, keys and values of the (merged) tokens.
        agents: ``[B, heads, n, d]`` agent tokens, already projected (AgentSD uses ``to_q``).
        scale: ``s``, normally ``d ** -0.5``.
        k_scale2: exponent of ``s`` in the second softmax; 0.3 (the paper's value) sharpens it.
        k_shortcut: weight of the value shortcut; 0.075 in the paper.

    Returns:
        ``[B, heads, N, d]``. Cost is ``O(N·n)`` instead of ``O(N²)``.
    """
    agent_values = F.scaled_dot_product_attention(agents, k, v, scale=scale)
    out = F.scaled_dot_product_attention(q, agents, agent_values, scale=scale**k_scale2)
    # not in place: SDPA's output is saved for its backward
    return torch.add(out, v, alpha=k_shortcut) if k_shortcut else out


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, inner = x.shape
    return x.view(batch, tokens, heads, inner // heads).transpose(1, 2)


def agent_self_attention(
    attn: Attention, x: torch.Tensor, plan: Plan, config: AgentSDConfig, fused: bool = False
) -> torch.Tensor:
    """AgentSD's self-attention of one layer: merge, agent attention, output projection, unmerge.

    Computes what diffusers' plain processors compute for ``attn`` (projections, attention, ``to_out``,
    residual and rescaling), with the merged tokens as queries, keys and values and the agents built
    from the same input by ``plan.agents``.

    Args:
        attn: a diffusers ``Attention`` computing self-attention (no group, spatial or q/k norm).
        x: ``[B, N, C]``, the layer's input.
        plan: the block's merges for this call; ``plan.agents`` must be set.
        config: the patch's settings (``k_scale2``, ``k_shortcut``, ``attn_precision``).
        fused: use the fused ``to_qkv`` projection (the layer runs ``FusedAttnProcessor2_0``).

    Returns:
        ``[B, N, C]``.
    """
    tokens = x if plan.merge is None else plan.merge.merge(x)
    if fused:
        q, k, v = attn.to_qkv(tokens).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
    q, k, v = (_heads(t, attn.heads) for t in (q, k, v))
    a = _heads(attn.to_q(plan.agents.merge(x)), attn.heads)
    dtype = q.dtype
    if config.attn_precision == "fp32":
        q, k, v, a = q.float(), k.float(), v.float(), a.float()
    out = agent_attention(q, k, v, a, scale=attn.scale, k_scale2=config.k_scale2,
                          k_shortcut=config.k_shortcut)
    out = out.to(dtype).transpose(1, 2).reshape(tokens.shape[0], tokens.shape[1], -1)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + tokens
    if attn.rescale_output_factor != 1.0:
        out = out / attn.rescale_output_factor
    return out if plan.merge is None else plan.merge.unmerge(out)
