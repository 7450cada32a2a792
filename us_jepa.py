"""US-JEPA in one file: masked latent prediction on ultrasound with a frozen teacher (the SALT recipe).

The idea in five lines:
  1. A teacher ViT is trained first (stage 1, MAE-style pixel reconstruction) and then frozen for good.
  2. A student ViT sees only a context block of an image's patches.
  3. A narrow predictor takes the student's context tokens plus mask tokens at 4 target blocks and
     regresses the teacher's (layer-normed) features there: Smooth-L1, student + predictor trained.
  4. Targets never depend on the student, so nothing can collapse and no EMA is needed.
  5. The student is judged by a linear probe on frozen, mean-pooled features of labeled tasks.

References: US-JEPA (arXiv 2602.19322), SALT (arXiv 2509.24317), I-JEPA (arXiv 2301.08243), MAE (2111.06377).
Commands:
  python us_jepa.py teacher     # stage 1: train a teacher on built-in synthetic ultrasound (or --data DIR)
  python us_jepa.py pretrain    # stage 2: SALT student (trains a teacher first if none is found)
  python us_jepa.py probe       # linear probe: student vs teacher vs random encoder vs pixel features
  python us_jepa.py show        # figures: the masks on images, PCA of the student's patch features
Any command takes --help; every field of the config dataclasses is a flag (--batch_size 64, --tgt_scale 0.15,0.25).
"""
import argparse, copy, dataclasses, difflib, json, math, os, sys, time
from dataclasses import dataclass, field, fields, asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from us_data import UserError, Images, probe_data, synth_batch


# ----------------------------------------------------------------------------------------------------
# Config: small dataclasses; the command line is generated from them; stored in every checkpoint.

@dataclass
class DataConfig:
    data: str = ""                  # folder of images or .dcm (searched recursively); "" = built-in synthetic
    every: int = 1                  # multi-frame DICOM cines: keep every n-th frame
    img_size: int = 96              # model input size in pixels (paper: 224)
    n_images: int = 6000            # size of the synthetic pretraining pool (ignored with --data)
    holdout: float = 0.05           # share of images held out to pick best.pt (paper D.1: 5 %)
    crop_scale: tuple = (0.6, 1.0)  # RandomResizedCrop area range (paper)
    augment: bool = True            # flips, blur, speckle, contrast (paper; strengths are ours)
    cache: str = ""                 # preprocessing cache folder ("" = $US_JEPA_CACHE or ~/.cache/us_jepa); off = none
    max_bad: float = 0.01           # share of unreadable or too-small image files skipped (and said) before aborting

@dataclass
class ModelConfig:
    model: str = "vit_tiny"         # encoder width/heads: vit_tiny 192/3, vit_small 384/6, vit_base 768/12
    depth: int = 6                  # encoder blocks (timm presets have 12; 6 keeps the CPU demo in minutes)
    patch_size: int = 16            # pixels per patch side
    pred_depth: int = 4             # predictor blocks (paper: 12); the stage-1 pixel decoder reuses these
    pred_dim: int = 96              # predictor width (paper: 384)
    pred_heads: int = 3             # predictor heads (not stated; 32 channels per head like the encoder)

@dataclass
class MaskConfig:
    n_targets: int = 4              # target blocks per image (paper)
    tgt_scale: tuple = (0.1, 0.15)  # target block area / image (paper: 0.075,0.125 on 14x14; see README)
    tgt_aspect: tuple = (0.75, 1.5) # target block height/width (paper)
    ctx_scale: tuple = (0.85, 1.0)  # context block area / image, before targets are removed (paper)
    min_keep: int = 4               # fewest context patches (paper: 10 of 196; we have 36 patches)
    usrc: bool = False              # USrc-JEPA: only patches inside the scan fan become context or targets
    tau: int = 2                    # USrc: blocks are re-drawn until they cover >= tau valid patches (not stated)

@dataclass
class TrainConfig:
    out: str = "runs/pretrain"      # run folder: last.pt, best.pt, log.jsonl
    teacher: str = "runs/teacher/best.pt"  # frozen teacher checkpoint; "ema" = I-JEPA's EMA target (ablation)
    steps: int = 500                # optimiser steps (fixed count, so schedules are reproducible)
    epochs: float = 0.0             # if > 0, overrides steps: epochs x training images / batch_size
    batch_size: int = 64            # images per step (paper: 128)
    lr: float = 1e-3                # peak learning rate (paper: 5e-5 at batch 128, ViT-B)
    start_lr: float = 1e-5          # learning rate at step 0, warmed up linearly to lr (paper: 5e-6)
    final_lr: float = 1e-6          # learning rate at the end of the cosine (paper: 5e-7)
    warmup: float = 0.1             # share of steps spent warming up (paper: 10 of 100 epochs)
    wd: tuple = (0.04, 0.4)         # weight decay, cosine from first to second value (paper)
    betas: tuple = (0.9, 0.95)      # AdamW betas (SALT)
    clip: float = 1.0               # gradient-norm clip, 0 = off (not stated in US-JEPA)
    loss: str = "smooth_l1"         # smooth_l1 (paper) | l1 (SALT) | l2
    beta: float = 1.0               # Smooth-L1 transition point (not stated; torch's default)
    teacher_std: bool = True        # standardise teacher features per channel, stats measured once (ours)
    pix_pool: int = 4               # stage 1 regresses patches average-pooled by this (1 = MAE's raw pixels)
    log_every: int = 50             # steps between log lines
    eval_every: int = 100           # steps between held-out evaluations (best.pt) and checkpoints
    seed: int = 0                   # seeds init, data order, masks and augmentation
    threads: int = 0                # torch CPU threads, 0 = torch's default
    workers: int = 0                # DataLoader processes building batches (images, augmentation, masks); 0 = inline
    bf16: bool = True               # bfloat16 autocast on CUDA, the frozen teacher's forward included (CPU: float32)
    compile: bool = False           # torch.compile the student, predictor and teacher (with the kernels/ ops inside)
    resume: str = ""                # continue the run in --out: auto (= bare --resume) = the newest valid checkpoint
    overwrite: bool = False         # start over in an --out that already holds a run (its checkpoints are replaced)
    kernels: str = "auto"           # masked gather + SALT loss: auto | torch (references) | cpp | triton | cuda

@dataclass
class ProbeConfig:
    ckpt: str = "runs/pretrain/best.pt"  # checkpoint written by pretrain (or teacher)
    encoder: str = "all"            # student | teacher | random | pixels | all
    data: str = ""                  # ImageFolder or UltraBench folder; "" = built-in synthetic task
    task: str = "lesion"            # built-in task: lesion (2 classes) | lesion3 (normal/benign/malignant)
    n_train: int = 1500             # synthetic task sizes (ignored with --data)
    n_val: int = 300
    n_test: int = 600
    seeds: int = 5                  # probe seeds; macro-F1 reported as mean ± std (paper: 5)
    epochs: int = 150               # at most (paper)
    patience: int = 15              # early stopping on validation loss (paper)
    lr: float = 1e-3                # AdamW (paper)
    wd: float = 1e-4                # (paper)
    batch_size: int = 32            # (paper)
    head: str = "linear"            # linear (paper) | attentive (V-JEPA's attentive probe; ours)
    layers: int = 1                 # features from the last N blocks, mean-pooled and concatenated (1 = paper)
    fractions: str = ""             # few-shot: % of the training split, e.g. 1,5,10,50,100 (stratified; paper)
    corrupt: str = ""               # robustness: also test on corrupted images, e.g. blur,contrast,speckle (paper)
    severity: str = "1,2,3"         # corruption severities (paper)
    out: str = ""                   # result JSON; "" = probe_<task>.json beside the checkpoint
    cache: str = ""                 # preprocessing cache folder ("" = $US_JEPA_CACHE or ~/.cache/us_jepa); off = none
    threads: int = 0                # torch CPU threads, 0 = torch's default

@dataclass
class ShowConfig:
    ckpt: str = "runs/pretrain/best.pt"  # the encoder whose features the PCA figure shows
    n_images: int = 4               # built-in lesion images per figure
    usrc: bool = True               # the mask figure uses USrc masks (invalid fan patches greyed)
    out: str = "runs/figures"       # folder for masks.png and pca.png (an existing file is kept: -1, -2, ...)
    seed: int = 0                   # seeds the masks

ENCODERS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}  # width, heads
SECTIONS = {"teacher": (DataConfig, ModelConfig, MaskConfig, TrainConfig),
            "pretrain": (DataConfig, ModelConfig, MaskConfig, TrainConfig), "probe": (ProbeConfig,),
            "show": (ShowConfig,)}
