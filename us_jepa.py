"""US-JEPA in one file: masked latent prediction on ultrasound with a frozen teacher (SALT).

The idea in five lines:
  1. A teacher ViT is trained first (stage 1, MAE-style pixel reconstruction), then frozen for good.
  2. A student ViT sees only a context block of an image's patches.
  3. A narrow predictor takes the student's context tokens plus mask tokens at 4 target blocks and
     regresses the teacher's (layer-normed) features there: Smooth-L1, student + predictor trained.
  4. Targets never depend on the student, so nothing can collapse and no EMA is needed.
  5. The student is judged by a linear probe on frozen, mean-pooled features of labeled tasks.

References: US-JEPA (arXiv 2602.19322), SALT (arXiv 2509.24317), I-JEPA (arXiv 2301.08243),
MAE (arXiv 2111.06377). Images come from us_data.py, fused ops from kernels/, plumbing (flags,
files, locks, processes) from us_util.py, figures from show.py.
Commands:
  python us_jepa.py teacher     # stage 1: train a teacher on built-in synthetic images (or --data)
  python us_jepa.py pretrain    # stage 2: SALT student (trains a teacher first if none is found)
  python us_jepa.py probe       # linear probe of student, teacher, random, pixels: lesion, liver
  python us_jepa.py embed --data DIR  # frozen features of a folder -> .npz (embed.py)
  python show.py                # figures: the masks on images, PCA of the student's patch features
Any command takes --help; every config field is a flag (--batch_size 64, --tgt_scale 0.15,0.25).
"""
import copy, functools, json, math, os, sys, time, types
from dataclasses import dataclass, fields, asdict, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from us_data import UserError, Images, probe_data, corrupt, CORRUPTIONS
from us_util import (require, parse_flags, check_numbers, check_train_flags, check_probe_flags,
                     save_atomic, load_file, weights_sha256, claim_out, writable_file,
                     setup_distributed, say, peak_flops, Meter, precision, print_tables,
                     timm_vit_state, run_command, run_folder, clear_run, resumable,
                     select_kernels, step_flops, mean_std, finish, save_json, process_mean,
                     rankme, summarize, knn_votes, load_run_file, describe, probe_tasks,
                     whitening)

# --------------------------------------------------------------------------------------------------
# Config: small dataclasses; the command line is generated from them; stored in every checkpoint.

@dataclass
class DataConfig:
    data: str = ""                  # image/.dcm folder (searched recursively); "" = synthetic
    every: int = 1                  # multi-frame DICOM cines: keep every n-th frame
    img_size: int = 96              # model input size in pixels (paper: 224)
    n_images: int = 6000            # size of the synthetic pretraining pool (ignored with --data)
    pool: str = "lesion3"           # its images: lesion3 | liver | lesion3+liver (alternating)
    holdout: float = 0.05           # share of images held out to pick best.pt (paper D.1: 5 %)
    crop_scale: tuple = (0.6, 1.0)  # RandomResizedCrop area range (paper)
    augment: bool = True            # flips, blur, speckle, contrast (paper; strengths are ours)
    cache: str = ""                 # preprocessing cache folder ("" = ~/.cache/us_jepa); off = none
    max_bad: float = 0.01           # share of unreadable or too small files skipped before aborting

@dataclass
class ModelConfig:
    model: str = "vit_tiny"         # width/heads: vit_tiny 192/3, vit_small 384/6, vit_base 768/12
    depth: int = 6                  # encoder blocks (timm: 12; 6 keeps the CPU demo in minutes)
    patch_size: int = 16            # pixels per patch side
    pred_depth: int = 4             # predictor blocks (paper: 12); the stage-1 decoder reuses these
    pred_dim: int = 96              # predictor width (paper: 384)
    pred_heads: int = 3             # predictor heads (not stated; 32 channels per head, as encoder)

@dataclass
class MaskConfig:
    n_targets: int = 4              # target blocks per image (paper)
    tgt_scale: tuple = (0.1, 0.15)  # target area / image (paper: 0.075,0.125 on 14x14; README)
    tgt_aspect: tuple = (0.75, 1.5)  # target block height/width (paper)
    ctx_scale: tuple = (0.85, 1.0)  # context block area / image, before targets are removed (paper)
    min_keep: int = 4               # fewest context patches (paper: 10 of 196; we have 36 patches)
    place: str = "fit"              # corners: fit (I-JEPA; chosen on val, README) | cover (ours)
    usrc: bool = False              # USrc-JEPA: only patches in the scan fan are context/targets
    tau: int = 2                    # USrc: blocks re-drawn until >= tau valid patches (not stated)

@dataclass
class TrainConfig:
    out: str = "runs/pretrain"      # run folder: last.pt, best.pt, log.jsonl
    teacher: str = "runs/teacher/best.pt"  # frozen teacher; "ema" = I-JEPA's EMA target (ablation)
    steps: int = 500                # optimiser steps (fixed count, so schedules are reproducible)
    epochs: float = 0.0             # if > 0, overrides steps: epochs x training images / batch_size
    batch_size: int = 64            # images per step (paper: 128)
    lr: float = 1e-3                # peak learning rate (paper: 5e-5 at batch 128, ViT-B)
    start_lr: float = 1e-5          # learning rate at step 0, warmed up linearly (paper: 5e-6)
    final_lr: float = 1e-6          # learning rate at the end of the cosine (paper: 5e-7)
    warmup: float = 0.1             # share of steps spent warming up (paper: 10 of 100 epochs)
    wd: tuple = (0.04, 0.4)         # weight decay, cosine from first to second value (paper)
    betas: tuple = (0.9, 0.95)      # AdamW betas (SALT)
    clip: float = 1.0               # gradient-norm clip, 0 = off (not stated in US-JEPA)
    loss: str = "smooth_l1"         # smooth_l1 (paper) | l1 (SALT) | l2
    beta: float = 1.0               # Smooth-L1 transition point (not stated; torch's default)
    teacher_std: bool = True        # remove the teacher features' statistics, measured once (ours)
    whiten: float = 0.01            # ZCA, eigenvalues floored at this x top (ours); 0: per channel
    target_layers: int = 1          # SALT target: mean of the teacher's last N blocks (SALT: 1)
    pix_pool: int = 4               # stage 1 regresses patches average-pooled by this (1 = MAE's)
    log_every: int = 50             # steps between log lines
    eval_every: int = 100           # steps between held-out evaluations (best.pt) and checkpoints
    seed: int = 0                   # seeds init, data order, masks and augmentation
    threads: int = 0                # torch CPU threads, 0 = torch's default
    workers: int = 0                # DataLoader processes building the batches; 0 = inline
    bf16: bool = True               # bfloat16 autocast on CUDA, the teacher's forward included
    compile: bool = False           # torch.compile student, predictor and teacher (with kernels/)
    resume: str = ""                # continue the run in --out: auto (= bare --resume) | force
    overwrite: bool = False         # start over in an --out that already holds a run
    kernels: str = "auto"           # masked gather + SALT loss: auto | torch | cpp | triton | cuda

