"""The hostile-input table of issue 12: careless or hostile inputs in six groups, each one run through the
command line (us_jepa.main in this process; show.main for show.py's flags). Every case ends the same way:
exit code 2, exactly one line on stderr (a Python warning printed beside it counts as a line), no traceback,
the line saying what was wrong, and the --out folder the case was given (it exists before the run: a copy of
a finished run, or a folder holding a user's file) unchanged: the names, kinds, modes, sizes, mtimes and bytes
of everything in it, the folder itself included. No case may hang (an alarm fails it).

  g1 resume and checkpoints    g2 hostile image files    g3 paths    g4 labels and probe data
  g5 the command line          g6 where results go

The hostile files, records and layouts come from the writers in tests/test_hostile_data.py (whose in-process
checks of us_data stay there); the cases of tests/test_hostile_cli.py and tests/test_cli.py are not repeated.
A case whose run does not end that way is a bug to fix in us_jepa.py / us_data.py / show.py, marked
xfail(strict=True) with what it does instead."""
import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import show as S
import us_jepa as U
from test_hostile_cli import TINY
from test_hostile_data import FILES, RECORDS, TEST, TRAIN, bench, folder, good, hostile, image_folder_case, rec
from test_hostile_data import no_hang  # noqa: F401 (an autouse fixture: every case runs under an alarm)

SMALL = [*TINY, "--img_size", "32", "--patch_size", "8"]  # stage 1 on a data folder: 4 x 4 patches of 8 px
PROBE = ["probe", "--encoder", "pixels", "--seeds", "1", "--epochs", "2", "--n_train", "20", "--n_val", "10",
         "--n_test", "10", "--task", "lesion"]  # one task: --out names one file
QUIET = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)  # hidden by default


# ------------------------------------------------------------------------------------------------------------
# The harness.

def tree(top):
    """Everything at and below top, links not followed: kind and mode, size, mtime, and the bytes (a hash)
    of a regular file or the target of a link."""
    def entry(p):
        st = os.lstat(p)
        info = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns)
        if stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                info += (hashlib.sha256(f.read()).hexdigest(),)
        elif stat.S_ISLNK(st.st_mode):
            info += (os.readlink(p),)
        return info
    out = {".": entry(top)}
    for here, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(here, name)
            out[os.path.relpath(path, top)] = entry(path)
    return out


def refused(argv, out, match, capsys, main=U.main):
    """Run the command line: exit 2, one line on stderr holding every string of match, out unchanged."""
    before = tree(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
    err = capsys.readouterr().err
    shown = {f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, QUIET)}
    lines = err.strip().splitlines() + sorted(shown)
    assert e.value.code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, lines
    for m in [match] if isinstance(match, str) else match:
        assert m in lines[0], lines[0]
    after = tree(out)
    assert after == before, {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()
                             if before.get(k) != after.get(k)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished stage-1 run, a stage-2 run against its best.pt (both with paths relative to their folder, so
    that a case can put another teacher at the same path) and a folder of 24 ordinary scans."""
    base = tmp_path_factory.mktemp("table")
    cwd = os.getcwd()
    os.chdir(base)
    try:
        U.main(["teacher", *TINY, "--out", "teacher"])
        U.main(["pretrain", *TINY, "--teacher", "teacher/best.pt", "--out", "student"])
    finally:
        os.chdir(cwd)
    good(base / "scans", 24)
    return {"teacher": base / "teacher", "student": base / "student", "scans": base / "scans"}


class Ctx:
    """What a case builds its input with, in its own folder tmp."""
    def __init__(self, tmp, runs, monkeypatch):
        self.tmp, self.runs, self.mp, self.frozen, self.fds = tmp, runs, monkeypatch, [], []

    def out(self, name="out"):
        """A folder that holds a user's file."""
        d = self.tmp / name
        d.mkdir(parents=True)
        (d / "keep.txt").write_text("a user's notes")
        return d

    def copy(self, kind="teacher", name="out"):
        """A finished run of this case's own."""
        return Path(shutil.copytree(self.runs[kind], self.tmp / name))

    def data(self, *cases, n_good=1, name="d"):
        """A folder of n_good ordinary scans and these hostile files (test_hostile_data.FILES)."""
        d = self.tmp / name
        good(d, n_good)
        for case in cases:
            hostile(case, d)
        return d

    def freeze(self, path):
        """path and everything in it read-only, for root too (who writes anywhere: the immutable attribute)."""
        paths = [path] + [p for p in path.rglob("*") if not p.is_symlink() and (p.is_dir() or p.is_file())]
        for p in paths:
            os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) & ~0o222)
        self.frozen += paths
        if os.geteuid() == 0:
            r = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True, text=True)
            if r.returncode:
                pytest.skip(f"root, and no immutable attribute here: {r.stderr.strip()}")
        return path

    def lock(self, folder):
        """folder/.lock held as a running process holds it, until the case ends."""
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT)
        os.ftruncate(fd, 0)  # a copied run holds its own .lock with a pid of any length
        os.pwrite(fd, b"4242", 0)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.fds.append(fd)
        return folder

    def close(self):
        for fd in self.fds:
            os.close(fd)
        if self.frozen and os.geteuid() == 0:
            subprocess.run(["chattr", "-i", *map(str, self.frozen)], capture_output=True)
        for p in self.frozen:
            os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) | 0o200)
        if self.frozen and os.geteuid() == 0:
            subprocess.run(["chattr", "-i", *map(str, self.frozen)], capture_output=True)
        for p in self.frozen:
            os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) | 0o200)


