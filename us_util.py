"""Plumbing that is not the method, so that us_jepa.py reads as the method: flags generated from
dataclasses and the checks every number passes, checkpoint files (atomic writes, one-line load
errors, fingerprints), the lock on --out, processes and precision, the probe's tables. Like
us_data.py it never imports us_jepa.py (MAE keeps the same kind of code in util/misc.py).

  parse_flags     a command line -> {field: value} of dataclasses (one line on a bad flag)
  check_numbers   every numeric field finite and in range, before any work
  save_atomic     checkpoints written whole or not at all; load_file reads them weights_only
  claim_out       --out made, writable, with room, locked against a second run
  setup_distributed, precision, say, print_tables
"""
import argparse, difflib, fcntl, hashlib, json, math, os, re, shutil, sys, time
from dataclasses import fields

import numpy as np
import torch
import torch.nn.functional as F

from us_data import UserError, TASKS


def require(ok, message):
    """Bad input: one line on stderr and exit code 2 (main), no traceback."""
    if not ok:
        raise UserError(message)

# --------------------------------------------------------------------------------------------------
# Flags: every dataclass field is a flag --name VALUE of the field's type.

BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
         "off": False}


def parse_value(name, default, text):
    """A flag's text as its field's type; "0.15,0.25" -> (0.15, 0.25)."""
    try:
        if isinstance(default, bool):
            return BOOLS[text.lower()]
        if not isinstance(default, tuple):
            return type(default)(text)
        parts = tuple(float(p) for p in text.split(","))
        if len(parts) == len(default):
            return parts
    except (KeyError, ValueError):
        pass
    raise UserError(f"--{name}: cannot read {text!r} as {type(default).__name__}"
                    f" (example: {default})")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of argparse's usage block; a spelling hint
        known = [o for a in self._actions for o in a.option_strings]
        words = [w.strip(":,'\"").split("=")[0] for w in message.split() if w.startswith("--")]
        near = [difflib.get_close_matches(w, known, 1, 0.7) for w in words if w not in known]
        hint = [h for found in near for h in found]
        raise UserError(message + (f" (did you mean {hint[0]}?)" if hint else ""))


def parse_flags(prog, classes, argv, presets=()):
    """argv -> (preset, {field: value} for the flags given). Bare flags: --augment = --augment true,
    --resume = --resume auto. No prefix matching: --ov is not --overwrite."""
    p = _Parser(prog=prog, description=prog, allow_abbrev=False)
    if presets:
        p.add_argument("--preset", choices=list(presets), default=presets[0],
                       help=" or ".join(presets))
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    every = [f for cls in classes for f in fields(cls)]
    for f in every:
        const = "auto" if f.name == "resume" else "true" if isinstance(f.default, bool) else None
        bare = dict(nargs="?", const=const) if const else {}
        p.add_argument(f"--{f.name}", metavar=type(f.default).__name__.upper(),
                       help=f"default: {f.default}", **bare)
    args = vars(p.parse_args(argv))
    values = {f.name: parse_value(f.name, f.default, args[f.name]) for f in every
              if args[f.name] is not None}
    return args.get("preset"), values


# The smallest value of each numeric flag that can work (every float must also be finite).
LOWEST = dict(img_size=1, n_images=1, depth=1, patch_size=1, pred_depth=1, pred_dim=1, pred_heads=1,
              n_targets=1, tau=1, steps=1, epochs=0, batch_size=1, lr=1e-12, start_lr=0, final_lr=0,
              warmup=0, clip=0, beta=1e-12, pix_pool=1, log_every=1, eval_every=1, seed=0,
              threads=0, workers=0, every=1, min_keep=1, seeds=1, patience=1, n_train=1, n_val=1,
              n_test=1, layers=1, severity=0, max_bad=0, holdout=0, wd=0, whiten=0, target_layers=1)
# The largest that make sense (2048 px: 16k tokens at patch 16); stored configs are held to them.
HIGHEST = dict(img_size=2048, warmup=1, max_bad=1, depth=64, pred_depth=64, pred_dim=8192,
               pred_heads=128, patch_size=64, whiten=1, target_layers=64)


