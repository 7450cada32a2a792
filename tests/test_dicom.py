"""DICOM input, tested on the real ultrasound files that pydicom ships: a 30-frame SonoSite echo cine (JPEG,
YBR_FULL_422), one GE frame twice (RGB, and JPEG 2000 YBR_RCT at twice the size) and a Philips frame (PALETTE
COLOR). All four carry burnt-in annotations; the coordinates below were read off PNGs of frame + mask."""
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import us_data as D
import us_jepa as U

# pydicom.examples name -> (file, frames, photometric interpretation, manufacturer)
US = {"ybr_color": ("examples_ybr_color.dcm", 30, "YBR_FULL_422", "SonoSite"),
      "rgb_color": ("examples_rgb_color.dcm", 1, "RGB", "G.E. Medical Systems"),
      "jpeg2k": ("examples_jpeg2k.dcm", 1, "YBR_RCT", "G.E. Medical Systems"),
      "palette_color": ("examples_palette.dcm", 1, "PALETTE COLOR", "Philips Medical Systems")}


@pytest.fixture
def pydicom():
    return pytest.importorskip("pydicom")


@pytest.fixture
def us_dir(pydicom, tmp_path):
    """The four ultrasound examples copied into a folder, the cine one level down (any depth works)."""
    (tmp_path / "dcm" / "echo").mkdir(parents=True)
    for name, (file, n, _, _) in US.items():
        shutil.copy(pydicom.examples.get_path(name), tmp_path / "dcm" / ("echo" if n > 1 else "") / file)
    return tmp_path / "dcm"


def masks(path, frame=None):
    """Gray frame, its colour pixels, its fan mask, and the plain rule's (no colour, no text rule)."""
    g, c = D.read_dicom(str(path), frame)
    return g, c, D.fan_mask(g / g.max(), c), D.fan_mask(g / g.max(), thin=0)


def test_pydicom_ships_these_ultrasound_examples(pydicom):
    for name, (file, n, photometric, maker) in US.items():
        ds = pydicom.dcmread(pydicom.examples.get_path(name), stop_before_pixels=True)
        assert ds.Modality == "US" and "Ultrasound" in ds.SOPClassUID.name and ds.Manufacturer.startswith(maker)
        assert int(ds.get("NumberOfFrames") or 1) == n and ds.PhotometricInterpretation == photometric


def test_find_images_lists_frames_from_the_header(us_dir):
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(us_dir / "b.png")  # ordinary images mix in
    cine = str(us_dir / "echo" / "examples_ybr_color.dcm")
    items = D.find_images(str(us_dir))
    assert len(items) == 30 + 3 + 1 and items == sorted(items, key=lambda x: (x[0], x[1] or 0))
    assert [i for p, i in items if p == cine] == list(range(30))
    assert all(i is None for p, i in items if p != cine)
    assert [i for p, i in D.find_images(str(us_dir), 5) if p == cine] == [0, 5, 10, 15, 20, 25]
    assert len(D.find_images(str(us_dir), 5)) == 6 + 3 + 1 and len(D.find_images(str(us_dir), 7)) == 5 + 3 + 1


def test_colour_to_gray(pydicom, us_dir):
    """Gray = BT.601 luma: exactly for RGB, = the stored Y for YBR_FULL_422, and the JPEG 2000 (YBR_RCT) copy of the
    GE frame gives the RGB copy's gray after 2x2 averaging. The frame index is honoured."""
    from pydicom.pixels import pixel_array
    rgb = pixel_array(str(us_dir / "examples_rgb_color.dcm"))
    g, c = D.read_dicom(str(us_dir / "examples_rgb_color.dcm"))
    assert g.shape == (240, 320) and g.dtype == np.float32
    assert np.allclose(g, rgb @ np.array([0.299, 0.587, 0.114]), atol=1e-3)
    assert (c == (rgb.max(2).astype(int) - rgb.min(2) > 25.5)).all() and 0.03 < c.mean() < 0.1  # the Doppler
    g2, c2 = D.read_dicom(str(us_dir / "examples_jpeg2k.dcm"))
    assert g2.shape == (480, 640) and np.median(np.abs(g2.reshape(240, 2, 320, 2).mean((1, 3)) - g)) < 0.5
    cine = str(us_dir / "echo" / "examples_ybr_color.dcm")
    for k in (0, 17):
        g, c = D.read_dicom(cine, k)
        y = lambda i: pixel_array(cine, index=i, raw=True)[..., 0]  # noqa: E731  the stored Y channel
        assert np.abs(g - y(k)).mean() < 0.1 and np.abs(g - y(k + 5)).mean() > 1
    g, c = D.read_dicom(str(us_dir / "examples_palette.dcm"))
    assert g.shape == (350, 800) and c[:60].mean() > 0.8 and not c[60:170, 340:590].any()  # blue header, gray fan