@pytest.fixture
def ctx(tmp_path, runs, monkeypatch):
    c = Ctx(tmp_path, runs, monkeypatch)
    yield c
    c.close()


CASES = []  # pytest.param(setup, match, id="gN-group/name"); setup(ctx) -> argv, the --out folder[, more]
# The table is run by test_refused, at the end of this file.


def add(group, name, match, setup, bug=None, raises=AssertionError):
    """A case; bug: why it does not end as it must (an xfail that fails with `raises`, no other way)."""
    marks = [pytest.mark.xfail(strict=True, reason=bug, raises=raises)] if bug else []
    CASES.append(pytest.param(setup, match, id=f"{group}/{name}", marks=marks))


# Setups used by several groups.

def teacher_on(c, d, *flags):
    """Stage 1 on data folder d."""
    out = c.out()
    return ["teacher", *SMALL, "--data", d, "--out", out, *flags], out


def probe_on(c, d, *flags):
    """The pixel probe on data folder d."""
    out = c.out()
    return [*PROBE, "--data", d, "--out", out / "p.json", *flags], out


def on_flags(command, *flags):
    """A setup: `command` with these flags, --out a user's folder."""
    def setup(c):
        out = c.out()
        if command == "probe":
            return [*PROBE, "--out", out / "p.json", *flags], out
        if command == "show":
            return ["--ckpt", c.runs["student"] / "best.pt", "--out", out, *flags], out, {"main": S.main}
        if command == "pretrain":  # a teacher given: at the default path, a missing one is trained first
            return [command, *TINY, "--teacher", c.runs["teacher"] / "best.pt", "--out", out, *flags], out
        return [command, *TINY, "--out", out, *flags], out
    return setup


# ------------------------------------------------------------------------------------------------------------
# g1: resume and checkpoints. The run in --out is a copy of a finished one; its checkpoints are broken, or
# the flags are not the run's. A checkpoint given as --ckpt or --teacher is broken the same ways.

