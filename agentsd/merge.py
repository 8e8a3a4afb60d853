"""Bipartite soft matching (ToMe for SD) that yields the token merge and the agent merge at once.

Pure tensor code: no diffusers import. The tokens of an ``h × w`` grid are split into a dst set (one
token per ``sx × sy`` cell) and a src set (the rest). Each src token is scored against every dst
token by cosine similarity of the merge metric; the ``r`` src tokens with the highest best score are
averaged into their best dst. The agent merge uses the *same* scores and partition with a larger
``r``, so the similarity is computed once for both.

Merges are described by an index map (``index[b, i]`` = position of token ``i`` in the merged
sequence), which makes merging one ``index_add_`` and unmerging one ``index_select`` over rows —
far cheaper than scatter/gather with expanded indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Above this many score entries per batch element, the scores are computed in row chunks: on a GPU
# so that a 2048² image does not materialise a gigabyte-sized score matrix, on a CPU so that each
# chunk stays small enough for the allocator to reuse (a fresh 100 MB buffer per call costs its
# page faults every time) and for the max to read it from cache.
_SCORE_CHUNK_ELEMENTS = {"cpu": 1 << 21}
_SCORE_CHUNK_ELEMENTS_DEFAULT = 1 << 26


@dataclass
class TokenMerge:
    """One merge of ``N`` tokens into ``size`` tokens, for a batch.

    Attributes:
        index: ``[B * N]`` long tensor; row ``b * N + i`` holds ``b * size + j`` where ``j`` is the
            merged token that original token ``i`` of batch element ``b`` belongs to.
        counts: ``[B * size, 1]`` long tensor, the number of original tokens in each merged token.
        batch: ``B``.
        num_tokens: ``N``.
        size: number of merged tokens per batch element.
    """

    index: torch.Tensor
    counts: torch.Tensor
    batch: int
    num_tokens: int
    size: int

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """Average ``x`` (``[B, N, C]``) over each merged group: returns ``[B, size, C]``."""
        channels = x.shape[-1]
        total = x.new_zeros(self.batch * self.size, channels)
        total.index_add_(0, self.index, x.reshape(-1, channels))
        return (total / self.counts).view(self.batch, self.size, channels)  # int divisor: keeps x.dtype

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """Copy each merged token (``y``: ``[B, size, C]``) back to every token it holds: ``[B, N, C]``."""
        channels = y.shape[-1]
        out = y.reshape(-1, channels).index_select(0, self.index)
        return out.view(self.batch, self.num_tokens, channels)


_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply), on int64 tensors holding values in [0, 2**32).

    The multiplier is below 2**27, so no product overflows int64: CPU, CUDA and compiled kernels
    give the same bits.
    """
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def block_salt(seed: int, block: int) -> int:
    """The 32-bit salt of one block's dst positions: a pure function of the patch's seed and the block."""
    return (seed ^ (seed >> 32) ^ (block * _GOLDEN32)) & _MASK32


