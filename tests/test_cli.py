"""Bad input: one clear line on stderr and exit code 2, never a traceback or a silent wrong result."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import us_jepa as U

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fails(argv, capsys, match):
    with pytest.raises(SystemExit) as e:
        U.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert len(err.splitlines()) == 1 and match in err, err
    return err


@pytest.fixture
def bad_ckpts(tmp_path):
    vit = U.ViT(96, 16, "vit_tiny", depth=2)
    config = {"data": {"img_size": 96}, "model": {"model": "vit_tiny", "depth": 3, "patch_size": 16}}
    torch.save({"kind": "student", "config": config, "model": vit.state_dict()}, tmp_path / "shape.pt")
    torch.save({"kind": "student", "config": config, "model": vit.state_dict(), "x": U.MaskConfig()},
               tmp_path / "pickle.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "shape.pt").read_bytes()[:1000])
    torch.save({"weights": vit.state_dict()}, tmp_path / "foreign.pt")
    return tmp_path


CASES = [
    (["pretrain", "--batchsize", "3"], "unrecognized arguments: --batchsize 3 (did you mean --batch_size?)"),
    (["pretrain", "--batch_size", "abc"], "--batch_size: cannot read 'abc' as int"),
    (["pretrain", "--tgt_scale", "0.3"], "--tgt_scale: cannot read '0.3' as tuple"),
    (["pretrain", "--tgt_scale", "0.5,0.2"], "--tgt_scale 0.5,0.2: need low <= high"),
    (["pretrain", "--batch_size", "0"], "--batch_size and --steps must be >= 1"),
    (["teacher", "--batch_size", "-3"], "--batch_size and --steps must be >= 1"),
    (["pretrain", "--tgt_aspect", "0,1"], "--tgt_aspect 0.0,1.0: need low <= high in the valid range"),
    (["pretrain", "--ctx_scale", "0.5,1.5"], "--ctx_scale 0.5,1.5: need low <= high in the valid range"),
    (["pretrain", "--resume", "yes"], "--resume yes: auto (or a bare --resume)"),
    (["teacher", "--resume"], "--resume: no checkpoint in runs/teacher to continue"),
    (["pretrain", "--workers", "-1"], "--workers must be >= 0"),
    (["pretrain", "--max_bad", "2"], "--max_bad must be in [0, 1]"),
    (["pretrain", "--every", "0"], "--every 0: must be >= 1"),
    (["pretrain", "--img_size", "100"], "--img_size 100 must be a multiple of --patch_size 16"),
    (["pretrain", "--model", "vit_huge"], "--model vit_huge: choose one of"),
    (["pretrain", "--loss", "huber"], "--loss: smooth_l1 | l1 | l2"),
    (["teacher", "--kernels", "fast"], "unknown backend 'fast' (choose from auto, cuda, triton, cpp; torch"),
    (["teacher", "--kernels", "cuda"], "kernels backend 'cuda' cannot run here: cuda needs CUDA tensors"),
    (["pretrain", "--preset", "fast"], "argument --preset: invalid choice"),
    (["pretrain", "--data", "/no/such/dir"], "--data /no/such/dir: no such directory"),
    (["pretrain", "--teacher", "/no/such/teacher.pt"], "--teacher /no/such/teacher.pt: no such file"),
    (["probe", "--ckpt", "/no/such.pt"], "/no/such.pt: no such checkpoint"),
    (["probe", "--encoder", "pixels", "--task", "thyroid"], "--task thyroid: choose one of"),
    (["probe", "--encoder", "cnn"], "--encoder cnn: student | teacher | random | pixels | all"),
    (["fly"], "unknown command 'fly'"),
]


@pytest.mark.parametrize("argv,match", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_flags(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written to the repository by a failing run
    fails(argv, capsys, match)
    assert not (tmp_path / "runs").exists() or argv[0] == "probe"


@pytest.mark.parametrize("name,match", [("shape.pt", "weights do not fit the ViT its config describes"),
                                        ("pickle.pt", "cannot load (UnpicklingError"),
                                        ("trunc.pt", "cannot load"),
                                        ("foreign.pt", "not a us_jepa checkpoint")])
def test_bad_checkpoints(name, match, bad_ckpts, capsys):
    fails(["probe", "--ckpt", str(bad_ckpts / name), "--encoder", "student"], capsys, match)
    fails(["pretrain", "--teacher", str(bad_ckpts / name), "--out", str(bad_ckpts / "o")], capsys, match)


def test_bad_data_dirs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fails(["teacher", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o1")], capsys, "no images")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    fails(["teacher", "--data", str(tmp_path / "corrupt"), "--out", str(tmp_path / "o2")], capsys,
          "1 of 1 image files are unreadable or smaller than 16 px")
    (tmp_path / "onecls" / "train" / "a").mkdir(parents=True)
    fails(["probe", "--encoder", "pixels", "--data", str(tmp_path / "onecls")], capsys, "need at least 2 class")


def test_unreadable_files_are_skipped_and_counted(tmp_path, capsys):
    """A few broken files in a big folder are skipped and said; too many stop the run (--max_bad)."""
    from PIL import Image
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(30):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64), dtype=np.uint8)).save(d / f"{i}.png")
    good = (d / "0.png").read_bytes()
    Image.open(d / "1.png").convert("RGB").save(tmp_path / "x.jpg")
    (d / "cut.jpg").write_bytes((tmp_path / "x.jpg").read_bytes()[:300])  # a truncated JPEG: it opens, then fails
    (d / "notes.png").write_text("not an image")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(d / "tiny.png")  # smaller than a 16 px patch
    flags = ["teacher", "--data", str(d), "--batch_size", "8", "--steps", "1", "--depth", "1", "--pred_depth", "1",
             "--img_size", "64"]
    U.main(flags + ["--out", str(tmp_path / "o1"), "--max_bad", "0.1"])
    assert "skipping 3 of 33 unreadable or too small image files" in capsys.readouterr().out
    fails(flags + ["--out", str(tmp_path / "o2")], capsys, "3 of 33 image files are unreadable or smaller than 16 px")
    assert good == (d / "0.png").read_bytes()


def test_label_file_pointing_at_a_missing_image(tmp_path, capsys):
    from PIL import Image
    (tmp_path / "train_val.json").write_text('[{"image": "a.png", "label": 0}, {"image": "b.png", "label": 1}]')
    (tmp_path / "test.json").write_text('[{"image": "a.png", "label": 0}]')
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a.png")
    fails(["probe", "--encoder", "pixels", "--data", str(tmp_path)], capsys, "b.png does not exist")


def test_teacher_with_another_patch_size(tmp_path, capsys):
    U.main(["teacher", "--n_images", "64", "--batch_size", "8", "--steps", "1", "--depth", "1", "--pred_depth", "1",
            "--patch_size", "8", "--out", str(tmp_path / "t")])
    fails(["pretrain", "--teacher", str(tmp_path / "t" / "best.pt"), "--n_images", "64", "--out", str(tmp_path / "s")],
          capsys, "teacher sees a 12x12 patch grid, the student 6x6: use the teacher's --img_size and --patch_size")


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.pt").write_bytes(b"precious")
    fails(["teacher", "--out", str(out), "--n_images", "64", "--batch_size", "8"], capsys, "already holds a run")
    assert (out / "best.pt").read_bytes() == b"precious"


def test_no_traceback_from_the_real_command_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "us_jepa.py"), "pretrain", "--lr", "fast"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "us_jepa.py pretrain: error: --lr: cannot read 'fast' as float (example: 0.001)"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "us_jepa.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "python us_jepa.py pretrain" in r.stdout