class Payload:
    """Unpickled, it would create a file (weights_only loading refuses it before)."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def teacher_config(**model):
    return {"data": {"img_size": 96}, "model": {"model": "vit_tiny", "depth": 1, "patch_size": 16, **model}}


BROKEN = {  # name -> writer(path): a checkpoint file broken one way
    "0-byte": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:50_000] if p.exists() else b"PK\x03\x04"),
    "garbage": lambda p: p.write_bytes(np.random.default_rng(0).bytes(50_000)),
    "pickle payload": lambda p: torch.save({"kind": "teacher", "config": {}, "model": Payload(p.parent / "pwned")},
                                           p),  # p.parent: the --out folder, or in the case's checked folder
    "a tensor": lambda p: torch.save(torch.zeros(3), p),
    "a folder": lambda p: (p.unlink(missing_ok=True), p.mkdir()),
    "a nonsense config": lambda p: torch.save({"kind": "teacher", "config": teacher_config(depth="one"),
                                               "model": {}}, p),
}
NO_LOAD = "--resume: no readable checkpoint in"


def resume_broken(write):
    def setup(c):
        out = c.copy()
        for f in ("last.pt", "best.pt"):
            write(out / f)
        return ["teacher", *TINY, "--out", out, "--resume"], out
    return setup


for name, write in BROKEN.items():
    add("g1-resume", f"last.pt and best.pt {name}", NO_LOAD, resume_broken(write))


def resume_loop(c):
    out = c.copy()
    for f, to in (("last.pt", "best.pt"), ("best.pt", "last.pt")):
        (out / f).unlink()
        os.symlink(to, out / f)
    return ["teacher", *TINY, "--out", out, "--resume"], out


def resume_other_kind(c):
    out = c.copy()
    shutil.copy2(c.runs["student"] / "last.pt", out / "last.pt")  # a stage-2 checkpoint in a stage-1 run
    return ["teacher", *TINY, "--out", out, "--resume"], out


def resume_only_best(c):
    out = c.copy()
    (out / "last.pt").unlink()
    BROKEN["garbage"](out / "best.pt")
    return ["teacher", *TINY, "--out", out, "--resume"], out


add("g1-resume", "last.pt and best.pt links to each other", "--resume: no checkpoint in", resume_loop)
add("g1-resume", "a student's last.pt in a teacher run", "is a student run, not a teacher run", resume_other_kind)
add("g1-resume", "no last.pt, best.pt garbage", NO_LOAD, resume_only_best)
add("g1-resume", "pretrain --resume with no run", "--resume: no checkpoint in", on_flags("pretrain", "--resume"))
add("g1-resume", "teacher --resume force with no run", "--resume: no checkpoint in",
    on_flags("teacher", "--resume", "force"))


def resume_with(*flags):
    def setup(c):
        out = c.copy()
        more = [c.runs["scans"] if f == "SCANS" else f for f in flags]
        return ["teacher", *TINY, "--out", out, "--resume", *more], out
    return setup


for flags in (["--data", "SCANS"], ["--model", "vit_small"], ["--patch_size", "32"], ["--img_size", "64"],
              ["--pred_dim", "64"], ["--loss", "l1"], ["--holdout", "0.1"], ["--augment", "false"],
              ["--warmup", "0.5"], ["--epochs", "1"], ["--pix_pool", "2"], ["--crop_scale", "0.5,1"],
              ["--final_lr", "1e-4"], ["--teacher_std", "false"]):
    add("g1-resume", "teacher --resume " + " ".join(flags), f"{flags[0]} ", resume_with(*flags))


def student_resume(*flags, teacher="teacher/best.pt", retrained=False):
    """--resume the stage-2 run; its teacher copied to teacher/best.pt (retrained: other weights there)."""
    def setup(c):
        (c.tmp / "teacher").mkdir()
        shutil.copy2(c.runs["teacher"] / "best.pt", c.tmp / "teacher" / "best.pt")
        if teacher != "teacher/best.pt" and teacher != "ema":
            (c.tmp / teacher).parent.mkdir()
            shutil.copy2(c.runs["teacher"] / "best.pt", c.tmp / teacher)
        if retrained:
            ck = torch.load(c.tmp / "teacher" / "best.pt", weights_only=True)
            ck["model"]["patch_embed.proj.bias"] += 0.01
            torch.save(ck, c.tmp / "teacher" / "best.pt")
        out = c.copy("student", "student")
        c.mp.chdir(c.tmp)
        more = [c.runs["scans"] if f == "SCANS" else f for f in flags]
        return ["pretrain", *TINY, "--teacher", teacher, "--out", "student", "--resume", *more], out
    return setup


add("g1-resume", "pretrain --resume --lr 0.5", "--lr 0.5 (was 0.001)", student_resume("--lr", "0.5"))
add("g1-resume", "pretrain --resume --steps 9", "--steps 9 (was 2)", student_resume("--steps", "9"))
add("g1-resume", "pretrain --resume --data", "--data ", student_resume("--data", "SCANS"))
add("g1-resume", "pretrain --resume --teacher elsewhere", "--teacher other/best.pt (was teacher/best.pt)",
    student_resume(teacher="other/best.pt"))
add("g1-resume", "pretrain --resume --teacher ema", "--teacher ema (was teacher/best.pt)",
    student_resume(teacher="ema"))
add("g1-resume", "pretrain --resume, teacher retrained at its path", "teacher weights (sha256)",
    student_resume(retrained=True))


def pretrain_resume_on_teacher_run(c):
    out = c.copy()
    return ["pretrain", *TINY, "--teacher", c.runs["teacher"] / "best.pt", "--out", out, "--resume"], out


def teacher_resume_on_student_run(c):
    out = c.copy("student")
    return ["teacher", *TINY, "--out", out, "--resume"], out


add("g1-resume", "pretrain --resume on a teacher run", "is a teacher run, not a student run",
    pretrain_resume_on_teacher_run)
add("g1-resume", "teacher --resume on a student run", "is a student run, not a teacher run",
    teacher_resume_on_student_run)


def probe_ckpt(write, *flags, encoder="student"):
    """probe --ckpt a checkpoint written by write(path, runs)."""
    def setup(c):
        path = c.tmp / "ck" / "x.pt"
        path.parent.mkdir()
        write(path, c.runs)
        out = c.out()  # checked: all of tmp (where a payload that ran would have written)
        return ["probe", "--encoder", encoder, "--ckpt", path, *PROBE[3:], "--out", out / "p.json", *flags], c.tmp
    return setup


def student_without_teacher(p, runs):
    ck = torch.load(runs["student"] / "best.pt", weights_only=True)
    del ck["teacher"]
    torch.save(ck, p)


def student_with_nonsense_teacher(p, runs):
    ck = torch.load(runs["student"] / "best.pt", weights_only=True)
    ck["teacher"]["config"] = teacher_config(model="vit_giant")
    torch.save(ck, p)


for name in ("0-byte", "garbage", "pickle payload"):
    add("g1-ckpt", f"probe --ckpt {name}", "x.pt: cannot load", probe_ckpt(lambda p, _, w=BROKEN[name]: w(p)))
add("g1-ckpt", "probe --ckpt a tensor", "x.pt: not a us_jepa checkpoint",
    probe_ckpt(lambda p, _: BROKEN["a tensor"](p)))
add("g1-ckpt", "probe --ckpt a folder", "x.pt: no such checkpoint", probe_ckpt(lambda p, _: p.mkdir()))
add("g1-ckpt", "probe --ckpt a link to itself", "x.pt: no such checkpoint",
    probe_ckpt(lambda p, _: os.symlink("x.pt", p)))
add("g1-ckpt", "probe --encoder student --ckpt a teacher's", "is a teacher checkpoint: use --encoder teacher",
    probe_ckpt(lambda p, runs: shutil.copy2(runs["teacher"] / "best.pt", p)))
add("g1-ckpt", "probe --layers 3 on a 1-block student", "--layers 3: the student has 1",
    probe_ckpt(lambda p, runs: shutil.copy2(runs["student"] / "best.pt", p), "--layers", "3"))
add("g1-ckpt", "probe --encoder teacher, a student checkpoint without its teacher", "x.pt",
    probe_ckpt(student_without_teacher, encoder="teacher"))
add("g1-ckpt", "probe, a student checkpoint whose teacher config is nonsense", "its stored config cannot describe",
    probe_ckpt(student_with_nonsense_teacher, encoder="teacher"))


def pretrain_teacher(write):
    """pretrain --teacher a file written by write(path, runs)."""
    def setup(c):
        path = c.tmp / "t" / "t.pt"
        path.parent.mkdir()
        write(path, c.runs)
        out = c.out()  # checked: all of tmp (where a payload that ran would have written)
        return ["pretrain", *TINY, "--teacher", path, "--out", out], c.tmp
    return setup


def with_config(config, kind="teacher", weights=True):
    """A writer: the finished run's checkpoint of this kind, its config replaced (weights: kept, or none)."""
    def write(p, runs):
        ck = torch.load(runs[kind] / "best.pt", weights_only=True)
        torch.save(dict(ck, config=dict(ck["config"], **config), model=ck["model"] if weights else {}), p)
    return write


