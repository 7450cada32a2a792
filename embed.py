"""Frozen features of any image folder in one .npz, to probe with your own tools (a root script beside
us_jepa.py, like show.py):

    python embed.py --data scans/                       # runs/pretrain/best.pt -> runs/pretrain/embed_scans.npz
    python embed.py --data scans/ --encoder teacher --tokens true --out feats.npz

The .npz holds `features` (N, D) mean-pooled patch tokens of the last block after the final LayerNorm (what
the linear probe sees), or (N, patches, D) with --tokens; `paths` and `frames` (-1 but in DICOM cines) of
each row; and, when every image sits in a class folder directly below --data (an ImageFolder split),
`labels` (N,) with the class names in `classes`. The images go through the same reader, fan mask, cache and
preprocessing as pretraining (us_data.Images); unreadable files are skipped and counted.
"""
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

import us_jepa as U
from us_data import Images
from us_util import require, check_numbers, run_command, writable_file, unique_path, save_atomic


@dataclass
class EmbedConfig:
    ckpt: str = "runs/pretrain/best.pt"  # checkpoint written by pretrain (or teacher)
    data: str = ""                  # image/.dcm folder, searched recursively (required)
    encoder: str = "student"        # student | teacher (a teacher checkpoint's model is its teacher)
    tokens: bool = False            # per-patch features (N, patches, D) instead of mean-pooled (N, D)
    out: str = ""                   # .npz; "" = embed_<folder>.npz beside the checkpoint
    every: int = 1                  # multi-frame DICOM cines: keep every n-th frame
    cache: str = ""                 # preprocessing cache folder ("" = ~/.cache/us_jepa); off = none
    max_bad: float = 0.01           # share of unreadable or too small files skipped before aborting
    batch_size: int = 64            # images encoded at once
    threads: int = 0                # torch CPU threads, 0 = torch's default


def write_npz(arrays, path):
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a path
        np.savez(f, **arrays)


def run_embed(e):
    """The encoder's features of every image below --data -> one .npz (never overwritten: -1, -2, ...)."""
    check_numbers(e)
    require(e.data and os.path.isdir(e.data), f"--data {e.data!r}: no such directory")
    require(e.encoder in ("student", "teacher"), f"--encoder {e.encoder}: student | teacher")
    require(not e.out or e.out.endswith(".npz"), f"--out {e.out}: a .npz path")
    torch.set_num_threads(e.threads or torch.get_num_threads())
    ck = U.load_checkpoint(e.ckpt)
    src = ck["teacher"] if e.encoder == "teacher" and ck["kind"] != "teacher" else ck
    require(e.encoder == "teacher" or ck["kind"] != "teacher", f"{e.ckpt} is a teacher checkpoint: "
            "use --encoder teacher")
    name = os.path.basename(os.path.normpath(e.data))
    out = e.out or os.path.join(os.path.dirname(e.ckpt) or ".", f"embed_{name}.npz")
    writable_file(out)  # checked before the work, not after
    vit = U.build_encoder(src["config"], src["model"], e.ckpt)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vit = vit.to(device).eval()
    d = U.DataConfig(data=e.data, every=e.every, img_size=vit.grid * vit.patch_size, cache=e.cache,
                     max_bad=e.max_bad)
    images = Images(d, 0, vit.patch_size)
    feats = []
    for i in range(0, len(images), e.batch_size):
        img, _ = images[range(i, min(i + e.batch_size, len(images)))]
        feats.append(U.encode(vit, img.to(device), tokens=e.tokens).cpu())
    items = [images.item(i) for i in range(len(images))]
    rel = [os.path.relpath(path, e.data).split(os.sep) for path, _ in items]
    found = dict(features=torch.cat(feats).numpy(), paths=np.array([p for p, _ in items]),
                 frames=np.array([-1 if f is None else f for _, f in items]))
    if all(len(r) == 2 for r in rel):  # class folders directly below --data: an ImageFolder split
        found["classes"] = np.array(sorted({r[0] for r in rel}))
        found["labels"] = np.searchsorted(found["classes"], [r[0] for r in rel])
    out = unique_path(out)
    save_atomic(found, out, write_npz)  # written whole, then renamed: never half a file
    labelled = f", {len(found['classes'])} classes" if "classes" in found else ""
    print(f"[embed] {len(items)} images -> {out}: features {found['features'].shape}{labelled}")
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command("embed.py", argv,
                       lambda: run_embed(U.parse_config("embed.py", argv, (EmbedConfig,))["embed"]))


if __name__ == "__main__":
    main()
