"""Issue 4's protocol pieces: few-shot subsets, test-time corruptions, and their tables through `probe`."""
import json

import numpy as np
import pytest
import torch

import show as S
import us_jepa as U


def test_stratified_subsets():
    labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
    for pct in (1, 10, 50, 100):
        idx = U.stratified(labels, pct, seed=0)
        assert len(set(idx.tolist())) == len(idx) and idx.max() < len(labels)
        counts = np.bincount(labels[idx], minlength=3)
        assert (counts == [max(1, round(pct / 100 * n)) for n in (70, 20, 10)]).all()  # per class, >= 1
    assert np.array_equal(U.stratified(labels, 10, 3), U.stratified(labels, 10, 3))
    assert not np.array_equal(U.stratified(labels, 10, 3), U.stratified(labels, 10, 4))


def test_corruptions_follow_the_paper():
    fan = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    fan[..., 4:28, 4:28] = True
    img = torch.full((1, 1, 32, 32), 0.5) * fan
    img[..., 16, 16] = 1.0  # an impulse: blur spreads it over 2*floor(2 eps)+1 taps
    for eps, taps in ((1, 5), (2, 9), (1.5, 7)):
        out = U.corrupt(img, fan, "blur", eps)
        assert (out[0, 0, 16] > 0.5 + 1e-6).sum() == taps
    x = torch.rand(2, 1, 32, 32) * fan
    for eps, alpha in ((1, 0.7), (2, 0.5), (3, 0.3)):
        out = U.corrupt(x, fan.expand(2, -1, -1, -1), "contrast", eps)
        m = x[0][fan[0]].median()
        assert torch.allclose(out[0][fan[0]], (m + alpha * (x[0][fan[0]] - m)).clamp(0, 1), atol=1e-6)
    flat = torch.full((8, 1, 32, 32), 0.5) * fan
    s1, s3 = (U.corrupt(flat, fan.expand(8, -1, -1, -1), "speckle", e)[fan.expand(8, -1, -1, -1)] for e in (1, 3))
    assert abs(s1.mean() - 0.5) < 0.02 and s1.std() < s3.std()  # multiplicative, mean-preserving, grows with eps
    for kind in ("blur", "contrast", "speckle"):
        assert (U.corrupt(x, fan.expand(2, -1, -1, -1), kind, 2)[~fan.expand(2, -1, -1, -1)] == 0).all()


def test_probe_few_shot_and_robustness_tables(tmp_path, capsys):
    out = tmp_path / "p.json"
    U.main(["probe", "--encoder", "pixels", "--n_train", "60", "--n_val", "20", "--n_test", "40", "--seeds", "2",
            "--epochs", "5", "--fractions", "10,100", "--corrupt", "blur,speckle", "--severity", "1,2",
            "--task", "lesion", "--out", str(out)])
    text = capsys.readouterr().out
    assert "few-shot macro-F1" in text and "robustness macro-F1" in text
    r = json.loads(out.read_text())["results"]["pixels"]
    assert set(r["few_shot"]) == {"10", "100"} and set(r["corrupted"]) == {"blur/1", "blur/2", "speckle/1", "speckle/2"}
    assert all(0 <= m <= 1 for m, _ in list(r["few_shot"].values()) + list(r["corrupted"].values()))
    S.main(["few-shot", str(out)])  # the curve: a figure, drawn by show.py from the JSON
    assert (tmp_path / "p_few_shot.png").exists()


@pytest.mark.parametrize("flags,match", [(["--fractions", "0"], "--fractions in (0, 100]"),
                                         (["--corrupt", "fog"], "--corrupt from blur,contrast,speckle"),
                                         (["--severity", "x"], "comma-separated numbers")])
def test_bad_protocol_flags(flags, match, capsys):
    with pytest.raises(SystemExit):
        U.main(["probe", "--encoder", "pixels", *flags])
    assert match in capsys.readouterr().err