for name, config, error in (("a depth that is a string", teacher_config(depth="one"), TypeError),
                            ("an unknown width", teacher_config(model="vit_giant"), KeyError),
                            ("a negative image size", dict(teacher_config(), data={"img_size": -96}), RuntimeError)):
    add("g1-ckpt", f"pretrain --teacher, its config with {name}", "its stored config cannot describe a ViT",
        pretrain_teacher(with_config(config)))
add("g1-ckpt", "pretrain --teacher a checkpoint without weights", "t.pt",
    pretrain_teacher(with_config({}, weights=False)))
add("g1-ckpt", "probe --ckpt a student checkpoint without weights", "x.pt",
    probe_ckpt(with_config({}, "student", weights=False)))
for name in ("0-byte", "garbage", "pickle payload"):
    add("g1-ckpt", f"pretrain --teacher {name}", "t.pt: cannot load",
        pretrain_teacher(lambda p, _, w=BROKEN[name]: w(p)))
add("g1-ckpt", "pretrain --teacher a tensor", "t.pt: not a us_jepa checkpoint",
    pretrain_teacher(lambda p, _: BROKEN["a tensor"](p)))
add("g1-ckpt", "pretrain --teacher a folder", "t.pt: no such checkpoint", pretrain_teacher(lambda p, _: p.mkdir()))
add("g1-ckpt", "pretrain --teacher a timm dict of width 100", "width 100 is not one of",
    pretrain_teacher(lambda p, _: torch.save({"patch_embed.proj.weight": torch.zeros(100, 3, 16, 16),
                                              "pos_embed": torch.zeros(1, 37, 100)}, p)))


# ------------------------------------------------------------------------------------------------------------
# g2: image files that are valid but hostile. The data folder holds one ordinary scan and the hostile file
# (--max_bad 0), or only hostile files: the run stops, naming the file and why, before --out is touched.

def one_hostile(case, *flags, command="teacher"):
    def setup(c):
        d = c.data(case)
        path = d / FILES[case][0]
        match = {"match": ("1 of 2 image files are unreadable", str(path), FILES[case][2])}
        if command == "pretrain":
            out = c.out()
            return ["pretrain", *TINY, "--teacher", c.runs["teacher"] / "best.pt", "--data", d, "--out", out,
                    "--max_bad", "0", *flags], out, match
        return (*teacher_on(c, d, "--max_bad", "0", *flags), match)
    return setup


for case in FILES:
    add("g2-image", f"teacher, {case}", None, one_hostile(case))
for case in ("12000^2 png", "FIFO .png", "dcm declaring 5M frames", "float tiff NaN", "png bomb header",
             "dangling link"):
    add("g2-image", f"teacher --cache off, {case}", None, one_hostile(case, "--cache", "off"))
for case in ("jpeg bomb header", "FIFO .tif", "dcm frames beyond its size"):
    add("g2-image", f"pretrain, {case}", None, one_hostile(case, command="pretrain"))


def all_bad(c):
    cases = ("12000^2 png", "FIFO .png", "dcm declaring 5M frames", "float tiff NaN", "empty file", "7 px")
    return (*teacher_on(c, c.data(*cases, n_good=0)), {"match": "6 of 6 image files are unreadable"})


add("g2-image", "teacher, a folder where every file is bad", None, all_bad)


