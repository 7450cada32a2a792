"""Scale out and survive: the per-step batch is the same on any number of processes and workers, torchrun + DDP
(gloo, 2 CPU processes) reproduces one process, a SIGKILLed run resumes exactly, corrupt checkpoints are skipped,
nothing is overwritten without --overwrite, a NaN stops the run before it touches the weights."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import us_data as D
import us_jepa as U

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_images", "160", "--batch_size", "16", "--depth", "2", "--pred_depth", "1", "--log_every", "2"]


def weights(path):
    ck = U.load_checkpoint(str(path))
    return {**{"model." + k: v for k, v in ck["model"].items()}, **{"head." + k: v for k, v in ck["head"].items()}}


def cli(args, cwd, env=None, torchrun=0):
    pre = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                              if torchrun else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(pre + [os.path.join(ROOT, "us_jepa.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("usrc", [False, True])
def test_shares_of_a_step_make_the_one_process_batch(usrc):
    """The 'distributed sampler': rank r of 2 gets rows r*B/2 .. of exactly the batch one process builds, with the
    same augmentation; masks too (USrc masks are drawn per process, so only their validity is shared)."""
    cfg = U.parse_config("pretrain", TINY + ["--usrc", str(usrc)])
    images = D.Images(cfg["data"], 0)
    one = U.Steps(images, 150, cfg, 6)[7]
    two = [U.Steps(images, 150, cfg, 6, rank=r, world=2)[7] for r in (0, 1)]
    assert torch.equal(torch.cat([s[0] for s in two]), one[0])  # images after augmentation
    if not usrc:
        assert torch.equal(torch.cat([s[1][0] for s in two]), one[1][0])  # context indices
        assert torch.equal(torch.cat([s[1][1] for s in two], 1), one[1][1])  # target indices
    else:
        assert all(s[1][0].shape[0] == 8 and s[1][1].shape[1] == 8 for s in two)
    assert not torch.equal(U.Steps(images, 150, cfg, 6)[8][0], one[0])  # another step, another batch


def test_workers_build_the_same_batches(tmp_path):
    for w in (0, 2):
        U.main(["teacher", *TINY, "--steps", "3", "--eval_every", "3", "--workers", str(w), "--out", str(tmp_path / f"w{w}")])
    a, b = weights(tmp_path / "w0" / "last.pt"), weights(tmp_path / "w2" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("command", ["teacher", "pretrain"])
def test_two_gloo_processes_match_one(tmp_path, command):
    """torchrun --nproc_per_node=2 (DDP over gloo) and one process, same global batch and seed: same weights."""
    flags = TINY + ["--steps", "4", "--eval_every", "4"]
    if command == "pretrain":
        U.main(["teacher", *TINY, "--steps", "2", "--eval_every", "2", "--out", str(tmp_path / "t")])
        flags += ["--teacher", str(tmp_path / "t" / "best.pt")]
    for n in (1, 2):
        r = cli([command, *flags, "--out", str(tmp_path / f"p{n}")], tmp_path, torchrun=n)
        assert r.returncode == 0, r.stderr[-2000:]
    assert "4 steps of 16 on 2 x cpu" in r.stdout and r.stdout.count("done:") == 1  # rank 0 alone speaks
    a, b = weights(tmp_path / "p1" / "last.pt"), weights(tmp_path / "p2" / "last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_sigkill_mid_run_then_resume_auto_is_exact(tmp_path):
    flags = ["teacher", *TINY, "--steps", "40", "--eval_every", "4", "--threads", "1"]
    full = cli(flags + ["--out", "full"], tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "us_jepa.py"), *flags, "--out", "cut"], cwd=tmp_path,
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last, t0 = tmp_path / "cut" / "last.pt", time.time()
    while not last.exists() and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)  # no handler, no cleanup: like a node that dies
    p.wait()
    killed_at = U.load_checkpoint(str(last))["step"]
    assert 4 <= killed_at < 40, killed_at  # it really died mid-way
    r = cli(flags + ["--out", "cut", "--resume", "auto"], tmp_path)
    assert r.returncode == 0 and f"at step {killed_at}" in r.stdout, r.stderr[-2000:]
    a, b = weights(tmp_path / "full" / "last.pt"), weights(last)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_auto_skips_a_corrupt_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    U.main(["teacher", *TINY, "--steps", "4", "--eval_every", "2", "--out", str(out)])
    best_step = U.load_checkpoint(str(out / "best.pt"))["step"]
    (out / "last.pt").write_bytes((out / "last.pt").read_bytes()[:500])  # truncated, e.g. a full disk
    capsys.readouterr()
    U.main(["teacher", *TINY, "--steps", "6", "--eval_every", "2", "--out", str(out), "--resume"])
    captured = capsys.readouterr()
    assert "warning: skipping" in captured.err and f"best.pt at step {best_step}" in captured.out
    assert U.load_checkpoint(str(out / "last.pt"))["step"] == 6


def test_overwrite_is_explicit(tmp_path, capsys):
    out = tmp_path / "run"
    U.main(["teacher", *TINY, "--steps", "2", "--eval_every", "2", "--out", str(out)])
    first = (out / "last.pt").read_bytes()
    with pytest.raises(SystemExit):
        U.main(["teacher", *TINY, "--steps", "2", "--eval_every", "2", "--out", str(out), "--lr", "1e-4"])
    assert "--overwrite starts it over" in capsys.readouterr().err and (out / "last.pt").read_bytes() == first
    with pytest.raises(SystemExit):  # a run that cannot start leaves the old one as it was
        U.main(["teacher", *TINY, "--out", str(out), "--overwrite", "--batch_size", "1000"])  # fails in train()
    assert (out / "last.pt").read_bytes() == first
    U.main(["teacher", *TINY, "--steps", "2", "--eval_every", "2", "--out", str(out), "--lr", "1e-4", "--overwrite"])
    assert U.load_checkpoint(str(out / "last.pt"))["config"]["train"]["lr"] == 1e-4
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 2]  # the old run's log went with it: one loss line, one held-out line


def test_nan_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    U.main(["teacher", *TINY, "--steps", "2", "--eval_every", "2", "--out", str(out)])
    good = (out / "last.pt").read_bytes()
    real = U.mae_loss
    monkeypatch.setattr(U, "mae_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(SystemExit) as e:
        U.main(["teacher", *TINY, "--steps", "4", "--eval_every", "2", "--out", str(out), "--resume"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "loss nan, gradient norm nan at step 2" in err
    assert (out / "last.pt").read_bytes() == good


def test_more_processes_than_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(U.UserError, match="process 1 has no GPU: 1 visible; lower --nproc_per_node"):
        U.setup_distributed()


def test_step_flops_counts_a_vit_b_step():
    """The MFU numerator at the paper's shapes, checked by hand: 24 d^2 T + 4 T^2 d per block and sequence."""
    cfg = U.parse_config("pretrain", ["--preset", "paper"])
    d, m, k = cfg["data"], cfg["model"], cfg["mask"]
    teacher = U.ViT(224, 16, "vit_base", depth=12)
    f = U.step_flops(d, m, k, teacher, "student", 128, 100, 20, 4)
    blk = lambda dim, T: 24 * dim * dim * T + 4 * T * T * dim  # noqa: E731
    assert f == 3 * 128 * 12 * blk(768, 100) + 3 * 512 * 12 * blk(384, 120) + 128 * 12 * blk(768, 196)
    assert 1.7e13 < f < 2.2e13  # ~19 TFLOP: teacher 4.5, student 6.9, predictor 7.8 (4 x 128 sequences of 120)
