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
import us_util

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


def interrupted(monkeypatch, argv, at):
    """Run `argv` until step `at` starts, then Ctrl-C (the checkpoints before it are written)."""
    real = U.schedule
    def crash(step, *a):
        if step == at: raise KeyboardInterrupt
        return real(step, *a)
    monkeypatch.setattr(U, "schedule", crash)
    with pytest.raises(SystemExit):
        U.main(argv)
    monkeypatch.setattr(U, "schedule", real)


def test_resume_auto_skips_a_corrupt_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    flags = ["teacher", *TINY, "--steps", "6", "--eval_every", "2", "--out", str(out)]
    interrupted(monkeypatch, flags, at=4)
    best_step = U.load_checkpoint(str(out / "best.pt"))["step"]
    (out / "last.pt").write_bytes((out / "last.pt").read_bytes()[:500])  # truncated, e.g. a full disk
    capsys.readouterr()
    U.main(flags + ["--resume"])
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
    """The NaN at step 2 is seen at the next log step (3): no update from step 2 on, last.pt untouched."""
    out = tmp_path / "run"
    flags = ["teacher", *TINY, "--steps", "4", "--eval_every", "2", "--out", str(out)]
    interrupted(monkeypatch, flags, at=2)
    good = (out / "last.pt").read_bytes()
    real = U.mae_loss
    monkeypatch.setattr(U, "mae_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        U.main(flags + ["--resume"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "loss nan, gradient norm nan at step 2" in err
    assert (out / "last.pt").read_bytes() == good
    first = U.batch_indices(2, 16, 160 - 8, 0)[:3].tolist()  # step 2's images, named in the line
    assert f"; its images include synthetic image {first[0]}, synthetic image {first[1]}," in err


def test_more_processes_than_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(U.UserError, match="process 1 has no GPU: 1 visible; lower --nproc_per_node"):
        us_util.setup_distributed()


def test_step_flops_counts_a_vit_b_step():
    """The MFU numerator at the paper's shapes, checked by hand: 24 d^2 T + 4 T^2 d per block and sequence."""
    teacher = U.ViT(224, 16, "vit_base", depth=12)
    student = U.ViT(224, 16, "vit_base", depth=12)
    head = U.Predictor(14, 768, 384, 12, 12, 768)  # the paper preset's predictor
    f = us_util.step_flops(student, head, teacher, 128, 100, 20, 4)
    assert us_util.step_flops(student, head, None, 128, 100, 20, 4) < f  # stage 1: no teacher
    blk = lambda dim, T: 24 * dim * dim * T + 4 * T * T * dim  # noqa: E731
    assert f == 3 * 128 * 12 * blk(768, 100) + 3 * 512 * 12 * blk(384, 120) + 128 * 12 * blk(768, 196)
    assert 1.7e13 < f < 2.2e13  # ~19 TFLOP: teacher 4.5, student 6.9, predictor 7.8 (4 x 128 sequences of 120)


@pytest.mark.parametrize("fused", [False, True])
def test_a_nonfinite_step_and_those_after_it_are_not_applied(fused):
    """update(): the fused optimiser (CUDA's, here on CPU) skips on the device via found_inf, the CPU
    one by reading the flag; either way weights and optimiser state stay as they were."""
    torch.manual_seed(0)
    enc, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    opt, params = U.make_optimizer(enc, head, U.TrainConfig(), fused)
    bad = torch.tensor([-1.0, 0.0, 0.0])
    x = torch.randn(8, 4)
    for step, scale in enumerate([1.0, float("nan"), 1.0]):
        loss = head(enc(x)).pow(2).mean() * scale
        opt.zero_grad()
        loss.backward()
        before = [p.detach().clone() for p in params]
        bad = U.update(opt, params, 1.0, loss, step, bad)
        if step > 0:  # step 1 is NaN; step 2 is finite, but comes after it: skipped as well
            assert all(torch.equal(a, b) for a, b in zip(before, params))
            assert all(float(s["step"]) == 1 for s in opt.state.values())
    assert bad[0].item() == 1 and bad[1].isnan() and bad[2].isnan()
    with pytest.raises(U.UserError, match="loss nan, gradient norm nan at step 1: stopping at step 2"):
        U.stop_if_nonfinite(bad, 2, "x/last.pt")


@pytest.mark.parametrize("command", ["teacher", "pretrain"])
def test_no_reads_from_the_device_between_log_steps(tmp_path, monkeypatch, command):
    """On a GPU every item()/bool()/tolist() of a device tensor waits for it (a sync). Counted here on
    CPU with the fused optimiser that CUDA gets: zero reads in steps that neither log nor checkpoint.
    Batches are built in a worker process, so only the training step itself is counted."""
    if command == "pretrain":
        U.main(["teacher", *TINY, "--steps", "1", "--eval_every", "1", "--out", str(tmp_path / "t")])
    real_opt, real_schedule, calls, at = U.make_optimizer, U.schedule, [0], {}
    monkeypatch.setattr(U, "make_optimizer", lambda e, h, t, fused: real_opt(e, h, t, True))
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__format__"):
        def counted(self, *a, _real=getattr(torch.Tensor, name), **k):
            calls[0] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    def schedule(step, *a):  # called first in every step: the reads since the last call were the last step's
        at[step] = calls[0]
        return real_schedule(step, *a)
    monkeypatch.setattr(U, "schedule", schedule)
    U.main([command, *TINY, "--steps", "9", "--log_every", "4", "--eval_every", "8", "--workers", "1",
            "--teacher", str(tmp_path / "t" / "best.pt"), "--out", str(tmp_path / "s")])
    reads = {s + 1: at[s + 1] - at[s] for s in range(8)}  # step number (as logged) -> reads
    assert reads[4] > 0 and reads[8] > 0, reads  # log and checkpoint steps do read: the count works
    assert all(n == 0 for s, n in reads.items() if s % 4), reads


def test_resume_refuses_another_run_unless_forced(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["teacher", *TINY, "--steps", "2", "--eval_every", "2", "--out", str(out)]
    U.main(flags)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        U.main(flags + ["--steps", "4", "--lr", "1e-4", "--resume"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--steps 4 (was 2), --lr 0.0001 (was 0.001)" in err, err
    assert "--resume force" in err
    U.main(flags + ["--log_every", "1", "--eval_every", "1", "--workers", "1", "--kernels", "torch",
                    "--threads", "1", "--bf16", "false", "--resume"])  # flags that do not change the run
    U.main(flags + ["--steps", "4", "--lr", "1e-4", "--resume", "force"])
    err = capsys.readouterr().err
    assert "warning: --resume force" in err and "--lr 0.0001 (was 0.001)" in err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"step": 2, "resume_force": {"--steps": [2, 4], "--lr": [0.001, 0.0001]}} in log
    assert U.load_checkpoint(str(out / "last.pt"))["step"] == 4


def test_resume_refuses_a_checkpoint_that_did_not_record_a_flag(tmp_path, capsys):
    """A checkpoint from before a flag existed (--place came with issue 13, and its default changed since)
    does not say what that run used: resuming it under today's default would change the run unseen."""
    out = tmp_path / "run"
    flags = ["teacher", *TINY, "--steps", "2", "--eval_every", "2", "--out", str(out)]
    U.main(flags)
    ck = U.load_checkpoint(str(out / "last.pt"))
    section = next(s for s, c in ck["config"].items() if "place" in c)
    del ck["config"][section]["place"]  # as an older version wrote it
    torch.save(ck, out / "last.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        U.main(flags + ["--resume"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--place fit (was not recorded)" in err, err
    U.main(flags + ["--steps", "3", "--resume", "force"])
    assert U.load_checkpoint(str(out / "last.pt"))["step"] == 3


def test_resume_checks_the_teacher_is_the_same(tmp_path, capsys):
    for seed in (0, 1):
        U.main(["teacher", *TINY, "--steps", "1", "--eval_every", "1", "--seed", str(seed),
                "--out", str(tmp_path / f"t{seed}")])
    teacher = tmp_path / "t0" / "best.pt"
    flags = ["pretrain", *TINY, "--steps", "2", "--eval_every", "2", "--teacher", str(teacher),
             "--out", str(tmp_path / "s")]
    U.main(flags)
    stored = U.load_checkpoint(str(tmp_path / "s" / "last.pt"))["teacher"]
    assert stored["sha256"] == us_util.weights_sha256(stored["model"])
    U.main(flags + ["--resume"])  # the same teacher: fine
    teacher.write_bytes((tmp_path / "t1" / "best.pt").read_bytes())  # another teacher, the same path
    capsys.readouterr()
    with pytest.raises(SystemExit):
        U.main(flags + ["--resume"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "teacher weights (sha256)" in err, err
    U.main(flags + ["--resume", "force"])
    assert "warning: --resume force" in capsys.readouterr().err
