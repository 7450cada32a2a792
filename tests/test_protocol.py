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
