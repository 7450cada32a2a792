"""Careless or hostile data (issue 12): every case builds its input in tmp_path and runs the real
entry point (us_data.Images, us_data.probe_data, a few through the command line). The outcome is
one of two: the file is skipped and counted with its reason in the '[data] skipping' line, or one
line (UserError) names the file or record. Never a traceback, a hang (FIFOs: an alarm) or a silent
wrong result."""
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import us_data as D
import us_jepa as U

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_S = 60  # an alarm: what could hang (a FIFO, a listing) must be done long before


@pytest.fixture(autouse=True)
def no_hang():
    """Every case runs under an alarm: a read that blocks (a FIFO opened) fails the case, not the
    suite."""
    def hung(*_):
        raise TimeoutError("hung")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------------------
# Writers of hostile files. Large images are all-black PNGs written row by row through zlib: a
# 12000^2 file is ~140 KB and never 144 MB in this process.

def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(path, w, h, extra=(), idat=None):
    """A valid 8-bit gray PNG of w x h px, all black (idat: raw IDAT bytes instead, e.g. a
    header-only bomb)."""
    if idat is None:
        z, row = zlib.compressobj(9), bytes(w + 1)  # filter byte 0, then w zero pixels
        idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    head = _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    body = b"".join(_chunk(k, v) for k, v in extra) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + head + body)


