"""The merge against tomesd's own bipartite soft matching (an independent implementation)."""

import pytest
import torch
from tomesd.merge import bipartite_soft_matching_random2d

import agentsd.merge as merge_mod
from agentsd.merge import bipartite_soft_matching, block_salt, dst_positions, position_key


def _tomesd_roundtrip(metric, x, h, w, sx, sy, r):
    m, u = bipartite_soft_matching_random2d(metric, w, h, sx, sy, r, no_rand=True)
    return u(m(x)), m(x).shape[1]


@pytest.mark.parametrize("h,w,sx,sy,ratio", [(16, 16, 2, 2, 0.5), (13, 21, 2, 2, 0.4), (16, 24, 4, 4, 0.9),
                                             (9, 7, 4, 2, 0.3), (8, 8, 1, 1, 0.0)])
def test_merge_matches_tomesd(h, w, sx, sy, ratio):
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, h * w, 16, generator=g)
    x = torch.randn(2, h * w, 24, generator=g)
    r = int(h * w * ratio)
    main, _ = bipartite_soft_matching(metric, h, w, sx, sy, r)
    expected, size = _tomesd_roundtrip(metric, x, h, w, sx, sy, r)
    assert main.size == size
    # Merged token order differs between the implementations; merge-then-unmerge (each token
    # replaced by the mean of its group) does not depend on it.
    torch.testing.assert_close(main.unmerge(main.merge(x)), expected, rtol=1e-5, atol=1e-6)