def check_numbers(*sections):
    """One pass over every numeric field before any work: the field's type, finite, in range."""
    for sec in sections:
        for f in fields(sec):
            v = getattr(sec, f.name)
            kind = (int, float) if type(f.default) is float else type(f.default)
            require(isinstance(v, kind) and (kind is bool or not isinstance(v, bool)),
                    f"--{f.name} {v!r}: not a {type(f.default).__name__}")
            for x in v if isinstance(v, tuple) else (v,):
                if isinstance(x, bool) or not isinstance(x, (int, float)):
                    continue
                lo, hi = LOWEST.get(f.name, -math.inf), HIGHEST.get(f.name, math.inf)
                require(math.isfinite(x) and lo <= x <= hi, f"--{f.name} {x:g}: must be a finite "
                        f"number in [{lo:g}, {hi:g}]")


def check_train_flags(d, m, k, t, encoders):
    """Reject training settings (data, model, mask, train sections) that cannot work, each with
    one line saying why."""
    require(m.model in encoders, f"--model {m.model}: choose one of {list(encoders)}")
    require(0 < m.patch_size <= d.img_size and d.img_size % m.patch_size == 0,
            f"--img_size {d.img_size} must be a multiple of --patch_size {m.patch_size}")
    require(m.pred_heads > 0 and m.pred_dim % m.pred_heads == 0, "--pred_dim must be divisible by "
            "--pred_heads")
    for name in ("tgt_scale", "ctx_scale", "tgt_aspect", "crop_scale", "wd", "betas"):
        lo, hi = getattr(k, name, None) or getattr(d, name, None) or getattr(t, name)
        bad = lo > hi or lo < 0 or (name.endswith("scale") and not 0 < lo <= hi <= 1)
        require(not bad and (name != "tgt_aspect" or lo > 0), f"--{name} {lo},{hi}: need low <= "
                "high in the valid range")
    require(1 <= k.min_keep < (d.img_size // m.patch_size) ** 2 and k.n_targets >= 1,
            "--min_keep must be in [1, patches per image) and --n_targets >= 1")
    require(t.batch_size >= 1 and t.steps >= 1, "--batch_size and --steps must be >= 1")
    require(d.every >= 1, f"--every {d.every}: must be >= 1 (1 = every frame of a DICOM cine)")
    require(t.loss in ("smooth_l1", "l1", "l2"), "--loss: smooth_l1 | l1 | l2")
    require(k.place in ("cover", "fit"), f"--place {k.place}: cover | fit")
    require(t.pix_pool >= 1 and m.patch_size % t.pix_pool == 0, "--pix_pool must divide "
            "--patch_size")
    require(t.resume in ("", "auto", "force"), f"--resume {t.resume}: auto (or a bare --resume) "
            "| force")
    require(t.workers >= 0, "--workers must be >= 0")
    require(0 <= d.max_bad <= 1, "--max_bad must be in [0, 1]")
    require(0 <= d.holdout < 0.5, "--holdout must be in [0, 0.5)")
    require(all(0 <= b < 1 for b in t.betas), f"--betas {t.betas}: each in [0, 1)")
    check_numbers(d, m, k, t)  # whatever the checks above do not name: finite and in range
    require(not d.data or os.path.isdir(d.data), f"--data {d.data}: no such directory")


def check_probe_flags(p, corruptions):
    """The probe's flags -> few-shot percentages, corruption kinds, severities."""
    require(p.head in ("linear", "knn", "attentive") and p.layers >= 1,
            f"--head {p.head} --layers {p.layers}: head linear | knn | attentive, layers >= 1")
    require(p.encoder in ("student", "teacher", "random", "pixels", "all"),
            f"--encoder {p.encoder}: student | teacher | random | pixels | all")
    require(min(p.seeds, p.epochs, p.patience, p.n_train, p.n_val, p.n_test) >= 1
            and p.batch_size >= 2, "--seeds, --epochs, --patience and --n_* must be >= 1, "
            "--batch_size >= 2")
    try:
        fracs = [float(f) for f in p.fractions.split(",") if f]
        sev = [float(e) for e in p.severity.split(",") if e]
    except ValueError:
        raise UserError(f"--fractions {p.fractions!r} / --severity {p.severity!r}: comma-separated"
                        " numbers") from None
    kinds = [c for c in p.corrupt.split(",") if c]
    require(all(0 < f <= 100 for f in fracs) and all(0 < e <= 4 for e in sev)
            and set(kinds) <= set(corruptions), "--fractions in (0, 100], --severity in (0, 4] "
            "(past 4.5 the contrast corruption inverts the image), --corrupt from "
            "blur,contrast,speckle")
    check_numbers(p)
    return fracs, kinds, sev


def probe_tasks(p):
    """--task's built-in tasks (one with --data: the folder is the task), all checked before any
    runs; --out names one file, so it takes one task."""
    if p.data:
        return [p.task]
    tasks = p.task.split(",")
    for t in tasks:
        require(t in TASKS, f"--task {t}: choose one of {list(TASKS)}")
    require(len(tasks) == 1 or not p.out, f"--out {p.out} names one file: give one --task, not "
            f"{p.task}")
    return tasks

def run_command(prog, argv, fn):
    """fn() with bad input as one line and exit code 2 (--debug: the traceback), Ctrl-C as one
    line and 130, and torchrun's process group closed (or gloo's threads can abort the exit)."""
    try:
        return fn()
    except UserError as e:
        if "--debug" in argv:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; --resume continues from the last checkpoint",
              file=sys.stderr)
        sys.exit(130)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