# ------------------------------------------------------------------------------------------------------------
# g3: paths. Names are literal (no glob), links do not loop or duplicate, records stay inside the dataset
# folder, and a --data or --cache that is not a usable folder is one line.

def glob_named(name, twin):
    """--data NAME, a glob pattern that would match the folder twin (20 good scans): NAME's own files count."""
    def setup(c):
        good(c.tmp / twin, 20)
        d = c.data("empty file", name=name)
        return (*teacher_on(c, d, "--max_bad", "0"), {"match": ("1 of 2 image files", str(d / "empty.png"))})
    return setup


for name, twin in (("study[ab]", "studya"), ("only[1]", "only1"), ("a*", "ab"), ("?", "x")):
    add("g3-paths", f"teacher --data {name} beside {twin}", None, glob_named(name, twin))


def probe_glob(c):
    bench(c.tmp / "ub1", TRAIN, TEST)
    return probe_on(c, bench(c.tmp / "ub[1]", TRAIN, [rec(4, 1.5)]))


add("g3-paths", "probe --data ub[1] beside ub1", "test.json record 0: label 1.5 is not an integer", probe_glob)


def data_is(make, command="teacher"):
    """--data the path make(tmp) returns (something that is not a folder of images)."""
    def setup(c):
        path = make(c.tmp)
        return teacher_on(c, path) if command == "teacher" else probe_on(c, path)
    return setup


def a_scan(tmp):
    good(tmp / "f", 1)
    return tmp / "f" / "ok_0.png"


def only_text(tmp):
    (tmp / "t").mkdir()
    for name in ("notes.txt", "report.pdf", "scan.png.txt"):
        (tmp / "t" / name).write_text("not an image")
    return tmp / "t"


def only_a_loop(tmp):
    (tmp / "l" / "sub").mkdir(parents=True)
    os.symlink(tmp / "l", tmp / "l" / "sub" / "up")
    os.symlink(".", tmp / "l" / "self")
    return tmp / "l"


def dangling(tmp):
    os.symlink(tmp / "gone", tmp / "link")
    return tmp / "link"


def a_fifo(tmp):
    os.mkfifo(tmp / "pipe")
    return tmp / "pipe"


NO_DIR = "no such directory"
add("g3-paths", "teacher --data a missing folder", NO_DIR, data_is(lambda t: t / "nowhere"))
add("g3-paths", "probe --data a missing folder", NO_DIR, data_is(lambda t: t / "nowhere", "probe"))
add("g3-paths", "teacher --data a file", NO_DIR, data_is(a_scan))
add("g3-paths", "probe --data a file", NO_DIR, data_is(a_scan, "probe"))
add("g3-paths", "teacher --data a dangling link", NO_DIR, data_is(dangling))
add("g3-paths", "teacher --data a FIFO", NO_DIR, data_is(a_fifo))
add("g3-paths", "probe --data a FIFO", NO_DIR, data_is(a_fifo, "probe"))
add("g3-paths", "teacher --data only text files", "no images", data_is(only_text))
add("g3-paths", "teacher --data only links that loop", "no images", data_is(only_a_loop))


def loop_and_a_bad_file(c):
    d = c.data("empty file")
    os.symlink(d, d / "again")
    return (*teacher_on(c, d, "--max_bad", "0"), {"match": ("1 of 2 image files", "empty.png")})


def odd_name(name, shown):
    def setup(c):
        d = c.data("empty file", name=name)
        return (*teacher_on(c, d, "--max_bad", "0"), {"match": ("1 of 2 image files", shown)})
    return setup


add("g3-paths", "teacher --data with a link loop: each file once", None, loop_and_a_bad_file)
add("g3-paths", "teacher --data a folder named with a newline", None, odd_name("bad\nname", "bad\\nname"))
add("g3-paths", "teacher --data a folder named with a terminal escape", None,
    odd_name("x\x1b[2Jy", "x\\x1b[2Jy"))

for case in ("parent path", "parent path via a folder", "absolute path", "the root itself", "mask outside",
             "image not a string", "empty image path", "NUL in a path", "missing image"):
    train, test, val, match = RECORDS[case]
    add("g3-paths", f"probe, a record: {case}", match,
        lambda c, tr=train, te=test, va=val: probe_on(c, bench(c.tmp / "ub", tr, te, va)))


def cache_at(make, command="teacher"):
    """--cache the path make(tmp) returns (not a folder that can be written)."""
    def setup(c):
        cache = make(c)
        if command == "probe":
            return probe_on(c, bench(c.tmp / "ub", TRAIN, TEST), "--cache", cache)
        return teacher_on(c, c.data(n_good=20), "--cache", cache)
    return setup


def a_file(c):
    (c.tmp / "cachefile").write_text("")
    return c.tmp / "cachefile"


CACHE = "choose a writable --cache DIR, or --cache off"
add("g3-paths", "teacher --cache a file", CACHE, cache_at(a_file))
add("g3-paths", "teacher --cache a read-only folder", CACHE, cache_at(lambda c: c.freeze(c.out("cache"))))
add("g3-paths", "probe --cache a file", CACHE, cache_at(a_file, "probe"))
add("g3-paths", "probe --cache below a file", CACHE, cache_at(lambda c: a_file(c) / "sub", "probe"))


