"""The evaluations SSL users expect (issue 13): the k-NN probe, RankMe in the held-out evaluation, `embed`,
and where mask blocks land (the border-touch rate of each placement, against its exact value)."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import embed
import us_jepa as U
import us_util
from us_data import load_image, synth_batch


# ------------------------------------------------------------------------------------------------
# k-NN: DINO's weighted vote.

def test_knn_weights_votes_by_similarity():
    """One training image close to the query (class 0) against 19 orthogonal ones (class 1): a plain
    majority of 20 would say 1; with weights exp(sim / 0.07) the close one wins by ~1e6 to 19."""
    xtr = torch.cat([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]).repeat(19, 1)])
    ytr = torch.tensor([0] + [1] * 19)
    votes = us_util.knn_votes(xtr, ytr, 2, torch.tensor([[0.9, 0.1]]))
    assert votes.argmax(1).item() == 0
    assert votes[0, 0] / votes[0, 1] > 1e4
    unweighted = us_util.knn_votes(xtr, ytr, 2, torch.tensor([[0.9, 0.1]]), temperature=1e6)
    assert unweighted.argmax(1).item() == 1  # (almost) equal weights: the majority


def test_knn_uses_l2_normalised_features_and_k():
    """Scale does not matter (features are normalised); only the k nearest vote; chunks agree."""
    g = torch.Generator().manual_seed(0)
    xtr, ytr = torch.randn(3000, 8, generator=g), torch.randint(0, 3, (3000,), generator=g)
    x = torch.randn(1500, 8, generator=g)
    a = us_util.knn_votes(xtr, ytr, 3, x)
    b = us_util.knn_votes(xtr * 7.0, ytr, 3, x * 0.01)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    near = (torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(xtr, dim=1).T)
    top = near.topk(20, dim=1).indices  # the 20 nearest of each query hold all of its votes
    assert all(set(ytr[top[i]].tolist()) >= set(torch.nonzero(a[i]).flatten().tolist()) for i in range(50))


def test_probe_with_the_knn_head(tmp_path, capsys):
    argv = ["probe", "--encoder", "pixels", "--head", "knn", "--n_train", "120", "--n_val", "30", "--n_test",
            "60", "--seeds", "2", "--task", "lesion", "--out", str(tmp_path / "knn.json")]
    U.main(argv)
    res = json.load(open(tmp_path / "knn.json"))["results"]["pixels"]
    assert res["runs"][0]["epochs"] == 0 and res["macro_f1_std"] == 0.0  # nothing trained: seeds agree
    assert 0.0 <= res["macro_f1_mean"] <= 1.0
    assert 0.0 <= res["val_macro_f1_mean"] <= 1.0  # what a recipe may be chosen on (never the test)


def test_validation_score_is_the_heads_score_on_the_validation_split():
    """fit_probe's `val` is macro-F1 on the validation split: a probe scored on a test split equal to
    its validation split gives the same number twice."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(90) % 3
    x = torch.randn(90, 8, generator=g) + torch.nn.functional.one_hot(y, 8) * 6
    feats, labels = {"train": x[:60], "val": x[60:], "test": x[60:]}, {"train": y[:60], "val": y[60:], "test": y[60:]}
    r = U.fit_probe(feats, labels, 3, 0, U.ProbeConfig(lr=1e-2))
    assert r["val"] == pytest.approx(r["macro_f1"]) and r["val"] > 0.5


# ------------------------------------------------------------------------------------------------
# The SALT target's options (issue 13's recipe search): the teacher's last N blocks averaged, ZCA whitening.

def test_teacher_targets_average_the_last_blocks():
    vit = U.ViT(32, 16, "vit_tiny", depth=3).eval()
    img = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(U.teacher_targets(vit, img, 1), vit(img))  # SALT's target, unchanged
        two = vit(img, layers=2)  # the last two blocks, each normed, side by side
        assert torch.allclose(U.teacher_targets(vit, img, 2), (two[..., :192] + two[..., 192:]) / 2)


