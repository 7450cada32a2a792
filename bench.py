"""Benchmarks: scripts that print tables (not tests). BENCHMARKS.md holds what they printed, and where.

    python bench.py kernels                 # fused ops + a pretrain step: on the GPU if there is one
    python bench.py kernels --device cpu --quick

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
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels  # noqa: E402
import us_jepa as U  # noqa: E402

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
    gather, loss_fn = U.select_kernels(name, device)
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
    cfg = U.parse_config("pretrain", ["--model", model, "--img_size", str(img_size), "--depth", str(depth),
                                      "--pred_depth", str(pred[0]), "--pred_dim", str(pred[1])])
    flops = U.step_flops(cfg["data"], cfg["model"], cfg["mask"], teacher, "student", batch, ctx.shape[1],
                         tgt.shape[2], tgt.shape[0])
    peak = next((v for n, v in U.PEAK_BF16.items() if device == "cuda" and n in torch.cuda.get_device_name()), 0)
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
    # fused ops; MFU against the card's dense bf16 peak (U.PEAK_BF16), also for the fp32 row. On CPU: the demo.
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


BENCHES = {"kernels": bench_kernels}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHES:
        sys.exit(f"usage: python bench.py {{{'|'.join(BENCHES)}}} [flags]; --help after one for its flags")
    BENCHES[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
