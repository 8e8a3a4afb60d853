"""Agent attention and the diffusers attention processor that runs AgentSD in a self-attention layer."""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

from agentsd.merge import bipartite_soft_matching, position_key

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

    from agentsd.patch import Patch


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


_OWN_PARAMETERS = ("attn", "hidden_states", "encoder_hidden_states", "attention_mask", "temb")


class AgentSDProcessor:
    """Self-attention processor for one patched ``attn1``: ToMe merge, agent or softmax attention, unmerge.

    What it runs is decided once per UNet call and read from the patch's per-thread
    :class:`~agentsd.state.Call`: ``"full"`` hands the call to the processor that was there before
    (``original``, untouched, with every extra ``cross_attention_kwargs`` it takes); ``"tome"`` merges
    tokens and runs softmax attention on them; ``"agent"`` also builds agent tokens from the same
    similarity scores and runs agent attention. The merge metric (the block's input hidden states)
    comes from a forward pre-hook on the block, through the call.

    Args:
        patch: the :class:`~agentsd.patch.Patch` of the UNet. ``None`` when diffusers re-creates the
            processor from its class (``load_ip_adapter`` does): it then runs ``original`` until the
            patch binds it again at the next UNet call.
        original: the processor to run outside the merged phases (default ``AttnProcessor2_0``).
        downsample: how many times the block's token grid is downsampled from the latent.
        block_index: the block's index among the patched blocks (a salt of its dst positions).
    """

    def __init__(self, patch: Patch | None = None, original=None, downsample: int = 1, block_index: int = 0):
        self.patch = patch
        self.downsample = downsample
        self.block_index = block_index
        self.set_original(AttnProcessor2_0() if original is None else original)

    def set_original(self, original) -> None:
        """Wrap ``original``: it runs outside the merged phases, and its extra arguments are ours."""
        self.original = original
        self.fused = isinstance(original, FusedAttnProcessor2_0)
        # diffusers passes an attention only the cross_attention_kwargs its processor's __call__
        # names: name the wrapped processor's extra ones too, so they reach it.
        self.__dict__.pop("__call__", None)
        try:
            theirs = inspect.signature(original.__call__).parameters
        except (TypeError, ValueError):
            return
        extra = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for name, p in theirs.items()
            if name not in _OWN_PARAMETERS
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        if extra:
            call = functools.partial(type(self).__call__, self)
            own = list(inspect.signature(type(self).__call__).parameters.values())[1:-1]
            call.__signature__ = inspect.Signature(own + extra)
            self.__dict__["__call__"] = call  # read by inspect only; calls use the class's __call__

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        patch = self.patch
        call = None if patch is None else patch.local.call
        metric = None if call is None else call.metrics.pop(self.block_index, None)
        if metric is not None:
            grid = call.grid(self.downsample)
            if (
                encoder_hidden_states is None
                and attention_mask is None
                and hidden_states.ndim == 3
                and grid[0] * grid[1] == hidden_states.shape[1]
                and metric.shape == hidden_states.shape
                and attn.group_norm is None
                and attn.spatial_norm is None
                and attn.norm_q is None
                and attn.norm_k is None
            ):
                return self._merged_attention(attn, hidden_states, metric, grid, call)
        if temb is not None:
            kwargs["temb"] = temb
        return self.original(
            attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
            **kwargs,
        )

    def _project(self, attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fused and hasattr(attn, "to_qkv"):
            return attn.to_qkv(x).chunk(3, dim=-1)
        return attn.to_q(x), attn.to_k(x), attn.to_v(x)

    def _merged_attention(self, attn, hidden_states, metric, grid, call) -> torch.Tensor:
        config = self.patch.config
        batch, tokens, _ = hidden_states.shape
        h, w = grid
        agent = call.phase == "agent"
        sx, sy = (config.sx, config.sy) if agent else (config.late_sx, config.late_sy)
        # Random dst positions would mix prompted and unprompted halves of a CFG batch when the
        # batch size is odd, so randomness is off then (as in ToMeSD).
        key = None
        if config.use_rand and batch % 2 == 0:
            key = position_key(config.seed, self.block_index, call.timestep)
        merge, agents = bipartite_soft_matching(
            metric,
            h,
            w,
            sx,
            sy,
            r=int(tokens * config.ratio),
            agent_r=int(tokens * config.agent_ratio) if agent else None,
            key=key,
        )
        x = merge.merge(hidden_states) if merge.size < tokens else hidden_states
        heads = attn.heads
        q, k, v = (_heads(t, heads) for t in self._project(attn, x))
        # Agents pay off only when they are few next to the merged tokens.
        if agents is not None and agents.size * 2 < merge.size:
            a = _heads(attn.to_q(agents.merge(hidden_states)), heads)
            dtype = q.dtype
            if config.attn_precision == "fp32":
                q, k, v, a = q.float(), k.float(), v.float(), a.float()
            out = agent_attention(
                q, k, v, a, scale=attn.scale, k_scale2=config.k_scale2, k_shortcut=config.k_shortcut
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
