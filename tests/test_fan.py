"""fan_mask: the vectorised labelling and hull against the old per-pixel implementation, and the rule that keeps
burnt-in text, scale bars and tick marks out of the fan (synthetic sectors with PIL text at several sizes; the
real GE frame is checked in test_dicom.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import us_data as D


def old_fan_mask(a, colour=None):
    """fan_mask as of a6079d3 (per-pixel min-label propagation with np.roll), kept here only to compare against."""
    c = np.zeros_like(a) if colour is None else colour.astype(a.dtype)
    s = max(1, max(a.shape) // 64)
    small = F.max_pool2d(torch.from_numpy(np.stack([a, c]))[None], s, s, ceil_mode=True)[0]
    m = np.pad(((small[0] > 0.02) & (small[1] == 0)).numpy(), 1)
    lab = np.where(m, np.arange(m.size).reshape(m.shape) + 1, 0)
    for _ in range(m.size):
        nb = np.stack([lab, np.roll(lab, 1, 0), np.roll(lab, -1, 0), np.roll(lab, 1, 1), np.roll(lab, -1, 1)])
        new = np.where(m, np.where(nb > 0, nb, m.size + 1).min(0), 0)
        if (new == lab).all():
            break
        lab = new
    if not m.any():
        return np.ones_like(a, dtype=bool)
    m = (lab == np.bincount(lab[m]).argmax())[1:-1, 1:-1]
    ang = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    u, rc = np.stack([np.cos(ang), np.sin(ang)]), np.indices(m.shape).reshape(2, -1).T
    m = (rc @ u <= (rc[m.ravel()] @ u).max(0) + 1e-6).all(1).reshape(m.shape)
    return np.repeat(np.repeat(m, s, 0), s, 1)[: a.shape[0], : a.shape[1]]


def iou(x, y):
    return (x & y).sum() / max((x | y).sum(), 1)


def blobs(rng, h, w):
    """Random bright blobs (smoothed noise above a random level) on black, some speckle, some colour specks."""
    g = rng.random((h // 4 + 2, w // 4 + 2)).astype(np.float32)
    g = torch.nn.functional.interpolate(torch.from_numpy(g)[None, None], size=(h, w), mode="bilinear")[0, 0]
    a = np.where(g.numpy() > rng.uniform(0.3, 0.7), rng.random((h, w)), 0).astype(np.float32)
    colour = rng.random((h, w)) < rng.choice([0, 0.001])
    return a, colour


def test_plain_rule_equals_the_old_implementation():
    """thin=0 (no text rule): the same masks as the per-pixel implementation, bit for bit: random blobs (odd sizes,
    ties between equal components, colour walls), synthetic images and the pydicom ultrasound frames."""
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(60):
        h, w = rng.integers(8, 400, 2)
        cases.append(blobs(rng, int(h), int(w)))
    tie = np.zeros((40, 40), np.float32)
    tie[5:10, 5:10] = tie[20:25, 30:35] = 1  # two equal squares: the first in row-major order wins
    cases += [(tie, None), (np.zeros((30, 50), np.float32), None)]
    for size in (64, 96, 224):
        imgs, _, _ = D.synth_batch(range(12), size)
        cases += [(x[0].numpy() / max(float(x.max()), 1e-6), None) for x in imgs]
    pydicom = pytest.importorskip("pydicom")
    for name in ("ybr_color", "rgb_color", "jpeg2k", "palette_color"):
        g, c = D.read_dicom(str(pydicom.examples.get_path(name)))
        cases += [(g / g.max(), c), (g / g.max(), None)]
    for a, c in cases:
        assert np.array_equal(D.fan_mask(a, c, thin=0), old_fan_mask(a, c)), a.shape


def test_text_rule_changes_little_without_text():
    """On synthetic scans without annotations the text rule only trims, by up to a grid cell, acute corners of the
    fan and bright lines a few px thick along its edge (a skin line over a dark layer)."""
    for size, worst in ((96, 0.96), (224, 0.985)):
        imgs, _, _ = D.synth_batch(range(48), size)
        scores = []
        for x in imgs:
            a = x[0].numpy() / max(float(x.max()), 1e-6)
            m, m0 = D.fan_mask(a), D.fan_mask(a, thin=0)
            assert not (m & ~m0).any()  # it never adds
            scores.append(iou(m, m0))
        assert min(scores) > worst and np.median(scores) > 0.995, (size, min(scores), np.median(scores))


def stamp_text(a, fan, text, size, level):
    """Draws text (PIL's default font at size) at the first rows with room left of the fan, shifted right until it
    touches the fan's left edge. -> the image with the text (max with the scan) and the text's pixels."""
    font = ImageFont.load_default(size=size)
    x0, y0, x1, y1 = font.getbbox(text)
    left = np.where(fan.any(1), fan.argmax(1), a.shape[1])  # the fan's first column per row
    win = [left[r: r + y1] for r in range(a.shape[0] - y1)]  # the rows the text would cover, from each row
    fits = [w.max() < a.shape[1] and w.min() > x1 + 2 for w in win]  # all meet the fan, with room left of it
    r0 = fits.index(True)
    im = Image.new("L", (a.shape[1], a.shape[0]))
    ImageDraw.Draw(im).text((0, r0), text, fill=255, font=font)
    t = np.asarray(im, np.float32) / 255 * level
    rows = np.flatnonzero(t.any(1))
    right = a.shape[1] - 1 - (t[rows, ::-1] > 0).argmax(1)  # the text's last column per row
    t = np.roll(t, int((left[rows] - right).min()), 1)  # its last pixel lands on the fan's first
    return np.maximum(a, t), t > D.FAN_LEVEL


def stamp_ticks(a, fan, level, every=8, width=2):
    """A vertical scale bar near the right border with ticks (1 px) that reach the fan's right edge."""
    h, w = a.shape
    out, mark = a.copy(), np.zeros(a.shape, bool)
    right = np.where(fan.any(1), w - 1 - fan[:, ::-1].argmax(1), -1)
    rows = np.flatnonzero((right >= 0) & (right < w - width - 6))
    mark[rows[0]: rows[-1], w - width - 2: w - 2] = True
    for r in rows[::every]:
        mark[r, right[r]: w - 2] = True
    out[mark] = np.maximum(out[mark], level)
    return out, mark & ~fan


def sectors(size, n):
    """Sector scans of synth_batch (normalised to max 1) and their true fans."""
    imgs, fans, _ = D.synth_batch(range(4 * n), size)
    rows = fans[:, 0].sum(2)  # (B, size) fan width per row: a sector widens with depth, a linear scan does not
    keep = [i for i in range(len(imgs)) if rows[i, rows[i] > 0][0] < 0.8 * rows[i, -1]][:n]
    return [(imgs[i, 0].numpy() / float(imgs[i].max()), fans[i, 0].numpy()) for i in keep]


def frames_640x480(n):
    """Sector scans rendered at 420 px inside a 640 x 480 frame (margins for annotations, as on a scanner)."""
    return [(np.pad(a, ((30, 30), (110, 110))), np.pad(f, ((30, 30), (110, 110)))) for a, f in sectors(420, n)]


@pytest.mark.parametrize("frames,sizes", [(lambda: sectors(224, 3), (8, 11, 14)),
                                          (lambda: frames_640x480(2), (12, 16, 24, 32))])
def test_text_and_ticks_touching_the_fan_stay_out(frames, sizes):
    """Text (white and gray) touching the fan's left edge and a scale bar whose ticks touch its right edge: the
    mask stays that of the clean scan (IoU >= 0.97 with it and with the true fan as the clean mask was), and
    < 3 % of the annotation's pixels fall in it beyond the grid cells the clean mask already covers. The plain rule
    takes them in."""
    for a, fan in frames():
        clean = D.fan_mask(a)
        for size in sizes:
            for level in (1.0, 0.6):
                x, text = stamp_text(a, fan, "MI 1.1", size, level)
                x, ticks = stamp_ticks(x, fan, level)
                notes = text | ticks
                m = D.fan_mask(x)
                assert iou(m, clean) >= 0.97, (a.shape, size, level, iou(m, clean))
                assert iou(m, fan) >= iou(clean, fan) - 0.01
                assert (notes & m & ~clean).sum() < 0.03 * notes.sum(), (a.shape, size, level)
                plain = D.fan_mask(x, thin=0)
                assert (notes & plain & ~clean).sum() > 0.1 * notes.sum()