# ------------------------------------------------------------------------------------------------------------
# g4: labels and probe data, through `probe --encoder pixels --data DIR`: UltraBench records (test_hostile_data
# .RECORDS), ImageFolder layouts and hostile images in a probe split (image_folder_case).

PATHS = {"parent path", "parent path via a folder", "absolute path", "the root itself", "mask outside",
         "image not a string", "empty image path", "NUL in a path", "missing image"}
for case, (train, test, val, match) in RECORDS.items():
    if case not in PATHS:
        add("g4-labels", f"probe, UltraBench: {case}", match,
            lambda c, tr=train, te=test, va=val: probe_on(c, bench(c.tmp / "ub", tr, te, va)))


def layout(kind, *flags):
    def setup(c):
        match = image_folder_case(kind, c.tmp / "f")
        if "off" in flags:
            match = match.replace("cannot use probe image ", "")
        return (*probe_on(c, c.tmp / "f", *flags), {"match": match})
    return setup


for kind in ("test class train lacks", "val class train lacks", "image outside the class folders",
             "same file in train and test", "same file in two classes"):
    add("g4-labels", f"probe, ImageFolder: {kind}", None, layout(kind))
for kind in ("40000x16 png", "12000^2 png", "png bomb header", "jpeg bomb header", "bmp bomb header",
             "float tiff NaN", "FIFO .png", "FIFO .dcm", "dcm declaring 5M frames", "link to /dev/zero",
             "empty file"):
    add("g4-labels", f"probe, ImageFolder test image: {kind}", None, layout(kind))
for kind in ("FIFO .png", "dcm declaring 5M frames", "float tiff NaN"):
    add("g4-labels", f"probe --cache off, ImageFolder test image: {kind}", None, layout(kind, "--cache", "off"))


def json_is(make):
    def setup(c):
        root = bench(c.tmp / "ub", TRAIN, TEST)
        (root / "test.json").unlink()
        make(root / "test.json")
        return probe_on(c, root)
    return setup


def no_test_split(c):
    folder(c.tmp / "f", ("train", "val"))
    return probe_on(c, c.tmp / "f")


def no_test_json(c):
    root = bench(c.tmp / "ub", TRAIN, TEST)
    (root / "test.json").unlink()
    return probe_on(c, root)


def neither(c):
    good(c.tmp / "f" / "scans", 3)
    return probe_on(c, c.tmp / "f")


add("g4-labels", "probe, test.json a FIFO", "test.json: not a regular file (a FIFO)", json_is(os.mkfifo))
add("g4-labels", "probe, test.json a folder", "test.json: not a regular file (a folder)", json_is(os.mkdir))
add("g4-labels", "probe, UltraBench without test.json", "no test.json", no_test_json)
add("g4-labels", "probe, ImageFolder without a test split", "no test split", no_test_split)
add("g4-labels", "probe, neither ImageFolder nor UltraBench", "neither ImageFolder", neither)


# ------------------------------------------------------------------------------------------------------------
# g5: the command line (the flags of tests/test_hostile_cli.py and tests/test_cli.py are not repeated here).