def test_ema_teacher_follows_the_student(tiny_args, tmp_path, monkeypatch):
    """pretrain --teacher ema: after each step the target encoder moves toward the student by 1 - momentum,
    momentum 0.996 -> 1.0 (I-JEPA); the checkpoint carries it and --resume restores it exactly."""
    def run(out, steps, extra=()):
        U.main(["pretrain", *tiny_args(out, steps=steps, extra=["--teacher", "ema", "--augment", "false", *extra])])
        return U.load_checkpoint(str(tmp_path / out / "last.pt"))

    one = run("one", 1)  # one step: teacher = init + 0.004 * (student_1 - init), init = the student at step 0
    torch.manual_seed(0)
    init = U.ViT(96, 16, "vit_tiny", depth=2).state_dict()
    for k in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight"):
        want = init[k] + 0.004 * (one["model"][k] - init[k])
        torch.testing.assert_close(one["teacher"]["model"][k], want, rtol=1e-5, atol=1e-7)
    assert not torch.equal(one["teacher"]["model"]["patch_embed.proj.weight"], init["patch_embed.proj.weight"])

    full = run("full", 6)
    real = U.schedule
    def crash_at_4(step, *a):
        if step == 4: raise KeyboardInterrupt
        return real(step, *a)
    monkeypatch.setattr(U, "schedule", crash_at_4)
    with pytest.raises(SystemExit):
        run("cut", 6)
    monkeypatch.setattr(U, "schedule", real)
    cut = run("cut", 6, ["--resume"])
    for k in full["teacher"]["model"]:
        assert torch.equal(full["teacher"]["model"][k], cut["teacher"]["model"][k]), k


def timm_state(vit, cls=True, rgb=True, prefix="module.", extra=()):
    """A timm-format state dict made from one of our ViTs (none can be downloaded): learnt positions with a
    CLS slot, an RGB patch embedding whose channels sum to ours, a classifier head, a wrapper prefix."""
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    w = sd["patch_embed.proj.weight"]
    if rgb: sd["patch_embed.proj.weight"] = torch.cat([w * 0.2, w * 0.3, w * 0.5], 1)
    pos = vit.pos_embed.clone()
    sd["pos_embed"] = torch.cat([torch.randn(1, 1, pos.shape[2]), pos], 1) if cls else pos
    if cls: sd["cls_token"] = torch.randn(1, 1, pos.shape[2])
    sd["head.weight"], sd["head.bias"] = torch.randn(1000, pos.shape[2]), torch.zeros(1000)
    sd.update(dict(extra))
    return {prefix + k: v for k, v in sd.items()}


@pytest.mark.parametrize("cls,rgb,prefix", [(True, True, "module."), (False, False, ""), (True, False, "encoder.")])
def test_external_timm_teacher_maps_exactly(cls, rgb, prefix):
    torch.manual_seed(0)
    vit = U.ViT(96, 16, "vit_tiny", depth=2).eval()
    vit.pos_embed.copy_(torch.randn_like(vit.pos_embed) * 0.1)  # learnt-looking positions must be used as given
    teacher, ck = U.external_teacher(timm_state(vit, cls, rgb, prefix), "x.pt", 96)
    assert ck["config"]["model"] == {"model": "vit_tiny", "depth": 2, "patch_size": 16}
    img = torch.rand(2, 1, 96, 96)
    torch.testing.assert_close(teacher.eval()(img), vit(img), rtol=1e-4, atol=1e-5)


def test_external_teacher_positions_are_interpolated_to_our_grid():
    vit = U.ViT(112, 16, "vit_tiny", depth=1)  # a 7x7 grid, loaded for 96 px (6x6)
    teacher, _ = U.external_teacher(timm_state(vit), "x.pt", 96)
    assert teacher.grid == 6 and teacher.pos_embed.shape == (1, 36, 192)
    assert teacher(torch.rand(1, 1, 96, 96)).shape == (1, 36, 192)


@pytest.mark.parametrize("change,match", [
    (dict(extra={"blocks.0.ls1.gamma": torch.ones(192)}), "1 unexpected keys ['blocks.0.ls1.gamma']"),
    (dict(drop="blocks.1.mlp.fc2.bias"), "1 missing keys ['blocks.1.mlp.fc2.bias']"),
    (dict(drop="pos_embed"), "nor a timm ViT state dict"),
    (dict(width=100), "width 100 is not one of")])
def test_external_teacher_that_does_not_match_is_refused(change, match):
    sd = timm_state(U.ViT(96, 16, "vit_tiny", depth=2), prefix="", extra=change.get("extra", {}))
    sd.pop(change.get("drop", "nothing"), None)
    if "width" in change: sd["patch_embed.proj.weight"] = torch.randn(100, 3, 16, 16)
    with pytest.raises(U.UserError, match=match.replace("[", r"\[").replace("]", r"\]")):
        U.external_teacher(sd, "x.pt", 96)


def test_pretrain_with_an_external_teacher_file(tiny_args, tmp_path, capsys):
    """End to end: a timm-format file as --teacher; the student trains; probe can rebuild its teacher."""
    torch.save(timm_state(U.ViT(96, 16, "vit_tiny", depth=2)), tmp_path / "ext.pt")
    U.main(["pretrain", *tiny_args("s", steps=2, extra=["--teacher", str(tmp_path / "ext.pt")])])
    assert "external teacher" in capsys.readouterr().out
    ck = U.load_checkpoint(str(tmp_path / "s" / "last.pt"))
    t = U.build_encoder(ck["teacher"]["config"], ck["teacher"]["model"])
    assert torch.equal(t.pos_embed, U.external_teacher(torch.load(tmp_path / "ext.pt"), "e", 96)[0].pos_embed)


