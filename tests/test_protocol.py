"""Issue 4's protocol pieces: few-shot subsets, test-time corruptions, and their tables through `probe`."""
import json

import numpy as np
import pytest
import torch

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
            "--out", str(out)])
    text = capsys.readouterr().out
    assert "few-shot macro-F1" in text and "robustness macro-F1" in text
    r = json.loads(out.read_text())["results"]["pixels"]
    assert set(r["few_shot"]) == {"10", "100"} and set(r["corrupted"]) == {"blur/1", "blur/2", "speckle/1", "speckle/2"}
    assert all(0 <= m <= 1 for m, _ in list(r["few_shot"].values()) + list(r["corrupted"].values()))
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