@dataclass
class ProbeConfig:
    ckpt: str = "runs/pretrain/best.pt"  # checkpoint written by pretrain (or teacher)
    encoder: str = "all"            # student | teacher | random | pixels | all
    data: str = ""                  # ImageFolder or UltraBench folder; "" = built-in synthetic task
    task: str = "lesion,liver"      # built-in, comma-separated: lesion | lesion3 | liver (fatty)
    n_train: int = 1500             # synthetic task sizes (ignored with --data)
    n_val: int = 300
    n_test: int = 600
    seeds: int = 5                  # probe seeds; macro-F1 reported as mean ± std (paper: 5)
    epochs: int = 150               # at most (paper)
    patience: int = 15              # early stopping on validation loss (paper)
    lr: float = 1e-3                # AdamW (paper)
    wd: float = 1e-4                # (paper)
    batch_size: int = 32            # (paper)
    head: str = "linear"            # linear (paper) | knn (DINO: k=20, T=0.07) | attentive (V-JEPA)
    layers: int = 1                 # features of the last N blocks, mean-pooled, side by side
    fractions: str = ""             # few-shot: % of the training split, e.g. 1,5,10,50,100 (paper)
    corrupt: str = ""               # robustness: also test corrupted images: blur,contrast,speckle
    severity: str = "1,2,3"         # corruption severities (paper)
    out: str = ""                   # result JSON; "" = probe_<task>.json beside the checkpoint
    cache: str = ""                 # preprocessing cache folder ("" = ~/.cache/us_jepa); off = none
    threads: int = 0                # torch CPU threads, 0 = torch's default

ENCODERS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}  # width, heads
SECTIONS = {"teacher": (DataConfig, ModelConfig, MaskConfig, TrainConfig),
            "pretrain": (DataConfig, ModelConfig, MaskConfig, TrainConfig), "probe": (ProbeConfig,)}
PAPER = dict(img_size=224, model="vit_base", depth=12, pred_depth=12, pred_dim=384, pred_heads=12,
             tgt_scale=(0.075, 0.125), min_keep=10, batch_size=128, epochs=100.0, lr=5e-5,
             start_lr=5e-6, final_lr=5e-7, warmup=0.1, wd=(0.04, 0.4), workers=8)
# The one preset table: --preset -> command -> the fields it sets (field < preset < flag). Stage 1
# trains a small pixel decoder briefly at a constant LR (SALT: a brief teacher suffices). The
# paper's teacher was URFM; ours gets MAE's decoder 8 x 512 and LR. Workers: ours, for a GPU box.
PRESETS = {
    "demo": {"pretrain": {},
             "teacher": dict(out="runs/teacher", steps=250, pred_depth=2, pred_dim=128,
                             pred_heads=4, final_lr=1e-3, wd=(0.05, 0.05))},
    "paper": {"pretrain": PAPER,
              "teacher": dict(PAPER, out="runs/teacher", steps=250, pred_depth=8, pred_dim=512,
                              pred_heads=16, lr=1.5e-4, final_lr=1.5e-4, wd=(0.05, 0.05))}}

def make_config(command, preset="demo", sections=None, **values):
    """-> {section: dataclass instance} of `command` under the preset, with `values` on top."""
    values = {**PRESETS[preset].get(command, {}), **values}
    cfg = {"preset": preset}
    for cls in sections or SECTIONS[command]:
        mine = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        cfg[cls.__name__.replace("Config", "").lower()] = cls(**mine)
    return cfg

def parse_config(command, argv, sections=None):
    """Flags -> make_config(...); sections: the dataclasses of a root script (show.py)."""
    prog = command if sections else f"us_jepa.py {command}"
    presets = list(PRESETS) if command in PRESETS["demo"] else ()
    preset, values = parse_flags(prog, sections or SECTIONS[command], argv, presets)
    return make_config(command, preset or "demo", sections, **values)

# --------------------------------------------------------------------------------------------------
# Augmentation: the paper's pretraining augmentations, applied to a batch (images: us_data.py).

def augment(x, fan, g, crop_scale, n=None, lo=0):
    """The paper's pretraining augmentations on a batch x (B, 1, S, S) in [0, 1]:
    RandomResizedCrop + flips as one affine resampling, then blur, speckle and contrast. Strengths
    are not stated; ours are mild. x may be rows lo:lo+B of a batch of n (one rank's share): random
    numbers are drawn for all n, so each row is augmented the same for any number of processes."""
    B, S = x.shape[0], x.shape[-1]
    n, rows = n or B, slice(lo, lo + B)
    u = torch.rand(n, 8, generator=g)[rows]  # all random numbers of this batch, from its generator
    area = crop_scale[0] + (crop_scale[1] - crop_scale[0]) * u[:, 0]
    ratio = torch.exp((u[:, 1] - 0.5) * 2 * math.log(4 / 3))  # aspect in [3/4, 4/3], torchvision's
    w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)  # side / image's
    cx, cy = (2 * u[:, 2] - 1) * (1 - w), (2 * u[:, 3] - 1) * (1 - h)  # crop centre in [-1, 1]
    fx, fy = torch.where(u[:, 4] < 0.5, -1.0, 1.0), torch.where(u[:, 5] < 0.5, -1.0, 1.0)  # flips
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * fx, cx, h * fy, cy
    grid = F.affine_grid(theta, (B, 1, S, S), align_corners=False)  # (B, S, S, 2)
    x = F.grid_sample(x, grid, align_corners=False)
    fan = F.grid_sample(fan.float(), grid, mode="nearest", align_corners=False) > 0.5
    sigma = 0.1 + 0.9 * u[:, 6]  # Gaussian blur, sigma in [0.1, 1] px, one separable conv per batch
    k = torch.exp(-0.5 * (torch.arange(-2, 3.0)[None] / sigma[:, None]) ** 2)  # (B, 5)
    k = (k / k.sum(1, keepdim=True))[:, None, None]  # (B, 1, 1, 5)
    x = F.conv2d(F.pad(x.transpose(0, 1), (2, 2, 0, 0), mode="replicate"), k, groups=B)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k.transpose(2, 3), groups=B)
    x = x.transpose(0, 1)  # (B, 1, S, S)
    noise = torch.randn((n,) + x.shape[1:], generator=g)[rows]  # (B, 1, S, S)
    x = x * (1 + 0.15 * u[:, 7, None, None, None] * noise)  # multiplicative speckle, sd <= 0.15
    m = (x * fan).sum((1, 2, 3), keepdim=True) / fan.sum((1, 2, 3), keepdim=True).clamp(min=1)
    alpha = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)[rows]  # contrast around the fan mean
    return ((m + alpha * (x - m)).clamp(0, 1) * fan), fan

# --------------------------------------------------------------------------------------------------
# Masks: I-JEPA's multi-block sampler with US-JEPA's numbers, and the gather that applies a mask.
# Per batch: one target block size and one context block size (so masks stack into tensors); per
# image: 4 target blocks and 1 context block, the context minus all targets, every mask truncated
# to the batch's shortest. Four defects of the reference sampler are fixed: "fix (a)".."fix (d)".

def block_size(rng, grid, scale, aspect):
    """Height and width (patches) of a block covering `scale` of the grid, height/width `aspect`."""
    s = rng.uniform(*scale)
    a = rng.uniform(*aspect)  # fix (b): drawn apart from s; I-JEPA's one uniform draw set both
    h, w = round(math.sqrt(s * grid * grid * a)), round(math.sqrt(s * grid * grid / a))
    return min(max(h, 1), grid), min(max(w, 1), grid)

