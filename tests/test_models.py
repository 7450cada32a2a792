"""Shapes and wiring of the ViT, the predictor and the two losses."""
import torch
import torch.nn.functional as F

import us_jepa as U


def test_vit_shapes_and_timm_names():
    vit = U.ViT(96, 16, "vit_tiny", depth=2)
    img = torch.rand(3, 1, 96, 96)
    assert vit(img).shape == (3, 36, 192)
    assert vit(img, torch.tensor([[0, 5, 35]] * 3)).shape == (3, 3, 192)
    names = set(vit.state_dict())
    for n in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias", "norm.weight"):
        assert n in names
    assert vit.patch_embed.proj.in_channels == 1
    assert U.ViT(224, 16, "vit_base", depth=1)(torch.rand(1, 1, 224, 224)).shape == (1, 196, 768)


def test_context_subset_equals_dropping_patches():
    """Running on idx = dropping the other patches: the kept tokens ignore what was dropped."""
    vit = U.ViT(64, 16, "vit_tiny", depth=2).eval()
    img, idx = torch.rand(2, 1, 64, 64), torch.tensor([[1, 2, 7], [0, 9, 15]])
    a = vit(img, idx)
    img2 = img.clone()
    img2[:, :, 48:, 48:] = 5.0  # patch 15 of a 4x4 grid: in image 1's context, not image 0's
    b = vit(img2, idx)
    assert torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_sincos_positions():
    pe = U.sincos_pos_embed(16, 4)
    assert pe.shape == (16, 16) and torch.unique(pe, dim=0).shape[0] == 16


def test_predictor_blocks_do_not_see_each_other():
    pred = U.Predictor(grid=6, in_dim=192, dim=48, depth=2, heads=3, out_dim=64).eval()
    ctx, ctx_idx = torch.randn(2, 5, 192), torch.tensor([[0, 1, 2, 3, 4]] * 2)
    tgt = torch.tensor([[[10, 11], [20, 21]], [[30, 31], [14, 15]]])  # (M=2, B=2, K=2)
    out = pred(ctx, ctx_idx, tgt)
    assert out.shape == (4, 2, 64)
    tgt2 = tgt.clone()
    tgt2[1] = torch.tensor([[6, 7], [8, 9]])  # move target block 1: block 0's predictions must not change
    out2 = pred(ctx, ctx_idx, tgt2)
    assert torch.allclose(out[:2], out2[:2]) and not torch.allclose(out[2:], out2[2:])


def test_salt_loss_by_hand():
    feats = torch.tensor([[[1.0, 3.0], [2.0, 2.0], [0.0, 4.0]]])  # (B=1, N=3, D=2)
    tgt = torch.tensor([[[0, 2]]])  # (M=1, B=1, K=2)
    # layer_norm of [1, 3] and [0, 4] (no affine, eps 1e-5) is ~[-1, 1] for both rows
    pred = torch.tensor([[[0.0, 1.0], [-3.0, 1.5]]])
    d = torch.tensor([1.0, 0.0, 2.0, 0.5])  # |pred - target| per element, up to eps
    s = torch.where(d < 1, 0.5 * d ** 2, d - 0.5)  # Smooth-L1 with beta = 1
    assert torch.allclose(U.salt_loss(pred, feats, tgt), s.mean(), atol=1e-4)
    assert torch.allclose(U.salt_loss(pred, feats, tgt, "l1"), d.mean(), atol=1e-4)
    assert torch.allclose(U.salt_loss(pred, feats, tgt, "l2"), (d ** 2).mean(), atol=1e-4)
    s2 = torch.where(d < 0.5, 0.5 * d ** 2 / 0.5, d - 0.25)
    assert torch.allclose(U.salt_loss(pred, feats, tgt, beta=0.5), s2.mean(), atol=1e-4)


def test_mae_loss_targets_are_normalised_patches():
    img = torch.rand(2, 1, 32, 32)
    tgt = torch.tensor([[[0, 3], [1, 2]]])  # (1, 2, 2)
    patches = U.patchify(img, 16)
    assert patches.shape == (2, 4, 256) and torch.equal(patches[1, 3], img[1, 0, 16:, 16:].flatten())
    want = torch.stack([patches[0, [0, 3]], patches[1, [1, 2]]])
    want = (want - want.mean(-1, keepdim=True)) / (want.var(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(U.mae_loss(want, img, tgt, 16), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(U.mae_loss(torch.zeros_like(want), img, tgt, 16), (want ** 2).mean())


def test_mae_loss_with_pooled_targets():
    img = torch.rand(1, 1, 32, 32)
    tgt = torch.tensor([[[2]]])  # patch 2 = rows 16-31, cols 0-15
    want = F.avg_pool2d(img[:, :, 16:, :16], 4).flatten()  # (16,)
    want = (want - want.mean()) / (want.var() + 1e-6).sqrt()
    assert torch.allclose(U.mae_loss(want.view(1, 1, 16), img, tgt, 16, pool=4), torch.tensor(0.0), atol=1e-6)