# Stage 1 trains a small pixel decoder for a short budget at a constant LR (SALT: a brief teacher suffices).
DEFAULTS = {"teacher": dict(out="runs/teacher", steps=250, pred_depth=2, pred_dim=128, pred_heads=4,
                            final_lr=1e-3, wd=(0.05, 0.05))}
PAPER = dict(img_size=224, model="vit_base", depth=12, pred_depth=12, pred_dim=384, pred_heads=12,
             tgt_scale=(0.075, 0.125), min_keep=10, batch_size=128, epochs=100.0, lr=5e-5,
             start_lr=5e-6, final_lr=5e-7, warmup=0.1, wd=(0.04, 0.4), workers=8)  # workers: ours, for a GPU box
PRESETS = {"demo": {}, "paper": PAPER,  # the paper's teacher was URFM; ours gets MAE's decoder 8 x 512 and LR
           "paper/teacher": dict(PAPER, pred_depth=8, pred_dim=512, pred_heads=16, lr=1.5e-4, final_lr=1.5e-4,
                                 wd=(0.05, 0.05))}


def _parse_value(text, default):
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"): return True
        if text.lower() in ("0", "false", "no", "off"): return False
        raise ValueError
    if isinstance(default, tuple):  # "0.15,0.25" -> (0.15, 0.25)
        parts = tuple(float(p) for p in text.split(","))
        if len(parts) != len(default): raise ValueError
        return parts
    return type(default)(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of argparse's usage block, with a spelling hint
        known = [o for a in self._actions for o in a.option_strings]
        hint = [h for w in message.split() if w.startswith("--") and w.split("=")[0] not in known
                for h in difflib.get_close_matches(w.split("=")[0], known, 1)]
        raise UserError(message + (f" (did you mean {hint[0]}?)" if hint else ""))


def parse_config(command, argv):
    """Flags -> a dict of section name -> dataclass instance. Precedence: field < command < preset < flag."""
    p = _Parser(prog=f"us_jepa.py {command}", description=f"us_jepa.py {command}")
    if command in ("teacher", "pretrain"):
        p.add_argument("--preset", choices=["demo", "paper"], default="demo", help="demo (CPU) or paper")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    for cls in SECTIONS[command]:
        for f in fields(cls):
            default = f.default
            const = "auto" if f.name == "resume" else "true" if isinstance(default, bool) else None
            flag = dict(nargs="?", const=const) if const else {}  # --augment = --augment true, --resume = --resume auto
            p.add_argument(f"--{f.name}", default=None, metavar=type(default).__name__.upper(),
                           help=f"default: {default}", **flag)
    args = p.parse_args(argv)
    name = getattr(args, "preset", "demo")
    preset = PRESETS.get(f"{name}/{command}", PRESETS[name])
    cfg = {}
    for cls in SECTIONS[command]:
        values = {}
        for f in fields(cls):
            v = preset.get(f.name, DEFAULTS.get(command, {}).get(f.name, f.default))
            text = getattr(args, f.name)
            if text is not None:
                try:
                    v = _parse_value(text, f.default)
                except ValueError:
                    raise UserError(f"--{f.name}: cannot read {text!r} as {type(f.default).__name__}"
                                    f" (example: {f.default})") from None
            values[f.name] = v
        cfg[cls.__name__.replace("Config", "").lower()] = cls(**values)
    cfg["preset"] = name
    return cfg


def check_config(cfg):
    """Reject settings that cannot work, each with one line saying why."""
    d, m, k, t = cfg["data"], cfg["model"], cfg["mask"], cfg["train"]
    if m.model not in ENCODERS: raise UserError(f"--model {m.model}: choose one of {list(ENCODERS)}")
    if d.img_size < m.patch_size or d.img_size % m.patch_size:
        raise UserError(f"--img_size {d.img_size} must be a multiple of --patch_size {m.patch_size}")
    if m.pred_dim % m.pred_heads: raise UserError("--pred_dim must be divisible by --pred_heads")
    for name in ("tgt_scale", "ctx_scale", "tgt_aspect", "crop_scale", "wd", "betas"):
        lo, hi = getattr(k, name, None) or getattr(d, name, None) or getattr(t, name)
        bad = lo > hi or lo < 0 or (name.endswith("scale") and not 0 < lo <= hi <= 1)
        if bad or (name == "tgt_aspect" and lo <= 0):
            raise UserError(f"--{name} {lo},{hi}: need low <= high in the valid range")
    if k.min_keep < 1 or k.min_keep >= (d.img_size // m.patch_size) ** 2 or k.n_targets < 1:
        raise UserError("--min_keep must be in [1, patches per image) and --n_targets >= 1")
    if t.batch_size < 1 or t.steps < 1: raise UserError("--batch_size and --steps must be >= 1")
    if d.every < 1: raise UserError(f"--every {d.every}: must be >= 1 (1 = every frame of a DICOM cine)")
    if t.loss not in ("smooth_l1", "l1", "l2"): raise UserError("--loss: smooth_l1 | l1 | l2")
    if t.pix_pool < 1 or m.patch_size % t.pix_pool: raise UserError("--pix_pool must divide --patch_size")
    if t.resume not in ("", "auto"): raise UserError(f"--resume {t.resume}: auto (or a bare --resume)")
    if t.workers < 0: raise UserError("--workers must be >= 0")
    if not 0 <= d.max_bad <= 1: raise UserError("--max_bad must be in [0, 1]")
    if not 0 <= d.holdout < 0.5: raise UserError("--holdout must be in [0, 0.5)")
    if d.data and not os.path.isdir(d.data): raise UserError(f"--data {d.data}: no such directory")


# ----------------------------------------------------------------------------------------------------
# Augmentation: the paper's pretraining augmentations, applied to a batch (images come from us_data.py).

def augment(x, fan, g, crop_scale, n=None, lo=0):
    """The paper's pretraining augmentations on a batch x (B, 1, S, S) in [0, 1]: RandomResizedCrop + flips as one
    affine resampling, then blur, speckle and contrast. Strengths are not stated; ours are mild. x may be rows
    lo:lo+B of a batch of n (one rank's share): random numbers are drawn for all n, so each row is augmented the
    same whatever the number of processes."""
    B, S = x.shape[0], x.shape[-1]
    n, rows = n or B, slice(lo, lo + B)
    u = torch.rand(n, 8, generator=g)[rows]  # all random numbers for this batch, from the step's generator
    area = crop_scale[0] + (crop_scale[1] - crop_scale[0]) * u[:, 0]
    ratio = torch.exp((u[:, 1] - 0.5) * 2 * math.log(4 / 3))  # aspect in [3/4, 4/3] like torchvision
    w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)  # crop side / image side
    cx, cy = (2 * u[:, 2] - 1) * (1 - w), (2 * u[:, 3] - 1) * (1 - h)  # crop centre, in [-1, 1] coordinates
    fx, fy = torch.where(u[:, 4] < 0.5, -1.0, 1.0), torch.where(u[:, 5] < 0.5, -1.0, 1.0)  # h/v flips
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * fx, cx, h * fy, cy
    grid = F.affine_grid(theta, (B, 1, S, S), align_corners=False)  # (B, S, S, 2)
    x = F.grid_sample(x, grid, align_corners=False)
    fan = F.grid_sample(fan.float(), grid, mode="nearest", align_corners=False) > 0.5
    sigma = 0.1 + 0.9 * u[:, 6]  # Gaussian blur, sigma in [0.1, 1] px, one separable conv for the whole batch
    k = torch.exp(-0.5 * (torch.arange(-2, 3.0)[None] / sigma[:, None]) ** 2)  # (B, 5)
    k = (k / k.sum(1, keepdim=True))[:, None, None]  # (B, 1, 1, 5)
    x = F.conv2d(F.pad(x.transpose(0, 1), (2, 2, 0, 0), mode="replicate"), k, groups=B)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k.transpose(2, 3), groups=B).transpose(0, 1)
    noise = torch.randn((n,) + x.shape[1:], generator=g)[rows]  # (B, 1, S, S)
    x = x * (1 + 0.15 * u[:, 7, None, None, None] * noise)  # multiplicative speckle, sd <= 0.15
    m = (x * fan).sum((1, 2, 3), keepdim=True) / fan.sum((1, 2, 3), keepdim=True).clamp(min=1)
    alpha = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)[rows]  # contrast around the fan mean, x0.7 .. x1.3
    return ((m + alpha * (x - m)).clamp(0, 1) * fan), fan


# ----------------------------------------------------------------------------------------------------
# Masks: I-JEPA's multi-block sampler with US-JEPA's numbers, and the gather that applies a mask.
# Per batch: one target block size and one context block size (so masks stack into tensors); per image:
# 4 target blocks and 1 context block, the context minus all targets, every mask truncated to the batch's
# shortest. Four defects of the reference sampler are fixed here, each marked "fix (a)".."fix (d)".

