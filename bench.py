"""Benchmarks: scripts that print tables (not tests). BENCHMARKS.md holds what they printed, and where.

    python bench.py kernels                 # fused ops + a pretrain step: on the GPU if there is one
    python bench.py kernels --device cpu --quick
    python bench.py fan                     # us_data.fan_mask ms per frame, one thread
    python bench.py fan --module OLD.py     # the same frames through another file's fan_mask

`kernels`: per op, forward + backward at the paper's shapes (B=128, N=196, D=768; 4 target masks of 18 tokens; a
context of 96 tokens) plus a smaller (the CPU demo: B=64, N=36, D=192) and a larger size (B=256, D=1024):
median time, achieved GB/s over the *minimal* bytes (each input read once, each output written once) and,
on CUDA, peak memory above the inputs. The ceiling is the measured device copy bandwidth (bytes read +
written). Then a pretrain step (teacher forward + student + predictor + backward + AdamW) with the torch
references and with the fused ops: images/s and peak memory. This file imports us_jepa for the references
and the models; kernels/ itself imports nothing of the method."""
import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels  # noqa: E402
import us_jepa as U  # noqa: E402
import us_util  # noqa: E402

SIZES = {"small": (64, 36, 192, 4, 4, 28), "paper": (128, 196, 768, 4, 18, 96),
         "large": (256, 196, 1024, 4, 18, 96)}  # B, N, D, M, K target, K context


def timeit(fn, device, reps):
    """Median milliseconds. CUDA: events around each call (after warm-up); CPU: perf_counter."""
    for _ in range(3): fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); torch.cuda.synchronize(); times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter(); fn(); times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def peak_mb(fn, device):
    if device != "cuda": return float("nan")
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    fn(); torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def fmt_mb(mb):
    return f"{mb:8.1f}" if mb == mb else f"{'n/a':>8}"  # NaN: not measured on CPU


def copy_bandwidth(device, reps):
    n = (256 if device == "cuda" else 64) * 2**20 // 4
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    ms = timeit(lambda: dst.copy_(src), device, reps)
    return 2 * n * 4 / ms / 1e6  # GB/s, read + write


def repeat_gather(x, idx):
    """I-JEPA's apply_masks: torch.gather with a repeat()ed index, one mask at a time, then cat."""
    return torch.cat([torch.gather(x, 1, m.unsqueeze(-1).repeat(1, 1, x.size(-1))) for m in idx])


def make_idx(M, B, N, K, device, g):
    return torch.stack([torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)])
                        for _ in range(M)]).to(device)


def variants(device, fused, size):
    """name -> (gather, salt_loss) implementations to time. torch.compile only at the paper's size on a GPU
    (each shape and dtype is a fresh compile of ~10 s)."""
    out = {"torch eager": (U.apply_masks, U.salt_loss), "I-JEPA repeat": (repeat_gather, None)}
    if device == "cuda" and size == "paper":
        out["torch.compile"] = (torch.compile(U.apply_masks, dynamic=False), torch.compile(U.salt_loss, dynamic=False))
    for name in fused:
        o = kernels.get(name, device)
        out[name] = (o.masked_gather, o.salt_loss)
    return out


def bench_ops(device, dtypes, sizes, fused, reps, rows):
    g = torch.Generator().manual_seed(0)
    for size in sizes:
        B, N, D, M, Kt, Kc = SIZES[size]
        for dtype in dtypes:
            s = torch.finfo(dtype).bits // 8
            x = torch.randn(B, N, D, generator=g).to(device, dtype)
            tgt, ctx = make_idx(M, B, N, Kt, device, g), make_idx(1, B, N, Kc, device, g)
            pred = torch.randn(M * B, Kt, D, generator=g).to(device, dtype)
            for name, (gather, salt) in variants(device, fused, size).items():
                for op, idx in (("gather ctx", ctx), ("gather tgt", tgt)):
                    R = idx.numel()
                    xg = x.detach().requires_grad_()
                    gy = torch.randn(idx.shape[0] * B, idx.shape[2], D, generator=g).to(device, dtype)
                    fn = lambda: torch.autograd.grad(gather(xg, idx), xg, gy)  # noqa: E731
                    ms = timeit(fn, device, reps)
                    nbytes = (3 * R * D + B * N * D) * s  # fwd: read + write R rows; bwd: read R rows, write dx
                    rows.append((op, size, str(dtype)[6:], name, ms, nbytes / ms / 1e6, peak_mb(fn, device)))
                if salt is None: continue
                pg = pred.detach().requires_grad_()
                fn = lambda: torch.autograd.grad(salt(pg, x, tgt), pg)  # noqa: E731
                ms = timeit(fn, device, reps)
                nbytes = 3 * tgt.numel() * D * s  # read pred and the target rows of feats, write grad_pred
                rows.append(("salt_loss", size, str(dtype)[6:], name, ms, nbytes / ms / 1e6, peak_mb(fn, device)))