def place_block(rng, grid, h, w, fit=False):
    """Top-left corner of an h x w block. fix (a)+(d): I-JEPA's randint(0, grid - h) never reaches
    the last row/column (at 224/16 its 13x13 context is always top-left). fit: what it meant,
    uniform over the corners where the block fits. cover (ours): uniform over every corner whose
    block overlaps the grid, pushed inside, so border patches are covered like the rest."""
    if fit:
        return int(rng.integers(0, grid - h + 1)), int(rng.integers(0, grid - w + 1))
    top = min(max(int(rng.integers(-(h - 1), grid)), 0), grid - h)
    left = min(max(int(rng.integers(-(w - 1), grid)), 0), grid - w)
    return top, left

def place_valid(rng, grid, h, w, ok, k):
    """The block's `ok` patches (grid, grid) at the first placement covering >= k.tau of them (USrc;
    without USrc every patch is ok and the first placement is taken)."""
    for _ in range(100):
        r, c = place_block(rng, grid, h, w, k.place == "fit")
        if ok[r:r + h, c:c + w].sum() >= min(k.tau, h * w):
            break
    out = np.zeros((grid, grid), bool)
    out[r:r + h, c:c + w] = ok[r:r + h, c:c + w]
    return out

def sample_masks(rng, batch, grid, k, valid=None):
    """-> ctx (B, Kc) and tgt (M, B, Kt) patch indices (row-major, sorted within each row). USrc:
    valid (B, grid, grid) marks patches holding >= 1 fan pixel; every block is re-drawn until it
    covers >= k.tau valid patches, and only valid patches are kept."""
    th, tw = block_size(rng, grid, k.tgt_scale, k.tgt_aspect)
    ch, cw = block_size(rng, grid, k.ctx_scale, (1.0, 1.0))
    ctx, tgt = [], []
    for b in range(batch):
        ok = np.ones((grid, grid), bool) if valid is None else np.asarray(valid[b])
        for _ in range(100):  # re-place the targets until enough context survives (as I-JEPA)
            t = np.stack([place_valid(rng, grid, th, tw, ok, k) for _ in range(k.n_targets)])
            c = place_valid(rng, grid, ch, cw, ok, k) & ~t.any(0)  # disjoint from the targets
            if c.sum() >= k.min_keep and t.any((1, 2)).all():
                break
        else:
            raise UserError(f"masks: {k.n_targets} targets of {th}x{tw} patches leave < "
                            f"{k.min_keep} context patches on a {grid}x{grid} grid; lower "
                            "--tgt_scale, --n_targets or --min_keep")
        ctx.append(np.flatnonzero(c))
        tgt.append([np.flatnonzero(tm) for tm in t])
    # fix (c): truncate to the shortest mask with a random subset; I-JEPA kept the first indices in
    # raster order, which biases every context toward its top-left. Targets differ only under USrc.
    n_c, n_t = min(len(c) for c in ctx), min(len(m) for ts in tgt for m in ts)
    ctx = [np.sort(rng.choice(c, n_c, replace=False)) for c in ctx]
    if any(len(m) != n_t for ts in tgt for m in ts):
        tgt = [[np.sort(rng.choice(m, n_t, replace=False)) for m in ts] for ts in tgt]
    ctx, tgt = np.stack(ctx), np.stack(tgt, 1)  # (B, Kc), (M, B, Kt)
    return torch.from_numpy(ctx), torch.from_numpy(tgt)

def fan_patches(fan, p):
    """USrc: a patch is valid if it holds a fan pixel. fan (B, 1, S, S) -> numpy (B, S/p, S/p)."""
    return (F.max_pool2d(fan.float(), p)[:, 0] > 0).numpy()

def draw_masks(rng, batch, grid, k, fan, p):
    """sample_masks, its indices checked here on the CPU (the fused ops do not, on the device)."""
    ctx, tgt = sample_masks(rng, batch, grid, k, fan_patches(fan, p) if k.usrc else None)
    for name, idx in (("context", ctx.numpy()), ("target", tgt.numpy())):
        if idx.min() < 0 or idx.max() >= grid * grid:
            raise ValueError(f"masks: {name} indices in [{idx.min()}, {idx.max()}] on a "
                             f"{grid}x{grid} grid: they must lie in [0, {grid * grid})")
    return ctx, tgt

def apply_masks(x, idx):
    """x (B, N, D), idx (M, B, K) -> (M*B, K, D), out[m*B + b, k] = x[b, idx[m, b, k]] (mask-major,
    as in I-JEPA). The reference for kernels/: `expand` makes the M views of x without copies."""
    M, B, K = idx.shape
    xs = x.unsqueeze(0).expand(M, -1, -1, -1)  # (M, B, N, D), a view
    out = torch.gather(xs, 2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))  # (M, B, K, D)
    return out.flatten(0, 1)  # (M*B, K, D)

# --------------------------------------------------------------------------------------------------
# Models: a ViT that can run on a subset of its patches, and I-JEPA's narrow predictor. Parameter
# names follow timm's VisionTransformer (patch_embed.proj, blocks.N.attn.qkv, ...) so outside
# weights map directly. `gather` is apply_masks or a fused op of kernels/ (--kernels).

def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos positions (MAE/I-JEPA): half the channels the row, half the column."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    r, c = torch.meshgrid(*[torch.arange(grid, dtype=torch.float64)] * 2, indexing="ij")  # (g, g)
    out = [f(p.flatten()[:, None] * omega) for p in (r, c) for f in (torch.sin, torch.cos)]
    return torch.cat(out, 1).float()  # 4 x (N, dim/4) -> (N, dim)

class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):  # (B, L, D)
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, D // self.heads)  # (B, L, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, d)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))

class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

class Block(nn.Module):  # pre-norm transformer block
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

def init_weights(m):  # timm / I-JEPA style
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)

class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, patch, patch)  # 1 input channel: ultrasound is grayscale

    def forward(self, x):  # (B, 1, H, W) -> (B, N, D)
        return self.proj(x).flatten(2).transpose(1, 2)

class ViT(nn.Module):
    """Patch embedding + fixed positions, pre-norm blocks, final LayerNorm; no CLS (I-JEPA)."""
    def __init__(self, img_size=96, patch_size=16, model="vit_tiny", depth=6, gather=apply_masks,
                 **_):
        super().__init__()
        self.dim, heads = ENCODERS[model]
        self.grid, self.patch_size, self.gather = img_size // patch_size, patch_size, gather
        self.patch_embed = PatchEmbed(patch_size, self.dim)
        pos = sincos_pos_embed(self.dim, self.grid)[None]  # (1, N, D)
        self.register_buffer("pos_embed", pos, persistent=False)
        self.blocks = nn.ModuleList(Block(self.dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.apply(init_weights)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # MAE: the patch projection as a Linear

    def forward(self, img, idx=None, layers=1):
        """img (B, 1, H, W); idx (B, K) patch indices to keep (the context) or None for all
        -> (B, K or N, D). layers > 1 (probing only): the last `layers` blocks' outputs, each
        normed, side by side (B, N, layers*D)."""
        x = self.patch_embed((img - 0.5) / 0.25) + self.pos_embed  # (B, N, D); [0, 1] -> [-2, 2]
        if idx is not None:
            x = self.gather(x, idx[None])  # (B, K, D): the encoder never sees the dropped patches
        outs = []
        for blk in self.blocks:
            x = blk(x)
            outs.append(x)
        if layers == 1:
            return self.norm(x)
        return torch.cat([self.norm(h) for h in outs[-layers:]], -1)  # (B, N, layers*D)

class Predictor(nn.Module):
    """I-JEPA predictor: context tokens + one shared mask token at each target position -> out_dim
    per target. Each target block is its own sequence (context ++ that block), so target blocks
    never attend to each other. Stage 1 reuses it as MAE's light pixel decoder (out_dim = p*p)."""
    def __init__(self, grid, in_dim, dim, depth, heads, out_dim, gather=apply_masks):
        super().__init__()
        self.embed, self.gather = nn.Linear(in_dim, dim), gather
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, out_dim)  # head: adapter
        self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, ctx, ctx_idx, tgt_idx):
        """ctx (B, Kc, D_enc), ctx_idx (B, Kc), tgt_idx (M, B, Kt) -> (M*B, Kt, out_dim)."""
        M, B, Kt = tgt_idx.shape
        pos = self.pos_embed.expand(B, -1, -1)  # (B, N, d)
        x = self.embed(ctx) + self.gather(pos, ctx_idx[None])  # (B, Kc, d)
        x = x.repeat(M, 1, 1)  # (M*B, Kc, d): one copy of the context per target block
        t = self.mask_token + self.gather(pos, tgt_idx)  # (M*B, Kt, d)
        x = torch.cat([x, t], 1)  # (M*B, Kc + Kt, d)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, -Kt:]))  # (M*B, Kt, out_dim)