def test_whitening_gives_unit_variance_above_the_floor():
    """Features with one dominant direction (as the teacher's: effective rank ~1.5): whitened, every direction
    whose variance is far above the floor has variance ~1; one far below it is scaled only as far as the floor."""
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([30.0, 5.0, 2.0, 1.0, 1e-3])
    basis = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0].float()
    f = (torch.randn(20000, 5, generator=g) * scales) @ basis.T + 7.0
    mean, w = us_util.whitening(f, 1e-6)
    assert torch.allclose(mean, torch.full((5,), 7.0), atol=0.5)
    cov = torch.cov(((f - mean) @ w).T)
    assert torch.allclose(torch.linalg.eigvalsh(cov)[1:], torch.ones(4), atol=0.05)  # the four strong ones
    _, w = us_util.whitening(f, 0.01)  # floor: 1 % of 900 = 9, above the weak directions' 1e-6 .. 25
    ev = torch.linalg.eigvalsh(torch.cov(((f - mean) @ w).T))
    assert ev[-1] == pytest.approx(900 / 909, rel=0.05) and ev[0] < 1e-6  # the dominant one ~1; noise stays small


def test_pretrain_with_averaged_whitened_targets(tiny_args, tmp_path, capsys):
    U.main(["teacher", *tiny_args("t")])
    U.main(["pretrain", *tiny_args("s", extra=["--teacher", str(tmp_path / "t" / "best.pt"), "--target_layers", "2",
                                               "--whiten", "0.01"])])
    ck = U.load_checkpoint(str(tmp_path / "s" / "best.pt"))
    assert ck["config"]["train"]["target_layers"] == 2 and ck["config"]["train"]["whiten"] == 0.01
    log = [json.loads(x) for x in open(tmp_path / "s" / "log.jsonl")]
    assert all(math.isfinite(r["loss"]) for r in log if "loss" in r)
    with pytest.raises(SystemExit):  # the teacher has 2 blocks
        U.main(["pretrain", *tiny_args("s3", extra=["--teacher", str(tmp_path / "t" / "best.pt"), "--target_layers",
                                                    "3"])])
    assert "--target_layers 3: the teacher has 2 blocks" in capsys.readouterr().err
    assert not (tmp_path / "s3").exists()  # refused before the run took --out


# ------------------------------------------------------------------------------------------------
# RankMe.

@pytest.mark.parametrize("rank", [1, 3, 17, 64])
def test_rankme_of_matrices_of_known_rank(rank):
    """Equal singular values: the entropy is log(rank), so RankMe = rank (up to its eps); unequal: fewer."""
    g = torch.Generator().manual_seed(rank)
    u = torch.linalg.qr(torch.randn(300, rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(96, rank, generator=g))[0]
    assert us_util.rankme(u @ v.T * 3.0) == pytest.approx(rank, rel=1e-3)  # eps 1e-7 on ~96 zeros
    skewed = u @ torch.diag(torch.logspace(0, -3, rank)) @ v.T
    assert 1.0 <= us_util.rankme(skewed) <= rank * 1.001


def test_rankme_in_every_heldout_line_and_log(tiny_args, capsys, tmp_path):
    U.main(["teacher", *tiny_args("t")])
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if "held-out loss" in x and "step" in x and "RankMe" in x]
    assert len(lines) == 2  # steps 3 and 6
    log = [json.loads(x) for x in open(tmp_path / "t" / "log.jsonl")]
    ranks = [r["rankme"] for r in log if "heldout_loss" in r]
    assert len(ranks) == 2 and all(1.0 <= x <= 8 for x in ranks)  # 8 held-out images: rank <= 8


# ------------------------------------------------------------------------------------------------
# Where blocks land. A block of side h on a grid of g touches the top or bottom border when its top row is 0
# or g - h. cover (ours): the top is a draw from the g + h - 1 values -(h-1) .. g-1, clamped into 0 .. g-h,
# so h values land on each border: 2h / (g + h - 1). fit (I-JEPA's intent): a draw from the g - h + 1 tops
# where it fits: 2 / (g - h + 1). Rows and columns are drawn apart: P(any border) = 1 - (1 - p_h)(1 - p_w).

def touch_exact(g, h, w, place):
    side = (lambda s: 2 * s / (g + s - 1)) if place == "cover" else (lambda s: 2 / (g - s + 1))
    return 1 - (1 - side(h)) * (1 - side(w))


def touches(top, left, g, h, w):
    return top == 0 or left == 0 or top + h == g or left + w == g


@pytest.mark.parametrize("g,h,w,place,value", [(14, 4, 4, "cover", 0.720), (14, 4, 4, "fit", 0.331),
                                                (6, 2, 2, "cover", 0.816), (6, 2, 2, "fit", 0.640),
                                                (14, 3, 5, "cover", None), (14, 3, 5, "fit", None)])