def bench_step(device, name, model, img_size, depth, batch, pred, dtype, reps, compiled=False):
    """One SALT pretrain step. name = 'torch' (references) or a kernels backend; compiled: torch.compile the
    student, predictor and teacher (the custom ops stay inside the graph). -> images/s, peak MB, MFU (CUDA)."""
    gather, loss_fn = U.select_kernels(name, device, U.REFERENCES)
    torch.manual_seed(0)
    enc = U.ViT(img_size, 16, model, depth=depth, gather=gather).to(device)
    teacher = U.ViT(img_size, 16, model, depth=depth).to(device).eval().requires_grad_(False)
    head = U.Predictor(enc.grid, enc.dim, pred[1], pred[0], pred[1] // 32, enc.dim, gather).to(device)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=1e-4, fused=device == "cuda" or None)
    mask_cfg = U.MaskConfig(tgt_scale=(0.075, 0.125), min_keep=10) if enc.grid >= 14 else U.MaskConfig()
    rng = np.random.default_rng(0)
    masks = [U.sample_masks(rng, batch, enc.grid, mask_cfg) for _ in range(4)]
    img = torch.rand(batch, 1, img_size, img_size, device=device)
    it = [0]
    run_enc, run_head, run_teacher = (torch.compile(m) if compiled else m for m in (enc, head, teacher))

    def step():
        ctx, tgt = (m.to(device) for m in masks[it[0] % 4]); it[0] += 1
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            with torch.no_grad(): feats = run_teacher(img)
            loss = loss_fn(run_head(run_enc(img, ctx), ctx, tgt), feats, tgt)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()

    for _ in range(3 if compiled else 0): step()  # compile outside the clock (timeit warms up once more)
    ms = timeit(step, device, reps)
    mb = peak_mb(step, device)
    ctx, tgt = masks[0]
    flops = us_util.step_flops(enc, head, teacher, batch, ctx.shape[1], tgt.shape[2], tgt.shape[0])
    peak = us_util.peak_flops(torch.device(device))
    return batch / ms * 1e3, mb, flops / (ms / 1e3) / peak if peak else float("nan")


def bench_kernels(argv):
    ap = argparse.ArgumentParser(prog="bench.py kernels", description="fused ops and a pretrain step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and sizes")
    ap.add_argument("--no_step", action="store_true", help="skip the pretrain-step benchmark")
    a = ap.parse_args(argv)
    dev, reps = a.device, (5 if a.quick else 20) if a.device == "cpu" else (20 if a.quick else 100)
    if dev == "cpu": torch.set_num_threads(os.cpu_count() or 1)
    fused = [b for b in kernels.BACKENDS if kernels.why_not(b, dev) is None]
    print(f"device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'} | torch {torch.__version__} | "
          f"triton {__import__('triton').__version__ if 'triton' in fused else 'n/a'} | threads "
          f"{torch.get_num_threads()} | fused backends: {', '.join(fused) or 'none'}")
    for b in kernels.BACKENDS:
        if b not in fused: print(f"  {b}: not measured ({kernels.why_not(b, dev)})")
    bw = copy_bandwidth(dev, reps)
    print(f"copy bandwidth (read + write): {bw:.1f} GB/s\n")
    dtypes = [torch.float32, torch.bfloat16]
    sizes = ["small", "paper"] if a.quick or dev == "cpu" else ["small", "paper", "large"]
    rows = []
    bench_ops(dev, dtypes, sizes, fused, reps, rows)
    print(f"{'op':11} {'size':6} {'dtype':9} {'variant':14} {'ms':>8} {'GB/s':>8} {'% copy':>7} {'peak MB':>8}")
    for op, size, dt, name, ms, gbs, mb in rows:
        print(f"{op:11} {size:6} {dt:9} {name:14} {ms:8.3f} {gbs:8.1f} {100 * gbs / bw:6.1f}% {fmt_mb(mb)}")
    if a.no_step: return
    print()
    # The ladder on a GPU (ViT-B/16, 224 px, batch 128): eager fp32, bf16, bf16 + compile, bf16 + compile +
    # fused ops; MFU against the card's dense bf16 peak (us_util.PEAK_BF16), also for the fp32 row. On CPU: the demo.
    bf16, fp32 = torch.bfloat16, torch.float32
    ops = ["torch"] + [b for b in fused if b != "triton" or dev == "cuda"]
    if dev == "cuda":
        cfgs = [("vit_base", 224, 12, 128, (12, 384), dt, c, o) for dt, c, o in
                [(fp32, False, "torch"), (bf16, False, "torch"), (bf16, True, "torch")] + [(bf16, True, o) for o in ops[1:]]
                + [(bf16, False, o) for o in ops[1:]]]
    else:
        cfgs = [("vit_tiny", 96, 6, 64, (4, 96), fp32, False, o) for o in ops]
    print(f"{'pretrain step':34} {'compile':8} {'ops':8} {'img/s':>8} {'peak MB':>8} {'MFU':>6}")
    for model, size, depth, batch, pred, dt, c, name in cfgs:
        ips, mb, mfu = bench_step(dev, name, model, size, depth, batch, pred, dt, max(5, reps // 4), c)
        label = f"{model} {size}px d{depth} b{batch} {str(dt)[6:]}"
        print(f"{label:34} {str(c):8} {name:8} {ips:8.1f} {fmt_mb(mb)} {mfu:6.1%}")


# ----------------------------------------------------------------------------------------------------
# `data`: real-data input at training speed (issue 10). A folder of N realistic scans (640 x 480 8-bit PNGs:
# a sector fan from the built-in simulator, burnt-in text and a depth scale touching it), then: the cache
# build on 1 and 2 processes, its size, training images/s with the cache, with --cache off and on the
# built-in synthetic images, peak RSS of each run, and the loader rate alone (slice + augment, one process).

def write_scans(folder, n, seed=0):
    """n 640 x 480 PNGs: 64 simulated scans (sector and linear), each flipped, shifted and dimmed, with a text
    line across the fan's top edge and a depth scale whose ticks cross its right edge (annotations that touch
    the fan, as on a scanner's screen)."""
    from PIL import Image, ImageDraw, ImageFont
    import us_data as D
    os.makedirs(folder, exist_ok=True)
    base, fans, _ = D.synth_batch(range(64), 448, 7, "lesion3")  # (64, 1, 448, 448) each
    font = ImageFont.load_default(size=14)
    rng = np.random.default_rng(seed)
    for i in range(n):
        flip = rng.random() < 0.5
        img, fan = (t[i % 64, 0].numpy()[:, ::-1] if flip else t[i % 64, 0].numpy() for t in (base, fans))
        frame = np.zeros((480, 640), np.float32)
        x0 = int(rng.integers(40, 150))
        frame[20:468, x0:x0 + 448] = img * rng.uniform(0.7, 1.0)
        im = Image.fromarray((frame * 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        top = 20 + int(np.flatnonzero(fan.any(1))[0])  # the fan's first row
        d.text((x0 + 150, top - 8), f"US-JEPA {i:05d} FR {rng.integers(15, 60)}Hz", fill=230, font=font)
        for k in range(8):  # ticks across the fan's right edge at 8 depths
            y = 40 + 52 * k
            edge = x0 + int(np.flatnonzero(fan[y - 20])[-1]) if fan[y - 20].any() else x0 + 440
            d.line([(edge - 10, y), (edge + 10, y)], fill=200, width=2)
        d.text((x0 + 460, 30), f"{rng.integers(3, 16)} cm", fill=220, font=font)
        im.save(os.path.join(folder, f"scan_{i:05d}.png"), compress_level=1)


def run_child(args, env=None):
    """A pretrain run in a fresh process -> (training img/s from its done line, peak RSS in MB, seconds)."""
    # Peak RSS from /proc (VmHWM): getrusage's ru_maxrss would carry this process's own peak across exec.
    code = ("import sys; sys.argv = ['us_jepa.py'] + sys.argv[1:]; import us_jepa as U\n"
            "try: U.main(sys.argv[1:])\n"
            "finally: print('maxrss', [l.split()[1] for l in open('/proc/self/status')"
            " if l.startswith('VmHWM')][0], flush=True)")
    tic = time.time()
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env=dict(os.environ, **(env or {})), cwd=os.path.dirname(os.path.abspath(__file__)))
    if r.returncode:
        sys.exit(f"bench data: the run failed: {r.stderr.strip().splitlines()[-1]}")
    rate = float(r.stdout.split(" img/s in training steps")[0].split()[-1])
    rss = int(r.stdout.split("maxrss ")[-1].split()[0]) / 1024
    return rate, rss, time.time() - tic


def bench_data(argv):
    import shutil
    import tempfile
    import us_data as D
    ap = argparse.ArgumentParser(prog="bench.py data", description="the preprocessing cache and real-data speed")
    ap.add_argument("--n", default="1000,20000", help="folder sizes (comma-separated)")
    ap.add_argument("--steps", type=int, default=60, help="student steps per training run (batch 64)")
    ap.add_argument("--dir", default="", help="scratch folder (default: a temporary one, removed at the end)")
    ap.add_argument("--loader_only", action="store_true", help="only the loader rows (folders exist)")
    a = ap.parse_args(argv)
    work = a.dir or tempfile.mkdtemp(prefix="us_jepa_bench_")
    if a.loader_only:
        os.environ["US_JEPA_CACHE"] = os.path.join(work, "cache")
        return loader_alone(work, a.n)
    env = {"US_JEPA_CACHE": os.path.join(work, "cache")}
    os.environ.update(env)  # this process's loader measurement below uses the same cache
    os.makedirs(work, exist_ok=True)
    teacher = os.path.join(work, "teacher")  # one small teacher for every student run
    if not os.path.exists(os.path.join(teacher, "best.pt")):
        run_child(["teacher", "--steps", "10", "--n_images", "1000", "--out", teacher], env)
    tflags = ["--teacher", os.path.join(teacher, "best.pt"), "--steps", str(a.steps), "--log_every",
              str(a.steps), "--eval_every", str(10 * a.steps), "--holdout", "0", "--overwrite"]
    rows = []
    rate, rss, _ = run_child(["pretrain", *tflags, "--n_images", "6000", "--out", os.path.join(work, "syn")], env)
    rows.append(("built-in synthetic (cache)", "", rate, rss))
    rate, rss, _ = run_child(["pretrain", *tflags, "--n_images", "6000", "--cache", "off",
                              "--out", os.path.join(work, "syn_off")], env)
    rows.append(("built-in synthetic (--cache off)", "", rate, rss))
    print(f"cores {len(os.sched_getaffinity(0))} | torch {torch.__version__} | scratch {work}\n")
    print(f"{'files':>6} {'procs':>5} {'build s':>8} {'img/s':>7} {'cache MB':>9} {'files MB':>9}")
    for n in [int(x) for x in a.n.split(",")]:
        data = os.path.join(work, f"scans_{n}")
        if not os.path.isdir(data) or len(os.listdir(data)) != n:
            write_scans(data, n)
        size = sum(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data)) / 2**20
        root = os.path.realpath(data)
        params = dict(side=96, root=root, every=1)
        for procs in (1, 2):
            folder = D.cache_folder(env["US_JEPA_CACHE"], "files", root, params)
            shutil.rmtree(folder, ignore_errors=True)
            items, keys = D.file_items(root, 1, folder, params)
            tic = time.time()
            D.open_cache(folder, params, items, keys, procs=procs, say=lambda *a, **k: None)
            sec = time.time() - tic
            mb = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20
            print(f"{n:>6} {procs:>5} {sec:>8.1f} {n / sec:>7.0f} {mb:>9.1f} {size:>9.0f}", flush=True)
        rate, rss, _ = run_child(["pretrain", *tflags, "--data", data, "--out", os.path.join(work, f"f{n}")], env)
        rows.append((f"{n} files (cache)", n, rate, rss))
        if n <= 1000:  # --cache off decodes every drawn image: minutes per run at this size already
            rate, rss, _ = run_child(["pretrain", *tflags, "--data", data, "--cache", "off",
                                      "--out", os.path.join(work, f"f{n}_off")], env)
            rows.append((f"{n} files (--cache off)", n, rate, rss))
    print(f"\n{'student pretrain, demo size, ' + str(a.steps) + ' steps of 64':44} {'img/s':>7} {'% synth':>8} "
          f"{'peak RSS MB':>12}")
    for name, _, rate, rss in rows:
        print(f"{name:44} {rate:>7.0f} {100 * rate / rows[0][2]:>7.0f}% {rss:>12.0f}")
    loader_alone(work, a.n)
    if not a.dir:
        shutil.rmtree(work, ignore_errors=True)


def loader_alone(work, sizes):
    """What one DataLoader worker delivers (slice the cache + augment + masks, no model), and the
    memory it maps: anonymous memory stays flat as N grows; the cache's pages that a run touches are
    mapped file pages (shared by workers and ranks, dropped by the kernel under pressure)."""
    import us_data as D
    import us_jepa as U

    def mem():
        return {k: int(v.split()[0]) / 1024 for k, v in (line.split(":") for line in
                open("/proc/self/status")) if k in ("RssAnon", "RssFile")}
    torch.set_num_threads(1)
    print(f"\n{'loader alone, 1 process, 1 thread':34} {'img/s':>7} {'anon MB':>8} {'+anon':>6} "
          f"{'+file':>6}")
    for n in [int(x) for x in sizes.split(",")]:
        cfg = U.parse_config("pretrain", ["--data", os.path.join(work, f"scans_{n}")])
        images = D.Images(cfg["data"], 0, say=lambda *a, **k: None)
        steps = U.Steps(images, len(images), cfg, cfg["data"].img_size // 16)
        steps[0]
        m0, tic = mem(), time.time()
        for s in range(1, 61):  # 60 steps of 64 random rows
            steps[s]
        rate, m1 = 60 * 64 / (time.time() - tic), mem()
        print(f"{f'{n} files':34} {rate:>7.0f} {m1['RssAnon']:>8.0f} "
              f"{m1['RssAnon'] - m0['RssAnon']:>+6.0f} {m1['RssFile'] - m0['RssFile']:>+6.0f}")


def fan_frames():
    """Realistic frames for fan_mask: synthetic sector scans with burnt-in text in the margin beside
    the fan and a scale bar with ticks, at 96 x 96, 224 x 224 and 640 x 480 (a 420 px scan in a
    scanner-like frame)."""
    from PIL import Image, ImageDraw, ImageFont
    import us_data as D
    frames = {}
    for name, size, (py, px) in (("96x96", 96, (0, 0)), ("224x224", 224, (0, 0)),
                                 ("640x480", 420, (30, 110))):
        imgs, fans, _ = D.synth_batch(range(8), size)
        widths = fans[:, 0].sum(2)  # a sector widens with depth; take the first one
        i = next(j for j in range(8) if widths[j, widths[j] > 0][0] < 0.8 * widths[j, -1])
        a = np.pad(imgs[i, 0].numpy() / float(imgs[i].max()), ((py, py), (px, px)))
        im = Image.fromarray((a * 255).astype(np.uint8))
        draw, h, w = ImageDraw.Draw(im), a.shape[0], a.shape[1]
        font = ImageFont.load_default(size=max(8, h // 30))
        draw.text((2, 2), "MI 1.1 TIS 0.7", fill=255, font=font)
        draw.line([(w - 4, h // 4), (w - 4, 3 * h // 4)], fill=255)
        for y in range(h // 4, 3 * h // 4, max(4, h // 40)):
            draw.line([(w * 3 // 4, y), (w - 4, y)], fill=200)  # ticks reaching into the fan's side
        frames[name] = np.asarray(im, np.float32) / 255
    return frames


def bench_fan(argv):
    ap = argparse.ArgumentParser(prog="bench.py fan", description="fan_mask ms per frame, 1 thread")
    ap.add_argument("--reps", type=int, default=50, help="timed calls per size (median)")
    ap.add_argument("--module", help="time this .py file's fan_mask (e.g. an older us_data.py)")
    a = ap.parse_args(argv)
    if a.module:
        import importlib.util
        spec = importlib.util.spec_from_file_location("fan_module", a.module)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        import us_data as mod
    torch.set_num_threads(1)  # a DataLoader worker's share
    print(f"fan_mask of {a.module or 'us_data.py'} | torch {torch.__version__} | threads 1 | "
          f"median of {a.reps}")
    print(f"{'frame':9} {'ms':>8} {'fan %':>6}")
    for name, img in fan_frames().items():
        assert img.shape[::-1] == tuple(map(int, name.split("x"))), (name, img.shape)
        ms = timeit(lambda: mod.fan_mask(img), "cpu", a.reps)
        print(f"{name:9} {ms:8.2f} {100 * mod.fan_mask(img).mean():6.1f}")


BENCHES = {"kernels": bench_kernels, "data": bench_data, "fan": bench_fan}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHES:
        sys.exit(f"usage: python bench.py {{{'|'.join(BENCHES)}}} [flags]; --help after one for its flags")
    BENCHES[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