def block_size(rng, grid, scale, aspect):
    """Height and width (in patches) of a block covering `scale` of the grid with height/width `aspect`."""
    s = rng.uniform(*scale)
    a = rng.uniform(*aspect)  # fix (b): drawn apart from s; I-JEPA's one uniform draw set both together
    h, w = round(math.sqrt(s * grid * grid * a)), round(math.sqrt(s * grid * grid / a))
    return min(max(h, 1), grid), min(max(w, 1), grid)


def place_block(rng, grid, h, w):
    """Top-left corner of an h x w block. fix (a)+(d): I-JEPA's randint(0, grid - h) never reaches the last
    row/column (at 224/16 its 13x13 context is always top-left). We draw the corner uniformly over every
    position where the block still overlaps the grid, then push it inside: border patches are then
    covered about as often as central ones (uniform corners cover the border h times less often)."""
    top = min(max(int(rng.integers(-(h - 1), grid)), 0), grid - h)
    left = min(max(int(rng.integers(-(w - 1), grid)), 0), grid - w)
    return top, left


def sample_masks(rng, batch, grid, k, valid=None):
    """-> ctx (B, Kc) and tgt (M, B, Kt) patch indices (row-major, sorted within each row). USrc: valid
    (B, grid, grid) marks patches holding >= 1 fan pixel; every block is re-drawn until it covers >= k.tau
    valid patches, and only valid patches are kept."""
    th, tw = block_size(rng, grid, k.tgt_scale, k.tgt_aspect)
    ch, cw = block_size(rng, grid, k.ctx_scale, (1.0, 1.0))
    ctx, tgt = [], []

    def block(ok, h, w):  # the first placement covering >= tau valid patches (without USrc: the first one)
        for _ in range(100):
            r, c = place_block(rng, grid, h, w)
            if ok[r:r + h, c:c + w].sum() >= min(k.tau, h * w): break
        out = np.zeros((grid, grid), bool)
        out[r:r + h, c:c + w] = ok[r:r + h, c:c + w]
        return out

    for b in range(batch):
        ok = np.ones((grid, grid), bool) if valid is None else np.asarray(valid[b])
        for _ in range(100):  # re-place the targets until enough context survives (I-JEPA does the same)
            t = np.stack([block(ok, th, tw) for _ in range(k.n_targets)])  # (M, grid, grid)
            c = block(ok, ch, cw) & ~t.any(0)  # context disjoint from every target
            if c.sum() >= k.min_keep and t.any((1, 2)).all(): break
        else:
            raise UserError(f"masks: {k.n_targets} targets of {th}x{tw} patches leave < {k.min_keep} context "
                            f"patches on a {grid}x{grid} grid; lower --tgt_scale, --n_targets or --min_keep")
        ctx.append(np.flatnonzero(c)); tgt.append([np.flatnonzero(tm) for tm in t])
    # fix (c): truncate to the shortest mask with a random subset; I-JEPA kept the first indices in raster
    # order, which biases every context toward its top-left. Targets differ in length only under USrc.
    n_c, n_t = min(len(c) for c in ctx), min(len(m) for ts in tgt for m in ts)
    ctx = [np.sort(rng.choice(c, n_c, replace=False)) for c in ctx]
    if any(len(m) != n_t for ts in tgt for m in ts):
        tgt = [[np.sort(rng.choice(m, n_t, replace=False)) for m in ts] for ts in tgt]
    return torch.from_numpy(np.stack(ctx)), torch.from_numpy(np.stack(tgt, 1))  # (B, Kc), (M, B, Kt)


def fan_patches(fan, p):
    """USrc: a patch is valid if it holds at least one fan pixel. fan (B, 1, S, S) -> numpy bool (B, S/p, S/p)."""
    return (F.max_pool2d(fan.float(), p)[:, 0] > 0).numpy()


def apply_masks(x, idx):
    """x (B, N, D), idx (M, B, K) -> (M*B, K, D) with out[m*B + b, k] = x[b, idx[m, b, k]] (mask-major, as in
    I-JEPA). The reference for kernels/: `expand` makes the M views of x without copying them."""
    M, B, K = idx.shape
    xs = x.unsqueeze(0).expand(M, -1, -1, -1)  # (M, B, N, D), a view
    return torch.gather(xs, 2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1])).flatten(0, 1)  # (M*B, K, D)


gather = apply_masks  # what the models call; `--kernels` may rebind it to a fused op from kernels/ (set_kernels)


# ----------------------------------------------------------------------------------------------------
# Models: a ViT that can run on a subset of its patches, and I-JEPA's narrow predictor. Parameter names
# follow timm's VisionTransformer (patch_embed.proj, blocks.N.attn.qkv, ...) so outside weights map directly.

def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos positions (MAE/I-JEPA): half the channels encode the row, half the column. (N, dim)"""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    r, c = torch.meshgrid(*[torch.arange(grid, dtype=torch.float64)] * 2, indexing="ij")  # (grid, grid) each
    out = [f(p.flatten()[:, None] * omega) for p in (r, c) for f in (torch.sin, torch.cos)]  # 4 x (N, dim/4)
    return torch.cat(out, 1).float()  # (N, dim)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):  # (B, L, D)
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, d)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x): return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):  # pre-norm transformer block
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 4 * dim)

    def forward(self, x): x = x + self.attn(self.norm1(x)); return x + self.mlp(self.norm2(x))


def init_weights(m):  # timm / I-JEPA style
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None: nn.init.zeros_(m.bias)


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, patch, patch)  # 1 input channel: ultrasound is grayscale

    def forward(self, x): return self.proj(x).flatten(2).transpose(1, 2)  # (B, 1, H, W) -> (B, N, D)


class ViT(nn.Module):
    """Encoder: patch embedding + fixed positions, pre-norm blocks, final LayerNorm; no CLS token (I-JEPA)."""
    def __init__(self, img_size=96, patch_size=16, model="vit_tiny", depth=6, **_):
        super().__init__()
        self.dim, heads = ENCODERS[model]
        self.grid, self.patch_size = img_size // patch_size, patch_size
        self.patch_embed = PatchEmbed(patch_size, self.dim)
        self.register_buffer("pos_embed", sincos_pos_embed(self.dim, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(self.dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.apply(init_weights)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # MAE: initialise the patch projection like a Linear

    def forward(self, img, idx=None, layers=1):
        """img (B, 1, H, W); idx (B, K) patch indices to keep (the context) or None for all -> (B, K or N, D);
        layers > 1 (probing only): the last `layers` blocks' outputs, each normed, side by side (B, N, layers*D)."""
        x = self.patch_embed((img - 0.5) / 0.25) + self.pos_embed  # (B, N, D); pixels [0, 1] -> [-2, 2]
        if idx is not None:
            x = gather(x, idx[None])  # (B, K, D): the encoder never sees the dropped patches
        outs = []
        for blk in self.blocks:
            x = blk(x)
            outs.append(x)
        return self.norm(x) if layers == 1 else torch.cat([self.norm(h) for h in outs[-layers:]], -1)


class Predictor(nn.Module):
    """I-JEPA predictor: context tokens + one shared mask token at each target position -> out_dim per target.
    Each target block is its own sequence (context ++ that block), so target blocks never attend to each other.
    Stage 1 reuses it as MAE's light pixel decoder (out_dim = patch_size**2)."""
    def __init__(self, grid, in_dim, dim, depth, heads, out_dim):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, out_dim)  # head: adapter to teacher
        self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, ctx, ctx_idx, tgt_idx):
        """ctx (B, Kc, D_enc), ctx_idx (B, Kc), tgt_idx (M, B, Kt) -> (M*B, Kt, out_dim), mask-major."""
        M, B, Kt = tgt_idx.shape
        pos = self.pos_embed.expand(B, -1, -1)  # (B, N, d)
        x = self.embed(ctx) + gather(pos, ctx_idx[None])  # (B, Kc, d)
        x = x.repeat(M, 1, 1)  # (M*B, Kc, d): one copy of the context per target block
        t = self.mask_token + gather(pos, tgt_idx)  # (M*B, Kt, d)
        x = torch.cat([x, t], 1)  # (M*B, Kc + Kt, d)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, -Kt:]))  # (M*B, Kt, out_dim)


# ----------------------------------------------------------------------------------------------------
# Losses. salt_loss is the plain-PyTorch reference that the fused kernels in kernels/ must match.

