"""Agent attention and the diffusers attention processor that runs AgentSD in a self-attention layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from agentsd.merge import bipartite_soft_matching

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

    from agentsd.patch import PatchState


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
    return out.add_(v, alpha=k_shortcut) if k_shortcut else out


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, inner = x.shape
    return x.view(batch, tokens, heads, inner // heads).transpose(1, 2)


class AgentSDProcessor:
    """Self-attention processor for one patched ``attn1``: ToMe merge, agent or softmax attention, unmerge.

    What it runs is decided per UNet call by the shared :class:`~agentsd.patch.PatchState`:
    ``"full"`` hands the call to the processor that was there before (untouched); ``"tome"`` merges
    tokens and runs softmax attention on them; ``"agent"`` also builds agent tokens from the same
    similarity scores and runs agent attention. The merge metric (the block's input hidden states)
    is handed over by a forward pre-hook on the block, in ``self.metric``.
    """

    def __init__(self, state: PatchState, original, downsample: int, block_index: int):
        self.state = state
        self.original = original
        self.downsample = downsample
        self.block_index = block_index
        self.metric: torch.Tensor | None = None

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        metric, self.metric = self.metric, None
        state = self.state
        phase = state.phase
        grid = state.grid(self.downsample)
        if (
            phase == "full"
            or metric is None
            or grid is None
            or encoder_hidden_states is not None
            or attention_mask is not None
            or hidden_states.ndim != 3
            or grid[0] * grid[1] != hidden_states.shape[1]
            or attn.group_norm is not None
            or attn.spatial_norm is not None
            or attn.norm_q is not None
            or attn.norm_k is not None
        ):
            kwargs = {} if temb is None else {"temb": temb}
            return self.original(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **kwargs,
            )
        return self._merged_attention(attn, hidden_states, metric, grid, phase)

    def _merged_attention(self, attn, hidden_states, metric, grid, phase) -> torch.Tensor:
        state = self.state
        batch, tokens, _ = hidden_states.shape
        h, w = grid
        agent = phase == "agent"
        sx, sy = (state.sx, state.sy) if agent else (state.late_sx, state.late_sy)
        # Random dst positions would mix prompted and unprompted halves of a CFG batch when the
        # batch size is odd, so randomness is off then (as in ToMeSD).
        generator = state.generator(self.block_index) if state.use_rand and batch % 2 == 0 else None
        merge, agents = bipartite_soft_matching(
            metric,
            h,
            w,
            sx,
            sy,
            r=int(tokens * state.ratio),
            agent_r=int(tokens * state.agent_ratio) if agent else None,
            generator=generator,
        )
        x = merge.merge(hidden_states) if merge.size < tokens else hidden_states
        heads = attn.heads
        q = _heads(attn.to_q(x), heads)
        k = _heads(attn.to_k(x), heads)
        v = _heads(attn.to_v(x), heads)
        # Agents pay off only when they are few next to the merged tokens.
        if agents is not None and agents.size * 2 < merge.size:
            a = _heads(attn.to_q(agents.merge(hidden_states)), heads)
            dtype = q.dtype
            if state.attn_precision == "fp32":
                q, k, v, a = q.float(), k.float(), v.float(), a.float()
            out = agent_attention(
                q, k, v, a, scale=attn.scale, k_scale2=state.k_scale2, k_shortcut=state.k_shortcut
            ).to(dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, x.shape[1], -1)
        out = attn.to_out[1](attn.to_out[0](out))
        if merge.size < tokens:
            out = merge.unmerge(out)
        if attn.residual_connection:
            out = out + hidden_states
        if attn.rescale_output_factor != 1.0:
            out = out / attn.rescale_output_factor
        return out
