"""Training end to end on tiny runs: the teacher stays frozen, resume is exact, teacher -> pretrain -> probe."""
import json

import pytest
import torch

import us_jepa as U
import us_util


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    U.main(["teacher", "--n_images", "160", "--batch_size", "16", "--steps", "3", "--eval_every", "3",
            "--depth", "2", "--pred_depth", "1", "--out", str(out)])
    return str(out / "best.pt")


def configure(args):
    cfg = U.parse_config("pretrain", args)
    us_util.check_train_flags(*(cfg[s] for s in ("data", "model", "mask", "train")), U.ENCODERS)
    return cfg


def test_teacher_frozen_after_pretrain_steps(teacher_ckpt, tiny_args, tmp_path):
    ck = U.load_checkpoint(teacher_ckpt)
    teacher = U.build_encoder(ck["config"], ck["model"]).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    U.train(configure(tiny_args("s", steps=2, extra=["--teacher", teacher_ckpt])), "student", teacher, ck)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    student = U.load_checkpoint(str(tmp_path / "s" / "last.pt"))
    assert student["kind"] == "student" and student["step"] == 2
    assert "teacher" in student and torch.equal(student["teacher"]["model"]["norm.weight"], before["norm.weight"])


def test_resume_after_interruption_matches_uninterrupted(teacher_ckpt, tiny_args, tmp_path, monkeypatch):
    flags = ["--teacher", teacher_ckpt]
    full = configure(tiny_args("full", steps=6, extra=flags))
    ck = U.load_checkpoint(teacher_ckpt)
    frozen = lambda: U.build_encoder(ck["config"], ck["model"]).eval().requires_grad_(False)
    U.train(full, "student", frozen(), ck)

    real = U.schedule
    def crash_at_4(step, *a):
        if step == 4: raise KeyboardInterrupt  # like Ctrl-C or a dying node, after the step-3 checkpoint
        return real(step, *a)
    monkeypatch.setattr(U, "schedule", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        U.train(configure(tiny_args("cut", steps=6, extra=flags)), "student", frozen(), ck)
    monkeypatch.setattr(U, "schedule", real)
    with pytest.raises(U.UserError, match="--resume"):  # never silently restarts over an existing run
        U.train(configure(tiny_args("cut", steps=6, extra=flags)), "student", frozen(), ck)
    U.train(configure(tiny_args("cut", steps=6, extra=flags + ["--resume"])), "student", frozen(), ck)

    a = U.load_checkpoint(str(tmp_path / "full" / "last.pt"))
    b = U.load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert a["step"] == b["step"] == 6
    for part in ("model", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k


def test_end_to_end_teacher_pretrain_probe(tmp_path, monkeypatch, capsys):
    """The README's demo in miniature, through the command line: pretrain trains its own teacher first."""
    monkeypatch.chdir(tmp_path)
    tiny = ["--n_images", "160", "--batch_size", "16", "--steps", "4", "--eval_every", "2", "--depth", "2"]
    U.main(["pretrain", *tiny])
    out = capsys.readouterr().out
    assert "no teacher at runs/teacher/best.pt: training one first" in out
    for f in ("runs/teacher/best.pt", "runs/pretrain/best.pt", "runs/pretrain/last.pt", "runs/pretrain/log.jsonl"):
        assert (tmp_path / f).exists(), f
    log = [json.loads(line) for line in open(tmp_path / "runs/pretrain/log.jsonl")]
    assert {"step", "loss", "lr", "img_s", "feat_std"} <= set(log[-2]) and any("heldout_loss" in r for r in log)
    U.main(["probe", "--n_train", "60", "--n_val", "30", "--n_test", "40", "--seeds", "2", "--epochs", "20"])
    res = json.load(open(tmp_path / "runs/pretrain/probe_lesion.json"))
    liver = json.load(open(tmp_path / "runs/pretrain/probe_liver.json"))  # no --task: both kinds
    assert res["config"]["task"] == "lesion" and liver["config"]["task"] == "liver"
    assert liver["classes"] == ["normal", "fatty"]
    for r in (*res["results"].values(), *liver["results"].values()):
        assert 0 <= r["macro_f1_mean"] <= 1 and len(r["runs"]) == 2
    assert set(res["results"]) == set(liver["results"]) == {"student", "teacher", "random", "pixels"}
    out = capsys.readouterr().out
    assert "[probe] lesion:" in out and "[probe] liver:" in out
    U.main(["probe", "--encoder", "pixels", "--n_train", "60", "--n_val", "30", "--n_test", "40", "--seeds", "1",
            "--task", "lesion"])
    assert (tmp_path / "runs/pretrain/probe_lesion-1.json").exists()  # the first result was kept
    assert not (tmp_path / "runs/pretrain/probe_liver-1.json").exists()  # --task lesion: that one
    assert json.load(open(tmp_path / "runs/pretrain/probe_lesion.json")) == res


def test_bad_mask_indices_are_one_clear_error(monkeypatch):
    """The fused ops do not check indices on the device: draw_masks checks them once, on the CPU."""
    monkeypatch.setattr(U, "sample_masks", lambda *a, **k: (torch.tensor([[0, 36]]), torch.tensor([[[1, 2]]])))
    with pytest.raises(ValueError, match=r"context indices in \[0, 36\] on a 6x6 grid"):
        U.draw_masks(None, 1, 6, U.MaskConfig(), None, 16)


def test_teacher_statistics_come_from_training_images_only():
    """Fewer than 1024 training images: the statistics stop at the held-out ones."""
    class Pool:  # 400 images, the last 20 held out
        seen = []
        def __len__(self): return 400
        def __getitem__(self, idx):
            self.seen.extend(idx)
            return torch.rand(len(idx), 1, 32, 32), None
    vit = U.ViT(32, 16, "vit_tiny", depth=1).eval()
    mu, sd = U.teacher_stats(vit, Pool(), 380, "cpu")
    assert sorted(Pool.seen) == list(range(380)) and mu.shape == sd.shape == (192,)
