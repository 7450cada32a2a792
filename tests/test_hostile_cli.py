"""Careless or hostile command lines (issue 12): every case ends with exit code 2, exactly one line on stderr,
no traceback, and nothing in --out changed. The data side (hostile images, paths, labels) is
tests/test_hostile_data.py."""
import fcntl
import os

import pytest

import us_jepa as U

TINY = ["--n_images", "96", "--batch_size", "16", "--depth", "1", "--pred_depth", "1", "--steps", "2",
        "--eval_every", "2", "--log_every", "2"]


def snapshot(folder):
    """Names, sizes and modification times of everything below folder."""
    out = {}
    for top, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(top, f))
            out[os.path.join(top, f)] = (st.st_size, st.st_mtime_ns)
    return out


def refused(argv, capsys, match, out=None):
    """Run the command line; assert exit 2, one stderr line containing match, --out untouched."""
    before = snapshot(out) if out else None
    with pytest.raises(SystemExit) as e:
        U.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    if out:
        assert snapshot(out) == before


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One finished tiny stage-1 run: the run that the resume cases try to continue wrongly."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    U.main(["teacher", *TINY, "--out", str(out)])
    return out


FLAGS = [  # (extra flags, what the one line must say)
    (["--ov"], "unrecognized arguments: --ov"),  # no prefix matching: --ov is not --overwrite
    (["--overw"], "unrecognized arguments: --overw"),
    (["--patch_size", "0"], "--patch_size 0"),
    (["--pred_heads", "0"], "--pred_dim must be divisible by --pred_heads"),
    (["--eval_every", "0"], "--eval_every 0"),
    (["--log_every", "0"], "--log_every 0"),
    (["--threads", "-1"], "--threads -1"),
    (["--betas", "0.9,1.5"], "--betas"),
    (["--lr", "-1"], "--lr -1"),
    (["--lr", "inf"], "--lr inf"),
    (["--lr", "nan"], "--lr nan"),
    (["--start_lr", "nan"], "--start_lr nan"),
    (["--final_lr", "-1e-3"], "--final_lr"),
    (["--epochs", "nan"], "--epochs nan"),
    (["--epochs", "-1"], "--epochs -1"),
    (["--seed", "-1"], "--seed -1"),
    (["--img_size", "100000"], "--img_size 100000"),
    (["--depth", "0"], "--depth 0"),
    (["--pred_depth", "0"], "--pred_depth 0"),
    (["--pred_dim", "0"], "--pred_dim 0"),
    (["--warmup", "2"], "--warmup 2"),
    (["--warmup", "nan"], "--warmup nan"),
    (["--clip", "-1"], "--clip -1"),
    (["--beta", "0"], "--beta 0"),
    (["--holdout", "nan"], "--holdout must be in [0, 0.5)"),
    (["--max_bad", "2"], "--max_bad must be in [0, 1]"),
    (["--max_bad", "nan"], "--max_bad must be in [0, 1]"),
    (["--tau", "0"], "--tau 0"),
    (["--n_images", "0"], "--n_images 0"),
    (["--batch_size", "0"], "--batch_size and --steps must be >= 1"),
    (["--batch_size", "-4"], "--batch_size and --steps must be >= 1"),
    (["--steps", "0"], "--batch_size and --steps must be >= 1"),
    (["--every", "0"], "--every 0"),
    (["--workers", "-2"], "--workers must be >= 0"),
    (["--pix_pool", "0"], "--pix_pool must divide --patch_size"),
    (["--n_targets", "0"], "--n_targets >= 1"),
    (["--min_keep", "0"], "--min_keep must be in [1, patches per image)"),
    (["--tgt_scale", "0.2,nan"], "--tgt_scale"),
    (["--crop_scale", "inf,1"], "--crop_scale"),
    (["--wd", "nan,0.4"], "--wd"),
    (["--lr", "abc"], "--lr: cannot read 'abc'"),
    (["--resume", "sometimes"], "--resume sometimes"),
    (["--loss", "huber"], "--loss"),
    (["--model", "vit_huge"], "--model vit_huge"),
]


@pytest.mark.parametrize("flags,match", FLAGS, ids=[" ".join(f) for f, _ in FLAGS])
def test_bad_training_flags(tmp_path, capsys, flags, match):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("a user's file")
    refused(["pretrain", *TINY, "--out", str(out), *flags], capsys, match, out)


PROBE_FLAGS = [
    (["--severity", "9", "--corrupt", "contrast"], "--severity in (0, 4]"),
    (["--severity", "nan", "--corrupt", "blur"], "--severity"),
    (["--seeds", "0"], "--seeds, --epochs, --patience and --n_* must be >= 1"),
    (["--epochs", "-1"], "--seeds, --epochs, --patience and --n_* must be >= 1"),
    (["--threads", "-1"], "--threads -1"),
    (["--n_train", "0"], "--seeds, --epochs, --patience and --n_* must be >= 1"),
    (["--patience", "0"], "--seeds, --epochs, --patience and --n_* must be >= 1"),
    (["--lr", "nan"], "--lr nan"),
    (["--wd", "inf"], "--wd inf"),
    (["--layers", "0"], "--layers 0"),
    (["--fractions", "0"], "--fractions in (0, 100]"),
    (["--fractions", "150"], "--fractions in (0, 100]"),
    (["--corrupt", "fog"], "--corrupt from"),
    (["--head", "mlp"], "--head mlp"),
    (["--encoder", "best"], "--encoder best"),
    (["--enc", "pixels"], "unrecognized arguments: --enc"),
]