FLAGS = [  # (command, flags, what the line says)
    ("teacher", ["extra"], "unrecognized arguments: extra"),
    ("teacher", ["--data"], "argument --data: expected one argument"),
    ("teacher", ["--lr="], "--lr: cannot read ''"),
    ("teacher", ["--lr=nan"], "--lr nan"),
    ("teacher", ["--img_size", "0"], "--img_size 0 must be a multiple of --patch_size 16"),
    ("teacher", ["--img_size", "2.5"], "--img_size: cannot read '2.5' as int"),
    ("teacher", ["--img_size", "4096"], "--img_size 4096"),
    ("teacher", ["--steps", "1e3"], "--steps: cannot read '1e3' as int"),
    ("teacher", ["--tgt_scale", "0.1,0.2,0.3"], "--tgt_scale: cannot read '0.1,0.2,0.3' as tuple"),
    ("teacher", ["--betas", "0.9"], "--betas: cannot read '0.9' as tuple"),
    ("teacher", ["--wd", "0.4,0.04"], "--wd 0.4,0.04: need low <= high"),
    ("teacher", ["--augment", "maybe"], "--augment: cannot read 'maybe' as bool"),
    ("teacher", ["--usrc", "2"], "--usrc: cannot read '2' as bool"),
    ("teacher", ["--overwrite", "perhaps"], "--overwrite: cannot read 'perhaps' as bool"),
    ("teacher", ["--every", "-1"], "--every -1: must be >= 1"),
    ("teacher", ["--holdout", "0.5"], "--holdout must be in [0, 0.5)"),
    ("teacher", ["--n_images", "-5"], "--n_images -5"),
    ("teacher", ["--max_bad", "-0.1"], "--max_bad must be in [0, 1]"),
    ("teacher", ["--clip", "nan"], "--clip nan"),
    ("teacher", ["--start_lr", "inf"], "--start_lr inf"),
    ("teacher", ["--depth", "65"], "--depth 65"),
    ("teacher", ["--pred_dim", "10000"], "--pred_dim 10000"),
    ("teacher", ["--threads", "1.5"], "--threads: cannot read '1.5' as int"),
    ("teacher", ["--min_keep", "36"], "--min_keep must be in [1, patches per image)"),
    ("pretrain", ["--pred_heads", "5"], "--pred_dim must be divisible by --pred_heads"),
    ("pretrain", ["--model", ""], "--model : choose one of"),
    ("pretrain", ["--whiten", "2"], "--whiten 2: must be a finite number in [0, 1]"),
    ("pretrain", ["--target_layers", "0"], "--target_layers 0: must be a finite number in [1, 64]"),
    ("pretrain", ["--preset", "paper", "--img_size", "100"], "--img_size 100 must be a multiple"),
    ("probe", ["--batch_size", "1"], "--batch_size >= 2"),
    ("probe", ["--n_val", "0"], "--n_* must be >= 1"),
    ("probe", ["--n_test", "-3"], "--n_* must be >= 1"),
    ("probe", ["--fractions", "abc"], "comma-separated numbers"),
    ("probe", ["--fractions", "5,nan"], "--fractions in (0, 100]"),
    ("probe", ["--corrupt", "blur", "--severity", "0"], "--severity in (0, 4]"),
    ("probe", ["--corrupt", "blur", "--severity", "-1"], "--severity in (0, 4]"),
    ("probe", ["--corrupt", "contrast", "--severity", "4.5"], "--severity in (0, 4]"),
    ("probe", ["--corrupt", "speckle", "--severity", "inf"], "--severity in (0, 4]"),
    ("probe", ["--corrupt", "blur,fog"], "--corrupt from blur,contrast,speckle"),
    ("probe", ["--layers", "-1"], "--layers -1"),
    ("probe", ["--seeds", "1.5"], "--seeds: cannot read '1.5' as int"),
    ("probe", ["--lr", "0"], "--lr 0"),
    ("probe", ["--preset", "paper"], "unrecognized arguments: --preset paper"),
    ("probe", ["--sev", "9"], "unrecognized arguments: --sev 9"),
    ("probe", ["--task", ""], "--task : choose one of"),
    ("probe", ["--task", "liver,thyroid"], "--task thyroid: choose one of"),  # before liver runs
    ("probe", ["--task", "lesion,"], "--task : choose one of"),
    ("probe", ["--task", "lesion,liver"], "names one file: give one --task"),  # --out is given
    ("show", ["--ov"], "unrecognized arguments: --ov"),
    ("show", ["--n_images", "x"], "--n_images: cannot read 'x' as int"),
]
for command, flags, match in FLAGS:
    add("g5-flags", f"{command} {' '.join(flags)}", match, on_flags(command, *flags))
add("g5-flags", "teacher --n_targets 40 --tgt_scale 0.5,0.5", "masks: 40 targets",
    on_flags("teacher", "--n_targets", "40", "--tgt_scale", "0.5,0.5"))
add("g5-flags", "probe --wd -1", "--wd -1", on_flags("probe", "--wd", "-1"))
for flags, error in ((["--n_images", "0"], IndexError), (["--n_images", "-2"], IndexError),
                     (["--seed", "-1"], ValueError)):
    add("g5-flags", f"show {' '.join(flags)}", flags[0], on_flags("show", *flags))


def show_few_shot(text):
    def setup(c):
        out = c.out()
        if text is not None:
            (out / "p.json").write_text(text)
        return ["few-shot", out / "p.json"], out, {"main": S.main}
    return setup


add("g5-flags", "show few-shot a missing JSON", "no such probe JSON", show_few_shot(None))
add("g5-flags", "show few-shot a JSON without few-shot results", "no few-shot results",
    show_few_shot('{"results": {"pixels": {"few_shot": {}}}}'))
add("g5-flags", "show few-shot a file that is not JSON", "p.json", show_few_shot("not json"))
add("g5-flags", "show few-shot a JSON that is not a probe's", "p.json", show_few_shot("[1, 2]"))


# ------------------------------------------------------------------------------------------------------------
# g6: where results go: an --out that cannot be written, is not a folder, or is another run's.

def train_out(command, where, *flags, snap=None):
    """command with --out where(c); the folder checked is snap(c) (default: the --out itself)."""
    def setup(c):
        out = where(c)
        head = ["teacher", *TINY] if command == "teacher" else [
            "pretrain", *TINY, "--teacher", c.runs["teacher"] / "best.pt"]
        return [*head, "--out", out, *flags], snap(c) if snap else out
    return setup


def special(make):
    """A folder holding a user's file and make(folder) -> the --out path in it."""
    return lambda c: make(c.out())


def fifo_in(o):
    os.mkfifo(o / "f")
    return o / "f"


def dangling_in(o):
    os.symlink(o / "nowhere", o / "link")
    return o / "link"