# --------------------------------------------------------------------------------------------------
# Losses. salt_loss is the plain-PyTorch reference that the fused kernels in kernels/ must match.

def salt_loss(pred, feats, tgt_idx, kind="smooth_l1", beta=1.0):
    """pred (M*B, K, D) from the predictor; feats (B, N, D) the frozen teacher's last layer on the
    full image. Targets = layer_norm (no affine, as I-JEPA/V-JEPA; not stated in US-JEPA) of the
    teacher features at the target patches. Normalising after the gather equals normalising all N
    then gathering, for fewer rows. Mean over masked tokens and channels = I-JEPA's mean over
    blocks, since every block has K tokens."""
    target = F.layer_norm(apply_masks(feats, tgt_idx).float(), feats.shape[-1:])  # (M*B, K, D)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred.float(), target, beta=beta)
    return (F.l1_loss if kind == "l1" else F.mse_loss)(pred.float(), target)

REFERENCES = (apply_masks, salt_loss)  # --kernels torch; every fused op of kernels/ must match them

def patchify(img, p):
    """(B, 1, H, W) -> (B, N, p*p) pixels of each patch in row-major patch order."""
    return F.unfold(img, p, stride=p).transpose(1, 2)  # (B, p*p, N) -> (B, N, p*p)

def mae_loss(pred, img, tgt_idx, p, pool=1):
    """Stage 1 (MAE): MSE between decoded pixels (M*B, K, (p/pool)^2) and per-patch-normalised
    target pixels. pool > 1 regresses each patch average-pooled by `pool` (ours): speckle is an
    interference pattern that no context can predict, and with MAE's raw pixels it made most of the
    target (measured: teacher ~ random)."""
    target = patchify(F.avg_pool2d(img, pool), p // pool)  # (B, N, (p/pool)^2)
    target = apply_masks(target, tgt_idx)  # (M*B, K, (p/pool)^2)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    return F.mse_loss(pred, target)

# --------------------------------------------------------------------------------------------------
# Training: one loop for both stages. Stage 1 (`teacher`): encoder + pixel decoder, MAE loss.
# Stage 2 (`pretrain`): student + predictor against the frozen teacher, SALT loss. Everything random
# in a step (batch, augmentation, masks) is seeded by (seed, step), so --resume is exact.

def schedule(step, steps, t):
    """Linear warm-up start_lr -> lr, cosine lr -> final_lr; weight decay cosine wd[0] -> wd[1]."""
    warm = max(1, int(t.warmup * steps))
    if step < warm:
        lr = t.start_lr + (t.lr - t.start_lr) * step / warm
    else:
        cos = 1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))
        lr = t.final_lr + 0.5 * (t.lr - t.final_lr) * cos
    wd = t.wd[1] + 0.5 * (t.wd[0] - t.wd[1]) * (1 + math.cos(math.pi * step / steps))
    return lr, wd

def batch_indices(step, batch, n, seed):
    """A step's images: the stream of per-epoch shuffles cut into batches (epochs end mid-batch)."""
    pos = np.arange(step * batch, (step + 1) * batch)
    out = np.empty(batch, np.int64)
    for e in np.unique(pos // n):
        sel = pos // n == e
        out[sel] = np.random.default_rng([seed, int(e)]).permutation(n)[pos[sel] % n]
    return torch.from_numpy(out)

class Steps(torch.utils.data.Dataset):
    """Item `step` = this process's share of that step's batch: images, augmentation, masks, all
    keyed by (seed, step), never by a worker's or a process's state: any worker builds the same
    batch, a resumed run continues the same stream, N processes see the batch one process would."""
    def __init__(self, images, n_train, cfg, grid, rank=0, world=1):
        self.images, self.n_train, self.cfg, self.grid = images, n_train, cfg, grid
        self.rank, self.world = rank, world

    def __getitem__(self, step):
        d, k, t, m = (self.cfg[s] for s in ("data", "mask", "train", "model"))
        n = t.batch_size
        B, lo = n // self.world, self.rank * (n // self.world)  # this process's rows lo:lo+B
        img, fan = self.images[batch_indices(step, n, self.n_train, t.seed)[lo:lo + B]]
        if d.augment:
            g = torch.Generator().manual_seed(t.seed * 100_003 + step)
            img, fan = augment(img, fan, g, d.crop_scale, n, lo)
        own = k.usrc and self.world > 1  # USrc needs every image's fan: each process draws masks
        rng = np.random.default_rng([t.seed, step, self.rank] if own else [t.seed, step])
        ctx, tgt = draw_masks(rng, B if own else n, self.grid, k, fan, m.patch_size)
        if not own:
            ctx, tgt = ctx[lo:lo + B], tgt[:, lo:lo + B]
        return img, (ctx, tgt)  # (B, 1, S, S), (B, Kc), (M, B, Kt)

def check_stored(config):
    """A checkpoint's stored config (refused before anything is allocated): the types and ranges
    of the flags that made its ViT."""
    model = ModelConfig(**config["model"])
    check_numbers(model, DataConfig(img_size=config["data"]["img_size"]))
    require(model.model in ENCODERS, f"--model {model.model}: unknown width")

load_checkpoint = functools.partial(load_run_file, check=check_stored)  # (path[, its dict])

def build_encoder(config, state=None, path="checkpoint"):
    """The ViT a checkpoint's config describes, with its weights (None: random, as initialised)."""
    vit = ViT(config["data"]["img_size"], **config["model"])
    if state is None:
        return vit
    try:
        state = dict(state)
        pos = state.pop("pos_embed", None)  # a learnt position table (external teachers): theirs
        vit.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: weights do not fit the ViT its config describes "
                        f"({str(e).splitlines()[-1].strip()[:160]})") from None
    if pos is not None:
        vit.pos_embed.copy_(pos)
    return vit

def teacher_weights(vit):  # what a checkpoint stores of a teacher
    return {**vit.state_dict(), "pos_embed": vit.pos_embed}

