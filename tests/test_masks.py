"""The multi-block sampler: I-JEPA's contract (shapes, disjointness, equal lengths) with its four defects fixed."""
import dataclasses
import math

import numpy as np
import pytest
import torch

import us_data as D
import us_jepa as U

DEMO = U.MaskConfig()
PAPER = U.MaskConfig(tgt_scale=(0.075, 0.125), min_keep=10)
COVER, PAPER_COVER = (dataclasses.replace(c, place="cover") for c in (DEMO, PAPER))


@pytest.mark.parametrize("grid,cfg", [(6, DEMO), (14, PAPER), (8, PAPER)])
def test_contract(grid, cfg):
    rng = np.random.default_rng(0)
    for _ in range(50):
        ctx, tgt = U.sample_masks(rng, 8, grid, cfg)
        assert ctx.dtype == tgt.dtype == torch.int64
        assert ctx.ndim == 2 and ctx.shape[0] == 8 and ctx.shape[1] >= cfg.min_keep  # equal lengths: a tensor
        assert tgt.shape[:2] == (cfg.n_targets, 8)
        for t in (ctx, tgt):
            assert t.min() >= 0 and t.max() < grid * grid
        for b in range(8):
            c = ctx[b].tolist()
            assert c == sorted(set(c))  # sorted, unique
            assert not set(c) & set(tgt[:, b].flatten().tolist())  # context disjoint from every target
            for m in range(cfg.n_targets):  # each target is one solid h x w block
                r, q = np.divmod(tgt[m, b].numpy(), grid)
                assert len(r) == (r.max() - r.min() + 1) * (q.max() - q.min() + 1)


def coverage(grid, cfg, batches=300):
    rng = np.random.default_rng(1)
    tc, cc = np.zeros(grid * grid), np.zeros(grid * grid)
    for _ in range(batches):
        ctx, tgt = U.sample_masks(rng, 16, grid, cfg)
        np.add.at(tc, tgt.flatten().numpy(), 1)
        np.add.at(cc, ctx.flatten().numpy(), 1)
    return tc / tc.mean(), cc / cc.mean()