def test_agent_merge_is_a_harder_merge_of_the_same_partition():
    h, w = 16, 20
    metric = torch.randn(2, h * w, 8, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, h * w, 8, generator=torch.Generator().manual_seed(2))
    n = h * w
    main, agents = bipartite_soft_matching(metric, h, w, 4, 4, int(n * 0.4), int(n * 0.95))
    # 0.95 is capped at the src count: one agent per 4x4 cell
    assert agents.size == (h // 4) * (w // 4)
    assert main.size == n - int(n * 0.4)
    src_count = n - (h // 4) * (w // 4)
    expected, _ = _tomesd_roundtrip(metric, x, h, w, 4, 4, src_count)
    torch.testing.assert_close(agents.unmerge(agents.merge(x)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["tied", "zero rows", "fp16 overflow", "random"])
def test_plan_is_a_valid_merge_whatever_the_scores(kind):
    """Each dst token keeps a slot of its own and exactly ``r`` src tokens join a dst, also when scores
    tie (a constant image), are NaN (zero or overflowing features) or the key is random."""
    h, w, sx, sy, r = 12, 16, 2, 2, 70
    g = torch.Generator().manual_seed(4)
    metric = {"tied": torch.ones(2, h * w, 8), "random": torch.randn(2, h * w, 8, generator=g)}.get(kind)
    if kind == "zero rows":
        metric = torch.randn(2, h * w, 8, generator=g)
        metric[:, ::5] = 0
    if kind == "fp16 overflow":
        metric = (torch.randn(2, h * w, 8, generator=g) * 3e4).half()
    dst = dst_positions(h, w, sx, sy, position_key(block_salt(1, 2), torch.tensor(500)))
    plans = bipartite_soft_matching(metric, h, w, sx, sy, r, agent_r=h * w, dst=dst)
    for plan, merged in zip(plans, (r, h * w - dst.numel()), strict=True):  # the agents: every src merged
        index = plan.index.view(2, h * w) - torch.arange(2).unsqueeze(1) * plan.size
        counts = plan.counts.view(2, plan.size)
        assert plan.size == h * w - merged and bool((counts >= 1).all())  # every slot holds a token
        for b in range(2):
            dst_slots = index[b, dst]
            assert dst_slots.unique().numel() == dst.numel()  # dst tokens never share a slot
            assert torch.equal(dst_slots, torch.arange(plan.size - dst.numel(), plan.size))
            assert int(counts[b, dst_slots].sum()) - dst.numel() == merged  # r src tokens joined a dst


def test_scores_computed_once_for_both_merges(monkeypatch):
    calls = []
    original = merge_mod._best_match
    monkeypatch.setattr(merge_mod, "_best_match", lambda a, b: calls.append(1) or original(a, b))
    metric = torch.randn(2, 64, 8)
    merge_mod.bipartite_soft_matching(metric, 8, 8, 2, 2, 20, 40)
    assert len(calls) == 1


def test_chunked_scores_equal_unchunked(monkeypatch):
    metric = torch.randn(2, 24 * 24, 8, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 24 * 24, 5)
    full, _ = bipartite_soft_matching(metric, 24, 24, 2, 2, 200)
    monkeypatch.setattr(merge_mod, "_SCORE_CHUNK_ELEMENTS", {"cpu": 1000})
    chunked, _ = bipartite_soft_matching(metric, 24, 24, 2, 2, 200)
    assert torch.equal(full.index, chunked.index)
    assert torch.equal(full.merge(x), chunked.merge(x))


def test_merge_averages_and_unmerge_copies():
    metric = torch.randn(1, 16, 4)
    x = torch.randn(1, 16, 3)
    main, _ = bipartite_soft_matching(metric, 4, 4, 2, 2, 6)
    merged = main.merge(x)
    assert merged.shape == (1, 10, 3)
    index = main.index.view(16)
    for j in range(10):
        members = (index == j).nonzero().flatten()
        torch.testing.assert_close(merged[0, j], x[0, members].mean(0))
    assert torch.equal(main.unmerge(merged)[0], merged[0, index])


def test_dst_positions_one_per_cell():
    h, w, sx, sy = 10, 13, 4, 2
    for key in (None, position_key(block_salt(5, 0), torch.tensor(981))):
        pos = dst_positions(h, w, sx, sy, key)
        rows, cols = pos // w, pos % w
        cells = set(zip((rows // sy).tolist(), (cols // sx).tolist(), strict=True))
        assert len(pos) == len(cells) == (h // sy) * (w // sx)
        assert rows.max() < (h // sy) * sy and cols.max() < (w // sx) * sx
    top_left = dst_positions(h, w, sx, sy)
    assert torch.equal(top_left % w % sx, torch.zeros_like(top_left))
    a = dst_positions(64, 64, 2, 2, position_key(block_salt(0, 0), torch.tensor(981)))
    t = torch.tensor(981)
    for other in (position_key(block_salt(1, 0), t), position_key(block_salt(0, 1), t),
                  position_key(block_salt(0, 0), torch.tensor(961))):
        assert not torch.equal(a, dst_positions(64, 64, 2, 2, other))  # seed, block and timestep all count
    # a pure function of its inputs, whatever the timestep's dtype
    assert torch.equal(a, dst_positions(64, 64, 2, 2, position_key(block_salt(0, 0), torch.tensor(981.0))))
    # every offset in a cell is used about equally
    keys = [position_key(block_salt(0, 0), torch.tensor(t)) for t in range(8)]
    offsets = torch.stack([dst_positions(64, 64, 2, 2, key) for key in keys])
    rows, cols = offsets // 64, offsets % 64
    counts = torch.bincount(((rows % 2) * 2 + cols % 2).flatten(), minlength=4).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.1  # 8192 draws: 0.1 is about 5 sigma


def test_grid_mismatch_is_rejected():
    with pytest.raises(ValueError, match="grid"):
        bipartite_soft_matching(torch.randn(1, 10, 4), 3, 3, 2, 2, 2)


def test_dst_positions_of_several_blocks_at_once_equal_one_block_at_a_time():
    """A call hashes every patched block's positions at once (one set of kernels, not one per block)."""
    t = torch.tensor(981)
    salts = [block_salt(3, block) for block in range(5)]
    together = dst_positions(20, 26, 2, 2, position_key(torch.tensor(salts), t))
    apart = torch.stack([dst_positions(20, 26, 2, 2, position_key(salt, t)) for salt in salts])
    assert together.shape == (5, 10 * 13) and torch.equal(together, apart)