def salt_loss(pred, feats, tgt_idx, kind="smooth_l1", beta=1.0):
    """pred (M*B, K, D) from the predictor; feats (B, N, D) the frozen teacher's last layer on the full image.
    Targets = layer_norm (no affine, as I-JEPA/V-JEPA; not stated in US-JEPA) of the teacher features at the
    target patches. Normalising after the gather equals normalising all N then gathering, for fewer rows.
    Mean over masked tokens and channels = I-JEPA's mean over blocks, since every block has K tokens."""
    target = F.layer_norm(apply_masks(feats, tgt_idx).float(), feats.shape[-1:])  # (M*B, K, D)
    if kind == "smooth_l1": return F.smooth_l1_loss(pred.float(), target, beta=beta)
    if kind == "l1": return F.l1_loss(pred.float(), target)
    return F.mse_loss(pred.float(), target)


def patchify(img, p):
    """(B, 1, H, W) -> (B, N, p*p) pixels of each patch in row-major patch order."""
    return F.unfold(img, p, stride=p).transpose(1, 2)  # (B, p*p, N) -> (B, N, p*p)


def mae_loss(pred, img, tgt_idx, p, pool=1):
    """Stage 1 (MAE): MSE between decoded pixels (M*B, K, (p/pool)^2) and per-patch-normalised target pixels.
    pool > 1 regresses each patch average-pooled by `pool` (ours): speckle is an interference pattern that no
    context can predict, and with MAE's raw pixels it made most of the target (measured: teacher ~ random)."""
    target = apply_masks(patchify(F.avg_pool2d(img, pool), p // pool), tgt_idx)  # (M*B, K, (p/pool)^2)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    return F.mse_loss(pred, target)


# ----------------------------------------------------------------------------------------------------
# Training: one loop for both stages. Stage 1 (`teacher`): encoder + pixel decoder, MAE loss. Stage 2
# (`pretrain`): student + predictor against the frozen teacher, SALT loss. Everything random in a step
# (batch, augmentation, masks) is drawn from generators seeded by (seed, step), so --resume is exact.

def schedule(step, steps, t):
    """Linear warm-up start_lr -> lr, cosine lr -> final_lr; weight decay cosine wd[0] -> wd[1] (I-JEPA)."""
    warm = max(1, int(t.warmup * steps))
    if step < warm:
        lr = t.start_lr + (t.lr - t.start_lr) * step / warm
    else:
        lr = t.final_lr + 0.5 * (t.lr - t.final_lr) * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
    wd = t.wd[1] + 0.5 * (t.wd[0] - t.wd[1]) * (1 + math.cos(math.pi * step / steps))
    return lr, wd


def batch_indices(step, batch, n, seed):
    """Images of a step: the stream of per-epoch shuffles, cut into batches (an epoch boundary may fall mid-batch)."""
    pos = np.arange(step * batch, (step + 1) * batch)
    out = np.empty(batch, np.int64)
    for e in np.unique(pos // n):
        sel = pos // n == e
        out[sel] = np.random.default_rng([seed, int(e)]).permutation(n)[pos[sel] % n]
    return torch.from_numpy(out)


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def unique_path(path):
    """`path`, or path-1, path-2, ... : never overwrite a result."""
    base, ext = os.path.splitext(path)
    i = 1
    while os.path.exists(path):
        path, i = f"{base}-{i}{ext}", i + 1
    return path


def load_checkpoint(path, ours=True):
    """A checkpoint of this file's format (or, ours=False, any dict of tensors), loaded safely (weights_only:
    no pickled code runs)."""
    if not os.path.isfile(path): raise UserError(f"{path}: no such checkpoint")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, pickled objects, not a torch file, ...
        raise UserError(f"{path}: cannot load ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ck, dict) or (ours and not {"kind", "config", "model"} <= set(ck)):
        raise UserError(f"{path}: not a us_jepa checkpoint (needs 'kind', 'config', 'model')")
    return ck


def build_encoder(config, state=None, path="checkpoint"):
    """The ViT described by a stored config (the dict saved in every checkpoint), with its weights if given."""
    vit = ViT(config["data"]["img_size"], **config["model"])
    if state is not None:
        state = dict(state)
        pos = state.pop("pos_embed", None)  # a learnt position table (external teachers) replaces the sin-cos one
        try:
            vit.load_state_dict(state)
            if pos is not None: vit.pos_embed.copy_(pos)
        except RuntimeError as e:
            raise UserError(f"{path}: weights do not fit the ViT its config describes "
                            f"({str(e).splitlines()[-1].strip()[:160]})") from None
    return vit


def set_kernels(name, device="cpu"):
    """--kernels: fused masked_gather + salt_loss from kernels/ (they match the references above, as
    tests/test_kernels.py checks); 'torch' keeps the references. Rebinds the models' `gather`; returns the loss."""
    global gather
    ops = None
    if name != "torch":
        import kernels
        try: ops = kernels.select(name, device)  # auto: the fastest that runs here (None: none does), said once
        except RuntimeError as e: raise UserError(str(e)) from None
    gather = ops.masked_gather if ops else apply_masks
    return ops.salt_loss if ops else salt_loss


def setup_distributed():
    """torchrun starts one process per device and sets RANK, LOCAL_RANK, WORLD_SIZE; DDP averages gradients
    over them (nccl on GPUs, gloo on CPU). Without torchrun: one process. -> rank, world size, device."""
    world, rank, local = (int(os.environ.get(v, d)) for v, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    cuda = torch.cuda.is_available()
    if cuda and local >= torch.cuda.device_count():
        raise UserError(f"process {local} has no GPU: {torch.cuda.device_count()} visible; lower --nproc_per_node")
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda: torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


class Steps(torch.utils.data.Dataset):
    """Item `step` = this process's share of that step's batch: images, augmentation, masks. Everything random is
    keyed by (seed, step), never by a worker's or a process's state: any worker builds the same batch, a resumed
    run continues the same stream, and N processes together see exactly the batch one process would."""
    def __init__(self, images, n_train, cfg, grid, rank=0, world=1):
        self.images, self.n_train, self.cfg, self.grid, self.rank, self.world = images, n_train, cfg, grid, rank, world

    def __getitem__(self, step):
        d, k, t, p = self.cfg["data"], self.cfg["mask"], self.cfg["train"], self.cfg["model"].patch_size
        n = t.batch_size
        B, lo = n // self.world, self.rank * (n // self.world)  # this process's rows lo:lo+B of the global batch
        img, fan = self.images[batch_indices(step, n, self.n_train, t.seed)[lo:lo + B]]  # distributed sampler
        if d.augment:
            img, fan = augment(img, fan, torch.Generator().manual_seed(t.seed * 100_003 + step), d.crop_scale, n, lo)
        own = k.usrc and self.world > 1  # USrc needs every image's fan: then each process draws its own masks
        rng = np.random.default_rng([t.seed, step, self.rank] if own else [t.seed, step])
        ctx, tgt = sample_masks(rng, B if own else n, self.grid, k, fan_patches(fan, p) if k.usrc else None)
        return img, (ctx, tgt) if own else (ctx[lo:lo + B], tgt[:, lo:lo + B])  # (B, 1, S, S), (B, Kc), (M, B, Kt)


def newest_checkpoint(out):
    """--resume auto: last.pt, or best.pt when last.pt does not load (a corrupt one is skipped, loudly); last.pt is
    never older, since best.pt is written only at steps that also write last.pt. -> (path, checkpoint)"""
    for path in (os.path.join(out, "last.pt"), os.path.join(out, "best.pt")):
        try:
            if os.path.exists(path): return path, load_checkpoint(path)
        except UserError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
    raise UserError(f"--resume: no readable checkpoint in {out}")


PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s per card


def step_flops(d, m, k, teacher, kind, B, Kc, Kt, M):
    """Matmul FLOPs of one training step, the numerator of MFU: per block 24 d^2 per token (qkv, proj, MLP) and
    4 T^2 d per sequence (attention), x3 for forward + backward, x1 for the frozen teacher. Embeddings and the
    small heads are left out (< 2 % at ViT-B)."""
    blocks = lambda dim, depth, T, seqs: seqs * depth * (24 * dim * dim * T + 4 * T * T * dim)  # noqa: E731
    dim, N = ENCODERS[m.model][0], (d.img_size // m.patch_size) ** 2
    f = 3 * blocks(dim, m.depth, Kc, B) + 3 * blocks(m.pred_dim, m.pred_depth, Kc + Kt, M * B)
    return f + (blocks(teacher.dim, len(teacher.blocks), N, B) if kind == "student" else 0)


def train(cfg, kind, teacher=None, teacher_ck=None):
    """Stage 1 (kind='teacher') or stage 2 (kind='student'). Writes last.pt, best.pt and log.jsonl to --out.
    teacher='ema': the I-JEPA baseline, targets from an EMA of the student (the ablation US-JEPA lacks)."""
    d, m, k, t = cfg["data"], cfg["model"], cfg["mask"], cfg["train"]
    rank, world, device = setup_distributed()
    say = print if rank == 0 else lambda *a, **kw: None  # noqa: E731  one process speaks and writes
    last, best_path = os.path.join(t.out, "last.pt"), os.path.join(t.out, "best.pt")
    if t.batch_size % world: raise UserError(f"--batch_size {t.batch_size} must split evenly over {world} processes")
    exists = os.path.exists(last) or os.path.exists(best_path)
    if t.resume and not exists: raise UserError(f"--resume: no checkpoint in {t.out} to continue")
    if not t.resume and exists and not t.overwrite:
        raise UserError(f"{t.out} already holds a run: --resume continues it, --overwrite starts it over, "
                        "--out DIR starts a new one")
    loss_salt = set_kernels(t.kernels, device.type)
    torch.manual_seed(t.seed)
    encoder = ViT(d.img_size, **asdict(m))
    ema = isinstance(teacher, str)
    if ema:  # I-JEPA: the target encoder starts as a copy of the student and follows it (momentum below)
        teacher = copy.deepcopy(encoder).requires_grad_(False)
        teacher_ck = {"config": {"data": asdict(d), "model": asdict(m)}}
    out_dim = teacher.dim if kind == "student" else (m.patch_size // t.pix_pool) ** 2
    head = Predictor(encoder.grid, encoder.dim, m.pred_dim, m.pred_depth, m.pred_heads, out_dim)
    if teacher is not None and teacher.grid != encoder.grid:
        raise UserError(f"teacher sees a {teacher.grid}x{teacher.grid} patch grid, the student "
                        f"{encoder.grid}x{encoder.grid}: use the teacher's --img_size and --patch_size")
    encoder, head, teacher = (x.to(device) if x is not None else None for x in (encoder, head, teacher))

    images = Images(d, t.seed, m.patch_size, say)  # rank 0 speaks; all ranks share one cache
    n_hold = int(len(images) * d.holdout)
    n_train = len(images) - n_hold  # the last n_hold images are held out for best.pt
    if n_train < t.batch_size: raise UserError(f"{n_train} training images < --batch_size {t.batch_size}")
    steps = t.steps if t.epochs <= 0 else math.ceil(t.epochs * n_train / t.batch_size)
    if rank == 0: os.makedirs(t.out, exist_ok=True)
    amp = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda" and t.bf16)
    mu, sd = 0.0, 1.0

    def loss_fn(enc, hd, tch, img, ctx, tgt):  # -> loss, student/encoder context tokens
        with amp:
            z = enc(img, ctx)  # (B, Kc, D)
            pred = hd(z, ctx, tgt)  # (M*B, Kt, out_dim)
            if kind == "teacher": return mae_loss(pred, img, tgt, m.patch_size, t.pix_pool), z
            with torch.no_grad():
                feats = (tch(img) - mu) / sd  # (B, N, Dt): the frozen teacher sees the whole image
            return loss_salt(pred, feats, tgt, t.loss, t.beta), z

    # Fixed per-channel statistics of the frozen teacher (ours): without them ~70 % of the layer-normed target
    # was one constant vector (measured); the student learnt it in 100 steps and the probe stayed at chance.
    if teacher is not None and t.teacher_std and not ema:  # (an EMA target moves: I-JEPA does not standardise)
        with torch.no_grad():
            f = torch.cat([teacher(images[range(i, min(i + 256, len(images)))][0].to(device))
                           for i in range(0, min(1024, n_train), 256)])
        mu, sd = f.mean((0, 1)), f.std((0, 1)) + 1e-6  # (Dt,) each
    params = [p for mod in (encoder, head) for p in mod.parameters()]  # no decay on biases and norms (1-D):
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2]},  # I-JEPA
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=t.lr,
                            betas=t.betas, fused=device.type == "cuda" or None)
    start, best = 0, float("inf")
    config = {"data": asdict(d), "model": asdict(m), "mask": asdict(k), "train": asdict(t)}
    if t.resume:  # the step is the whole state of the data stream and of every random draw (all keyed by it)
        path, ck = newest_checkpoint(t.out)
        if ck["kind"] != kind: raise UserError(f"{path} is a {ck['kind']} run, not a {kind} run")
        encoder.load_state_dict(ck["model"]); head.load_state_dict(ck["head"]); opt.load_state_dict(ck["opt"])
        if ema: teacher.load_state_dict({k: v for k, v in ck["teacher"]["model"].items() if k != "pos_embed"})
        start, best = ck["step"], ck["best"]
        say(f"[{kind}] resuming {path} at step {start}")
    say(f"[{kind}] config: {json.dumps(config)}")
    say(f"[{kind}] {sum(p.numel() for p in encoder.parameters()) / 1e6:.2f} M encoder + "
        f"{sum(p.numel() for p in head.parameters()) / 1e6:.2f} M head parameters; {n_train} train / {n_hold} "
        f"held-out images ({'synthetic' if not d.data else d.data}); {steps} steps of {t.batch_size} on {world} x "
        f"{device.type}")

    def evaluate():  # held-out loss with fixed masks and no augmentation: comparable across the run
        encoder.eval(); head.eval()
        rng, total = np.random.default_rng([t.seed, 10**9]), 0.0
        with torch.no_grad():
            for i in range(n_train, len(images), t.batch_size):
                img, fan = images[range(i, min(i + t.batch_size, len(images)))]
                valid = fan_patches(fan, m.patch_size) if k.usrc else None
                ctx, tgt = (x.to(device) for x in sample_masks(rng, len(img), encoder.grid, k, valid))
                total += loss_fn(encoder, head, teacher, img.to(device), ctx, tgt)[0].item() * len(img)
        encoder.train(); head.train()
        return total / n_hold

    # The training graph: DDP around student and predictor (gradients averaged over processes), then compiled.
    if not t.resume and exists and rank == 0:  # --overwrite, once all checks passed: the old run goes as a whole
        for f in (last, best_path, os.path.join(t.out, "log.jsonl")): os.remove(f) if os.path.exists(f) else None
    wrap = lambda x: torch.nn.parallel.DistributedDataParallel(x) if world > 1 else x  # noqa: E731
    enc, hd, tch = wrap(encoder), wrap(head), teacher
    if t.compile: enc, hd, tch = (torch.compile(x) if x is not None else None for x in (enc, hd, tch))
    loader = torch.utils.data.DataLoader(Steps(images, n_train, cfg, encoder.grid, rank, world), batch_size=None,
                                         sampler=range(start, steps), num_workers=t.workers,
                                         pin_memory=device.type == "cuda", persistent_workers=t.workers > 0)
    peak = next((v for n, v in PEAK_BF16.items() if device.type == "cuda" and n in torch.cuda.get_device_name()), 0)
    log = open(os.path.join(t.out, "log.jsonl"), "a") if rank == 0 else None
    t0, seen, busy, flops, tic = time.time(), 0, 0.0, 0.0, time.time()
    window = (0, 0.0, 0.0)  # seen, busy, flops at the last log line: its speed is over the steps since then
    for step, (img, (ctx, tgt)) in zip(range(start, steps), loader):
        lr, wd = schedule(step, steps, t)
        opt.param_groups[0].update(lr=lr, weight_decay=wd); opt.param_groups[1].update(lr=lr)
        img, ctx, tgt = (x.to(device, non_blocking=True) for x in (img, ctx, tgt))
        loss, z = loss_fn(enc, hd, tch, img, ctx, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, t.clip if t.clip > 0 else float("inf"))  # same on all ranks
        if not torch.isfinite(norm):  # a NaN/Inf loss gives a NaN/Inf gradient: stop before the update
            raise UserError(f"loss {loss.item():.4g}, gradient norm {norm.item():.4g} at step {step}: stopping; "
                            f"{last} holds the last good state")
        opt.step()
        if ema:  # target <- momentum * target + (1 - momentum) * student, momentum 0.996 -> 1.0 linearly (I-JEPA)
            with torch.no_grad():
                for pt, ps in zip(teacher.parameters(), encoder.parameters()): pt.lerp_(ps, 0.004 * (1 - step / steps))
        busy, seen = busy + time.time() - tic, seen + t.batch_size
        if peak: flops += step_flops(d, m, k, teacher, kind, t.batch_size, ctx.shape[1], tgt.shape[2], tgt.shape[0])
        if (step + 1) % t.log_every == 0 or step + 1 == steps:
            stats = torch.stack([loss.detach().float(), z.detach().float().mean(1).std(0).mean()])  # loss, feat std
            if world > 1: torch.distributed.all_reduce(stats); stats /= world  # the mean over processes
            (n, b, f), window = (seen - window[0], busy - window[1], flops - window[2]), (seen, busy, flops)
            mfu = f" | MFU {f / b / (peak * world):.1%}" if peak else ""  # feat std across images: ~0 = collapse
            say(f"[{kind}] step {step + 1}/{steps} | loss {stats[0]:.4f} | lr {lr:.2e} | wd {wd:.3f} | "
                f"{n / b:.0f} img/s{mfu} | feat std {stats[1]:.3f}", flush=True)
            if log: log.write(json.dumps(dict(step=step + 1, loss=stats[0].item(), lr=lr, wd=wd, img_s=n / b,
                                              feat_std=stats[1].item())) + "\n"); log.flush()
        if rank == 0 and ((step + 1) % t.eval_every == 0 or step + 1 == steps):
            held = evaluate() if n_hold else loss.item()
            log.write(json.dumps(dict(step=step + 1, heldout_loss=round(held, 5))) + "\n"); log.flush()
            is_best, best = held < best, min(best, held)
            ck = {"kind": kind, "config": config, "step": step + 1, "best": best, "model": encoder.state_dict(),
                  "head": head.state_dict(), "opt": opt.state_dict()}
            if teacher is not None:  # the teacher travels with its student, so `probe` can compare them
                ck["teacher"] = {"config": teacher_ck["config"], "model": {**teacher.state_dict(),
                                                                           "pos_embed": teacher.pos_embed}}
            save_atomic(ck, last)
            if is_best: save_atomic(ck, best_path)
            say(f"[{kind}] step {step + 1}: held-out loss {held:.4f}{' (best)' if is_best else ''}", flush=True)
        tic = time.time()  # the next step's clock starts here: waiting for its batch counts, evaluation does not
    if log: log.close()
    if world > 1: torch.distributed.barrier()  # rank 0's last checkpoint is on disk before anyone goes on
    rate = seen / busy if busy else float("nan")
    mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
    say(f"[{kind}] done: {steps - start} steps in {time.time() - t0:.0f} s, {rate:.0f} img/s in training "
        f"steps{mem}; best held-out loss {best:.4f}; wrote {best_path} and {last}")
    return rate


# ----------------------------------------------------------------------------------------------------
# Linear probe (paper section 4.2): frozen encoder, mean of the last layer's patch tokens (no CLS; I-JEPA),
# BatchNorm1d(affine=False) + Linear (MAE's linprobe), AdamW, cosine LR, early stopping on validation loss.



@torch.no_grad()
def encode(vit, imgs, batch=256, layers=1, tokens=False):
    """Frozen features: mean of the last layer's patch tokens (N, 1, S, S) -> (N, D) (paper); or of the last
    `layers` layers side by side (N, layers*D); tokens=True keeps every token for the attentive probe."""
    vit.eval()
    out = (vit(imgs[i:i + batch], layers=layers) for i in range(0, len(imgs), batch))  # (b, N, layers*D) each
    return torch.cat([o if tokens else o.mean(1) for o in out])


def features(split, fn, corruption=(None, 0)):
    """fn(imgs, fans) -> (b, F) over a probe split, batch by batch (only features are held); corruption
    (kind, severity) corrupts each batch first, seeded by its first row (the same images whatever runs)."""
    out = []
    for i, imgs, fans in split.batches():
        if corruption[0]:
            imgs = corrupt(imgs, fans, *corruption, seed=i)
        out.append(fn(imgs, fans))
    return torch.cat(out)


def pixel_features(imgs, fans):
    """Trivial features: a 32-bin intensity histogram inside the fan + 16x16 downsampled pixels. (N, 288)"""
    hist = torch.stack([torch.histc(x[f], 32, 0, 1) / f.sum().clamp(min=1) for x, f in zip(imgs, fans)])
    return torch.cat([hist, F.adaptive_avg_pool2d(imgs, 16).flatten(1)], 1)


def f1_scores(pred, y, n_classes):
    """Per-class F1 = 2TP / (2TP + FP + FN); a class never predicted nor present scores 0."""
    c = torch.arange(n_classes)[:, None]  # (C, 1) against (N,): 2TP + FP + FN = #predicted c + #true c
    tp, npred, ntrue = ((pred == c) & (y == c)).sum(1), (pred == c).sum(1), (y == c).sum(1)  # (C,) each
    return (2 * tp / (npred + ntrue).clamp(min=1)).tolist()


def fit_probe(feats, labels, n_classes, seed, p, subset=None):
    """Train BN + Linear on train features (or the rows `subset` of them), early-stop on val loss, score test
    and every corrupted test set ("test/blur/2", ...). -> dict of metrics."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    xtr, ytr = feats["train"], labels["train"]
    if subset is not None: xtr, ytr = xtr[subset], ytr[subset]
    if xtr.ndim == 3:  # tokens: the attentive probe (ours, beyond the paper)
        head = AttentiveProbe(xtr.shape[2], n_classes, heads=max(1, xtr.shape[2] // 64))
    else:  # the paper's linear probe (MAE's BatchNorm without affine in front)
        head = nn.Sequential(nn.BatchNorm1d(xtr.shape[1], affine=False), nn.Linear(xtr.shape[1], n_classes))
    opt = torch.optim.AdamW(head.parameters(), lr=p.lr, weight_decay=p.wd)
    per_epoch = math.ceil(len(xtr) / p.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, p.epochs * per_epoch)
    best, best_state, bad, epoch = float("inf"), None, 0, 0
    for epoch in range(p.epochs):
        head.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), p.batch_size):
            j = perm[i:i + p.batch_size]
            if len(j) < 2: continue  # BatchNorm needs two samples
            loss = F.cross_entropy(head(xtr[j]), ytr[j])
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step()
        head.eval()
        with torch.no_grad():
            val = F.cross_entropy(head(feats["val"]), labels["val"]).item()
        if val < best:
            best, best_state, bad = val, {k: v.clone() for k, v in head.state_dict().items()}, 0
        elif (bad := bad + 1) >= p.patience:
            break
    head.load_state_dict(best_state)
    with torch.no_grad():
        pred = head(feats["test"]).argmax(1)
        corrupted = {k[5:]: sum(f1_scores(head(v).argmax(1), labels["test"], n_classes)) / n_classes
                     for k, v in feats.items() if k.startswith("test/")}
    per_class = f1_scores(pred, labels["test"], n_classes)
    return dict(macro_f1=sum(per_class) / n_classes, accuracy=(pred == labels["test"]).float().mean().item(),
                per_class_f1=per_class, epochs=epoch + 1, corrupted=corrupted)


def run_probe(p):
    if p.head not in ("linear", "attentive") or p.layers < 1:
        raise UserError(f"--head {p.head} --layers {p.layers}: head linear | attentive, layers >= 1")
    if p.encoder not in ("student", "teacher", "random", "pixels", "all"):
        raise UserError(f"--encoder {p.encoder}: student | teacher | random | pixels | all")
    if min(p.seeds, p.epochs, p.patience, p.n_train, p.n_val, p.n_test) < 1 or p.batch_size < 2:
        raise UserError("--seeds, --epochs, --patience and --n_* must be >= 1, --batch_size >= 2")
    if p.encoder != "pixels" and not os.path.exists(p.ckpt):
        raise UserError(f"{p.ckpt}: no such checkpoint (`python us_jepa.py pretrain` writes it; or pass --ckpt)")
    ck = load_checkpoint(p.ckpt) if p.encoder != "pixels" else None
    size = ck["config"]["data"]["img_size"] if ck else DataConfig.img_size
    names = ["student", "teacher", "random", "pixels"] if p.encoder == "all" else [p.encoder]
    if ck and ck["kind"] == "teacher":  # a stage-1 checkpoint: its model is the teacher, there is no student
        names = [n for n in names if n != "student"] if p.encoder == "all" else names
        if "student" in names: raise UserError(f"{p.ckpt} is a teacher checkpoint: use --encoder teacher")
        ck = dict(ck, teacher={"config": ck["config"], "model": ck["model"]})
    try:
        fracs = [float(f) for f in p.fractions.split(",") if f]
        sev = [float(e) for e in p.severity.split(",") if e]
    except ValueError:
        raise UserError(f"--fractions {p.fractions!r} / --severity {p.severity!r}: comma-separated numbers") from None
    kinds = [c for c in p.corrupt.split(",") if c]
    if not all(0 < f <= 100 for f in fracs) or not all(e > 0 for e in sev) or set(kinds) - set(CORRUPTIONS):
        raise UserError("--fractions in (0, 100], --severity > 0, --corrupt from blur,contrast,speckle")
    data, classes = probe_data(p, size)
    print(f"[probe] {p.data or p.task}: {', '.join(f'{s} {len(v)}' for s, v in data.items())} images; "
          f"classes {classes}; {p.seeds} seeds")
    labels = {s: v.labels for s, v in data.items()}
    views = {s: (s, None, 0) for s in data}  # robustness: the probe is trained on clean features and scored on
    views.update({f"test/{c}/{e:g}": ("test", c, e) for c in kinds for e in sev})  # corrupted test images
    for s in views:
        labels[s] = labels[views[s][0]]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the probe encodes on the GPU if any
    results = {}
    for name in names:
        tic = time.time()
        if name == "pixels":
            feats = {s: features(data[v[0]], pixel_features, v[1:]) for s, v in views.items()}
        else:
            if name == "random": torch.manual_seed(0)
            src = ck["teacher"] if name == "teacher" else ck
            vit = build_encoder(src["config"], None if name == "random" else src["model"], p.ckpt)
            if vit.grid * vit.patch_size != size: raise UserError(f"{p.ckpt}: teacher and student sizes differ")
            if p.layers > len(vit.blocks): raise UserError(f"--layers {p.layers}: the {name} has {len(vit.blocks)}")
            vit = vit.to(device)
            enc = lambda x, f: encode(vit, x.to(device), layers=p.layers, tokens=p.head == "attentive").cpu()  # noqa
            feats = {s: features(data[v[0]], enc, v[1:]) for s, v in views.items()}  # once, for all seeds
        runs = [fit_probe(feats, labels, len(classes), seed, p) for seed in range(p.seeds)]
        few_shot = {f"{f:g}": mean_std([fit_probe(feats, labels, len(classes), seed, p, stratified(
            labels["train"].numpy(), f, seed))["macro_f1"] for seed in range(p.seeds)]) for f in fracs}
        f1 = torch.tensor([r["macro_f1"] for r in runs])
        results[name] = dict(macro_f1_mean=f1.mean().item(), macro_f1_std=f1.std().item() if len(runs) > 1 else 0.0,
                             accuracy_mean=float(np.mean([r["accuracy"] for r in runs])),
                             per_class_f1_mean=np.mean([r["per_class_f1"] for r in runs], 0).tolist(), runs=runs,
                             corrupted={k: mean_std([r["corrupted"][k] for r in runs]) for k in runs[0]["corrupted"]},
                             few_shot=few_shot, seconds=round(time.time() - tic, 1))
    print(f"\n{'encoder':<9} {'macro-F1 (' + str(p.seeds) + ' seeds)':<22} {'accuracy':<9} per-class F1")
    for name, r in results.items():
        pc = "  ".join(f"{c} {v:.3f}" for c, v in zip(classes, r["per_class_f1_mean"]))
        print(f"{name:<9} {r['macro_f1_mean']:.3f} ± {r['macro_f1_std']:.3f}{'':<9} {r['accuracy_mean']:.3f}     {pc}")
    for key, title in (("few_shot", "few-shot macro-F1 (% of the training split)"),
                       ("corrupted", "robustness macro-F1 (probe trained clean; corruption/severity)")):
        cols = list(results[names[0]][key])
        if not cols: continue
        clean = key == "corrupted"  # the robustness table starts with the clean score
        print(f"\n{title}\n{'encoder':<9} " + " ".join(f"{c:>13}" for c in ["clean"] * clean + cols))
        for name, r in results.items():
            cells = [(r["macro_f1_mean"], r["macro_f1_std"])] * clean + list(r[key].values())
            print(f"{name:<9} " + " ".join(f"{f'{m:.3f}±{s:.3f}':>13}" for m, s in cells))
    default = os.path.join(os.path.dirname(p.ckpt) or ".", f"probe_{p.task if not p.data else 'data'}.json")
    out = unique_path(p.out or default)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(config=asdict(p), classes=classes, results=results), f, indent=1)
    if fracs:  # the few-shot curve beside the JSON (its name is new, so this never overwrites either)
        plot_curves(out[:-5] + "_few_shot.png", fracs, {n: [m for m, _ in r["few_shot"].values()]
                                                         for n, r in results.items()}, "few-shot macro-F1")
    print(f"\nwrote {out}  (chance macro-F1 ~ {1 / len(classes):.3f} for balanced classes)")
    return results


# ----------------------------------------------------------------------------------------------------
# Beyond the core (issue 4): the paper's evaluation protocol and what it left out. External teachers, the
# attentive probe, few-shot subsets, test-time corruptions, and figures for readers (`show`). The method above
# reads without them; `train` and `run_probe` call them only when their flags ask.

TIMM_IGNORED = ("cls_token", "head.", "fc_norm.", "pre_logits.", "mask_token")  # unused by a patch-feature teacher


def external_teacher(sd, path, img_size):
    """A timm-style ViT state dict (e.g. an ultrasound foundation model's ViT-B/16) -> (ViT, its config). Strips
    wrapper prefixes, sums an RGB patch embedding into one gray channel (= the gray image fed 3 times), drops
    the CLS token and its position, interpolates the position table to our grid; refuses anything else."""
    for key in ("model", "state_dict", "teacher", "target_encoder"):  # common wrappers around the weights
        if isinstance(sd.get(key), dict): sd = sd[key]
    out = {}
    for k, v in sd.items():
        while k.split(".", 1)[0] in ("module", "encoder", "model", "backbone") and "." in k: k = k.split(".", 1)[1]
        if isinstance(v, torch.Tensor) and not k.startswith(TIMM_IGNORED): out[k] = v
    w, pos = out.get("patch_embed.proj.weight"), out.get("pos_embed")
    if w is None or w.ndim != 4 or pos is None:
        raise UserError(f"{path}: not a us_jepa checkpoint ('kind', 'config', 'model') nor a timm ViT state dict "
                        "(patch_embed.proj.weight, pos_embed)")
    dim, p = w.shape[0], w.shape[-1]
    name = next((n for n, (width, _) in ENCODERS.items() if width == dim), None)
    if name is None: raise UserError(f"{path}: width {dim} is not one of {[v[0] for v in ENCODERS.values()]}")
    out["patch_embed.proj.weight"] = w.sum(1, keepdim=True)  # (D, C, p, p) -> (D, 1, p, p)
    n = pos.shape[1]
    g0 = math.isqrt(n - 1) if math.isqrt(n) ** 2 != n else math.isqrt(n)
    if g0 * g0 not in (n, n - 1): raise UserError(f"{path}: pos_embed holds {n} positions, not a square grid (+ CLS)")
    grid = img_size // p
    pos = pos[:, n - g0 * g0:].reshape(1, g0, g0, dim).permute(0, 3, 1, 2)  # without CLS: (1, D, g0, g0)
    pos = F.interpolate(pos.float(), (grid, grid), mode="bicubic", align_corners=False)  # (1, D, grid, grid)
    out["pos_embed"] = pos.flatten(2).transpose(1, 2)  # (1, N, D)
    depth = 1 + max((int(k.split(".")[1]) for k in out if k.startswith("blocks.")), default=-1)
    config = {"data": {"img_size": img_size}, "model": {"model": name, "depth": depth, "patch_size": p}}
    want = set(ViT(img_size, p, name, depth).state_dict()) | {"pos_embed"}
    missing, unexpected = sorted(want - set(out)), sorted(set(out) - want)
    if missing or unexpected:
        raise UserError(f"{path}: does not match a timm ViT: {len(missing)} missing keys {missing[:3]}, "
                        f"{len(unexpected)} unexpected keys {unexpected[:3]}")
    print(f"[pretrain] external teacher {path}: {name}, depth {depth}, patch {p}, {w.shape[1]}-channel patch "
          f"embedding summed to 1, positions {g0}x{g0} -> {grid}x{grid}")
    return build_encoder(config, out, path), {"config": config}


class AttentiveProbe(nn.Module):
    """V-JEPA's attentive probe: one learnt query cross-attends to the frozen patch tokens, then a linear layer.
    Mean pooling can wash out cues that are contrasts between regions; attention can weigh the regions."""
    def __init__(self, dim, n_classes, heads=4):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.norm1, self.attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4 * dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, tokens):  # (B, N, D) -> (B, n_classes)
        kv = self.norm1(tokens)
        x = self.query.expand(len(tokens), -1, -1) + self.attn(self.query.expand(len(tokens), -1, -1), kv, kv)[0]
        return self.head((x + self.mlp(self.norm2(x)))[:, 0])


def mean_std(v): return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def stratified(labels, percent, seed):
    """Indices of `percent` % of each class (at least one image per class), drawn with the seed. (few-shot)"""
    g = np.random.default_rng([seed, round(percent * 1000)])
    return np.sort(np.concatenate([g.permutation(np.flatnonzero(labels == c))[:max(1, round(percent / 100 * n))]
                                   for c, n in zip(*np.unique(labels, return_counts=True))]))


CORRUPTIONS = ("blur", "contrast", "speckle")


def corrupt(imgs, fans, kind, eps, seed=0):
    """The paper's test-time corruptions (method notes 7) of (N, 1, S, S) images in [0, 1], severity eps."""
    r = int(2 * eps)  # Gaussian kernel 2*floor(2 eps) + 1 taps, sigma = eps
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1.0) / eps) ** 2)
    k = k / k.sum()
    smooth = lambda x: F.conv2d(F.conv2d(F.pad(x, (r, r, r, r), mode="replicate"), k.view(1, 1, 1, -1)),  # noqa
                                k.view(1, 1, -1, 1))
    if kind == "blur":
        x = smooth(imgs)
    elif kind == "contrast":  # toward the median inside the fan: alpha 0.7, 0.5, 0.3
        m = torch.stack([x[f].median() if f.any() else x.median() for x, f in zip(imgs, fans)]).view(-1, 1, 1, 1)
        x = m + (0.9 - 0.2 * eps) * (imgs - m)
    else:  # correlated multiplicative speckle: eta ~ N(0, (0.35 eps)^2) smoothed by the same Gaussian (ours)
        eta = torch.randn(imgs.shape, generator=torch.Generator().manual_seed(seed)) * 0.35 * eps
        x = imgs * (1 + smooth(eta))
    return x.clamp(0, 1) * fans


def plot_curves(path, xs, series, title):
    """A line chart drawn with pillow, x on a log axis: the few-shot curve (macro-F1 per % of the training split)."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (560, 360), "white")  # plot box: x 56..450, y 28..324; legend on the right
    d, lx, ys = ImageDraw.Draw(im), np.log10(xs), np.array(list(series.values()))
    y0, y1 = ys.min() - 0.02, ys.max() + 0.02
    px = lambda x: 56 + 394 * (np.log10(x) - lx.min()) / max(np.ptp(lx), 1e-9)  # noqa: E731
    py = lambda y: 324 - 296 * (y - y0) / (y1 - y0)  # noqa: E731
    d.rectangle([56, 28, 450, 324], outline="black")
    d.text((56, 8), title, fill="black")
    for x in xs: d.text((px(x) - 8, 330), f"{x:g}%", fill="black")
    for y in np.linspace(y0, y1, 5): d.text((6, py(y) - 6), f"{y:.2f}", fill="black")
    for i, (name, s) in enumerate(series.items()):
        c = [(31, 119, 180), (214, 39, 40), (120, 120, 120), (44, 160, 44), (148, 103, 189)][i % 5]
        d.line([(px(x), py(y)) for x, y in zip(xs, s)], fill=c, width=2)
        for x, y in zip(xs, s): d.ellipse([px(x) - 3, py(y) - 3, px(x) + 3, py(y) + 3], fill=c)
        d.text((460, 28 + 16 * i), name, fill=c)
    im.save(path)


def run_show(s):
    """`show`: PNGs of the masks on a few built-in images and of the student's patch features (3 PCA colours)."""
    from PIL import Image
    ck = load_checkpoint(s.ckpt)
    vit = build_encoder(ck["config"], ck["model"], s.ckpt).eval()
    S, p, g, n = vit.grid * vit.patch_size, vit.patch_size, vit.grid, s.n_images
    imgs, fans, _ = synth_batch(range(n), S, 2, "lesion")  # (n, 1, S, S) each
    valid = fan_patches(fans, p)  # (n, g, g) patches inside the fan
    k = dataclasses.replace(MaskConfig(**ck["config"].get("mask", {})), usrc=s.usrc)
    ctx, tgt = sample_masks(np.random.default_rng(s.seed), n, g, k, valid if s.usrc else None)
    colours = np.array([(60, 130, 255), (230, 60, 60), (250, 170, 40), (60, 190, 90), (180, 80, 220)], float)
    rgb = np.repeat(imgs[:, 0, :, :, None].numpy() * 255, 3, -1)  # (n, S, S, 3)
    over = np.full((n, g * g, 3), np.nan)  # the colour of each patch, NaN = left as it is
    over[~valid.reshape(n, -1)] = 128  # invalid (outside the fan): grey
    for b in range(n):
        over[b, ctx[b]] = colours[0]  # context blue; the 4 targets red, orange, green, purple
        for m in range(tgt.shape[0]): over[b, tgt[m, b]] = colours[1 + m % 4]
    over = over.reshape(n, g, g, 3).repeat(p, 1).repeat(p, 2)  # (n, S, S, 3)
    mixed = np.where(np.isnan(over), rgb, 0.45 * np.nan_to_num(over) + 0.55 * rgb)
    with torch.no_grad():
        f = vit(imgs)  # (n, N, D)
    x = f.reshape(-1, f.shape[-1]) - f.reshape(-1, f.shape[-1]).mean(0)
    pcs = x @ torch.linalg.svd(x, full_matrices=False)[2][:3].T  # (n*N, 3) first three principal components
    lo, hi = pcs.quantile(0.02, 0), pcs.quantile(0.98, 0)
    pca = ((pcs - lo) / (hi - lo)).clamp(0, 1).reshape(n, g, g, 3).repeat_interleave(p, 1).repeat_interleave(p, 2)
    os.makedirs(s.out, exist_ok=True)
    for name, rows in (("masks", [mixed]), ("pca", [rgb, pca.numpy() * 255])):
        grid_img = np.concatenate([np.concatenate(list(r), 1) for r in rows], 0)  # images side by side
        path = unique_path(os.path.join(s.out, f"{name}.png"))
        Image.fromarray(grid_img.clip(0, 255).astype(np.uint8)).resize(
            (grid_img.shape[1] * 2, grid_img.shape[0] * 2), Image.NEAREST).save(path)
        print(f"[show] wrote {path}")


# ----------------------------------------------------------------------------------------------------
# Command line.

def run_pretrain(cfg):
    t = cfg["train"]
    if t.teacher == "ema": return train(cfg, "student", "ema")  # the I-JEPA baseline (ablation)
    if not os.path.exists(t.teacher):
        if t.teacher != TrainConfig.teacher: raise UserError(f"--teacher {t.teacher}: no such file")
        tcfg = parse_config("teacher", ["--preset", cfg["preset"]])  # teacher defaults; this run's data, masks
        model = dataclasses.replace(tcfg["model"], model=cfg["model"].model, depth=cfg["model"].depth,
                                    patch_size=cfg["model"].patch_size)
        # Half the student's budget: SALT finds brief teachers suffice and compute is best spent on the student.
        tcfg.update(data=cfg["data"], mask=cfg["mask"], model=model, train=dataclasses.replace(
            tcfg["train"], out=os.path.dirname(t.teacher), steps=max(1, t.steps // 2), epochs=t.epochs / 2,
            **{f: getattr(t, f) for f in ("seed", "threads", "batch_size", "workers", "bf16", "compile", "kernels")}))
        print(f"[pretrain] no teacher at {t.teacher}: training one first (SALT stage 1, "
              f"{tcfg['train'].steps} steps; `python us_jepa.py teacher` trains your own)")
        train(tcfg, "teacher")
    teacher_ck = load_checkpoint(t.teacher, ours=False)
    if {"kind", "config", "model"} <= set(teacher_ck):  # this file's format
        teacher = build_encoder(teacher_ck["config"], teacher_ck["model"], t.teacher)
    else:  # a state dict from elsewhere (timm names)
        teacher, teacher_ck = external_teacher(teacher_ck, t.teacher, cfg["data"].img_size)
    teacher.eval().requires_grad_(False)  # frozen for good: never trained, never EMA-updated
    return train(cfg, "student", teacher, teacher_ck)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = ("teacher", "pretrain", "probe", "show")
    if not argv or argv[0] in ("-h", "--help"):
        return print("usage:" + __doc__.split("Commands:")[1].rstrip())
    cmd = argv[0]
    try:
        if cmd not in commands: raise UserError(f"unknown command {cmd!r}; choose one of {', '.join(commands)}")
        cfg = parse_config(cmd, argv[1:])
        section = cfg.get("train") or cfg[cmd]
        if getattr(section, "threads", 0): torch.set_num_threads(section.threads)
        if cmd == "probe": return run_probe(cfg["probe"])
        if cmd == "show": return run_show(cfg["show"])
        check_config(cfg)
        return train(cfg, "teacher") if cmd == "teacher" else run_pretrain(cfg)
    except UserError as e:
        if "--debug" in argv: raise
        print(f"us_jepa.py {cmd}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\nus_jepa.py {cmd}: interrupted; --resume continues from the last checkpoint", file=sys.stderr)
        sys.exit(130)
    finally:  # torchrun: close the process group, or gloo's threads can abort the process at exit
        if torch.distributed.is_initialized(): torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