def scan(path, w=64, h=48, seed=0):
    """An ordinary small frame: a bright noisy block on black."""
    rng = np.random.default_rng(seed)
    a = np.zeros((h, w), np.uint8)
    a[h // 8:, w // 8: w - w // 8] = rng.integers(40, 255, (h - h // 8, w - 2 * (w // 8)))
    Image.fromarray(a).save(path)


def patched(path, fmt, w, h):
    """A small real JPEG / BMP whose header then declares w x h px (tiny file, huge claim)."""
    buf = path.with_suffix(".tmp")
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(buf, fmt)
    b = bytearray(buf.read_bytes())
    buf.unlink()
    if fmt == "JPEG":
        i = b.index(b"\xff\xc0")  # SOF0: length (2), precision (1), height (2), width (2)
        b[i + 5:i + 9] = struct.pack(">HH", h, w)
    else:  # BMP: BITMAPINFOHEADER width and height (int32) at 18 and 22
        b[18:26] = struct.pack("<ii", w, h)
    path.write_bytes(bytes(b))


def float_tiff(path, value):
    a = np.ones((32, 32), np.float32)
    a[5, 7] = value
    Image.fromarray(a, mode="F").save(path)


def dicom(path, declared=None, rows_hdr=None, encapsulated=False, floats=None):
    """A 1-frame 8-bit 64 x 64 DICOM. declared: the NumberOfFrames its header then claims;
    rows_hdr: the Rows it claims; encapsulated: JPEG baseline, one fragment; floats: Float Pixel
    Data (H, W) instead."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.3.1", generate_uid()
    if floats is not None:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.Rows, ds.Columns = floats.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated = 1, "MONOCHROME2", 32
        ds.FloatPixelData = floats.astype(np.float32).tobytes()
    elif encapsulated:
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.Rows, ds.Columns, ds.SamplesPerPixel = 64, 64, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
        ds["PixelData"].VR = "OB"
    else:
        ds.set_pixel_data(np.zeros((64, 64), np.uint8), "MONOCHROME2", 8)
    if declared is not None:
        ds.NumberOfFrames = declared
    if rows_hdr is not None:
        ds.Rows = rows_hdr
    ds.save_as(path, enforce_file_format=True)


def fifo(path):
    os.mkfifo(path)


def unix_socket(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))  # the socket file stays after the test process closes it
    s.close()


LARGER = "larger than 4096 px on a side"
NOT_FINITE = "NaN or infinite pixel values"
# name -> (file name, writer(path), what the reason says). Each goes into a folder of 3 good frames.
FILES = {
    "40000x16 png": ("wide.png", lambda p: png(p, 40000, 16), f"40000 x 16 px, {LARGER}"),
    "16x40000 png": ("tall.png", lambda p: png(p, 16, 40000), f"16 x 40000 px, {LARGER}"),
    "12000^2 png": ("big.png", lambda p: png(p, 12000, 12000), f"12000 x 12000 px, {LARGER}"),
    "4097 px png": ("edge.png", lambda p: png(p, 4097, 1024), f"4097 x 1024 px, {LARGER}"),
    "png bomb header": ("bomb.png", lambda p: png(p, 20000, 20000, idat=zlib.compress(bytes(100))),
                        f"{LARGER} (MAX_SIDE; Image size (400000000 pixels)"),
    "jpeg bomb header": ("bomb.jpg", lambda p: patched(p, "JPEG", 60000, 60000), LARGER),
    "jpeg 5000 px header": ("five.jpg", lambda p: patched(p, "JPEG", 5000, 900),
                            f"5000 x 900 px, {LARGER}"),
    "bmp bomb header": ("bomb.bmp", lambda p: patched(p, "BMP", 50000, 50000), LARGER),
    "bmp 4100 px header": ("wide.bmp", lambda p: patched(p, "BMP", 4100, 600),
                           f"4100 x 600 px, {LARGER}"),
    "aspect 9:1": ("strip.png", lambda p: png(p, 900, 100),
                   "900 x 100 px, longer than 8:1 (MAX_ASPECT)"),
    "aspect 1:20": ("pole.png", lambda p: png(p, 20, 400), "20 x 400 px, longer than 8:1"),
    "7 px": ("tiny.png", lambda p: png(p, 7, 7), "image too small (7 x 7 px; at least 8)"),
    "5x40 px": ("sliver.png", lambda p: png(p, 5, 40), "image too small (5 x 40 px"),
    "png text bomb": ("ztxt.png", lambda p: png(p, 64, 64, extra=[
        (b"zTXt", b"k\0\0" + zlib.compress(bytes(50_000_000)))]), "cannot read image"),
    "float tiff NaN": ("nan.tif", lambda p: float_tiff(p, np.nan), NOT_FINITE),
    "float tiff +inf": ("inf.tif", lambda p: float_tiff(p, np.inf), NOT_FINITE),
    "float tiff -inf": ("ninf.tiff", lambda p: float_tiff(p, -np.inf), NOT_FINITE),
    "FIFO .png": ("pipe.png", fifo, "not a regular file (a FIFO)"),
    "FIFO .dcm": ("pipe.dcm", fifo, "not a regular file (a FIFO)"),
    "FIFO .tif": ("pipe.tif", fifo, "not a regular file (a FIFO)"),
    "socket .png": ("sock.png", unix_socket, "not a regular file (a socket)"),
    "link to /dev/zero": ("zero.png", lambda p: os.symlink("/dev/zero", p),
                          "not a regular file (a character device)"),
    "link to /dev/null .dcm": ("null.dcm", lambda p: os.symlink("/dev/null", p),
                               "not a regular file (a character device)"),
    "dangling link": ("gone.png", lambda p: os.symlink(p.parent / "nowhere.png", p),
                      "No such file or directory"),
    "empty file": ("empty.png", lambda p: p.write_bytes(b""), "cannot read image"),
    "truncated png": ("cut.png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0"),
                      "cannot read image"),
    "text as jpeg": ("notes.jpg", lambda p: p.write_text("patient notes\n" * 50),
                     "cannot identify image file"),
    "dcm declaring 5M frames": ("cine.dcm", lambda p: dicom(p, declared=5_000_000),
                                "declares 5000000 frames (at most 10000, MAX_FRAMES)"),
    "dcm declaring 0 frames": ("zero.dcm", lambda p: dicom(p, declared=0), "declares 0 frames"),
    "dcm declaring -3 frames": ("neg.dcm", lambda p: dicom(p, declared=-3), "declares -3 frames"),
    "dcm frames beyond its size": ("lies.dcm", lambda p: dicom(p, declared=9000),
                                   "declares 9000 frames of 64 x 64 px (>= 36864000 bytes) in a "
                                   "file of"),
    "dcm compressed frames beyond its size": (
        "jl.dcm", lambda p: dicom(p, declared=5000, encapsulated=True),
        "declares 5000 compressed frames"),
    "dcm 60000 rows": ("rows.dcm", lambda p: dicom(p, rows_hdr=60000), f"64 x 60000 px, {LARGER}"),
    "dcm float NaN": ("fnan.dcm", lambda p: dicom(p, floats=np.where(np.eye(32) > 0, np.nan, 1)),
                      NOT_FINITE),
    "dcm not dicom": ("junk.dcm", lambda p: p.write_bytes(bytes(300)), "cannot read DICOM"),
}


def cfg(data, cache, max_bad=0.5, size=64):
    return SimpleNamespace(data=str(data), cache=str(cache), img_size=size, every=1,
                           max_bad=max_bad, n_images=0)


def good(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scan(folder / f"ok_{i}.png", seed=i)


def hostile(case, folder):
    """Write FILES[case] into folder -> (its path, the reason)."""
    name, write, reason = FILES[case]
    if name.endswith(".dcm"):
        pytest.importorskip("pydicom")
    write(folder / name)
    return folder / name, reason


@pytest.mark.parametrize("case", list(FILES))
def test_hostile_file_is_skipped_and_counted(case, tmp_path, capsys):
    d = tmp_path / "d"
    good(d)
    path, reason = hostile(case, d)
    images = D.Images(cfg(d, tmp_path / "c"), 0)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("[data] skipping"))
    assert len(images) == 3, out
    assert f"skipping 1 of 4 unreadable or too small image files, e.g. {path}" in line, line
    assert reason in line, line
    with pytest.raises(D.UserError, match=r"1 of 4 image files .* more than --max_bad 0.1"):
        D.Images(cfg(d, tmp_path / "c", max_bad=0.1), 0)  # too many for this run: it stops


@pytest.mark.parametrize("case", ["12000^2 png", "FIFO .png", "FIFO .dcm",
                                  "dcm declaring 5M frames", "float tiff NaN", "png bomb header",
                                  "dangling link"])
def test_hostile_file_without_the_cache(case, tmp_path, capsys):
    """--cache off screens each file as the build does: the same reason, no hang, no exception type
    escaping."""
    good(tmp_path / "d")
    path, reason = hostile(case, tmp_path / "d")
    images = D.Images(cfg(tmp_path / "d", "off"), 0)
    out = capsys.readouterr().out
    assert len(images) == 3 and "skipping 1 of 4" in out, out
    assert str(path) in out and reason in out, out


def test_boundary_sizes_are_accepted(tmp_path):
    """Exactly MAX_SIDE on a side, exactly MAX_ASPECT:1 and exactly MIN_SIDE: used."""
    d = tmp_path / "d"
    d.mkdir()
    png(d / "a.png", D.MAX_SIDE, D.MAX_SIDE // D.MAX_ASPECT)
    png(d / "b.png", D.MIN_SIDE * D.MAX_ASPECT, D.MIN_SIDE)
    images = D.Images(cfg(d, tmp_path / "c", max_bad=0), 0, min_side=8)
    assert len(images) == 2 and images.cache.shape.tolist() == [[512, 4096], [8, 64]]


def test_exif_orientation_is_applied(tmp_path):
    """A frame stored sideways with an EXIF orientation tag (6: rotate 90 degrees clockwise to
    view) comes out upright, its mask too; a JPEG and a PNG alike. Upright: a bright bar at the
    top, wider than tall."""
    up = np.zeros((60, 100), np.uint8)
    up[5:15, 10:90] = 250  # the bar, near the top
    up[20:55, 30:70] = 120
    stored = np.ascontiguousarray(np.rot90(up))  # (100, 60): turned clockwise, it is `up`
    exif = Image.Exif()
    exif[0x0112] = 6
    mask = tmp_path / "m.png"
    Image.fromarray((stored > 0).astype(np.uint8)).save(mask, exif=exif.tobytes())
    for ext in ("jpg", "png"):
        path = tmp_path / f"side.{ext}"
        Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=100)
        a, _, fan = D.read_image(str(path), mask_path=str(mask))
        assert a.shape == fan.shape == (60, 100), ext
        assert np.abs(a * 250 - up).mean() < 3, ext  # the pixels, upright (JPEG: to its rounding)
        assert (fan == (up > 0)).all(), ext
    assert D.CACHE_VERSION >= 2  # rows made before orientation was applied are rebuilt


# ------------------------------------------------------------------------------------------------
# Paths: names are literal, links do not duplicate files, records stay inside the dataset folder.

def test_glob_characters_are_literal(tmp_path):
    for name, n in (("study[ab]", 2), ("studya", 5), ("studyb", 4), ("only[1]", 3), ("a*", 1),
                    ("ab", 6), ("?", 2), ("x", 7)):
        good(tmp_path / name, n)
    for name, n in (("study[ab]", 2), ("only[1]", 3), ("a*", 1), ("?", 2)):
        images = D.Images(cfg(tmp_path / name, tmp_path / "c"), 0)
        assert len(images) == n, name
        assert {k[0] for k in images.cache.keys} == {f"ok_{i}.png" for i in range(n)}, name


def test_a_symlink_loop_lists_each_file_once(tmp_path):
    d = tmp_path / "d"
    good(d / "a" / "b", 3)
    os.symlink(d, d / "a" / "b" / "loop")  # back to the top
    os.symlink(d / "a", d / "again")  # a second name for a folder
    assert len(D.walk_images(str(d))) == 3
    assert len(D.Images(cfg(d, tmp_path / "c"), 0)) == 3


def test_one_file_by_two_names_is_listed_once(tmp_path):
    """Symlinked and hard-linked files are one file: a held-out image is never a training image
    renamed."""
    d = tmp_path / "d"
    good(d, 3)
    os.symlink(d / "ok_0.png", d / "zz_link.png")
    os.link(d / "ok_1.png", d / "zz_hard.png")
    (d / "sub").mkdir()
    os.symlink(d / "ok_2.png", d / "sub" / "copy.png")
    assert D.walk_images(str(d)) == [str(d / f"ok_{i}.png") for i in range(3)]
    assert len(D.Images(cfg(d, tmp_path / "c"), 0)) == 3


def test_a_link_to_a_file_outside_is_data(tmp_path):
    good(tmp_path / "elsewhere", 1)
    good(tmp_path / "d", 2)
    os.symlink(tmp_path / "elsewhere" / "ok_0.png", tmp_path / "d" / "outside.png")
    assert len(D.Images(cfg(tmp_path / "d", tmp_path / "c"), 0)) == 3


def test_a_folder_named_like_an_image_is_a_folder(tmp_path):
    good(tmp_path / "d" / "scan.png", 2)
    assert len(D.Images(cfg(tmp_path / "d", tmp_path / "c"), 0)) == 2


def test_a_newline_in_a_name_stays_one_line(tmp_path, capsys):
    d = tmp_path / "d"
    good(d, 3)
    (d / "bad\nname\x1b[2J.png").write_bytes(b"junk")  # a newline and a terminal escape
    D.Images(cfg(d, tmp_path / "c"), 0)
    line = [x for x in capsys.readouterr().out.splitlines() if "skipping" in x]
    assert len(line) == 1 and "bad\\nname\\x1b[2J.png" in line[0], line
    with pytest.raises(D.UserError) as e:
        D.Images(cfg(d, tmp_path / "c", max_bad=0), 0)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)


def test_a_data_loader_workers_user_error_is_its_own_line():
    """torch re-raises a worker's UserError with the worker's whole traceback as its text: str()
    gives back the worker's one line."""
    import torch

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise D.UserError("/x/a.png: NaN or infinite pixel values")
    with pytest.raises(D.UserError) as e:
        next(iter(torch.utils.data.DataLoader(Broken(), batch_size=None, num_workers=1)))
    assert str(e.value) == "/x/a.png: NaN or infinite pixel values"


# ------------------------------------------------------------------------------------------------
# Probe data: UltraBench records and ImageFolder layouts.

def bench(root, train, test, val=None, images=6):
    """An UltraBench folder: images/img_i.png and the JSON files as given (lists of records, or
    raw text or bytes)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        scan(root / "images" / f"img_{i}.png", seed=i)
    files = {"train_val.json": train, "test.json": test} if val is None else {
        "train.json": train, "validation.json": val, "test.json": test}
    for name, recs in files.items():
        if isinstance(recs, bytes):
            (root / name).write_bytes(recs)
        else:
            (root / name).write_text(recs if isinstance(recs, str) else json.dumps(recs))
    return root


def rec(i, y, **kw):
    return {"image": f"images/img_{i}.png", "label": y, **kw}


TRAIN = [rec(0, 0), rec(1, 1), rec(2, 0), rec(3, 1)]
TEST = [rec(4, 0), rec(5, 1)]
NOT_A_RECORD = 'record 0: {"image": ..., "label": ...} expected'
# name -> (train records, test records, validation records or None, what the one line says)
RECORDS = {
    "test label outside the classes": (
        TRAIN, [rec(4, 0), rec(5, 2)], None,
        "test.json record 1: label 2 is not a class of train_val.json (0..1)"),
    "negative test label": (TRAIN, [rec(4, -1)], None,
                            "test.json record 0: label -1 is not a class"),
    "validation label out of range": (
        TRAIN, TEST, [rec(4, 0), rec(5, 7)],
        "validation.json record 1: label 7 is not a class of train.json"),
    "train labels with a gap": ([rec(0, 0), rec(1, 2)], TEST, None,
                                "labels must be 0..C-1, found ['0', '2']"),
    "one class": ([rec(0, 0), rec(1, 0)], [rec(4, 0)], None, "need at least 2 classes"),
    "no label": (TRAIN, [rec(4, 0), {"image": "images/img_5.png"}], None,
                 'test.json record 1: no "label"'),
    "no image": ([{"label": 0}] + TRAIN, TEST, None, 'train_val.json record 0: no "image"'),
    "string label": (TRAIN, [rec(4, "1")], None, 'test.json record 0: label "1" is not an integer'),
    "float label": ([rec(0, 0), rec(1, 1.5)], TEST, None,
                    "train_val.json record 1: label 1.5 is not an integer"),
    "bool label": (TRAIN, [rec(4, True)], None, "test.json record 0: label true is not an integer"),
    "null label": (TRAIN, [rec(4, None)], None, "label null is not an integer"),
    "list label": (TRAIN, [rec(4, [1])], None, "label [1] is not an integer"),
    "NaN label": (TRAIN, '[{"image": "images/img_4.png", "label": NaN}]', None,
                  "label NaN is not an integer"),
    "huge label": (TRAIN, [rec(4, 10 ** 30)], None, f"label {10 ** 30} is not a class"),
    "json dict": (TRAIN, json.dumps({"images": TEST}), None, "a JSON list of records"),
    "json list of strings": (TRAIN, ["images/img_4.png"], None, NOT_A_RECORD),
    "json list of lists": ([[0, 1]], TEST, None, NOT_A_RECORD),
    "malformed json": (TRAIN, '[{"image": "images/img_4.png", "label": 0', None,
                       "test.json: not valid JSON"),
    "empty json file": ("", TEST, None, "train_val.json: not valid JSON"),
    "binary json file": (TRAIN, b"\xff\xfe\x00[", None, "test.json: not valid JSON"),
    "deeply nested json": (TRAIN, "[" * 100_000 + "]" * 100_000, None, "not valid JSON"),
    "no records": (TRAIN, [], None, "test.json: no records"),
    "parent path": (TRAIN, [{"image": "../img.png", "label": 0}], None,
                    'test.json record 0: "image" ../img.png is not inside'),
    "parent path via a folder": (TRAIN, [rec(4, 0, image="images/../../x.png")], None,
                                 "is not inside"),
    "absolute path": (TRAIN, [{"image": "/etc/hostname", "label": 0}], None,
                      '"image" /etc/hostname is not inside'),
    "the root itself": (TRAIN, [{"image": ".", "label": 0}], None, '"image" . is not inside'),
    "mask outside": (TRAIN, [rec(4, 0, scan_mask="../../m.png")], None,
                     '"scan_mask" ../../m.png is not inside'),
    "image not a string": (TRAIN, [{"image": 4, "label": 0}], None, '"image" is not a path (4)'),
    "empty image path": (TRAIN, [{"image": "", "label": 0}], None, '"image" is not a path ("")'),
    "NUL in a path": (TRAIN, [{"image": "images/img_4.png\0.txt", "label": 0}], None,
                      '"image" is not a path'),
    "missing image": (TRAIN, [rec(9, 0)], None, "img_9.png does not exist"),
    "test image in train": (TRAIN, [rec(0, 0)], None, "a test image the probe would also train on"),
    "one image two labels": (TRAIN + [rec(0, 1)], TEST, None, "one image, two labels"),
}


@pytest.mark.parametrize("case", list(RECORDS))
def test_bad_probe_records_are_one_line(case, tmp_path):
    train, test, val, match = RECORDS[case]
    root = bench(tmp_path / "ub", train, test, val)
    with pytest.raises(D.UserError) as e:
        D.probe_data(U.ProbeConfig(data=str(root), cache=str(tmp_path / "c")), 64)
    assert match in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_good_records_with_integral_floats_and_inner_dots(tmp_path):
    """1.0 is the label 1 (some exporters write floats); images/../images/x stays inside: both
    accepted."""
    root = bench(tmp_path / "ub", [rec(0, 0.0), rec(1, 1.0), rec(2, 0), rec(3, 1)],
                 [rec(4, 0, image="images/../images/img_4.png"), rec(5, 1)])
    data, classes = D.probe_data(U.ProbeConfig(data=str(root), cache=str(tmp_path / "c")), 64)
    assert classes == ["0", "1"] and data["test"].labels.tolist() == [0, 1]
    assert sorted(data["train"].labels.tolist() + data["val"].labels.tolist()) == [0, 0, 1, 1]


def test_json_that_is_a_fifo_or_a_folder(tmp_path):
    root = bench(tmp_path / "ub", TRAIN, TEST)
    (root / "test.json").unlink()
    os.mkfifo(root / "test.json")
    p = U.ProbeConfig(data=str(root), cache=str(tmp_path / "c"))
    with pytest.raises(D.UserError, match=r"test.json: not a regular file \(a FIFO\)"):
        D.probe_data(p, 64)
    (root / "test.json").unlink()
    (root / "test.json").mkdir()
    with pytest.raises(D.UserError, match=r"test.json: not a regular file \(a folder\)"):
        D.probe_data(p, 64)


def folder(root, splits=("train", "test"), classes=("a", "b"), n=3):
    for split in splits:
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                scan(root / split / name / f"{split}_{c}_{i}.png", seed=hash((split, c, i)) % 1000)
    return root


def image_folder_case(kind, root):
    """Build one ImageFolder case below root -> what the one line says."""
    if kind == "test class train lacks":
        folder(root)
        folder(root, ("test",), ("c",))
        return "test/c: a class folder that"
    if kind == "val class train lacks":
        folder(root, ("train", "val", "test"))
        folder(root, ("val",), ("zz",))
        return "val/zz: a class folder that"
    if kind == "image outside the class folders":
        folder(root)
        scan(root / "test" / "loose.png")
        return "test/loose.png: an image outside the class folders"
    if kind == "same file in train and test":
        folder(root)
        os.symlink(root / "train" / "a" / "train_0_0.png", root / "test" / "a" / "linked.png")
        return "a test image the probe would also train on"
    if kind == "same file in two classes":
        folder(root)
        os.link(root / "train" / "a" / "train_0_0.png", root / "train" / "b" / "hard.png")
        return "one image, two labels"
    folder(root)  # a hostile image in the test split
    path, reason = hostile(kind, root / "test" / "b")
    return f"cannot use probe image {path}: {reason}"


FOLDER_CASES = ["test class train lacks", "val class train lacks",
                "image outside the class folders", "same file in train and test",
                "same file in two classes", "40000x16 png", "png bomb header", "jpeg bomb header",
                "float tiff NaN", "FIFO .png", "FIFO .dcm", "dcm declaring 5M frames",
                "link to /dev/zero"]


@pytest.mark.parametrize("cache", ["c", "off"])
@pytest.mark.parametrize("case", FOLDER_CASES)
def test_bad_image_folders_are_one_line(case, cache, tmp_path):
    match = image_folder_case(case, tmp_path / "f")
    if cache == "off":  # read directly: the reader's own line
        match = match.replace("cannot use probe image ", "")
    cache = str(tmp_path / "c") if cache == "c" else "off"
    with pytest.raises(D.UserError) as e:
        D.probe_data(U.ProbeConfig(data=str(tmp_path / "f"), cache=cache), 64)
    assert match in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_class_folders_with_odd_names(tmp_path):
    root = folder(tmp_path / "f", classes=("benign [2]", "malignant*"))
    os.symlink(root / "train" / "benign [2]", root / "train" / "benign [2]" / "loop")
    data, classes = D.probe_data(U.ProbeConfig(data=str(root), cache=str(tmp_path / "c")), 64)
    assert classes == ["benign [2]", "malignant*"] and len(data["test"]) == 6
    assert len(data["train"]) + len(data["val"]) == 6


# ------------------------------------------------------------------------------------------------
# The command line: exit code 2, exactly one line on stderr, no traceback, no hang.

def cli(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", US_JEPA_CACHE=str(tmp_path / "cache"))
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "us_jepa.py"), *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_the_command_line_says_one_line(tmp_path):
    """Five runs at once (each starts Python and torch): every one exits 2 with one line on stderr
    and no traceback."""
    runs = {}
    for k, case in enumerate(["12000^2 png", "FIFO .png", "dcm declaring 5M frames"]):
        d = tmp_path / f"d{k}"  # only the hostile file: 1 of 1 unusable, the run stops
        d.mkdir()
        _, reason = hostile(case, d)
        argv = ["teacher", "--data", str(d), "--out", str(tmp_path / f"o{k}")]
        runs[case] = cli(argv, tmp_path), reason
    ub = bench(tmp_path / "ub", TRAIN, [rec(4, "1")])
    argv = ["probe", "--encoder", "pixels", "--data", str(ub)]
    runs["string label"] = cli(argv, tmp_path), "is not an integer"
    match = image_folder_case("png bomb header", tmp_path / "f")
    match = match.replace("cannot use probe image ", "")  # --cache off: the reader's own line
    argv = ["probe", "--encoder", "pixels", "--data", str(tmp_path / "f"), "--cache", "off"]
    runs["bomb, --cache off"] = cli(argv, tmp_path), match
    for case, (proc, match) in runs.items():
        out, err = proc.communicate(timeout=HANG_S - 5)
        assert proc.returncode == 2, (case, err[-2000:])
        assert len(err.strip().splitlines()) == 1, (case, err)
        assert "Traceback" not in err and match in err, (case, err)


# ------------------------------------------------------------------------------------------------
# The memory bound. A build process holds one frame at a time, and check_size refuses from the
# header any frame whose padded square exceeds MAX_SIDE^2: a hostile file costs nothing, and the
# largest accepted frame bounds the process.

PEAK = """import resource, sys
sys.path.insert(0, {root!r})
from types import SimpleNamespace
import us_data as D
def peak_mb():  # VmHWM: getrusage's maxrss keeps the parent's over exec; children: build processes
    hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return max(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
for data in sys.argv[1:]:
    d = SimpleNamespace(data=data, cache={cache!r}, img_size=96, every=1, max_bad=0.9, n_images=0)
    n = len(D.Images(d, 0))
    print("peak", n, round(peak_mb()), flush=True)
"""
HOSTILE_MB = 400  # a build over hostile files: Python, torch and numpy (~250 MB), nothing more
BOUND_MB = 1200  # with the largest accepted frame (MAX_SIDE^2 = 4096^2): ~0.85 GB measured


def test_peak_memory_of_a_build_stays_bounded(tmp_path):
    hostile_dir, largest = tmp_path / "hostile", tmp_path / "largest"
    good(hostile_dir, 1)
    for case in ("40000x16 png", "16x40000 png", "12000^2 png", "jpeg bomb header",
                 "png bomb header", "dcm declaring 5M frames", "dcm 60000 rows"):
        hostile(case, hostile_dir)
    largest.mkdir()
    y, x = np.ogrid[:D.MAX_SIDE, :D.MAX_SIDE]
    sector = (x - 2048) ** 2 + (y - 600) ** 2 < 3000 ** 2
    frame = ((x * 7 + y * 3) % 200 + 40) * sector  # a textured sector, so the fan mask works
    Image.fromarray(frame.astype(np.uint8)).save(largest / "max.png", compress_level=1)
    del frame, sector
    code = PEAK.format(root=ROOT, cache=str(tmp_path / "c"))
    r = subprocess.run([sys.executable, "-c", code, str(hostile_dir), str(largest)],
                       capture_output=True, text=True, timeout=HANG_S - 5,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    (_, n1, mb1), (_, n2, mb2) = [x.split() for x in r.stdout.splitlines() if x.startswith("peak")]
    print(f"peak RSS: hostile files {mb1} MB, with a {D.MAX_SIDE}^2 frame {mb2} MB")
    assert n1 == "1" and n2 == "1"
    assert int(mb1) < HOSTILE_MB and int(mb2) < BOUND_MB, (mb1, mb2)


def test_threads_keep_the_bomb_warning_quiet(tmp_path):
    """The loader decodes in 8 threads; Pillow's decompression-bomb warning is silenced around each
    header read. Interleaved catch_warnings windows (a process-wide filter list) once let it through
    as a second stderr line in CI: many threads reading oversized headers at once must warn nothing."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor
    png(tmp_path / "big.png", 12000, 12000)

    def read(_):
        with pytest.raises(D.UserError, match="larger than"):
            D.decode(str(tmp_path / "big.png"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(read, range(400)))
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
