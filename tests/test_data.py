"""Data: real-image preprocessing (fan mask, grayscale, 16-bit, RGBA), augmentation, and the synthetic tasks."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import us_data as D
import us_jepa as U


def fan_image(h=120, w=160, seed=0):
    """A sector-shaped speckle image with a dark cyst inside and burnt-in text-like specks outside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    r, th = np.hypot(yy + 20, xx - w / 2), np.arctan2(xx - w / 2, yy + 20)
    fan = (r > 25) & (r < h + 10) & (np.abs(th) < 0.6)
    a = rng.rayleigh(0.3, (h, w)) * fan
    a[(yy - 70) ** 2 + (xx - w / 2) ** 2 < 12 ** 2] = 0  # anechoic cyst: dark but inside the fan
    a[2:5, 2:6] = 1.0  # a small burnt-in label: not the largest component
    return np.clip(a, 0, 1).astype(np.float32), fan


def test_fan_mask_finds_the_sector_and_fills_dark_regions():
    a, fan = fan_image()
    m = D.fan_mask(a)
    assert m.shape == a.shape and m.dtype == bool
    assert not m[2:5, 2:6].any()  # the label is not tissue
    assert m[70, 80]  # the cyst is inside the fan
    iou = (m & fan).sum() / (m | fan).sum()
    assert iou > 0.9, iou


def test_fan_mask_is_the_convex_hull_of_the_largest_component():
    """UltraBench's rule: an L-shaped region becomes the triangle-closed hull; a separate blob is dropped."""
    a = np.zeros((64, 64), np.float32)
    a[8:56, 8:20] = a[44:56, 8:56] = 0.8  # an L: vertical bar + bottom bar
    a[2:6, 50:60] = 0.9  # burnt-in text, not connected
    m = D.fan_mask(a)
    assert m[30, 30] and m[50, 50] and not m[20, 50]  # inside the hull (the L's corner side), outside it
    assert not m[3, 55]
    a = np.zeros((64, 64), np.float32)
    a[40:, 10:50], a[:3, 20:30] = 0.8, 0.9  # a fan reaching the bottom edge, text touching the top edge
    m = D.fan_mask(a)
    assert m[50, 30] and not m[1, 25] and not m[20, 30]  # opposite edges are not neighbours


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16"])
def test_load_image_modes(tmp_path, mode):
    a, fan = fan_image(128, 128)
    if mode == "I;16":
        im = Image.fromarray((a * 65535).astype(np.uint16))
    else:
        im = Image.fromarray((a * 255).astype(np.uint8)).convert(mode)
    im.save(tmp_path / "x.png")
    img, m = D.load_image(str(tmp_path / "x.png"), 128)
    assert img.shape == m.shape == (1, 128, 128) and img.dtype == torch.float32 and m.dtype == torch.bool
    assert img.min() >= 0 and img.max() <= 1 and (img[~m] == 0).all()
    inside = img[m]
    assert 0.015 < (inside > 0.999).float().mean() < 0.05  # 2nd-98th percentile rescale: ~2 % saturate


def test_load_image_pads_to_square(tmp_path):
    a, _ = fan_image(120, 160)
    Image.fromarray((a * 255).astype(np.uint8)).save(tmp_path / "x.png")
    img, m = D.load_image(str(tmp_path / "x.png"), 64)
    assert img.shape == (1, 64, 64) and (img[~m] == 0).all()
    assert m[0, 40, 32] and not m[0, 3, 32] and not m[0, 60, 32]  # 20 rows of padding above and below


def test_load_image_with_mask_file(tmp_path):
    a, fan = fan_image()
    Image.fromarray((a * 255).astype(np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(fan.astype(np.uint8)).save(tmp_path / "m.png")  # UltraBench stores masks as 0/1
    _, m = D.load_image(str(tmp_path / "x.png"), 64, str(tmp_path / "m.png"))
    ref = torch.nn.functional.interpolate(torch.from_numpy(np.pad(fan, ((20, 20), (0, 0))))[None, None].float(),
                                          size=(64, 64), mode="area")[0] > 0.5
    assert (m == ref).float().mean() > 0.97


def test_augment_keeps_range_and_zero_outside_fan():
    x, fan, _ = D.synth_batch(range(8), 64, 0, "lesion")
    g = torch.Generator().manual_seed(0)
    y, f = U.augment(x, fan, g, (0.6, 1.0))
    assert y.shape == x.shape and f.shape == fan.shape and f.dtype == torch.bool
    assert y.min() >= 0 and y.max() <= 1 and (y[~f] == 0).all()
    y2, _ = U.augment(x, fan, torch.Generator().manual_seed(0), (0.6, 1.0))
    assert torch.equal(y, y2)  # seeded by the step: resume-exact
    assert not torch.equal(y, U.augment(x, fan, torch.Generator().manual_seed(1), (0.6, 1.0))[0])


def test_synthetic_is_deterministic_per_index():
    a = D.synth_batch([5, 7, 9], 64, 3, "lesion3")
    b = D.synth_batch([9, 1, 5], 64, 3, "lesion3")
    assert torch.equal(a[0][0], b[0][2]) and torch.equal(a[0][2], b[0][0]) and torch.equal(a[1][0], b[1][2])
    assert a[2].tolist() == [2, 1, 0] and b[2].tolist() == [0, 1, 2]  # balanced: label = index mod classes
    assert not torch.equal(a[0][0], D.synth_batch([5], 64, 4, "lesion3")[0][0])  # another seed, another image
    img, fan, _ = a
    assert img.dtype == torch.float32 and fan.dtype == torch.bool and img.min() >= 0 and img.max() <= 1
    assert (img[~fan] == 0).all() and 0.3 < fan.float().mean() < 1.0


def test_speckle_envelope_is_rayleigh():
    """Fully developed speckle: the envelope of a complex Gaussian field has mean/std = sqrt(pi / (4 - pi))
    and E[A^2] / E[A]^2 = 4 / pi, whatever the PSF."""
    g = torch.Generator().manual_seed(0)
    env, img = D.bmode(torch.ones(4, 128, 128), torch.randn(4, 2, 128, 128, generator=g), 0.8, 1.2)
    a = env[:, 10:-10, 10:-10]  # away from the convolution's zero padding
    assert abs(a.mean() / a.std() / math.sqrt(math.pi / (4 - math.pi)) - 1) < 0.05
    assert abs((a ** 2).mean() / a.mean() ** 2 / (4 / math.pi) - 1) < 0.03
    assert img.shape == env.shape and img.min() >= 0 and img.max() <= 1


@pytest.mark.parametrize("task", ["lesion", "lesion3"])
def test_trivial_features_stay_near_chance(task):
    """The label is in the lesion's shape and texture, not in brightness, size, position or probe geometry:
    a linear probe on an intensity histogram + 16x16 pixels must stay within chance + 0.15 (macro-F1)."""
    p = U.ProbeConfig(task=task, n_train=900, n_val=300, n_test=600, epochs=60, patience=10)
    data, classes = D.probe_data(p, 96)
    feats = {s: U.features(v, U.pixel_features) for s, v in data.items()}
    labels = {s: v.labels for s, v in data.items()}
    f1 = np.mean([U.fit_probe(feats, labels, len(classes), seed, p)["macro_f1"] for seed in range(2)])
    assert f1 <= 1 / len(classes) + 0.15, f1