@pytest.mark.parametrize("grid,cfg", [(6, DEMO), (14, PAPER), (6, COVER), (14, PAPER_COVER)])
def test_every_patch_reachable(grid, cfg):
    """fix (a)/(d): the last row and column are reachable, as a target and as context, with either placement."""
    tc, cc = coverage(grid, cfg)
    last = [i for i in range(grid * grid) if i // grid == grid - 1 or i % grid == grid - 1]
    assert (tc[last] > 0).all() and (cc[last] > 0).all()


@pytest.mark.parametrize("grid,cfg", [(6, COVER), (14, PAPER_COVER)])
def test_cover_placement_covers_every_patch_near_uniformly(grid, cfg):
    """--place cover: coverage of every patch, as a target and as context, stays within a factor 2 of the mean
    (I-JEPA's uniform corners, the default --place fit, give the 14x14 corners ~0.1 of the mean)."""
    tc, cc = coverage(grid, cfg)
    for c in (tc, cc):
        assert c.min() > 0.5 and c.max() < 2.0, (c.min(), c.max())


def test_scale_and_aspect_drawn_independently():
    """fix (b): I-JEPA drew one number for both, so a block's area fixed its shape."""
    rng = np.random.default_rng(0)
    sizes = [U.block_size(rng, 14, (0.075, 0.3), (0.5, 2.0)) for _ in range(3000)]
    area = np.array([h * w for h, w in sizes], float)
    aspect = np.array([math.log(h / w) for h, w in sizes])
    assert abs(np.corrcoef(area, aspect)[0, 1]) < 0.1
    assert len(set(sizes)) > 10


def test_truncation_is_a_random_subset():
    """fix (c): contexts are cut to the batch minimum by a random subset, not the first indices in raster order.
    With truncation kept to the first K indices the mean kept row would sit well above the block's centre."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(200):
        ctx, _ = U.sample_masks(rng, 16, 14, PAPER)
        rows.append((ctx // 14).float().mean().item())
    assert abs(np.mean(rows) - 6.5) < 0.5


def test_min_keep_unreachable_is_a_clear_error():
    with pytest.raises(U.UserError, match="lower --tgt_scale"):
        U.sample_masks(np.random.default_rng(0), 4, 4, U.MaskConfig(tgt_scale=(0.9, 1.0), min_keep=3))


def test_apply_masks_matches_a_loop():
    x = torch.randn(3, 10, 5)
    idx = torch.tensor([[[0, 2], [9, 1], [4, 4]], [[3, 3], [0, 9], [1, 2]]])  # (M=2, B=3, K=2), repeats
    out = U.apply_masks(x, idx)
    assert out.shape == (6, 2, 5)
    for m in range(2):
        for b in range(3):
            for k in range(2):
                assert torch.equal(out[m * 3 + b, k], x[b, idx[m, b, k]])
    x.requires_grad_(True)
    U.apply_masks(x, idx).sum().backward()  # the backward is a scatter-ADD: repeated indices accumulate
    assert x.grad[0, 0, 0] == 1 and x.grad[2, 4, 0] == 2 and x.grad[0, 5, 0] == 0


def fans_as_patches(n, size, grid, seed=0):
    """Valid-patch maps (patches holding >= 1 fan pixel) of synthetic sector / linear scans."""
    _, fan, _ = D.synth_batch(range(n), size, seed)
    return (torch.nn.functional.max_pool2d(fan.float(), size // grid)[:, 0] > 0).numpy()


@pytest.mark.parametrize("grid,cfg", [(6, U.MaskConfig(usrc=True)), (14, U.MaskConfig(
    tgt_scale=(0.075, 0.125), min_keep=10, usrc=True, tau=8))])
def test_usrc_masks_stay_inside_the_fan(grid, cfg):
    valid = fans_as_patches(16, 16 * grid, grid)
    assert (~valid).sum() > 0  # the fans leave patches out: otherwise the test proves nothing
    rng = np.random.default_rng(0)
    for _ in range(30):
        ctx, tgt = U.sample_masks(rng, 16, grid, cfg, valid)
        assert tgt.shape[:2] == (cfg.n_targets, 16) and ctx.shape[1] >= cfg.min_keep  # equal lengths
        for b in range(16):
            ok = set(np.flatnonzero(valid[b]).tolist())
            c, t = set(ctx[b].tolist()), set(tgt[:, b].flatten().tolist())
            assert c <= ok and t <= ok and not c & t


def test_usrc_coverage_of_the_fan_near_uniform():
    """Over many batches with one fan, every valid patch is a target and a context patch, and none is covered
    far more or less often than the average valid patch."""
    grid, cfg = 6, U.MaskConfig(usrc=True)
    valid = fans_as_patches(1, 96, grid, seed=3)[0]
    rng = np.random.default_rng(1)
    tc, cc = np.zeros(grid * grid), np.zeros(grid * grid)
    for _ in range(300):
        ctx, tgt = U.sample_masks(rng, 8, grid, cfg, np.broadcast_to(valid, (8, grid, grid)))
        np.add.at(tc, tgt.flatten().numpy(), 1)
        np.add.at(cc, ctx.flatten().numpy(), 1)
    v = valid.flatten()
    assert tc[~v].sum() == cc[~v].sum() == 0
    for cov in (tc[v] / tc[v].mean(), cc[v] / cc[v].mean()):
        assert cov.min() > 0.3 and cov.max() < 2.5, (cov.min(), cov.max())


def test_without_usrc_the_sampler_is_unchanged():
    """USrc off (valid=None or all valid): the same masks as before, draw for draw."""
    a = U.sample_masks(np.random.default_rng(5), 8, 6, U.MaskConfig())
    b = U.sample_masks(np.random.default_rng(5), 8, 6, U.MaskConfig(usrc=True), np.ones((8, 6, 6), bool))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