# --------------------------------------------------------------------------------------------------
# Files: checkpoints and results are written whole, never overwritten by surprise, read safely.

def save_atomic(obj, path, write=None):
    """write(obj, a temporary file), then rename it to `path`: a crash never leaves a half-written
    checkpoint or result. write: torch.save (None: checkpoints), or a JSON / .npz writer."""
    try:
        (write or torch.save)(obj, path + ".tmp")
        os.replace(path + ".tmp", path)
    except OSError as e:  # a full disk: no .tmp left behind, a previous file at `path` kept
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        said = f"{path}: cannot write ({e.strerror}); nothing there was replaced"
        raise UserError(said) from None


def unique_path(path):
    """`path`, or path-1, path-2, ... : never overwrite a result."""
    base, ext = os.path.splitext(path)
    i = 1
    while os.path.exists(path):
        path, i = f"{base}-{i}{ext}", i + 1
    return path


def load_file(path):
    """A dict saved by torch, loaded weights_only (no pickled code runs); a failure is one line."""
    require(os.path.isfile(path), f"{path}: no such checkpoint (`python us_jepa.py pretrain` "
            "writes runs/pretrain/best.pt, `teacher` runs/teacher/best.pt)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, pickled objects, not a torch file, ...
        first = (str(e).splitlines() or [""])[0]  # a 0-byte file's error has no text
        first = re.sub(r"\x1b\[[0-9;]*m", "", first)[:120]  # torch's message has bold escapes
        raise UserError(f"{path}: cannot load ({type(e).__name__}: {first})") from None
    require(isinstance(ck, dict), f"{path}: not a us_jepa checkpoint (needs 'kind', 'config', "
            "'model')")
    return ck


def load_run_file(path, ck=None, check=None):
    """A checkpoint of ours (ck: its dict, when load_file read it already); check(config) refuses
    a stored config (the run's, its teacher's) that cannot describe a ViT, before anything is
    built."""
    ck = load_file(path) if ck is None else ck
    require({"kind", "config", "model"} <= set(ck), f"{path}: not a us_jepa checkpoint (needs "
            "'kind', 'config', 'model')")
    try:
        for config in (ck["config"], ck["teacher"]["config"] if "teacher" in ck else None):
            if config is not None and check:
                check(config)
    except (TypeError, KeyError, AttributeError, UserError) as e:
        raise UserError(f"{path}: its stored config cannot describe a ViT ({e})") from None
    return ck


def weights_sha256(state):
    """A fingerprint of a state dict's names and bytes: --resume checks the teacher with it."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


LOCKS = {}  # --out folder -> the open, flock'd lock file of this process


def claim_out(out, need):
    """--out made, writable, with `need` bytes free, and locked for this run: a second run into it
    is refused (the lock is the kernel's: it goes when the process does, even on SIGKILL)."""
    try:
        os.makedirs(out, exist_ok=True)
        fd = LOCKS.get(os.path.realpath(out)) or os.open(os.path.join(out, ".lock"),
                                                         os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"--out {out}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise UserError(f"--out {out}: another run (pid {pid}) is writing there") from None
    LOCKS[os.path.realpath(out)] = fd  # held until this process ends (runs after it here may reuse)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    free = shutil.disk_usage(out).free
    require(free > need, f"--out {out}: {free / 2**20:.0f} MB free, a checkpoint needs "
            f"{need / 2**20:.0f} MB")
    return fd


def run_folder(out, resume, overwrite):
    """Does --out hold a run? Refuses --resume without one, and a run there without --resume or
    --overwrite (nothing a user made is replaced by surprise)."""
    exists = any(os.path.exists(os.path.join(out, f)) for f in ("last.pt", "best.pt"))
    require(exists or not resume, f"--resume: no checkpoint in {out} to continue")
    require(not exists or resume or overwrite, f"{out} already holds a run: --resume "
            "continues it, --overwrite starts it over, --out DIR starts a new one")
    return exists


def clear_run(out):
    """--overwrite, once every check passed: the old run's files go."""
    for f in ("last.pt", "best.pt", "log.jsonl"):
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))


def newest_checkpoint(out, load):
    """last.pt, or best.pt when last.pt does not load (a corrupt one is skipped, loudly); last.pt is
    never older: best.pt is written only at steps that also write last.pt. -> path, load(path)"""
    skipped = []
    for path in (os.path.join(out, "last.pt"), os.path.join(out, "best.pt")):
        try:
            if os.path.exists(path):
                ck = load(path)
                for e in skipped:
                    print(f"warning: skipping {e}", file=sys.stderr)
                return path, ck
        except UserError as e:
            skipped.append(e)
    raise UserError(f"--resume: no readable checkpoint in {out}"
                    + "".join(f"; {e}" for e in skipped))


def differences(was, now, keep=()):
    """Two configs {section: {flag: value}} -> {--flag: [was, now]} for flags not in `keep`. A flag
    that a checkpoint from an older version did not record counts as changed: its default today
    (e.g. --place, --whiten) need not be what that run used."""
    was, now = json.loads(json.dumps(was)), json.loads(json.dumps(now))  # tuples -> lists
    pairs = {(s, key): None for c in (was, now) for s in c for key in c[s]}  # in order, once each
    old = {k: was.get(k[0], {}).get(k[1], "not recorded") for k in pairs}
    new = {k: now.get(k[0], {}).get(k[1], "not recorded") for k in pairs}
    return {f"--{k[1]}": [old[k], new[k]] for k in pairs if k[1] not in keep and old[k] != new[k]}


def resumable(out, kind, config, keep, sha, force, load):
    """--resume: the newest readable checkpoint in `out`, of this kind, and what differs from it:
    the flags (but those in `keep`) and the frozen teacher's fingerprint `sha`; refused unless
    `force` (then said as a warning). -> path, checkpoint, {what: [was, now]}"""
    path, ck = newest_checkpoint(out, load)
    require(ck["kind"] == kind, f"{path} is a {ck['kind']} run, not a {kind} run")
    changes = differences(ck["config"], config, keep)
    if sha and (ck["teacher"].get("sha256") or weights_sha256(ck["teacher"]["model"])) != sha:
        changes["teacher weights (sha256)"] = [ck["teacher"].get("sha256", "older"), sha]
    said = ", ".join(f"{name} {new} (was {old})" for name, (old, new) in changes.items())
    require(not changes or force, f"--resume: this run differs from the one in {path}: {said}; "
            "use its flags, or --resume force to continue anyway")
    if changes:
        print(f"warning: --resume force: continuing {path} with {said}", file=sys.stderr)
    return path, ck, changes


def make_folder(folder, name):
    """folder made (one line naming --out `name` if it cannot be) -> may this process write there?
    Checked before the work, not after it."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {name}: {e.strerror}") from None
    return os.access(folder, os.W_OK)


def writable_file(out):
    """A result file's folder made and writable, and the file not a folder."""
    require(make_folder(os.path.dirname(out) or ".", out) and not os.path.isdir(out),
            f"--out {out}: not a writable file path")

# --------------------------------------------------------------------------------------------------
# Processes and precision.

def select_kernels(name, device, references):
    """--kernels -> (gather, salt_loss): the fused ops of kernels/ (auto: the fastest that runs
    here, said once), or `references` (--kernels torch, or auto when none runs)."""
    if name == "torch":
        return references
    import kernels
    try:
        ops = kernels.select(name, device)
    except RuntimeError as e:
        raise UserError(str(e)) from None
    return (ops.masked_gather, ops.salt_loss) if ops else references


def setup_distributed():
    """torchrun's process per device (nccl on GPUs, gloo on CPU). -> rank, world size, device"""
    world, rank, local = (int(os.environ.get(v, 0)) for v in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    cuda = torch.cuda.is_available()
    require(not cuda or local < torch.cuda.device_count(), f"process {local} has no GPU: "
            f"{torch.cuda.device_count()} visible; lower --nproc_per_node")
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return rank, max(world, 1), device


def say(*args, **kwargs):  # print, in one process (rank 0) only
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


def process_mean(values, world):
    """A 1-D tensor averaged over the processes (as it is with one). -> list of floats"""
    if world > 1:
        torch.distributed.all_reduce(values)
        values /= world
    return values.tolist()


PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}  # FLOP/s, dense


def peak_flops(device):
    """The card's dense bf16 peak (MFU's denominator), 0 when unknown (no MFU is printed)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return next((v for name, v in PEAK_BF16.items() if name in gpu), 0)


def step_flops(encoder, head, teacher, B, Kc, Kt, M):
    """Matmul FLOPs of a training step (MFU's numerator), read from the models: per block 24 d^2 per
    token (qkv, proj, MLP) and 4 T^2 d per sequence (attention), x3 for forward + backward, x1 for
    the frozen teacher (None in stage 1). Embeddings and the small heads are left out (< 2 % at
    ViT-B). B images, Kc context and Kt target tokens, M target blocks."""
    def blocks(net, T, seqs):
        dim = net.blocks[0].norm1.normalized_shape[0]
        return seqs * len(net.blocks) * (24 * dim * dim * T + 4 * T * T * dim)
    f = 3 * blocks(encoder, Kc, B) + 3 * blocks(head, Kc + Kt, M * B)
    return f + (blocks(teacher, teacher.grid ** 2, B) if teacher is not None else 0)


class Meter:
    """Training speed over the steps since the last log line: images/s, and MFU when the card's
    peak is known. Only training steps are timed (waiting for a batch counts, evaluation not)."""
    def __init__(self, peak):
        self.peak, self.t0, self.tic = peak, time.time(), time.time()
        self.total = [0, 0.0, 0.0]  # images, seconds, FLOPs
        self.last = [0, 0.0, 0.0]  # the same at the last log line

    def add(self, images, flops):  # after a step
        self.total = [a + b for a, b in zip(self.total, (images, time.time() - self.tic, flops))]

    def window(self):
        """-> images/s since the last call, its text (with MFU)"""
        n, s, f = [a - b for a, b in zip(self.total, self.last)]
        self.last = list(self.total)
        mfu = f" | MFU {f / s / self.peak:.1%}" if self.peak else ""
        return n / s, f"{n / s:.0f} img/s{mfu}"


def describe(r, config, said):
    """The run's first lines: its config, sizes, images, steps, processes, precision."""
    (encoder, head, _), d, t = r.models, r.cfg["data"], r.cfg["train"]
    n, held = r.n_train, len(r.images) - r.n_train
    say(f"[{r.kind}] config: {json.dumps(config)}")
    say(f"[{r.kind}] {sum(p.numel() for p in encoder.parameters()) / 1e6:.2f} M encoder + "
        f"{sum(p.numel() for p in head.parameters()) / 1e6:.2f} M head parameters; {n} train / "
        f"{held} held-out images ({d.data or 'synthetic'}); {r.steps} steps of {t.batch_size} on "
        f"{r.world} x {r.device.type} ({said})")
    if not held:
        say(f"[{r.kind}] no held-out images (--holdout {d.holdout} of {n}): best.pt is simply the "
            "last checkpoint")


def finish(r, log, meter):
    """The run's last line: steps, time, images/s, peak GPU memory, best held-out loss. -> img/s"""
    if log:
        log.close()
    if r.world > 1:
        torch.distributed.barrier()  # rank 0's last checkpoint is on disk before anyone goes on
    rate = meter.total[0] / meter.total[1] if meter.total[1] else float("nan")
    mem = ""
    if r.device.type == "cuda":
        mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    best, last = (os.path.join(r.cfg["train"].out, f) for f in ("best.pt", "last.pt"))
    say(f"[{r.kind}] done: {r.steps - r.start} steps in {time.time() - meter.t0:.0f} s, "
        f"{rate:.0f} img/s in training steps{mem}; best held-out loss {r.best:.4f}; wrote {best} "
        f"and {last}")
    return rate


def save_json(obj, path):
    """obj as JSON at `path`, or at path-1, ... when it exists; written whole. -> its path"""
    def write(o, tmp):
        with open(tmp, "w") as f:
            json.dump(o, f, indent=1)
    path = unique_path(path)
    save_atomic(obj, path, write)
    return path


def precision(device, bf16):
    """bf16 autocast on CUDA, else float32 (TF32 matmuls on sm80+). -> autocast, its description"""
    cuda = device.type == "cuda"
    tf32 = cuda and not bf16 and torch.cuda.get_device_capability(device) >= (8, 0)
    if tf32:
        torch.set_float32_matmul_precision("high")
    said = "bf16 autocast" if cuda and bf16 else "float32, TF32 matmuls" if tf32 else "float32"
    return torch.autocast("cuda", torch.bfloat16, enabled=cuda and bf16), said

# --------------------------------------------------------------------------------------------------
# The probe's numbers and tables.

def knn_votes(xtr, ytr, n_classes, x, k=20, temperature=0.07):
    """DINO's weighted k-NN on L2-normalised features: the k training images most cosine-similar to
    each row of x vote for their class with weight exp(similarity / temperature). -> (N, C)"""
    xtr, out = F.normalize(xtr.flatten(1), dim=1), []
    for xb in F.normalize(x.flatten(1), dim=1).split(1024):  # (b, D): at most 1024 x Ntr at once
        sim, idx = (xb @ xtr.T).topk(min(k, len(xtr)), dim=1)  # (b, k) each
        votes = torch.zeros(len(xb), n_classes)
        out.append(votes.scatter_add_(1, ytr[idx], (sim / temperature).exp()))
    return torch.cat(out)


def rankme(feats, eps=1e-7):
    """RankMe (Garrido et al., 2023): the effective rank of (N, D) features, exp of the entropy of
    their singular values normalised to sum 1; between 1 (collapse) and min(N, D)."""
    s = torch.linalg.svdvals(feats.double())
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def mean_std(v):
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def whitening(f, floor):
    """ZCA whitening of features f (n, D), in float64 -> mean (D,), W (D, D): (f - mean) @ W has
    unit variance along every direction whose variance is well above floor x the largest; weaker
    ones are scaled as if they had that floor's variance, so noise is not blown up."""
    f = f.double()
    lam, vec = torch.linalg.eigh(torch.cov(f.T))
    lam = lam.clamp(min=0) + floor * lam.max()
    return f.mean(0).float(), (vec / lam.sqrt() @ vec.T).float()

def summarize(runs, few_shot):
    """One encoder's probe runs (one per seed) -> its results: means, std, per class, corrupted."""
    f1 = torch.tensor([r["macro_f1"] for r in runs])
    corrupted = {k: mean_std([r["corrupted"][k] for r in runs]) for k in runs[0]["corrupted"]}
    std = f1.std().item() if len(runs) > 1 else 0.0
    return dict(macro_f1_mean=f1.mean().item(), macro_f1_std=std,
                val_macro_f1_mean=float(np.mean([r["val"] for r in runs])),  # choose on this
                accuracy_mean=float(np.mean([r["accuracy"] for r in runs])),
                per_class_f1_mean=np.mean([r["per_class_f1"] for r in runs], 0).tolist(), runs=runs,
                corrupted=corrupted, few_shot=few_shot)


def print_tables(results, classes, seeds):
    """The probe's table; the few-shot and robustness tables when they were asked for."""
    print(f"\n{'encoder':<9} {f'macro-F1 ({seeds} seeds)':<22} {'accuracy':<9} per-class F1")
    for name, r in results.items():
        pc = "  ".join(f"{c} {v:.3f}" for c, v in zip(classes, r["per_class_f1_mean"]))
        print(f"{name:<9} {r['macro_f1_mean']:.3f} ± {r['macro_f1_std']:.3f}{'':<9} "
              f"{r['accuracy_mean']:.3f}     {pc}")
    for key, title in (("few_shot", "few-shot macro-F1 (% of the training split)"), ("corrupted",
                       "robustness macro-F1 (probe trained clean; corruption/severity)")):
        cols = list(next(iter(results.values()))[key])
        if not cols:
            continue
        clean = key == "corrupted"  # the robustness table starts with the clean score
        head = " ".join(f"{c:>13}" for c in ["clean"] * clean + cols)
        print(f"\n{title}\n{'encoder':<9} {head}")
        for name, r in results.items():
            cells = [(r["macro_f1_mean"], r["macro_f1_std"])] * clean + list(r[key].values())
            print(f"{name:<9} " + " ".join(f"{f'{m:.3f}±{s:.3f}':>13}" for m, s in cells))

# --------------------------------------------------------------------------------------------------
# Weights from elsewhere: a timm-style ViT state dict in our layout.

TIMM_IGNORED = ("cls_token", "head.", "fc_norm.", "pre_logits.", "mask_token")  # not for a teacher


def timm_vit_state(sd, path, img_size, widths):
    """A timm-style ViT state dict (e.g. an ultrasound foundation model) -> (width, depth, patch,
    state in our layout). Unwraps common wrappers and prefixes, sums an RGB patch embedding into
    one gray channel (= gray fed 3 times), drops the CLS token and interpolates the learnt
    positions to our grid; refuses anything else."""
    for key in ("model", "state_dict", "teacher", "target_encoder"):  # common wrappers
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    out = {}
    for k, v in sd.items():
        while k.split(".", 1)[0] in ("module", "encoder", "model", "backbone") and "." in k:
            k = k.split(".", 1)[1]
        if isinstance(v, torch.Tensor) and not k.startswith(TIMM_IGNORED):
            out[k] = v
    w, pos = out.get("patch_embed.proj.weight"), out.get("pos_embed")
    require(w is not None and w.ndim == 4 and pos is not None, f"{path}: not a us_jepa checkpoint "
            "('kind', 'config', 'model') nor a timm ViT state dict (patch_embed.proj.weight, "
            "pos_embed)")
    dim, p, n = w.shape[0], w.shape[-1], pos.shape[1]
    require(dim in widths, f"{path}: width {dim} is not one of {list(widths)}")
    out["patch_embed.proj.weight"] = w.sum(1, keepdim=True)  # (D, C, p, p) -> (D, 1, p, p)
    g0 = math.isqrt(n - 1) if math.isqrt(n) ** 2 != n else math.isqrt(n)
    require(g0 * g0 in (n, n - 1), f"{path}: pos_embed holds {n} positions, not a square grid "
            "(+ CLS)")
    grid = img_size // p
    pos = pos[:, n - g0 * g0:].reshape(1, g0, g0, dim).permute(0, 3, 1, 2)  # no CLS: (1, D, g0, g0)
    pos = torch.nn.functional.interpolate(pos.float(), (grid, grid), mode="bicubic",
                                          align_corners=False)
    out["pos_embed"] = pos.flatten(2).transpose(1, 2)  # (1, D, grid, grid) -> (1, N, D)
    depth = 1 + max((int(k.split(".")[1]) for k in out if k.startswith("blocks.")), default=-1)
    print(f"[pretrain] external teacher {path}: width {dim}, depth {depth}, patch {p}, "
          f"{w.shape[1]}-channel patch embedding summed to 1, positions {g0}x{g0} -> {grid}x{grid}")
    return dim, depth, p, out