def build_models(cfg, kind, teacher, gather):
    """The encoder trained here and its predictor (stage 1: pixel decoder), seeded. teacher='ema':
    I-JEPA's target encoder starts as a copy of the student. -> encoder, head, teacher"""
    d, m, t = cfg["data"], cfg["model"], cfg["train"]
    torch.manual_seed(t.seed)
    encoder = ViT(d.img_size, **asdict(m), gather=gather)
    if isinstance(teacher, str):
        teacher = copy.deepcopy(encoder).requires_grad_(False)
    out_dim = teacher.dim if kind == "student" else (m.patch_size // t.pix_pool) ** 2
    head = Predictor(encoder.grid, encoder.dim, m.pred_dim, m.pred_depth, m.pred_heads, out_dim,
                     gather)
    g, tg, n = encoder.grid, (teacher or encoder).grid, len((teacher or encoder).blocks)
    require(tg == g, f"teacher sees a {tg}x{tg} patch grid, the student {g}x{g}: use the teacher's"
            " --img_size and --patch_size")
    require(t.target_layers <= n, f"--target_layers {t.target_layers}: the teacher has {n} blocks")
    return encoder, head, teacher

def teacher_targets(teacher, img, n=1):
    """What SALT regresses: the teacher's last n blocks, each through its final norm, averaged
    (n > 1 is ours, as data2vec averages layers). -> (B, N, Dt)"""
    return teacher(img, layers=n).unflatten(-1, (n, -1)).mean(-2)

@torch.no_grad()
def teacher_stats(teacher, images, n_train, device, n=1, floor=0.0):
    """Fixed statistics of the frozen teacher's targets on up to 1024 training images (ours):
    without them ~70 % of the layer-normed target was one constant vector (measured) and the probe
    stayed at chance. floor > 0: ZCA whitening (us_util.whitening); per channel, one direction
    still holds most of the variance. -> mean (Dt,), std (Dt,) or the whitening matrix (Dt, Dt)"""
    f = torch.cat([teacher_targets(teacher, images[range(i, min(i + 256, n_train))][0].to(device),
                                   n) for i in range(0, min(1024, n_train), 256)])  # (n, N, Dt)
    if floor > 0:
        return whitening(f.flatten(0, 1), floor)
    return f.mean((0, 1)), f.std((0, 1)) + 1e-6

def make_optimizer(encoder, head, t, fused):
    """AdamW; no weight decay on biases and norms (1-D; I-JEPA). -> optimiser, its parameters"""
    params = [p for mod in (encoder, head) for p in mod.parameters()]
    groups = [{"params": [p for p in params if p.ndim >= 2]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, fused=fused or None), params

def step_loss(kind, cfg, stats, salt, amp, enc, head, teacher, img, ctx, tgt):
    """Stage 1: MAE's pixel loss; stage 2: SALT on standardised teacher features. -> loss, z"""
    p, t = cfg["model"].patch_size, cfg["train"]
    with amp:
        z = enc(img, ctx)  # (B, Kc, D)
        pred = head(z, ctx, tgt)  # (M*B, Kt, out_dim)
        if kind == "teacher":
            return mae_loss(pred, img, tgt, p, t.pix_pool), z
        with torch.no_grad():  # the teacher sees all of img; its fixed statistics removed
            feats = teacher_targets(teacher, img, t.target_layers) - stats[0]  # (B, N, Dt)
            feats = feats @ stats[1] if stats[1].ndim == 2 else feats / stats[1]
        return salt(pred, feats, tgt, t.loss, t.beta), z

def build_run(cfg, kind, teacher=None, teacher_ck=None):
    """What the loop needs; every check passes before an --overwrite deletes the old run."""
    d, m, t = cfg["data"], cfg["model"], cfg["train"]
    rank, world, device = setup_distributed()
    require(t.batch_size % world == 0, f"--batch_size {t.batch_size} must split evenly over "
            f"{world} processes")
    exists = run_folder(t.out, t.resume, t.overwrite)
    gather, salt = select_kernels(t.kernels, device.type, REFERENCES)
    ema = isinstance(teacher, str)
    models = build_models(cfg, kind, teacher, gather)
    meta = {"config": {"data": asdict(d), "model": asdict(m)}} if ema else None
    if teacher_ck:  # the frozen teacher's fingerprint goes in every checkpoint (--resume checks it)
        meta = {"config": teacher_ck["config"], "sha256": weights_sha256(teacher_weights(teacher))}
    encoder, head, teacher = (x.to(device) if x is not None else None for x in models)
    images = Images(d, t.seed, m.patch_size, say)  # one cache, shared by every rank and worker
    n_train = len(images) - int(len(images) * d.holdout)  # the last images: held out for best.pt
    require(n_train >= t.batch_size, f"{n_train} training images < --batch_size {t.batch_size}")
    stats = (0.0, torch.tensor(1.0))
    if teacher is not None and t.teacher_std and not ema:  # an EMA target moves: I-JEPA has none
        stats = teacher_stats(teacher, images, n_train, device, t.target_layers, t.whiten)
    opt, params = make_optimizer(encoder, head, t, fused=device.type == "cuda")
    amp, said = precision(device, t.bf16)
    r = types.SimpleNamespace(
        kind=kind, cfg=cfg, rank=rank, world=world, device=device, ema=ema, teacher_meta=meta,
        models=(encoder, head, teacher), opt=opt, params=params, images=images, n_train=n_train,
        steps=t.steps if t.epochs <= 0 else math.ceil(t.epochs * n_train / t.batch_size),
        loss_of=functools.partial(step_loss, kind, cfg, stats, salt, amp),  # (models, batch)
        start=0, best=float("inf"), changes={})
    if t.resume:
        resume(r)
    sample_masks(np.random.default_rng(0), 1, encoder.grid, cfg["mask"])  # possible at all?
    if rank == 0:  # every check passed: the run takes --out (nothing there changed before this)
        need = 16 * sum(p.numel() for p in params)  # fp32 weights + AdamW's two moments, x2
        r.lock = claim_out(t.out, need)
    describe(r, config_dict(cfg), said)  # the config, sizes, images, steps, device, precision
    if exists and not t.resume and rank == 0:  # --overwrite, every check passed: the old run goes
        clear_run(t.out)
    return r

def config_dict(cfg):  # a training config's sections as plain dicts: printed, in every checkpoint
    return {s: asdict(cfg[s]) for s in ("data", "model", "mask", "train")}

# Flags --resume may change: they change how a run is computed or reported, not which run it is.
SAFE_TO_CHANGE = ("out", "resume", "overwrite", "log_every", "eval_every", "workers", "threads",
                  "compile", "kernels", "bf16", "max_bad", "cache")

def resume(r):
    """--resume: the newest readable checkpoint in --out (its step is the whole state of the data
    and every draw). Other flags (but SAFE_TO_CHANGE) or teacher: refused but by --resume force."""
    t, (encoder, head, teacher) = r.cfg["train"], r.models
    sha = (r.teacher_meta or {}).get("sha256")  # the frozen teacher's fingerprint: must match
    path, ck, r.changes = resumable(t.out, r.kind, config_dict(r.cfg), SAFE_TO_CHANGE, sha,
                                    t.resume == "force", load_checkpoint)
    encoder.load_state_dict(ck["model"])
    head.load_state_dict(ck["head"])
    r.opt.load_state_dict(ck["opt"])
    if r.ema:
        teacher.load_state_dict({k: v for k, v in ck["teacher"]["model"].items()
                                 if k != "pos_embed"})
    r.start, r.best = ck["step"], ck["best"]
    say(f"[{r.kind}] resuming {path} at step {r.start}")

def update(opt, params, clip, loss, step, bad):
    """Clip, then step, unless this or an earlier step's gradient norm was NaN/Inf (as a NaN/Inf
    loss gives): then nothing is applied; bad = (the first such step, its loss, its norm; -1: none).
    Nothing waits for the device: the fused optimiser (CUDA) skips on the device (found_inf), the
    CPU's reads a CPU tensor. The loop reads `bad` only at log and eval steps."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))  # all ranks
    first = (bad[0] < 0) & ~torch.isfinite(norm)
    now = torch.stack([norm.new_full((), step), loss.detach().float(), norm])
    bad = torch.where(first, now, bad)
    if opt.defaults["fused"]:
        opt.found_inf = (bad[0] >= 0).float()  # 1.0: the kernel leaves weights and state alone
        opt.step()
    elif bad[0] < 0:
        opt.step()
    return bad

def stop_if_nonfinite(bad, step, last, r=None):
    first, loss, norm = bad.tolist()  # waits for the device: only at log and eval steps
    if first < 0:
        return
    kept = f"{last} holds the last good state" if os.path.exists(last) else "no checkpoint written"
    names = ""
    if r is not None:  # the bad step's images, found again from the step (draws are keyed by it)
        t = r.cfg["train"]
        idx = batch_indices(int(first), t.batch_size, r.n_train, t.seed)[:3].tolist()
        names = "; its images include " + ", ".join(r.images.name(i) for i in idx)
    raise UserError(f"loss {loss:.4g}, gradient norm {norm:.4g} at step {first:.0f}: stopping at "
                    f"step {step}, no update since was applied; {kept}{names}")

def log_stats(loss, z, world):
    """[loss, feat std] averaged over processes; feat std ~ 0 across images would be collapse."""
    stats = torch.stack([loss.detach().float(), z.detach().float().mean(1).std(0).mean()])
    return process_mean(stats, world)

@torch.no_grad()
def evaluate(r):
    """Held-out loss, fixed masks, no augmentation: comparable across the run (picks best.pt); and
    RankMe of the held-out images' mean-pooled features (near 1 would be collapse). -> loss, rank"""
    (encoder, head, teacher), k, t = r.models, r.cfg["mask"], r.cfg["train"]
    rng, total, n, feats = np.random.default_rng([t.seed, 10**9]), 0.0, len(r.images), []
    trained = nn.ModuleList([encoder, head]).eval()  # a view of both: .eval() / .train() set both
    for i in range(r.n_train, n, t.batch_size):
        img, fan = r.images[range(i, min(i + t.batch_size, n))]
        masks = draw_masks(rng, len(img), encoder.grid, k, fan, r.cfg["model"].patch_size)
        img, ctx, tgt = (x.to(r.device) for x in (img, *masks))
        total += r.loss_of(encoder, head, teacher, img, ctx, tgt)[0].item() * len(img)
        feats.append(encode(encoder, img).float())  # (b, D) whole images, for RankMe
    trained.train()
    return total / (n - r.n_train), rankme(torch.cat(feats))

def save_checkpoint(r, step, loss, log):
    """Rank 0, at eval steps: the held-out loss, last.pt, and best.pt when it is the lowest yet."""
    (encoder, head, teacher), out = r.models, r.cfg["train"].out
    heldout = r.n_train < len(r.images)  # none: best.pt is the last step (said at the start)
    held, rank = evaluate(r) if heldout else (loss.item(), None)  # without: the step's loss
    what, key = ("held-out", "heldout_loss") if heldout else ("training", "train_loss")
    log.write(json.dumps({"step": step + 1, key: round(held, 5), "rankme": rank}) + "\n")
    log.flush()
    is_best = held < r.best or not heldout
    r.best = held if is_best else r.best
    ck = {"kind": r.kind, "config": config_dict(r.cfg), "step": step + 1, "best": r.best,
          "model": encoder.state_dict(), "head": head.state_dict(), "opt": r.opt.state_dict()}
    if teacher is not None:  # the teacher travels with its student, so `probe` can compare them
        ck["teacher"] = dict(r.teacher_meta, model=teacher_weights(teacher))
    if is_best:  # best.pt first: a kill between the two renames leaves last.pt one step older,
        save_atomic(ck, os.path.join(out, "best.pt"))  # which --resume repeats; never a stale best
    save_atomic(ck, os.path.join(out, "last.pt"))
    most = min(encoder.dim, len(r.images) - r.n_train)  # RankMe's largest value here
    ranks = f" | RankMe {rank:.1f} of {most}" if heldout else ""
    say(f"[{r.kind}] step {step + 1}: {what} loss {held:.4f}{' (best)' * is_best}{ranks}",
        flush=True)

def train(cfg, kind, teacher=None, teacher_ck=None):
    """Stage 1 (kind='teacher') or 2 ('student') -> --out/{last,best}.pt, log.jsonl. teacher='ema':
    I-JEPA's EMA target, the ablation US-JEPA lacks."""
    r = build_run(cfg, kind, teacher, teacher_ck)
    t, (encoder, head, teacher), opt = cfg["train"], r.models, r.opt
    ddp = torch.nn.parallel.DistributedDataParallel  # averages gradients over the processes
    enc, hd, tch = [ddp(x) if r.world > 1 else x for x in (encoder, head)] + [teacher]
    if t.compile:
        enc, hd, tch = (torch.compile(x) if x is not None else None for x in (enc, hd, tch))
    loader = torch.utils.data.DataLoader(
        Steps(r.images, r.n_train, cfg, encoder.grid, r.rank, r.world), batch_size=None,
        sampler=range(r.start, r.steps), num_workers=t.workers, pin_memory=r.device.type == "cuda",
        persistent_workers=t.workers > 0)
    log = open(os.path.join(t.out, "log.jsonl"), "a") if r.rank == 0 else None
    if log and r.changes:
        log.write(json.dumps(dict(step=r.start, resume_force=r.changes)) + "\n")
    bad = torch.tensor([-1.0, 0.0, 0.0], device=r.device)  # first non-finite step, its loss, norm
    meter = Meter(peak_flops(r.device) * r.world)  # images/s and MFU between log lines
    for step, (img, (ctx, tgt)) in zip(range(r.start, r.steps), loader):
        lr, wd = schedule(step, r.steps, t)
        opt.param_groups[0].update(lr=lr, weight_decay=wd)
        opt.param_groups[1].update(lr=lr)
        img, ctx, tgt = (x.to(r.device, non_blocking=True) for x in (img, ctx, tgt))
        loss, z = r.loss_of(enc, hd, tch, img, ctx, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        bad = update(opt, r.params, t.clip, loss, step, bad)
        if r.ema:  # target <- m * target + (1 - m) * student, momentum m 0.996 -> 1.0 linearly
            with torch.no_grad():
                for pt, ps in zip(teacher.parameters(), encoder.parameters()):
                    pt.lerp_(ps, 0.004 * (1 - step / r.steps))
        at_log = (step + 1) % t.log_every == 0 or step + 1 == r.steps
        at_eval = (step + 1) % t.eval_every == 0 or step + 1 == r.steps
        if at_log or at_eval:  # the only steps that wait for the device
            stop_if_nonfinite(bad, step, os.path.join(t.out, "last.pt"), r)
        stats = log_stats(loss, z, r.world) if at_log else None
        B, Kc, (M, _, Kt) = t.batch_size, ctx.shape[1], tgt.shape
        meter.add(B, step_flops(encoder, head, teacher, B, Kc, Kt, M))
        if at_log:
            img_s, speed = meter.window()
            say(f"[{kind}] step {step + 1}/{r.steps} | loss {stats[0]:.4f} | lr {lr:.2e} | wd "
                f"{wd:.3f} | {speed} | feat std {stats[1]:.3f}", flush=True)
            if log:
                print(json.dumps(dict(step=step + 1, loss=stats[0], lr=lr, wd=wd, img_s=img_s,
                                      feat_std=stats[1])), file=log, flush=True)
        if at_eval and r.rank == 0:
            save_checkpoint(r, step, loss, log)
        meter.tic = time.time()  # the next step's clock starts: waiting for its batch counts
    return finish(r, log, meter)

# --------------------------------------------------------------------------------------------------
# Linear probe (paper section 4.2): frozen encoder, mean of the last layer's patch tokens (no CLS;
# I-JEPA), BatchNorm1d(affine=False) + Linear (MAE's linprobe), AdamW, cosine LR, early stopping on
# validation loss. The protocol's extras it calls (few-shot, corruptions, attentive head) follow.

@torch.no_grad()
def encode(vit, imgs, batch=256, layers=1, tokens=False):
    """(N, 1, S, S) -> mean patch token (N, layers*D) (paper: layers=1), or all (attentive)."""
    vit.eval()
    out = (vit(imgs[i:i + batch], layers=layers) for i in range(0, len(imgs), batch))  # (b, N, L*D)
    return torch.cat([o if tokens else o.mean(1) for o in out])

def pixel_features(imgs, fans):
    """Trivial features: a 32-bin intensity histogram inside the fan + 16x16 downsampled pixels."""
    hist = [torch.histc(x[f], 32, 0, 1) / f.sum().clamp(min=1) for x, f in zip(imgs, fans)]
    return torch.cat([torch.stack(hist), F.adaptive_avg_pool2d(imgs, 16).flatten(1)], 1)  # (N, 288)

def f1_scores(pred, y, n_classes):
    """Per-class F1 = 2TP / (2TP + FP + FN); a class never predicted nor present scores 0."""
    c = torch.arange(n_classes)[:, None]  # (C, 1) against (N,): 2TP + FP + FN = #pred c + #true c
    tp, npred, ntrue = ((pred == c) & (y == c)).sum(1), (pred == c).sum(1), (y == c).sum(1)  # (C,)
    return (2 * tp / (npred + ntrue).clamp(min=1)).tolist()

def fit_probe(feats, labels, n_classes, seed, p, subset=None):
    """A probe on the train features (rows `subset`), scored on test and test/*/* (corrupted)."""
    xtr, ytr = feats["train"], labels["train"]
    if subset is not None:
        xtr, ytr = xtr[subset], ytr[subset]
    if p.head == "knn":  # nothing trained: every seed gives the same votes
        head, epochs = functools.partial(knn_votes, xtr, ytr, n_classes), 0
    else:
        head, epochs = train_head(xtr, ytr, feats["val"], labels["val"], n_classes, seed, p)
    def macro_f1(x, y):
        return sum(f1_scores(head(x).argmax(1), y, n_classes)) / n_classes
    with torch.no_grad():
        pred = head(feats["test"]).argmax(1)
        val = macro_f1(feats["val"], labels["val"])
        corrupted = {k[5:]: macro_f1(v, labels["test"]) for k, v in feats.items()
                     if k.startswith("test/")}
    per_class = f1_scores(pred, labels["test"], n_classes)
    return dict(macro_f1=sum(per_class) / n_classes, per_class_f1=per_class, epochs=epochs, val=val,
                accuracy=(pred == labels["test"]).float().mean().item(), corrupted=corrupted)

def train_head(xtr, ytr, xval, yval, n_classes, seed, p):
    """The linear (or attentive) head: AdamW, cosine LR, early stopping on the validation loss.
    -> the head at its best validation loss, epochs run"""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if xtr.ndim == 3:  # tokens: the attentive probe (ours, beyond the paper)
        head = AttentiveProbe(xtr.shape[2], n_classes, heads=max(1, xtr.shape[2] // 64))
    else:  # the paper's linear probe (MAE's BatchNorm without affine in front)
        head = nn.Sequential(nn.BatchNorm1d(xtr.shape[1], affine=False),
                             nn.Linear(xtr.shape[1], n_classes))
    opt = torch.optim.AdamW(head.parameters(), lr=p.lr, weight_decay=p.wd)
    per_epoch = math.ceil(len(xtr) / p.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, p.epochs * per_epoch)
    best, best_state, bad, epoch = float("inf"), None, 0, 0
    for epoch in range(p.epochs):
        head.train()
        perm = torch.randperm(len(xtr), generator=g)
        for j in (perm[i:i + p.batch_size] for i in range(0, len(xtr), p.batch_size)):
            if len(j) < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(head(xtr[j]), ytr[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        head.eval()
        with torch.no_grad():
            val = F.cross_entropy(head(xval), yval).item()
        if val < best:
            best, best_state, bad = val, {k: v.clone() for k, v in head.state_dict().items()}, 0
        elif (bad := bad + 1) >= p.patience:
            break
    require(best_state is not None, f"probe, seed {seed}: the validation loss was not finite in "
            f"any of {epoch + 1} epochs (NaN or Inf features?)")
    head.load_state_dict(best_state)
    return head, epoch + 1

def check_probe(p):
    """The probe's flags and checkpoint (a stage-1 checkpoint's model is its teacher)."""
    fracs, kinds, sev = check_probe_flags(p, CORRUPTIONS)
    names = ["student", "teacher", "random", "pixels"] if p.encoder == "all" else [p.encoder]
    ck = load_checkpoint(p.ckpt) if p.encoder != "pixels" else None
    if ck and ck["kind"] == "teacher":
        names = [n for n in names if n != "student"] if p.encoder == "all" else names
        require("student" not in names, f"{p.ckpt} is a teacher checkpoint: use --encoder teacher")
        ck = dict(ck, teacher={"config": ck["config"], "model": ck["model"]})
    require(not ck or "teacher" in ck or "teacher" not in names, f"{p.ckpt} holds no teacher: use "
            "--encoder student")
    size = ck["config"]["data"]["img_size"] if ck else DataConfig.img_size
    return names, ck, size, fracs, kinds, sev

def features(split, fn, corruption=(None, 0)):
    """fn(imgs, fans) over a split, batch by batch, each corrupted first (seeded by row one)."""
    out = []
    for i, imgs, fans in split.batches():
        if corruption[0]:
            imgs = corrupt(imgs, fans, *corruption, seed=i)
        out.append(fn(imgs, fans))
    return torch.cat(out)

def probe_features(name, ck, data, views, p, size):
    """One encoder's features of every view (a split, maybe corrupted), once for all seeds."""
    if name == "pixels":
        return {s: features(data[v[0]], pixel_features, v[1:]) for s, v in views.items()}
    if name == "random":
        torch.manual_seed(0)
    src = ck["teacher"] if name == "teacher" else ck
    vit = build_encoder(src["config"], None if name == "random" else src["model"], p.ckpt)
    require(vit.grid * vit.patch_size == size, f"{p.ckpt}: teacher and student sizes differ")
    require(p.layers <= len(vit.blocks), f"--layers {p.layers}: the {name} has {len(vit.blocks)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vit = vit.to(device)

    def enc(imgs, fans):
        return encode(vit, imgs.to(device), layers=p.layers, tokens=p.head == "attentive").cpu()
    return {s: features(data[v[0]], enc, v[1:]) for s, v in views.items()}

def probe_scores(feats, labels, n_classes, p, fracs):
    """One encoder: a probe per seed, and per seed and few-shot %. -> its results"""
    runs = [fit_probe(feats, labels, n_classes, seed, p) for seed in range(p.seeds)]
    few_shot = {}
    for f in fracs:
        subsets = [stratified(labels["train"].numpy(), f, seed) for seed in range(p.seeds)]
        few = [fit_probe(feats, labels, n_classes, seed, p, s) for seed, s in enumerate(subsets)]
        few_shot[f"{f:g}"] = mean_std([r["macro_f1"] for r in few])
    return summarize(runs, few_shot)

def run_probe(p):
    """`probe`: every encoder, p.seeds seeds; tables and a JSON (show.py few-shot: the curve)."""
    names, ck, size, fracs, kinds, sev = check_probe(p)
    name = f"probe_{'data' if p.data else p.task}.json"
    out = p.out or os.path.join(os.path.dirname(p.ckpt) or ".", name)
    writable_file(out)  # where the results go is checked before the probe runs, not after
    data, classes = probe_data(p, size)
    sizes = ", ".join(f"{s} {len(v)}" for s, v in data.items())
    print(f"[probe] {p.data or p.task}: {sizes} images; classes {classes}; {p.seeds} seeds")
    views = {s: (s, None, 0) for s in data}  # robustness: trained on clean features, scored on
    views.update({f"test/{c}/{e:g}": ("test", c, e) for c in kinds for e in sev})  # corrupted ones
    labels = {s: data[v[0]].labels for s, v in views.items()}
    results = {}
    for name in names:
        tic = time.time()
        feats = probe_features(name, ck, data, views, p, size)
        results[name] = dict(probe_scores(feats, labels, len(classes), p, fracs),
                             seconds=round(time.time() - tic, 1))
    print_tables(results, classes, p.seeds)
    out = save_json(dict(config=asdict(p), classes=classes, results=results), out)
    print(f"\nwrote {out}  (chance macro-F1 ~ {1 / len(classes):.3f} for balanced classes)")
    return results

# --------------------------------------------------------------------------------------------------
# The protocol's extras (issue 4): what the paper's evaluation needs beyond the core, and what it
# left out: external teachers, the attentive probe, few-shot subsets (the test-time corruptions of
# images are in us_data.py). The method above reads without them; they run only when a flag asks.

def external_teacher(sd, path, img_size):
    """A timm-style ViT state dict (e.g. an ultrasound foundation model) -> (ViT, its entry); the
    mapping (gray patch embedding, no CLS, positions on our grid) is us_util.timm_vit_state."""
    widths = {width: name for name, (width, _) in ENCODERS.items()}
    dim, depth, p, state = timm_vit_state(sd, path, img_size, widths)
    config = {"data": {"img_size": img_size},
              "model": {"model": widths[dim], "depth": depth, "patch_size": p}}
    want = set(ViT(img_size, p, widths[dim], depth).state_dict()) | {"pos_embed"}
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    require(not missing and not unexpected, f"{path}: does not match a timm ViT: {len(missing)} "
            f"missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")
    return build_encoder(config, state, path), {"config": config}

class AttentiveProbe(nn.Module):
    """V-JEPA's attentive probe: a learnt query cross-attends to the patch tokens, then a Linear.
    Mean pooling can wash out contrasts between regions; attention can weigh them."""
    def __init__(self, dim, n_classes, heads=4):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4 * dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, tokens):  # (B, N, D) -> (B, n_classes)
        kv, q = self.norm1(tokens), self.query.expand(len(tokens), -1, -1)  # q: (B, 1, D)
        x = q + self.attn(q, kv, kv)[0]
        return self.head((x + self.mlp(self.norm2(x)))[:, 0])

def stratified(labels, percent, seed):
    """Indices of `percent` % of each class (at least one image per class), drawn with the seed."""
    g = np.random.default_rng([seed, round(percent * 1000)])
    counts = zip(*np.unique(labels, return_counts=True))  # (class, its images)
    keep = [g.permutation(np.flatnonzero(labels == c))[:max(1, round(percent / 100 * n))]
            for c, n in counts]
    return np.sort(np.concatenate(keep))

# --------------------------------------------------------------------------------------------------
# Command line.

def load_teacher(path, img_size):
    """--teacher FILE: a checkpoint of ours or a timm-style state dict -> frozen ViT, its entry."""
    ck = load_file(path)
    if {"kind", "config", "model"} <= set(ck):  # this file's format
        ck = load_checkpoint(path, ck)
        teacher = build_encoder(ck["config"], ck["model"], path)
    else:  # a state dict from elsewhere (timm names)
        teacher, ck = external_teacher(ck, path, img_size)
    return teacher.eval().requires_grad_(False), ck  # frozen for good: never trained nor EMA'd

def teacher_config(cfg):
    """The stage-1 run `pretrain` starts when the default --teacher is missing: the preset's teacher
    with this run's data, masks, encoder shape and machine flags, for half the student's budget."""
    m, t = cfg["model"], cfg["train"]
    same = ("seed", "threads", "batch_size", "workers", "bf16", "compile", "kernels")
    tcfg = make_config("teacher", cfg["preset"], model=m.model, depth=m.depth,
                       patch_size=m.patch_size, out=os.path.dirname(t.teacher),
                       steps=max(1, t.steps // 2), epochs=t.epochs / 2,
                       **{f: getattr(t, f) for f in same})
    return dict(tcfg, data=cfg["data"], mask=cfg["mask"])

def run_pretrain(cfg):
    """`pretrain`: stage 2 against --teacher (trained first if the default path has none) or ema."""
    t = cfg["train"]
    run_folder(t.out, t.resume, t.overwrite)  # before a teacher is trained for a run that cannot
    if t.teacher == "ema":
        return train(cfg, "student", "ema")
    if not os.path.exists(t.teacher):
        require(t.teacher == TrainConfig.teacher, f"--teacher {t.teacher}: no such file")
        tcfg = teacher_config(cfg)
        print(f"[pretrain] no teacher at {t.teacher}: training one first (SALT stage 1, "
              f"{tcfg['train'].steps} steps; `python us_jepa.py teacher` trains your own)")
        train(tcfg, "teacher")
    return train(cfg, "student", *load_teacher(t.teacher, cfg["data"].img_size))

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        return print("usage:" + __doc__.split("Commands:")[1].rstrip())
    if argv[0] == "embed":  # the root script embed.py (like show.py), as a command too
        import embed
        return embed.main(argv[1:])
    return run_command(f"us_jepa.py {argv[0]}", argv, functools.partial(command, *argv))

def command(cmd, *flags):
    """One command of the docstring's list, its flags parsed and checked before any work."""
    require(cmd in SECTIONS, f"unknown command {cmd!r}; choose one of {', '.join(SECTIONS)}")
    cfg = parse_config(cmd, flags)
    section = cfg.get("train") or cfg[cmd]
    require(section.threads >= 0, f"--threads {section.threads}: must be >= 0")
    torch.set_num_threads(section.threads or torch.get_num_threads())
    if cmd == "probe":  # each task (default: lesion shape and liver echotexture), one JSON each
        p = cfg["probe"]
        return {p.data or t: run_probe(replace(p, task=t)) for t in probe_tasks(p)}
    check_train_flags(*(cfg[s] for s in ("data", "model", "mask", "train")), ENCODERS)
    return train(cfg, "teacher") if cmd == "teacher" else run_pretrain(cfg)

if __name__ == "__main__":
    main()