def test_fan_masks_on_the_real_frames(us_dir):
    # SonoSite echo: a sector of 20-40 % of the frame; the text, icons and the bottom toolbar stay out; the green
    # orientation dot at the apex is at most partly covered (the hull), never joined as without the colour rule.
    for k in (0, 10, 20, 29):
        g, c, m, m0 = masks(us_dir / "echo" / "examples_ybr_color.dcm", k)
        assert 0.2 < m.mean() < 0.4 and not m[:35, :45].any() and not m[:, 285:].any() and not m[225:].any()
        dot = c & (np.arange(320) >= 150) & (np.arange(240) < 40)[:, None]
        assert dot.sum() > 20 and m[dot].sum() <= dot.sum() // 2 and m0[dot].all()
    # Philips: the dark-blue header band (with white text) would join the fan without the colour rule
    g, c, m, m0 = masks(us_dir / "examples_palette.dcm")
    assert m[110, 460] and not m[:60].any() and not m[:, :300].any() and 0.05 < m.mean() < 0.15
    assert m0[:60].any() and m0.mean() > 3 * m.mean()
    # GE: colour Doppler inside the fan counts as fan; the annotations below the fan stay out.
    g, c, m, m0 = masks(us_dir / "examples_rgb_color.dcm")
    assert c[60:170, 40:280].sum() > 3000 and m[60:170, 40:280][c[60:170, 40:280]].all() and not m[175:].any()
    # The scan is rows 54-169, columns 7-311. The white header text (rows 4-51) ends 3 px above it and joined it
    # under the plain rule; the text rule drops it: the mask starts at the 5-px grid cell of row 54 (row 50). The
    # gray bars (columns 4-8 and 312-316, rows 76-108) beside the colour bars and the tick marks (columns 0-3)
    # are thinner than the 8-px square: out, but for the grid cells they share with the scan (columns 5-314).
    assert m0[:50].any() and m0[:, :5].any() and m[55:165, 10:305].all()
    assert not m[:50].any() and not m[:, :5].any() and not m[:, 315:].any()
    text = (g[:52] > 0.02 * g.max()) & ~c[:52]
    assert text.sum() > 2000 and (m[:52] & text).sum() < 0.05 * text.sum()
    g2, c2, m2, _ = masks(us_dir / "examples_jpeg2k.dcm")  # the same frame at 640 x 480: the same, doubled
    assert not m2[:100].any() and not m2[:, :10].any() and not m2[:, 630:].any() and m2[110:330, 20:610].all()
    assert m2[120:340, 80:560][c2[120:340, 80:560]].all()
    # load_image applies the same rule: at 800 px the Philips frame is only padded (225 rows above and below)
    img, fan = D.load_image(str(us_dir / "examples_palette.dcm"), 800)
    g, c, m, m0 = masks(us_dir / "examples_palette.dcm")
    assert torch.equal(fan[0, 225:575], torch.from_numpy(m)) and not fan[0, :225].any()