@pytest.mark.parametrize("flags,match", PROBE_FLAGS, ids=[" ".join(f) for f, _ in PROBE_FLAGS])
def test_bad_probe_flags(tmp_path, capsys, flags, match):
    refused(["probe", "--encoder", "pixels", "--task", "lesion", "--out", str(tmp_path / "p.json"), *flags], capsys,
            match, tmp_path)


RESUME = [  # a flag that changes which run this is: refused, the flag named
    (["--lr", "0.5"], "--lr"),
    (["--batch_size", "8"], "--batch_size"),
    (["--steps", "9"], "--steps"),
    (["--seed", "3"], "--seed"),
    (["--usrc"], "--usrc"),
    (["--tgt_scale", "0.2,0.3"], "--tgt_scale"),
    (["--depth", "2"], "--depth"),
    (["--n_images", "128"], "--n_images"),
]


@pytest.mark.parametrize("flags,match", RESUME, ids=[" ".join(f) for f, _ in RESUME])
def test_resume_with_other_flags(run, capsys, flags, match):
    refused(["teacher", *TINY, "--out", str(run), "--resume", *flags], capsys, match, run)


def test_outputs_that_cannot_be_written(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("not a folder")
    refused(["teacher", *TINY, "--out", str(f)], capsys, "--out")  # --out is a file
    refused(["teacher", *TINY, "--out", str(f / "sub")], capsys, "--out")  # below a file
    # probe: where the JSON goes is checked before the probe runs (its results would be lost)
    refused(["probe", "--encoder", "pixels", "--task", "lesion", "--out", str(f / "p.json")], capsys, "--out")
    refused(["probe", "--encoder", "pixels", "--task", "lesion", "--out", str(tmp_path)], capsys,
            "not a writable file path")


def test_a_second_run_into_a_locked_out_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242")
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running process holds it
    try:
        refused(["teacher", *TINY, "--out", str(out)], capsys, "another run (pid 4242) is writing there", out)
    finally:
        os.close(fd)
    U.main(["teacher", *TINY, "--out", str(out)])  # the holder is gone: the lock is free again
    assert (out / "last.pt").exists()


def test_empty_last_pt_falls_back_to_best(tmp_path, capsys):
    out = tmp_path / "run"
    U.main(["teacher", *TINY, "--out", str(out)])
    (out / "last.pt").write_bytes(b"")  # a 0-byte file: its load error has no message
    U.main(["teacher", *TINY, "--out", str(out), "--resume"])
    assert "warning: skipping" in capsys.readouterr().err


def test_best_is_written_before_last(tmp_path, monkeypatch):
    """At a new best, best.pt is renamed first: a kill between the renames leaves last.pt one step older
    (which --resume repeats), never a best.pt older than the best the run reported."""
    written, real = [], U.save_atomic

    def record(obj, path):
        written.append(os.path.basename(path))
        real(obj, path)
    monkeypatch.setattr(U, "save_atomic", record)
    U.main(["teacher", *TINY, "--out", str(tmp_path / "run")])
    assert written == ["best.pt", "last.pt"]


@pytest.mark.parametrize("model,data", [
    ({"model": "vit_tiny", "depth": "six", "patch_size": 16}, {"img_size": 96}),  # a string
    ({"model": "vit_tiny", "depth": 10**9, "patch_size": 16}, {"img_size": 96}),  # absurd: never allocated
    ({"model": "vit_giant", "depth": 2, "patch_size": 16}, {"img_size": 96}),
    ({"model": "vit_tiny", "depth": 2, "patch_size": 16, "bogus": 1}, {"img_size": 96}),
    ({"model": "vit_tiny", "depth": 2, "patch_size": 16}, {"img_size": -96}),
    ({"model": "vit_tiny", "depth": 2, "patch_size": 16}, {}),
])
def test_a_checkpoint_with_a_nonsense_config_is_refused(tmp_path, capsys, model, data):
    import torch
    path = tmp_path / "odd.pt"
    torch.save({"kind": "student", "config": {"data": data, "model": model}, "model": {}}, path)
    refused(["probe", "--ckpt", str(path), "--encoder", "student", "--task", "lesion", "--out",
             str(tmp_path / "p.json")], capsys, "its stored config cannot describe a ViT")


def test_a_full_disk_leaves_no_tmp_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    import errno
    import torch
    path = tmp_path / "last.pt"
    U.save_atomic({"a": 1}, str(path))

    def full(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(U.UserError, match="No space left on device"):
        U.save_atomic({"a": 2}, str(path))
    assert os.listdir(tmp_path) == ["last.pt"]
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"a": 1}


def test_a_nan_stop_names_files_of_the_bad_batch(tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image
    import us_data as D
    data = tmp_path / "data"
    data.mkdir()
    imgs = D.synth_batch(range(40), 64, 3, "lesion")[0]
    for i in range(40):
        Image.fromarray((imgs[i, 0].numpy() * 255).astype(np.uint8)).save(data / f"scan_{i:02d}.png")
    real = U.mae_loss
    monkeypatch.setattr(U, "mae_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    refused(["teacher", "--data", str(data), "--img_size", "64", "--batch_size", "8", "--steps", "2",
             "--depth", "1", "--pred_depth", "1", "--out", str(tmp_path / "run")], capsys,
            f"; its images include {data}{os.sep}scan_")