def position_key(salt: int | torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The random key of a block at one timestep: an int64 tensor on the timestep's device.

    A pure function of (:func:`block_salt`, timestep) that draws from no RNG stream; the timestep is
    read on its device (to 1/64 of a step), never on the host. ``salt`` may be an int64 tensor on that
    device, of any shape (the salts of several blocks): the keys have its shape.
    """
    t = timestep.reshape(-1)[0].float().mul(64).round().long() & _MASK32
    return _mix32(_mix32(t ^ salt) ^ ((salt * 3 + 1) & _MASK32))


def dst_positions(
    h: int, w: int, sx: int, sy: int, key: torch.Tensor | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Flat grid positions of the dst tokens: one per full ``sx × sy`` cell, on ``device``.

    With a ``key`` (see :func:`position_key`) the position inside each cell is a hash of the key and
    the cell, else it is the top-left corner. Rows and columns past the last full cell (grids that
    ``sx``/``sy`` do not divide) hold only src tokens. A key of shape ``[K]`` gives ``[K, cells]``:
    the positions of ``K`` blocks at once, as ``K`` calls with one key each would.
    """
    cells_y, cells_x = h // sy, w // sx
    if key is None:
        offset = torch.zeros(cells_y, cells_x, dtype=torch.long, device=device)
    else:
        # The cell index enters by xor, never times a constant: inductor folds ``arange * c`` into an
        # index expression, which Triton computes in int32 for small tensors (a c >= 2**31 failed to
        # compile on an H200). _mix32 is a bijection, so distinct cells still get distinct hashes.
        device = key.device
        cell = torch.arange(cells_y * cells_x, device=device)
        offset = (_mix32(key.unsqueeze(-1) ^ cell) % (sx * sy)).view(*key.shape, cells_y, cells_x)
    rows = torch.arange(cells_y, device=device).unsqueeze(1) * sy + offset // sx
    cols = torch.arange(cells_x, device=device).unsqueeze(0) * sx + offset % sx
    return (rows * w + cols).flatten(-2)


def bipartite_soft_matching(
    metric: torch.Tensor,
    h: int,
    w: int,
    sx: int,
    sy: int,
    r: int,
    agent_r: int | None = None,
    dst: torch.Tensor | None = None,
) -> tuple[TokenMerge, TokenMerge | None]:
    """Plan the ToMe merge of ``r`` tokens and, optionally, the agent merge of ``agent_r`` tokens.

    Static shapes throughout (every size follows from ``N``, the cells and ``r``), no host round trip:
    safe inside ``torch.compile(fullgraph=True)`` and CUDA graphs.

    Args:
        metric: ``[B, N, C]`` features whose cosine similarity decides the matching (AgentSD and
            ToMeSD use the transformer block's input hidden states). ``N`` must equal ``h * w``.
        h, w: the token grid, in tokens.
        sx, sy: cell size for the dst set; one dst token per cell. Must be >= 1.
        r: number of src tokens merged into dst tokens for the main merge (capped at the src count).
        agent_r: number of src tokens merged for the agent merge, or ``None`` for no agents. Capped at
            the src count, so ``sx = sy = 4`` with a large ratio leaves one agent per cell.
        dst: the dst positions, one per full cell (:func:`dst_positions`, random with a key); ``None``
            for the top-left of each cell.

    Returns:
        ``(merge, agents)``: the main :class:`TokenMerge` (``N - r`` tokens) and the agent one
        (``N - agent_r`` tokens) or ``None``.
    """
    batch, num_tokens, _ = metric.shape
    if num_tokens != h * w:
        raise ValueError(f"metric has {num_tokens} tokens but the grid is {h}x{w}")
    device = metric.device

    if dst is None:
        dst = dst_positions(h, w, sx, sy, device=device)
    num_dst = (h // sy) * (w // sx)
    num_src = num_tokens - num_dst

    r = max(0, min(r, num_src)) if num_dst else 0
    agent_r = None if agent_r is None else max(0, min(agent_r, num_src)) if num_dst else 0

    if num_dst and (r or agent_r):
        with torch.no_grad():
            # argmax over dst is unaffected by the src norm, so only the dst side is normalised up
            # front; dividing the best score by the src norm afterwards gives the cosine.
            b = metric.index_select(1, dst)
            b = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True)
            best, best_dst = _best_match(metric, b)
            # in float32: the dst sentinels below must be exact integers up to the number of cells
            best = best / torch.linalg.vector_norm(metric, dim=-1, dtype=torch.float32)
            # Every token is ranked, so no src/dst partition is needed: dst j scores -2 - j, below any
            # cosine, so it ranks num_src + j, after every src token and in cell order.
            sentinel = torch.arange(-2, -2 - num_dst, -1, dtype=best.dtype, device=device)
            best.index_copy_(1, dst, sentinel.expand(batch, -1))
            order = best.argsort(dim=-1, descending=True)
            # rank[b, i] = position of token i in the descending order of its best score
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(num_tokens, device=device).expand(batch, -1))
    else:
        rank = best_dst = None

    main = _plan(batch, num_tokens, num_dst, rank, best_dst, r, device)
    agents = None if agent_r is None else _plan(batch, num_tokens, num_dst, rank, best_dst, agent_r, device)
    return main, agents


def _best_match(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and argmax over dst of ``a @ b^T``, computed in row chunks when the matrix is large."""
    limit = _SCORE_CHUNK_ELEMENTS.get(a.device.type, _SCORE_CHUNK_ELEMENTS_DEFAULT)
    rows = max(1, limit // max(1, b.shape[1]))
    if a.shape[1] <= rows:
        return (a @ b.transpose(1, 2)).max(dim=-1)
    best, best_idx = [], []
    for chunk in a.split(rows, dim=1):
        value, index = (chunk @ b.transpose(1, 2)).max(dim=-1)
        best.append(value)
        best_idx.append(index)
    return torch.cat(best, dim=1), torch.cat(best_idx, dim=1)


def _plan(
    batch: int,
    num_tokens: int,
    num_dst: int,
    rank: torch.Tensor | None,
    best_dst: torch.Tensor | None,
    r: int,
    device: torch.device,
) -> TokenMerge:
    """Index map for merging the ``r`` best-matched src tokens into their dst token.

    Merged layout per batch element: the ``num_src - r`` kept src tokens (in rank order), then the
    dst tokens (each averaged with the src tokens merged into it). Without ``rank`` (nothing is
    merged) the layout is the grid order.
    """
    size = num_tokens - r
    if rank is None:
        index = torch.arange(batch * num_tokens, device=device)
    else:
        kept = num_tokens - num_dst - r
        # rank >= r: a kept src token (slot rank - r) or dst j (rank num_src + j, slot kept + j);
        # rank < r: merged into its best dst. The batch offsets fold the "- r" in.
        index = torch.where(rank >= r, rank, best_dst + (kept + r))
        index += torch.arange(-r, batch * size - r, size, device=device).unsqueeze(1)
        index = index.flatten()
    counts = torch.zeros(batch * size, 1, dtype=torch.long, device=device)
    counts.index_add_(0, index, torch.ones(index.shape[0], 1, dtype=torch.long, device=device))
    return TokenMerge(index=index, counts=counts, batch=batch, num_tokens=num_tokens, size=size)
