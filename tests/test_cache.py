"""The preprocessing cache: rows equal direct preprocessing bit for bit, a changed / added / removed file is
re-read, a killed build leaves no cache that loads and no process holding its lock, concurrent builders and
DDP ranks share one build, a corrupt cache is rebuilt with a warning, the data folder is never written to."""
import fcntl
import os
import random
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import us_data as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_scans(folder, n, size=(120, 90), seed=0):
    """n 8-bit PNGs of synthetic ultrasound (sector or linear fans on black), padded to a non-square frame."""
    folder.mkdir(parents=True, exist_ok=True)
    imgs, _, _ = D.synth_batch(range(seed, seed + n), max(size), 3, "lesion3")
    for i in range(n):
        a = (imgs[i, 0].numpy() * 255).astype(np.uint8)[: size[1], : size[0]]
        Image.fromarray(a).save(folder / f"scan_{seed + i:04d}.png")


def data_cfg(data, cache, size=64):
    return SimpleNamespace(data=str(data), cache=str(cache), img_size=size, every=1, max_bad=0.01, n_images=0)


def direct(path, size):
    """What a cache row must hold: load_image at 8-bit steps."""
    img, fan = D.load_image(str(path), size)
    return (img * 255).round() / 255, fan


def assert_rows_match(images, data, size=64):
    files = sorted(os.listdir(data))
    assert len(images) == len(files)
    got_i, got_f = images[range(len(files))]
    for j, name in enumerate(files):
        img, fan = direct(data / name, size)
        assert torch.equal(got_i[j], img) and torch.equal(got_f[j], fan), name


def test_round_trip_equals_direct_preprocessing(tmp_path, capsys):
    write_scans(tmp_path / "d", 12)
    images = D.Images(data_cfg(tmp_path / "d", tmp_path / "c"), 0)
    assert "building" in capsys.readouterr().out
    assert_rows_match(images, tmp_path / "d")
    again = D.Images(data_cfg(tmp_path / "d", tmp_path / "c"), 0)  # the second run only maps it
    out = capsys.readouterr().out
    assert "12 images from" in out and "building" not in out
    assert torch.equal(again[[3, 1]][0], images[[3, 1]][0])


def test_synthetic_pool_equals_on_demand_generation(tmp_path):
    d = SimpleNamespace(data="", cache=str(tmp_path / "c"), img_size=64, every=1, max_bad=0.01, n_images=150)
    cached = D.Images(d, 0)
    off = D.Images(SimpleNamespace(**{**vars(d), "cache": "off"}), 0)
    idx = [149, 0, 77, 3]
    assert all(torch.equal(a, b) for a, b in zip(cached[idx], off[idx]))


def test_changed_added_and_removed_files_are_reread(tmp_path, capsys):
    data = tmp_path / "d"
    write_scans(data, 10)
    D.Images(data_cfg(data, tmp_path / "c"), 0)
    capsys.readouterr()
    (data / "scan_0003.png").unlink()  # removed
    write_scans(data, 2, seed=50)  # added
    a = np.array(Image.open(data / "scan_0005.png"))
    Image.fromarray(255 - a).save(data / "scan_0005.png")  # changed (new size or mtime)
    os.utime(data / "scan_0005.png", ns=(1, time.time_ns() + 10**9))
    images = D.Images(data_cfg(data, tmp_path / "c"), 0)
    out = capsys.readouterr().out
    assert "(2 added, 1 changed, 1 removed): re-reading 3 of 11 images" in out
    assert_rows_match(images, data)


def test_other_parameters_build_another_cache(tmp_path, capsys):
    write_scans(tmp_path / "d", 6)
    D.Images(data_cfg(tmp_path / "d", tmp_path / "c", 64), 0)
    D.Images(data_cfg(tmp_path / "d", tmp_path / "c", 32), 0)
    assert capsys.readouterr().out.count("building") == 2
    assert len(os.listdir(tmp_path / "c")) == 2  # the 64 px cache is still there for runs that want it
    assert_rows_match(D.Images(data_cfg(tmp_path / "d", tmp_path / "c", 32), 0), tmp_path / "d", 32)