def test_monochrome1_and_multiframe_gray(pydicom, tmp_path):
    """A 2-frame 8-bit cine written as MONOCHROME2 and as MONOCHROME1 (inverted values) loads like the PNGs."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UltrasoundMultiFrameImageStorage, generate_uid
    frames = np.stack([(D.read_dicom(pydicom.examples.get_path("ybr_color"), k)[0]).round().astype(np.uint8)
                       for k in (0, 15)])  # (2, 240, 320)
    for name, pi, data in (("m2.dcm", "MONOCHROME2", frames), ("m1.dcm", "MONOCHROME1", 255 - frames)):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.SOPClassUID, ds.SOPInstanceUID = UltrasoundMultiFrameImageStorage, generate_uid()
        ds.set_pixel_data(data, pi, 8)
        ds.save_as(tmp_path / name, enforce_file_format=True)
    Image.fromarray(frames[1]).save(tmp_path / "f1.png")
    assert D.find_images(str(tmp_path)) == [(str(tmp_path / "f1.png"), None)] + [
        (str(tmp_path / n), i) for n in ("m1.dcm", "m2.dcm") for i in (0, 1)]
    ref = D.load_image(str(tmp_path / "f1.png"), 96)
    for name in ("m1.dcm", "m2.dcm"):
        img, fan = D.load_image(str(tmp_path / name), 96, frame=1)
        assert torch.equal(img, ref[0]) and torch.equal(fan, ref[1])
        assert not torch.equal(D.load_image(str(tmp_path / name), 96, frame=0)[0], img)


def test_pretrain_a_few_steps_on_dicom(us_dir, tmp_path, monkeypatch):
    U.main(["teacher", "--data", str(us_dir), "--every", "5", "--batch_size", "4", "--steps", "2", "--depth", "1",
            "--pred_depth", "1", "--holdout", "0", "--out", str(tmp_path / "t")])
    images = D.Images(U.parse_config("teacher", ["--data", str(us_dir), "--every", "5"])["data"], 0)
    imgs, fans = images[range(len(images))]
    assert imgs.shape == fans.shape == (6 + 3, 1, 96, 96)  # every 5th of 30 cine frames + 3 single frames
    share = fans.float().mean((1, 2, 3))
    assert ((share > 0.02) & (share < 0.8)).all(), share  # a fan, not nothing and not the whole square
    ck = U.load_checkpoint(str(tmp_path / "t" / "last.pt"))
    assert ck["step"] == 2 and ck["config"]["data"]["every"] == 5


def test_probe_imagefolder_with_a_cine(us_dir, tmp_path):
    root = tmp_path / "folder"
    for split in ("train", "test"):
        for cls, files in (("a", ["echo/examples_ybr_color.dcm"]), ("b", ["examples_rgb_color.dcm",
                                                                           "examples_palette.dcm"])):
            (root / split / cls).mkdir(parents=True)
            for f in files: shutil.copy(us_dir / f, root / split / cls)
    data, classes = D.probe_data(U.ProbeConfig(data=str(root)), 64)
    assert classes == ["a", "b"] and len(data["test"]) == 32 and data["test"].labels.tolist().count(0) == 30
    assert len(data["train"]) + len(data["val"]) == 32 and next(data["test"].batches())[1].shape == (32, 1, 64, 64)


def test_without_pydicom_one_clear_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "scan.dcm").write_bytes(b"\0" * 132)
    (tmp_path / "p").mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "p" / "a.png")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # `import pydicom` now raises ImportError
    assert D.find_images(str(tmp_path / "p")) == [(str(tmp_path / "p" / "a.png"), None)]  # PNGs need no pydicom
    with pytest.raises(SystemExit) as e:
        U.main(["teacher", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.endswith('scan.dcm: reading DICOM needs pydicom>=3: pip install "pydicom>=3" '
                        '(or pip install -e ".[dicom]")'), err


def test_bad_dicom_files_one_line(us_dir, tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.dcm").write_bytes(b"not a dicom file" * 20)
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "t.dcm").write_bytes((us_dir / "examples_rgb_color.dcm").read_bytes()[:100000])
    # A header that does not parse and pixels cut short are both found by the one decode (counted, reason said).
    for d, match in (("junk", "x.dcm (cannot read DICOM"), ("cut", "1 of 1 image files are unreadable")):
        with pytest.raises(SystemExit) as e:
            U.main(["teacher", "--data", str(tmp_path / d), "--out", str(tmp_path / ("o" + d))])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and match in err, err