@pytest.fixture
def student_ckpt(tmp_path):
    torch.manual_seed(0)
    config = {"data": {"img_size": 64}, "model": {"model": "vit_tiny", "depth": 3, "patch_size": 16}}
    vit = U.ViT(64, 16, "vit_tiny", depth=3)
    path = tmp_path / "s.pt"
    torch.save({"kind": "student", "config": config, "model": vit.state_dict(),
                "teacher": {"config": config, "model": vit.state_dict()}}, path)
    return str(path)


def test_multi_layer_features_and_attentive_probe(student_ckpt, tmp_path):
    vit = U.build_encoder(U.load_checkpoint(student_ckpt)["config"], U.load_checkpoint(student_ckpt)["model"])
    img = torch.rand(5, 1, 64, 64)
    one, three = U.encode(vit, img), U.encode(vit, img, layers=3)
    assert one.shape == (5, 192) and three.shape == (5, 576) and torch.allclose(three[:, -192:], one, atol=1e-6)
    assert U.encode(vit, img, tokens=True).shape == (5, 16, 192)
    for head, layers in (("attentive", 1), ("linear", 2)):
        out = tmp_path / f"{head}.json"
        U.main(["probe", "--ckpt", student_ckpt, "--encoder", "student", "--head", head, "--layers", str(layers),
                "--n_train", "40", "--n_val", "20", "--n_test", "20", "--seeds", "1", "--epochs", "3",
                "--task", "lesion", "--out", str(out)])
        r = json.loads(out.read_text())
        assert r["config"]["head"] == head and 0 <= r["results"]["student"]["macro_f1_mean"] <= 1
    with pytest.raises(SystemExit):
        U.main(["probe", "--ckpt", student_ckpt, "--encoder", "student", "--layers", "4"])


def test_attentive_probe_can_read_a_regional_contrast():
    """The case mean pooling loses (cpu-recipe notes): the class is which half of the tokens is brighter.
    Mean-pooled features are identical across classes; the attentive probe separates them."""
    g = torch.Generator().manual_seed(0)
    n, L, D = 256, 8, 16
    y = torch.arange(n) % 2
    base = torch.randn(n, 1, D, generator=g).expand(-1, L, -1).clone()
    sign = torch.where(y[:, None] == 1, 1.0, -1.0) * torch.cat([torch.ones(L // 2), -torch.ones(L // 2)])
    tokens = base + sign[:, :, None] * torch.linspace(-1, 1, D)  # half the tokens +v, half -v: the mean is equal
    tokens[:, :, 0] = torch.arange(L) / L  # a position code, so the probe can tell the halves apart
    feats = {s: tokens for s in ("train", "val", "test")}
    labels = {s: y for s in ("train", "val", "test")}
    p = U.ProbeConfig(epochs=60, seeds=1)
    att = U.fit_probe(feats, labels, 2, 0, p)["macro_f1"]
    lin = U.fit_probe({s: v.mean(1) for s, v in feats.items()}, labels, 2, 0, p)["macro_f1"]
    assert att > 0.9 and lin < 0.7, (att, lin)


def test_show_writes_both_figures_and_never_overwrites(student_ckpt, tmp_path):
    from PIL import Image
    for _ in range(2):
        S.main(["--ckpt", student_ckpt, "--n_images", "3", "--out", str(tmp_path / "fig")])
    names = sorted(f.name for f in (tmp_path / "fig").iterdir())
    assert names == ["masks-1.png", "masks.png", "pca-1.png", "pca.png"]
    m, p = Image.open(tmp_path / "fig" / "masks.png"), Image.open(tmp_path / "fig" / "pca.png")
    assert m.size == (3 * 64 * 2, 64 * 2) and p.size == (3 * 64 * 2, 2 * 64 * 2)  # 2x upscaled; pca: image + map
    a = np.asarray(m).reshape(-1, 3)
    assert ((a[:, 2] > a[:, 0] + 40)).any()  # some context (blue) overlay is there


def test_probe_whose_validation_loss_is_never_finite_stops_with_one_line():
    g = torch.Generator().manual_seed(0)
    feats = {s: torch.randn(40, 8, generator=g) for s in ("train", "val", "test")}
    feats["val"][0, 0] = float("nan")
    labels = {s: torch.arange(40) % 2 for s in feats}
    with pytest.raises(U.UserError, match="validation loss was not finite in any of 3 epochs"):
        U.fit_probe(feats, labels, 2, 0, U.ProbeConfig(epochs=10, patience=3))