def test_border_touch_rate_of_each_placement(g, h, w, place, value):
    """The rates the issue measured (14x14 grid, 4x4 target: 72 % vs 33 %; 6x6, 2x2: 82 % vs 64 %)."""
    exact = touch_exact(g, h, w, place)
    if value is not None:
        assert exact == pytest.approx(value, abs=1e-3)
    rng, n = np.random.default_rng(0), 20000
    rate = np.mean([touches(*U.place_block(rng, g, h, w, place == "fit"), g, h, w) for _ in range(n)])
    assert abs(rate - exact) < 4 * math.sqrt(exact * (1 - exact) / n)  # 4 standard errors
    if place == "fit":  # every corner where the block fits is reached, the last row and column too
        corners = {U.place_block(rng, g, h, w, True) for _ in range(3000)}
        assert corners == {(r, c) for r in range(g - h + 1) for c in range(g - w + 1)}


@pytest.mark.parametrize("place", ["cover", "fit"])
def test_targets_of_the_sampler_land_as_derived(place):
    """Through sample_masks (4 targets of 2x2 on 6x6, as the demo): the share of target blocks touching a
    border is the exact value above; the sampler's re-draws for enough context barely move it."""
    k = U.MaskConfig(tgt_scale=(4 / 36, 4 / 36), tgt_aspect=(1.0, 1.0), place=place)
    rng, hits, n = np.random.default_rng(1), 0, 0
    for _ in range(200):
        _, tgt = U.sample_masks(rng, 16, 6, k)  # (4, 16, 4): 2x2 blocks
        for m in tgt.reshape(-1, 4).numpy():
            r, c = m // 6, m % 6
            hits += bool(r.min() == 0 or c.min() == 0 or r.max() == 5 or c.max() == 5)
            n += 1
    exact = touch_exact(6, 2, 2, place)
    assert abs(hits / n - exact) < 0.02, (hits / n, exact)


def test_place_is_checked():
    with pytest.raises(U.UserError, match="--place middle: cover | fit"):
        cfg = U.parse_config("teacher", ["--place", "middle"])
        us_util.check_train_flags(*(cfg[s] for s in ("data", "model", "mask", "train")), U.ENCODERS)


# ------------------------------------------------------------------------------------------------
# embed.

def test_embed_writes_features_paths_and_labels(tmp_path):
    ck = tmp_path / "t"
    U.main(["teacher", "--n_images", "96", "--batch_size", "16", "--depth", "1", "--pred_depth", "1", "--steps",
            "2", "--eval_every", "2", "--out", str(ck)])
    imgs, _, labels = synth_batch(range(10), 128, 7, "lesion")
    for i, (x, y) in enumerate(zip(imgs, labels)):
        (tmp_path / "scans" / ["benign", "malignant"][y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[0].numpy() * 255).astype(np.uint8)).save(tmp_path / "scans" / ["benign", "malignant"][y]
                                                                    / f"{i}.png")
    out = embed.main(["--ckpt", str(ck / "best.pt"), "--encoder", "teacher", "--data", str(tmp_path / "scans"),
                      "--out", str(tmp_path / "f.npz")])
    z = np.load(out)
    assert z["features"].shape == (10, 192) and np.isfinite(z["features"]).all()
    assert list(z["classes"]) == ["benign", "malignant"]
    names = [p.split("/")[-2] for p in z["paths"]]
    assert [z["classes"][y] for y in z["labels"]] == names and (z["frames"] == -1).all()
    again = embed.main(["--ckpt", str(ck / "best.pt"), "--encoder", "teacher", "--data", str(tmp_path / "scans"),
                        "--out", str(tmp_path / "f.npz"), "--tokens", "true"])
    assert again.endswith("f-1.npz") and np.load(again)["features"].shape == (10, 36, 192)  # first one kept
    ckd = U.load_checkpoint(str(ck / "best.pt"))  # the same rows, encoded directly from the files
    vit = U.build_encoder(ckd["config"], ckd["model"])
    x = torch.stack([load_image(str(p), 96)[0] for p in z["paths"]])
    x = (x * 255).round() / 255  # stored 8-bit, as pretraining images are
    torch.testing.assert_close(U.encode(vit, x), torch.from_numpy(z["features"]), atol=1e-4, rtol=1e-4)