def test_broken_files_are_counted_once_during_the_build(tmp_path, capsys):
    data = tmp_path / "d"
    write_scans(data, 30)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    images = D.Images(SimpleNamespace(**{**vars(data_cfg(data, tmp_path / "c")), "max_bad": 0.05}), 0)
    out = capsys.readouterr().out
    assert len(images) == 30 and "skipping 1 of 31" in out and "broken.png" in out
    with pytest.raises(D.UserError, match="more than --max_bad 0.01"):  # another run, stricter: from the index
        D.Images(data_cfg(data, tmp_path / "c"), 0)


def test_corrupt_cache_files_are_rebuilt_with_a_warning(tmp_path, capsys):
    data = tmp_path / "d"
    write_scans(data, 8)
    D.Images(data_cfg(data, tmp_path / "c"), 0)
    folder = tmp_path / "c" / os.listdir(tmp_path / "c")[0]
    for damage in ("truncate", "index"):
        arr = next(f for f in os.listdir(folder) if f.startswith("images-"))
        if damage == "truncate":
            os.truncate(folder / arr, 1000)
        else:
            (folder / "index.json").write_text("{not json")
        capsys.readouterr()
        images = D.Images(data_cfg(data, tmp_path / "c"), 0)
        assert "warning" in capsys.readouterr().out
        assert_rows_match(images, data)


def test_the_data_folder_is_never_written(tmp_path):
    data = tmp_path / "d"
    write_scans(data, 5)
    before = {p: os.stat(data / p).st_mtime_ns for p in os.listdir(data)}
    os.chmod(data, 0o555)  # (root ignores it; the listing below is the real check)
    try:
        D.Images(data_cfg(data, tmp_path / "c"), 0)
    finally:
        os.chmod(data, 0o755)
    assert {p: os.stat(data / p).st_mtime_ns for p in os.listdir(data)} == before


def test_an_unwritable_cache_folder_is_one_line(tmp_path):
    write_scans(tmp_path / "d", 3)
    (tmp_path / "file").write_text("")
    with pytest.raises(D.UserError, match="choose a writable --cache DIR, or --cache off"):
        D.Images(data_cfg(tmp_path / "d", tmp_path / "file"), 0)


BUILD = """import sys; sys.path.insert(0, {root!r})
from types import SimpleNamespace
import us_data as D
d = SimpleNamespace(data={data!r}, cache={cache!r}, img_size=64, every=1, max_bad=0.01, n_images=0)
print("rows", len(D.Images(d, 0)), flush=True)
"""


def builder(data, cache):
    code = BUILD.format(root=ROOT, data=str(data), cache=str(cache))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def test_a_killed_build_leaves_no_cache_that_loads(tmp_path):
    """SIGKILL at random points of a build: the next run finds either nothing or a complete cache, and its rows
    are right either way."""
    data = tmp_path / "d"
    write_scans(data, 200, size=(320, 240))
    rng = random.Random(0)
    for k in range(3):
        p = builder(data, tmp_path / "c")
        time.sleep(rng.uniform(0.8, 2.5))  # python + torch start in ~1 s, the build takes ~3 s more
        p.send_signal(signal.SIGKILL)
        p.wait()
        params = dict(side=64, root=os.path.realpath(data), every=1)
        for folder in os.listdir(tmp_path / "c") if (tmp_path / "c").exists() else []:
            cache, why = D._read_index(str(tmp_path / "c" / folder), params)
            if cache is not None:  # whatever loads is complete: every row as direct preprocessing makes it
                rows = cache.get(range(len(cache.keys)))
                for j, key in enumerate(cache.keys):
                    img, fan = direct(data / key[0], 64)
                    assert torch.equal(rows[0][j], img) and torch.equal(rows[1][j], fan)
    images = D.Images(data_cfg(data, tmp_path / "c"), 0)
    assert_rows_match(images, data)
    folder = tmp_path / "c" / os.listdir(tmp_path / "c")[0]
    assert sorted(os.listdir(folder)) == sorted(["index.json", "lock", images.cache.index["images"],
                                                 images.cache.index["fans"]])  # the leftovers are gone


POOL_BUILD = """import sys; sys.path.insert(0, {root!r})
import us_data as D
params = dict(side=64, n=4000, seed=7, task="lesion3")
D.open_cache({cache!r}, params, list(range(4000)), list(range(4000)), (7, "lesion3"), procs=2)
"""