def link_to_file_in(o):
    os.symlink("keep.txt", o / "link")
    return o / "link"


OUTER = lambda c: c.tmp / "out"  # noqa: E731  the folder around a --out that is not one
add("g6-out", "teacher --out read-only", "--out", train_out("teacher", lambda c: c.freeze(c.out())))
add("g6-out", "teacher --out in a read-only folder", "--out",
    train_out("teacher", lambda c: c.freeze(c.out()) / "run", snap=OUTER))
add("g6-out", "teacher --out a FIFO", "File exists", train_out("teacher", special(fifo_in), snap=OUTER))
add("g6-out", "teacher --out a dangling link", "File exists",
    train_out("teacher", special(dangling_in), snap=OUTER))
add("g6-out", "teacher --out a link to a file", "File exists",
    train_out("teacher", special(link_to_file_in), snap=OUTER))
add("g6-out", "pretrain --out a file", "--out", train_out("pretrain", lambda c: c.out() / "keep.txt", snap=OUTER))
add("g6-out", "pretrain --out below a file", "--out",
    train_out("pretrain", lambda c: c.out() / "keep.txt" / "run", snap=OUTER))
add("g6-out", "pretrain --out read-only", "--out", train_out("pretrain", lambda c: c.freeze(c.out())))
add("g6-out", "pretrain --out locked", "another run (pid 4242) is writing there",
    train_out("pretrain", lambda c: c.lock(c.out())))
add("g6-out", "teacher --resume, --out locked", "another run (pid 4242) is writing there",
    train_out("teacher", lambda c: c.lock(c.copy()), "--resume"))
add("g6-out", "teacher --overwrite, --out locked: the run is kept", "another run (pid 4242) is writing there",
    train_out("teacher", lambda c: c.lock(c.copy()), "--overwrite"))
add("g6-out", "teacher --overwrite, --out read-only: the run is kept", "--out",
    train_out("teacher", lambda c: c.freeze(c.copy()), "--overwrite"))
add("g6-out", "teacher --resume, --out read-only", "--out",
    train_out("teacher", lambda c: c.freeze(c.copy()), "--resume"))


def only_best(c):
    out = c.copy()
    (out / "last.pt").unlink()
    return out


add("g6-out", "pretrain --out a run with only best.pt", "already holds a run", train_out("pretrain", only_best))


def empty_out(c):
    out = c.out()
    c.mp.chdir(out)
    return ["teacher", *TINY, "--out", ""], out


add("g6-out", "teacher --out ''", "--out", empty_out)


def probe_out(where, *flags, snap=OUTER):
    def setup(c):
        return [*PROBE, "--out", where(c), *flags], snap(c)
    return setup


def probe_default_out(c):
    ro = c.freeze(c.out())
    return [*PROBE, "--ckpt", ro / "best.pt"], ro  # its JSON would go beside the checkpoint


def dir_named_json(o):
    (o / "p.json").mkdir()
    return o / "p.json"


WRITABLE = "not a writable file path"
add("g6-out", "probe --out in a read-only folder", WRITABLE, probe_out(lambda c: c.freeze(c.out()) / "p.json"))
add("g6-out", "probe --out below a read-only folder", "--out",
    probe_out(lambda c: c.freeze(c.out()) / "new" / "p.json"))
add("g6-out", "probe --out a folder named p.json", WRITABLE, probe_out(special(dir_named_json)))
add("g6-out", "probe --out below a FIFO", "--out", probe_out(lambda c: fifo_in(c.out()) / "p.json"))
add("g6-out", "probe --out below a dangling link", "--out", probe_out(lambda c: dangling_in(c.out()) / "p.json"))
add("g6-out", "probe, default --out beside a --ckpt in a read-only folder", WRITABLE, probe_default_out)


def show_out(where):
    def setup(c):
        return ["--ckpt", c.runs["student"] / "best.pt", "--out", where(c)], c.tmp / "out", {"main": S.main}
    return setup


add("g6-out", "show --out a file", "--out", show_out(lambda c: c.out() / "keep.txt"))
add("g6-out", "show --out read-only", "--out", show_out(lambda c: c.freeze(c.out())))
add("g6-out", "show --out below a file", "--out", show_out(lambda c: c.out() / "keep.txt" / "figs"))


# ------------------------------------------------------------------------------------------------------------
# The table.

GROUPS = ("g1-", "g2-", "g3-", "g4-", "g5-", "g6-")


@pytest.mark.parametrize("setup,match", CASES)
def test_refused(ctx, capsys, setup, match):
    argv, out, *more = setup(ctx)  # more: {"match": what this case's line holds, "main": show.main}
    more = more[0] if more else {}
    refused(argv, out, more.get("match", match), capsys, more.get("main", U.main))


def test_the_table_covers_each_group():
    """At least 12 cases in each of the six groups, 120 in all, each with its own name."""
    ids = [c.id for c in CASES]
    counts = {g: sum(i.startswith(g) for i in ids) for g in GROUPS}
    assert len(set(ids)) == len(ids) >= 120 and min(counts.values()) >= 12, counts
