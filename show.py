"""Figures for readers (like nanoGPT's sample.py beside train.py): the masks on a few built-in images,
and the student's patch features as colours (first three principal components).

    python show.py                              # runs/pretrain/best.pt -> runs/figures/{masks,pca}.png
    python show.py --ckpt runs/long/best.pt --usrc false
    python show.py few-shot runs/pretrain/probe_lesion.json   # -> probe_lesion_few_shot.png
"""
import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

import us_jepa as U
from us_util import require, unique_path, check_numbers, run_command, make_folder
from us_data import UserError, synth_batch


@dataclass
class ShowConfig:
    ckpt: str = "runs/pretrain/best.pt"  # the encoder whose features the PCA figure shows
    n_images: int = 4               # built-in lesion images per figure
    usrc: bool = True               # the mask figure uses USrc masks (invalid fan patches greyed)
    out: str = "runs/figures"       # folder for masks.png and pca.png (never overwritten: -1, -2, ...)
    seed: int = 0                   # seeds the masks


def run_show(s):
    """PNGs of the masks on a few built-in images and of the student's patch features."""
    from PIL import Image
    check_numbers(s)
    require(s.n_images <= 64, f"--n_images {s.n_images}: at most 64 images fit a figure")
    require(make_folder(s.out, s.out), f"--out {s.out}: not a writable folder")  # before drawing
    ck = U.load_checkpoint(s.ckpt)
    vit = U.build_encoder(ck["config"], ck["model"], s.ckpt).eval()
    S, p, g, n = vit.grid * vit.patch_size, vit.patch_size, vit.grid, s.n_images
    imgs, fans, _ = synth_batch(range(n), S, 2, "lesion")  # (n, 1, S, S) each
    valid = U.fan_patches(fans, p)  # (n, g, g) patches inside the fan
    k = dataclasses.replace(U.MaskConfig(**ck["config"].get("mask", {})), usrc=s.usrc)
    ctx, tgt = U.sample_masks(np.random.default_rng(s.seed), n, g, k, valid if s.usrc else None)
    colours = np.array([(60, 130, 255), (230, 60, 60), (250, 170, 40), (60, 190, 90), (180, 80, 220)],
                       float)
    rgb = np.repeat(imgs[:, 0, :, :, None].numpy() * 255, 3, -1)  # (n, S, S, 3)
    over = np.full((n, g * g, 3), np.nan)  # the colour of each patch, NaN = left as it is
    over[~valid.reshape(n, -1)] = 128  # invalid (outside the fan): grey
    for b in range(n):
        over[b, ctx[b]] = colours[0]  # context blue; the 4 targets red, orange, green, purple
        for m in range(tgt.shape[0]):
            over[b, tgt[m, b]] = colours[1 + m % 4]
    over = over.reshape(n, g, g, 3).repeat(p, 1).repeat(p, 2)  # (n, S, S, 3)
    mixed = np.where(np.isnan(over), rgb, 0.45 * np.nan_to_num(over) + 0.55 * rgb)
    with torch.no_grad():
        f = vit(imgs)  # (n, N, D)
    x = f.reshape(-1, f.shape[-1]) - f.reshape(-1, f.shape[-1]).mean(0)  # (n*N, D)
    pcs = x @ torch.linalg.svd(x, full_matrices=False)[2][:3].T  # (n*N, 3) first three components
    lo, hi = pcs.quantile(0.02, 0), pcs.quantile(0.98, 0)
    pca = ((pcs - lo) / (hi - lo)).clamp(0, 1).reshape(n, g, g, 3)
    pca = pca.repeat_interleave(p, 1).repeat_interleave(p, 2)  # (n, S, S, 3)
    for name, rows in (("masks", [mixed]), ("pca", [rgb, pca.numpy() * 255])):
        grid_img = np.concatenate([np.concatenate(list(r), 1) for r in rows], 0)  # side by side
        path = unique_path(os.path.join(s.out, f"{name}.png"))
        Image.fromarray(grid_img.clip(0, 255).astype(np.uint8)).resize(
            (grid_img.shape[1] * 2, grid_img.shape[0] * 2), Image.NEAREST).save(path)
        print(f"[show] wrote {path}")


COLOURS = [(31, 119, 180), (214, 39, 40), (120, 120, 120), (44, 160, 44), (148, 103, 189)]


def plot_curves(path, xs, series, title):
    """A line chart drawn with pillow, x on a log axis: the few-shot curve (macro-F1 per %)."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (560, 360), "white")  # plot box: x 56..450, y 28..324; legend at right
    d, lx, ys = ImageDraw.Draw(im), np.log10(xs), np.array(list(series.values()))
    y0, y1 = ys.min() - 0.02, ys.max() + 0.02
    px = 56 + 394 * (lx - lx.min()) / max(np.ptp(lx), 1e-9)  # (X,) the pixel column of each x

    def py(y):  # the pixel row of a macro-F1
        return 324 - 296 * (y - y0) / (y1 - y0)

    d.rectangle([56, 28, 450, 324], outline="black")
    d.text((56, 8), title, fill="black")
    for x, c in zip(xs, px):
        d.text((c - 8, 330), f"{x:g}%", fill="black")
    for y in np.linspace(y0, y1, 5):
        d.text((6, py(y) - 6), f"{y:.2f}", fill="black")
    for i, (name, s) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        d.line([(c, py(y)) for c, y in zip(px, s)], fill=colour, width=2)
        for c, y in zip(px, s):
            d.ellipse([c - 3, py(y) - 3, c + 3, py(y) + 3], fill=colour)
        d.text((460, 28 + 16 * i), name, fill=colour)
    im.save(path)


def few_shot(path):
    """The few-shot curve of a probe JSON (`probe --fractions ...`) beside it: macro-F1 per %."""
    require(os.path.isfile(path), f"{path}: no such probe JSON")
    try:
        with open(path) as f:
            results = json.load(f)["results"]
        fracs = list(next(iter(results.values()))["few_shot"])
        curves = {n: [float(r["few_shot"][f][0]) for f in fracs] for n, r in results.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError, StopIteration, AttributeError) as e:
        raise UserError(f"{path}: not a probe JSON ({type(e).__name__})") from None
    require(fracs, f"{path}: no few-shot results (probe --fractions 1,5,10,50,100 writes them)")
    out = unique_path(os.path.splitext(path)[0] + "_few_shot.png")
    plot_curves(out, [float(f) for f in fracs], curves, "few-shot macro-F1")
    print(f"[show] wrote {out}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["few-shot"] and len(argv) == 2:
        return run_command("show.py", argv, lambda: few_shot(argv[1]))
    return run_command("show.py", argv,
                       lambda: run_show(U.parse_config("show.py", argv, (ShowConfig,))["show"]))


if __name__ == "__main__":
    main()