def proc_stat(pid):
    """The fields of /proc/PID/stat after the command name (state, ppid, ...), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children(pid):
    """The pids whose parent is pid."""
    stats = {int(e): proc_stat(e) for e in os.listdir("/proc") if e.isdigit()}
    return [k for k, f in stats.items() if f and int(f[1]) == pid]


def alive(pid):
    f = proc_stat(pid)
    return f is not None and f[0] != "Z"  # a zombie has ended


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_a_killed_builders_processes_end_and_free_the_lock(tmp_path):
    """The builder SIGKILLed (the OOM killer, kill -9) while its build processes work: they must not live on
    holding the cache lock, or every later run waits for a build that never ends."""
    code = POOL_BUILD.format(root=ROOT, cache=str(tmp_path / "c"))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in p.stdout:  # the first progress line: the build processes are at work
        if line.startswith("[cache] ") and "/4000 images" in line:
            break
    kids = children(p.pid)
    assert len(kids) == 2, (kids, line)
    p.send_signal(signal.SIGKILL)
    p.wait()
    fd = os.open(tmp_path / "c" / "lock", os.O_RDWR)
    deadline = time.time() + 30
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            assert time.time() < deadline, "a killed builder's processes still hold the cache lock after 30 s"
            time.sleep(0.1)
    os.close(fd)
    while any(alive(k) for k in kids):
        assert time.time() < deadline, "a killed builder's processes outlive it by 30 s"
        time.sleep(0.1)


def test_two_concurrent_builders_share_one_build(tmp_path):
    data = tmp_path / "d"
    write_scans(data, 40, size=(320, 240))
    procs = [builder(data, tmp_path / "c") for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    text = "".join(o for o, _ in outs)
    assert text.count("rows 40") == 2 and text.count("[cache] building") == 1  # the other waited, then mapped it
    assert_rows_match(D.Images(data_cfg(data, tmp_path / "c"), 0), data)


def test_ddp_ranks_share_one_cache(tmp_path):
    data = tmp_path / "d"
    write_scans(data, 40)
    env = dict(os.environ, OMP_NUM_THREADS="1", US_JEPA_CACHE=str(tmp_path / "c"))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "us_jepa.py"), "teacher", "--data", str(data), "--img_size", "64",
                        "--batch_size", "8", "--steps", "2", "--depth", "1", "--pred_depth", "1",
                        "--out", str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 steps of 8 on 2 x cpu" in r.stdout and r.stdout.count("[cache]") <= 3  # rank 0 speaks (or waits)
    (folder,) = os.listdir(tmp_path / "c")  # one cache, built once (by whichever rank came first): generation 1
    assert D._read_index(str(tmp_path / "c" / folder), dict(side=64, root=str(data), every=1))[0].index["gen"] == 1


def test_probe_splits_come_from_the_cache(tmp_path, capsys):
    """An ImageFolder probe: built once, mapped the second time; rows = --cache off's images at 8-bit steps."""
    root = tmp_path / "folder"
    for split, seed in (("train", 0), ("test", 40)):
        for c, cls in enumerate(("a", "b")):
            write_scans(root / split / cls, 6, seed=seed + 10 * c)
    import us_jepa as U
    p = U.ProbeConfig(data=str(root), cache=str(tmp_path / "c"))
    cached, classes = D.probe_data(p, 64)
    assert "building" in capsys.readouterr().out
    D.probe_data(p, 64)
    assert "building" not in capsys.readouterr().out
    off, _ = D.probe_data(U.ProbeConfig(data=str(root), cache="off"), 64)
    for s in ("train", "val", "test"):
        assert torch.equal(cached[s].labels, off[s].labels)
        (_, a, fa), (_, b, fb) = next(cached[s].batches()), next(off[s].batches())
        assert torch.equal(a, (b * 255).round() / 255) and torch.equal(fa, fb)
    (root / "test" / "a" / "scan_0041.png").write_bytes(b"broken")
    with pytest.raises(D.UserError, match="cannot use probe image .*scan_0041.png: cannot read image"):
        D.probe_data(p, 64)
