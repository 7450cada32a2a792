"""Where US-JEPA's images come from: everything before the method sees a pixel. us_jepa.py imports this
file; this file never imports us_jepa.py.

  synth_batch     built-in synthetic B-mode ultrasound (speckle, PSF, attenuation, scan conversion; lesions, liver)
  fan_mask        which pixels of a real frame are ultrasound (the scan fan), when no mask file is given
  read_dicom      one frame of a DICOM file (cines frame by frame), colour -> gray, burnt-in colour marked
  load_image      one file or frame -> the model's square grayscale image and its fan mask
  find_images     the (path, frame) items below a folder
  Images          the pretraining images by index (synthetic or files)
  probe_data      the labelled splits of a probe task (built-in, ImageFolder or UltraBench)
"""
import hashlib, json, math, os, stat, threading, time, warnings

import numpy as np
import torch
import torch.nn.functional as F


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback. One line even when
    a file's name holds a newline or a terminal escape: those are shown escaped (\\n, \\x1b)."""
    def __str__(self):
        text = super().__str__()
        if text.startswith("Caught UserError in DataLoader worker") and "UserError: " in text:
            # torch re-raises a worker's UserError with the worker's traceback as its text (20
            # lines): the worker's own line is the traceback's last
            text = text.rstrip().rsplit("UserError: ", 1)[1]
        return one_line(text)


def one_line(text):
    """text with every unprintable character (newline, tab, escape) written as its Python escape."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# ----------------------------------------------------------------------------------------------------
# Built-in synthetic B-mode ultrasound. Nothing can be downloaded at run time, so the demo
# simulates its own images: speckle from random scatterers, a probe's PSF, attenuation, log compression
# and scan conversion (one scanner for every task), with lesions whose shape (not brightness, size or
# position) carries the label (lesion, lesion3), or a liver beside a kidney whose echogenicity relative to the
# kidney cortex, texture and attenuation carry it (liver: normal or fatty; no level is absolute).

TASKS = {"lesion": ["benign", "malignant"], "lesion3": ["normal", "benign", "malignant"], "liver": ["normal", "fatty"]}
STREAM = {"liver": [1]}  # appended to the (seed, classes, index) seed: liver's images are not lesion's streams
LIVER = {  # the liver task's label-dependent draws: liver minus kidney cortex level (dB, hepatorenal index),
    #        liver attenuation (dB/cm/MHz), texture correlation (samples) and amplitude (dB)
    "normal": dict(hri=(-2, 2), alpha=(.45, .6), corr=(1.6, 2.4), amp=(3, 4.5)),
    "fatty": dict(hri=(5, 10), alpha=(.55, .7), corr=(.4, .8), amp=(3, 4.5))}
NA = 256  # angular samples of a mass outline R(phi)
SHAPES = {  # aspect w/h, tilt (rad), lobulation, spicules (n_min, n_max, length), margin width, internal texture (dB)
    "benign": ((1.4, 2.4), (-0.2, 0.2), (0.0, 0.03), (0, 0, 0.0), (0.003, 0.008), (0, 1)),  # oval, circumscribed, wide
    "malignant": ((0.45, 0.8), (-0.3, 0.3), (0.08, 0.2), (8, 14, 1.0), (0.003, 0.008), (3, 6)),  # spiculated, tall
    "normal": ((1.0, 2.2), (0.0, math.pi), (0.0, 0.05), (0, 0, 0.0), (0.03, 0.06), (0, 2))}  # fat lobule: soft, any tilt


def _outline(rng, kind):
    """Radius table R(phi), phi = atan2(dz, dx), of a star-shaped mass, and its margin width. Area is class-free."""
    (a0, a1), (t0, t1), (l0, l1), (n0, n1, ls), (e0, e1), _ = SHAPES[kind]
    phi = np.linspace(-np.pi, np.pi, NA, endpoint=False)
    asp, a, edge = rng.uniform(a0, a1), phi - rng.uniform(t0, t1), rng.uniform(e0, e1)
    g = 1 / np.sqrt(np.cos(a) ** 2 / asp + np.sin(a) ** 2 * asp)  # ellipse, semi-axes sqrt(asp) and 1/sqrt(asp)
    k = np.arange(2, 7)[:, None]  # lobulation: random low harmonics of the radius
    lob = rng.uniform(l0, l1) * rng.standard_normal((5, 1)) * 2 / k * np.cos(k * phi + rng.uniform(0, 7, (5, 1)))
    g = g * (1 + lob.sum(0))
    n = rng.integers(n0, n1 + 1)  # spicules: tapering spikes (triangular in angle) radiating from the margin
    dphi = np.abs(np.angle(np.exp(1j * (phi - rng.uniform(-np.pi, np.pi, (n, 1))))))  # (n, NA)
    g = g + (rng.uniform(0.4, 1, (n, 1)) * ls * np.clip(1 - dphi / rng.uniform(0.12, 0.3, (n, 1)), 0, None)).sum(0)
    # Same area distribution for every class: pi r_eq^2 = 1/2 int R^2 dphi + (soft-margin excess pi^3/3 edge^2).
    r_eq = rng.uniform(0.32, 0.48)
    return g / np.sqrt((g ** 2).mean()) * np.sqrt(r_eq ** 2 - np.pi ** 2 / 3 * edge ** 2), edge


def _probe(rng):
    """Probe geometry: sector (apex distance r0: phased ~0, curvilinear ~1; half-angle tm) or linear
    (half-aperture w)."""
    return dict(sector=float(rng.random() < 0.5), r0=rng.uniform(0.02, 1.0), tm=rng.uniform(0.45, 0.75),
                w=rng.uniform(0.75, 1.0))


def _system(rng, f, D):
    """The scanner's settings and the body's attenuation: frequency range f (MHz), depth range D (cm)."""
    return dict(f=rng.uniform(*f), D=rng.uniform(*D), al=rng.uniform(.4, .7),  # MHz, depth cm, dB/cm/MHz
                aerr=rng.uniform(-.2, .2), tgc=rng.uniform(-2, 2, 3),  # TGC: relative alpha error, slider wiggles (dB)
                sa=rng.uniform(.5, 1.1), sl=rng.uniform(.6, 1.4),  # PSF sigmas: axial (samples), lateral (beams)
                dr=rng.uniform(40, 65), top=rng.uniform(12, 24),  # dynamic range, gain (dB)
                gam=rng.uniform(1, 1.6))  # gray map


def _draw(rng, kind):
    """All random parameters of one lesion image (display units; dB for echo levels)."""
    p = _probe(rng)
    p["R"], p["edge"] = _outline(rng, kind)  # the only label-dependent draws: outline and internal echo texture
    p["het"] = rng.standard_normal((8, 8)) * rng.uniform(*SHAPES[kind][5])  # heterogeneous (malignant) or not
    u, p["cz"] = rng.uniform(-0.45, 0.45), rng.uniform(0.5, 1.35)  # mass centre: beam coordinate u, depth z
    ctr = (p["cz"] + p["r0"] * np.cos(p["tm"])) * np.tan(u * p["tm"]) if p["sector"] else u * p["w"]
    p["cx"] = np.clip(ctr, -0.6, 0.6)
    con = [rng.uniform(-24, -12), rng.uniform(-11, -7), rng.uniform(7, 13)]  # mass contrast (dB): hypo, mild, hyper
    p["con"] = rng.choice(con, p=[0.45, 0.25, 0.3])
    p["post"] = rng.choice([rng.uniform(-14, -5), 0.0, rng.uniform(3, 9)])  # posterior shadow / none / enhancement (dB)
    p.update(lb=np.sort(rng.uniform([.03, .2, .8, 1.5], [.09, .55, 1.5, 2.3])), la=rng.uniform(0, [.03, .08, .12, .12]),
             lf=rng.uniform(1, 5, 4), lp=rng.uniform(0, 7, 4), lq=rng.uniform(0, 7, 4), spec=rng.uniform(0, 8, 4),
             lv=rng.uniform([-2, -18, -6, -16, -10], [4, -8, 2, -4, 0]))  # 4 boundaries; skin fat gland muscle deep
    p["tex"] = rng.standard_normal((6, 6)) * rng.uniform(1, 4)  # low-frequency tissue texture (dB)
    p.update(ccx=rng.uniform(-.7, .7, 2), ccz=rng.uniform(.3, 1.8, 2), ce=rng.uniform(1, 3, 2),  # 0-2 cysts / vessels
             cr=np.where(rng.random(2) < 0.4, rng.uniform(0.03, 0.08, 2), -1.0))
    p.update(_system(rng, f=(2.5, 7), D=(3, 8)))
    return p


def bmode(echo, noise=None, sig_ax=1.0, sig_lat=1.0, dr_db=50.0, top_db=0.0, gamma=1.0):
    """Echo (B, Z, X): mean backscattered intensity (linear) on the beam grid -> (envelope, image in [0, 1]), both
    (B, Z, X). noise (B, 2, Z, X): standard normals (real, imag) for reproducibility; PSF sigmas in samples / beams."""
    B, Z, X = echo.shape
    noise = torch.randn(B, 2, Z, X) if noise is None else noise
    s = noise * torch.sqrt(echo / 2)[:, None]  # (B, 2, Z, X) complex Gaussian scatterers, E|s|^2 = echogenicity
    k, per_img = torch.arange(-5, 6.0), lambda v: torch.as_tensor(v, dtype=torch.float32).reshape(-1, 1).expand(B, 1)
    # Separable PSF: Gaussian pulse envelope (axial) x Gaussian beam profile (lateral), unit energy. We work at
    # baseband (IQ): for circular Gaussian scatterers the carrier does not change the envelope statistics.
    ka, kl = [torch.exp(-0.5 * (k / per_img(sg)) ** 2) for sg in (sig_ax, sig_lat)]  # (B, 11)
    ka, kl = [(kk / kk.norm(dim=1, keepdim=True)).repeat_interleave(2, 0) for kk in (ka, kl)]  # (2B, 11)
    s = F.conv2d(s.reshape(1, 2 * B, Z, X), ka.view(2 * B, 1, 11, 1), padding=(5, 0), groups=2 * B)  # axial
    s = F.conv2d(s, kl.view(2 * B, 1, 1, 11), padding=(0, 5), groups=2 * B).view(B, 2, Z, X)  # lateral
    env = torch.hypot(s[:, 0], s[:, 1])  # (B, Z, X) envelope |I + iQ|: Rayleigh in homogeneous tissue
    top, dr, gam = [per_img(v).view(B, 1, 1) for v in (top_db, dr_db, gamma)]
    img = (1 + (20 * torch.log10(env + 1e-6) - top) / dr).clamp(0, 1) ** gam  # log compression, gain, gray map
    return env, img


def synth_labels(indices, task):
    """The class of each synthetic image: index modulo the number of classes (balanced classes)."""
    return [int(i) % len(TASKS[task]) for i in indices]


def _draw_liver(rng, kind):
    """All random parameters of one liver image (display units: the image is 2 deep, 2 wide; dB for echo levels).
    Only the first four draws depend on the label. Levels are relative to the kidney cortex's (kc); the gain is
    set later on the organs' mean, so no level is absolute."""
    c = LIVER[kind]
    p = dict(hri=rng.uniform(*c["hri"]), alv=rng.uniform(*c["alpha"]), corr=rng.uniform(*c["corr"]),
             amp=rng.uniform(*c["amp"]))
    p.update(_probe(rng))
    # Abdominal wall: skin, subcutaneous fat, muscle; the third boundary is the peritoneum / liver capsule.
    p.update(lb=np.sort(rng.uniform([.02, .07, .16], [.05, .2, .4])), la=rng.uniform(0, [.02, .04, .06]),
             lf=rng.uniform(1, 5, 3), lp=rng.uniform(0, 7, 3), lq=rng.uniform(0, 7, 3),
             spec=rng.uniform([2, 0, 4], [8, 6, 12]), lv=rng.uniform([-2, -16, -10, 0], [4, -8, -2, 0]))
    p["tex"] = rng.standard_normal((6, 6)) * rng.uniform(1, 3)  # low-frequency shading (dB): the wall's
    p["otex"] = rng.standard_normal((6, 6)) * rng.uniform(1, 3)  # and the organs'
    # Kidney: an ellipse (centre anywhere, even partly out of view, so that no part of the image is more often
    # kidney than another; semi-axes, tilt), cortex ring, medullary pyramids, a lobulated bright sinus. Radius and
    # pyramid tables over NA angles, as the lesion outline.
    ka, phi = rng.uniform(.4, .75), np.linspace(-np.pi, np.pi, NA, endpoint=False)
    p.update(kx=rng.uniform(-1.1, 1.1), kz=rng.uniform(.35, 2), ka=ka, kb=ka * rng.uniform(.4, .6),
             kt=rng.uniform(-.5, .5), kc=rng.uniform(-3, 3), kcor=rng.uniform(.7, .8))
    lob = rng.standard_normal((3, 1)) * .07 * np.cos(np.arange(2, 5)[:, None] * phi + rng.uniform(0, 7, (3, 1)))
    p.update(krs=rng.uniform(.35, .48) * (1 + lob.sum(0)),  # sinus radius R(phi), in units of the capsule's
             kpy=1 / (1 + np.exp(-4 * np.cos(rng.integers(5, 9) * phi + rng.uniform(0, 7)))),  # pyramids vs columns
             ksl=rng.uniform(7, 13), kml=rng.uniform(-12, -6), kcap=rng.uniform(4, 10))  # sinus, medulla, fat (dB)
    # Vessels: up to 4 straight anechoic tubes (hepatic / portal veins) with echogenic walls; some absent.
    p.update(vx=rng.uniform(-.8, .8, 4), vz=rng.uniform(.4, 1.7, 4), va=rng.uniform(0, np.pi, 4),
             vl=rng.uniform(0, .3, 4), vr=np.where(rng.random(4) < .75, rng.uniform(.025, .07, 4), -1.0),
             vw=rng.uniform(4, 10))
    # Diaphragm: a bright curved line deep in the image (or below it), dim lung reverberation beyond it.
    p.update(dz=rng.uniform(1.55, 2.5), dx=rng.uniform(-1, 1), dc=rng.uniform(.1, .4), dsp=rng.uniform(10, 16),
             lung=rng.uniform(-14, -6))
    # The TGC turned up by a fraction kap of the liver's extra attenuation; receiver noise snr dB below the liver
    # at the bottom of the image had the liver the body's attenuation.
    p.update(kap=rng.uniform(.6, 1), snr=rng.uniform(5, 20))
    p.update(_system(rng, f=(2, 5), D=(12, 18)))  # abdominal probe: 2-5 MHz, 12-18 cm deep
    return p


def _smooth(noise, sigma):
    """White noise (B, 1, Z, X) smoothed by a separable Gaussian of per-image sigma (B,) samples, unit variance."""
    B, _, Z, X = noise.shape
    k = torch.exp(-0.5 * (torch.arange(-7, 8.0) / sigma.view(B, 1)) ** 2)  # (B, 15)
    k = k / k.norm(dim=1, keepdim=True)
    g = F.conv2d(noise.view(1, B, Z, X), k.view(B, 1, 15, 1), padding=(7, 0), groups=B)
    return F.conv2d(g, k.view(B, 1, 1, 15), padding=(0, 7), groups=B).view(B, 1, Z, X)


def _liver(P, x, z, t, db, d, tnoise):
    """The liver task's scene below the abdominal wall db (B, 1, Z, X) (d: depth below its boundaries): liver
    parenchyma, kidney, vessels, diaphragm; attenuation, receiver noise, gain. -> db, regions (B, 2, Z, X): the
    liver's and the kidney cortex's soft masks."""
    B, Z = x.shape[0], x.shape[2]
    org = torch.sigmoid(d[:, -1:] / .01)  # below the liver capsule
    o = P["kc"] + P["hri"] + P["amp"] * _smooth(tnoise, P["corr"].view(-1))  # parenchyma: level and texture
    # Diaphragm and lung.
    dd = z - P["dz"] - P["dc"] * (x - P["dx"]) ** 2
    below = torch.sigmoid(dd / .01)
    o = o + below * (P["kc"] + P["lung"] - o)
    o = o + torch.exp(-(dd / .015) ** 2) * (P["kc"] + P["dsp"] - o)
    # Kidney: elliptic radius rho (1 at the capsule), angle phi around its centre.
    ct, st = torch.cos(P["kt"]), torch.sin(P["kt"])
    ex, ez = ((x - P["kx"]) * ct + (z - P["kz"]) * st) / P["ka"], ((z - P["kz"]) * ct - (x - P["kx"]) * st) / P["kb"]
    rho = torch.hypot(ex, ez)
    idx = ((torch.atan2(ez, ex) + math.pi) * (NA / (2 * math.pi))).long().clamp(max=NA - 1).view(B, -1)
    rs, pyr = (torch.gather(P[k].view(B, NA), 1, idx).view_as(rho) for k in ("krs", "kpy"))
    kin = torch.sigmoid((1 - rho) / .03)
    pyr = pyr * torch.sigmoid((rho - rs) / .04) * torch.sigmoid((P["kcor"] - rho) / .03)  # medulla
    kid = P["kc"] + torch.sigmoid((rs - rho) / .04) * P["ksl"] + pyr * P["kml"]
    o = o + torch.exp(-((rho - 1.06) / .05) ** 2) * (P["kc"] + P["kcap"] - o)  # perirenal fat: a bright rim
    o = o + kin * (kid - o)
    cortex = org * kin * torch.sigmoid((rho - P["kcor"]) / .03)  # the reference tissue (hepatorenal index)
    # Vessels: signed distance to the nearest tube (< 0 inside), on a beam grid of half the samples (a distance
    # field is smooth: bilinear upsampling keeps it; the cost is in the 4 tubes); fluid inside, echogenic wall.
    _, xh, zh = _beams(P, (Z + 1) // 2, (x.shape[3] + 1) // 2)
    ca, sa = torch.cos(P["va"]), torch.sin(P["va"])  # (B, 4, 1, 1) tube directions
    u = xh * ca + zh * sa - (P["vx"] * ca + P["vz"] * sa)  # (B, 4, Z/2, X/2) along the tube, from its centre
    v = zh * ca - xh * sa - (P["vz"] * ca - P["vx"] * sa)  # across it
    dist = (torch.hypot(u - torch.clamp(u, -P["vl"], P["vl"]), v) - P["vr"]).amin(1, keepdim=True)
    dist = F.interpolate(dist, size=x.shape[2:], mode="bilinear", align_corners=True)  # (B, 1, Z, X)
    inliver = (1 - kin) * (1 - below)
    fluid = torch.sigmoid(-dist / .006) * inliver
    wall = torch.exp(-(dist / .012) ** 2) * inliver
    o = o + wall * (P["kc"] + P["vw"] - o)
    o = o + fluid * (P["kc"] - 40 - o)
    # Levels relative to the organs: the mean of the liver and kidney tissue is -8 dB, and the wall's levels
    # are drawn relative to it; low-frequency shading on top.
    tissue = org * (1 - fluid) * (1 - below)
    mean = lambda v: (v * tissue).sum((2, 3), keepdim=True) / tissue.sum((2, 3), keepdim=True).clamp(min=1)
    xz = torch.cat([x, z - 1], 1).permute(0, 2, 3, 1)  # (B, Z, X, 2) positions in grid_sample's [-1, 1] units
    o = o - mean(o) - 8 + F.grid_sample(P["otex"].view(B, 1, 6, 6), xz, mode="bicubic", align_corners=True)
    db = db + org * (o - db)
    # Attenuation beyond the body's alpha al (which _scan's TGC compensates, up to its error): the liver's own
    # alpha (the label's), and a third of al in fluid (posterior enhancement); accumulated along each beam, round
    # trip. The operator turns the TGC up by a fraction kap of the liver's excess, the same at a depth on every beam.
    liver = org * inliver * (1 - fluid)
    fD = 2 * P["f"] * P["D"]  # round-trip dB per dB/cm/MHz over the whole depth
    tgc = P["kap"] * (P["alv"] - P["al"]) * fD * t
    db = db - torch.cumsum((liver * (P["alv"] - P["al"]) - org * fluid * P["al"] / 3) * (fD / (Z - 1)), 2) + tgc
    # Receiver noise, amplified by the whole TGC: snr dB below the liver at the image's bottom had the liver the
    # body's attenuation. Where it attenuates more, the far field, deep vessels and the diaphragm sink into it.
    noise = -8 - P["snr"] + P["al"] * fD * (t - 1) + tgc
    db = torch.logaddexp(db * (math.log(10) / 10), noise * (math.log(10) / 10)) * (10 / math.log(10))
    # Auto gain: the displayed organs' mean level is -8 dB again (the random gain `top` follows, in _scan).
    return db - mean(db) - 8, torch.cat([liver, cortex], 1)


def _beams(P, Z, X):
    """Beam grid -> physical position. Sector: beams fan out from an apex r0*cos(tm) above the image top;
    linear: parallel vertical beams. A beam is 2 display units long in both cases (= D cm).
    -> t (1, 1, Z, 1) fraction of the imaging depth along a beam; x, z (B, 1, Z, X) lateral, depth."""
    t = torch.linspace(0, 1, Z).view(1, 1, Z, 1)  # fraction of the imaging depth along a beam
    s = torch.linspace(-1, 1, X).view(1, 1, 1, X)  # beam index in [-1, 1]
    sec, r0, tm = P["sector"] > 0, P["r0"], P["tm"]
    r, th = r0 + 2 * t, s * tm  # (B, 1, Z, X) range from the apex, beam angle
    x = torch.where(sec, r * torch.sin(th), P["w"] * s)  # (B, 1, Z, X)
    z = torch.where(sec, r * torch.cos(th) - r0 * torch.cos(tm), 2 * t)  # (B, 1, Z, X)
    return t, x, z


def _layers(P, x, z):
    """Tissue layers: wavy boundaries, smooth steps of echogenicity and a bright specular (fascia) line on each, plus a
    smooth low-frequency texture. -> db (B, 1, Z, X) and d (B, K, Z, X) signed depth below each of the K boundaries."""
    B = x.shape[0]
    d = z - P["lb"] - P["la"] * (torch.sin(P["lf"] * x + P["lp"]) + 0.5 * torch.sin(2.7 * P["lf"] * x + P["lq"]))
    lv = P["lv"]  # d: (B, K, Z, X) signed depth below each boundary; lv: (B, K + 1, 1, 1) layer levels (dB)
    db = lv[:, :1] + ((lv[:, 1:] - lv[:, :-1]) * torch.sigmoid(d / .01) + P["spec"] * torch.exp(-(d / .012) ** 2)).sum(
        1, keepdim=True)  # (B, 1, Z, X)
    xz = torch.cat([x, z - 1], 1).permute(0, 2, 3, 1)  # (B, Z, X, 2) positions in grid_sample's [-1, 1] units
    db = db + F.grid_sample(P["tex"].view(B, 1, 6, 6), xz, mode="bicubic", align_corners=True)  # smooth texture
    return db, d


def _lesion(P, x, z, db, Z):
    """The lesion tasks' scene on top of the layers db (B, 1, Z, X): a mass, 0-2 cysts, their posterior effects."""
    B = x.shape[0]
    # The mass (or pseudo-mass): soft membership from its outline; it replaces the tissue it displaces by a uniform
    # level = that tissue's mean + contrast, so the contrast does not depend on which layer it sits in.
    dx, dz = x - P["cx"], z - P["cz"]
    idx = ((torch.atan2(dz, dx) + math.pi) * (NA / (2 * math.pi))).long().clamp(max=NA - 1)  # (B, 1, Z, X)
    R = torch.gather(P["R"].view(B, NA), 1, idx.view(B, -1)).view_as(dx)  # (B, 1, Z, X) outline radius there
    m = torch.sigmoid((R - torch.sqrt(dx ** 2 + dz ** 2)) / P["edge"])  # (B, 1, Z, X) 1 inside the mass
    lvl = (db * m).sum((2, 3), keepdim=True) / m.sum((2, 3), keepdim=True).clamp(min=1)  # (B, 1, 1, 1)
    het = F.grid_sample(P["het"].view(B, 1, 8, 8), torch.cat([2 * dx, dz], 1).permute(0, 2, 3, 1), mode="bicubic",
                        align_corners=True)  # (B, 1, Z, X) internal echo texture, over a 1 x 2 box around the mass
    db = db + m * (lvl + P["con"] + het - db)
    # Small anechoic cysts / vessel cross-sections (distractors): elliptic, fluid-filled.
    mc = torch.sigmoid((P["cr"] - torch.sqrt(((x - P["ccx"]) / P["ce"]) ** 2 + (z - P["ccz"]) ** 2)) / .006)
    mc = mc.sum(1, keepdim=True)  # (B, 1, Z, X)
    db = db + mc.clamp(max=1) * (-35 - db)
    # Attenuation accumulates along each beam: a mass that attenuates more (shadow) or less (enhancement) than tissue
    # changes everything behind it. Normalised by the mass's longest path: posterior dB independent of its height.
    # Fluid barely attenuates: cysts enhance by 40 dB per display unit of path.
    thick = m.sum(2, keepdim=True).amax(3, keepdim=True).clamp(min=1)  # (B, 1, 1, 1) samples
    return db + torch.cumsum(m * P["post"] / thick + mc * 40 * 2 / Z, dim=2), m  # (B, 1, Z, X) each


def _scan(P, db, t, noise, size):
    """The scanner, shared by every task: residual attenuation after TGC, speckle + PSF + log compression (bmode),
    scan conversion. db (B, 1, Z, X) echo level on the beam grid -> imgs (B, 1, size, size) in [0, 1], fan (bool)."""
    # Tissue attenuation (round trip 2 alpha f depth dB) minus time-gain compensation set for a slightly wrong alpha,
    # plus TGC slider wiggles: a residual, random depth-dependent brightness.
    kk = torch.arange(1, 4.0).view(1, 3, 1, 1)
    db = db - 2 * P["al"] * P["aerr"] * P["f"] * P["D"] * t + (P["tgc"] * torch.cos(math.pi * kk * t)).sum(1, True)
    env, img = bmode(10 ** (db[:, 0] / 10), noise, P["sa"].view(-1), P["sl"].view(-1),
                     P["dr"].view(-1), P["top"].view(-1), P["gam"].view(-1))  # (B, Z, X)
    return _convert(P, img[:, None], size)


def _convert(P, beams, size):
    """Scan conversion: every display pixel looks up its (beam, depth) coordinate; bilinear interpolation.
    beams (B, C, Z, X) on the beam grid -> (B, C, size, size) zero outside the fan, fan (B, 1, size, size) bool."""
    B = beams.shape[0]
    zd, xd = torch.meshgrid(torch.linspace(0, 2, size), torch.linspace(-1, 1, size), indexing="ij")  # (size, size)
    sec, r0, tm, w = (P["sector"] > 0).view(B, 1, 1), P["r0"].view(B, 1, 1), P["tm"].view(B, 1, 1), P["w"].view(B, 1, 1)
    za = zd + r0 * torch.cos(tm)  # (B, size, size) depth below the virtual apex
    u = torch.where(sec, torch.atan2(xd, za) / tm, xd / w)  # (B, size, size) beam coordinate
    v = torch.where(sec, torch.sqrt(xd ** 2 + za ** 2) - r0 - 1, zd - 1)  # (B, size, size) depth
    fan = ((u.abs() <= 1) & (v.abs() <= 1))[:, None]  # (B, 1, size, size) inside the field of view
    return F.grid_sample(beams, torch.stack([u, v], -1), align_corners=True) * fan, fan


def synth_batch(indices, size=96, seed=0, task="lesion", parts=False):
    """Returns imgs float32 (B, 1, size, size) in [0, 1], fan bool (B, 1, size, size) (valid ultrasound pixels),
    labels int64 (B,). Deterministic per (seed, task, index): the same index gives the same image whatever batch.
    parts=True adds a 4th: {name: (B, 1, size, size) soft membership} of the scene's regions (lesion: mass;
    liver: liver, cortex). task "a+b+..." (a mixed pool, e.g. "lesion3+liver"; not a probe task): image i is image i
    of the (i mod k)-th of the k tasks, with that task's label."""
    if "+" in task:
        tasks, indices = task.split("+"), [int(i) for i in indices]
        out = [torch.zeros(len(indices), 1, size, size), torch.zeros(len(indices), 1, size, size, dtype=torch.bool),
               torch.zeros(len(indices), dtype=torch.int64)]
        for j, sub in enumerate(tasks):
            rows = [r for r, i in enumerate(indices) if i % len(tasks) == j]
            if rows:
                for o, v in zip(out, synth_batch([indices[r] for r in rows], size, seed, sub)):
                    o[rows] = v
        return tuple(out)
    names, Z, X, liver = TASKS[task], size, size, task == "liver"
    ps, noise, labels = [], [], []
    for i in indices:  # per-image parameters and speckle from a generator seeded by (seed, task, index)
        rng = np.random.default_rng([seed, len(names), int(i), *STREAM.get(task, [])])
        labels.append(synth_labels([i], task)[0])
        ps.append((_draw_liver if liver else _draw)(rng, names[labels[-1]]))
        noise.append(torch.from_numpy(rng.standard_normal((2 + liver, Z, X), dtype=np.float32)))  # speckle (+ texture)
    B, noise = len(ps), torch.stack(noise)
    P = {k: torch.tensor(np.array([p[k] for p in ps]), dtype=torch.float32).view(B, -1, 1, 1) for k in ps[0]}
    t, x, z = _beams(P, Z, X)
    db, d = _layers(P, x, z)
    if liver:
        db, regions = _liver(P, x, z, t, db, d, noise[:, 2:])
    else:
        db, regions = _lesion(P, x, z, db, Z)
    imgs, fan = _scan(P, db, t, noise[:, :2], size)
    labels = torch.tensor(labels, dtype=torch.int64)
    if not parts:
        return imgs, fan, labels
    regions = _convert(P, regions, size)[0]
    return imgs, fan, labels, {n: regions[:, i:i + 1] for i, n in enumerate(["liver", "cortex"] if liver else ["mass"])}


# ----------------------------------------------------------------------------------------------------
# Real images: files and DICOM frames, the fan mask, preprocessing, and the pretraining images by index.

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
# What one file may cost, checked from its header before a pixel is decoded (ours). A frame is
# zero-padded to a square before the resize, so it costs the square of its longer side however thin
# it is: a 40000 x 16 PNG (0.6 Mpx) asked for 40000^2 floats. Real frames are ~0.5-2k px on a side.
MAX_SIDE = 4096  # px on the longer side: a 4K screen capture (3840 x 2160) fits. A 4096^2 frame
#                  peaks at ~0.85 GB in a build process (measured, tests/test_hostile_data.py)
MIN_SIDE = 8  # px on the shorter side: below it there is no image to speak of
MAX_ASPECT = 8  # longer / shorter side: panoramic (extended field of view) frames reach ~4:1; past
#                 8:1 the image fills under 1/8 of the padded square (< a 16-px patch at 96 px)
MAX_FRAMES = 10_000  # frames one DICOM may declare: 100 s of cine at 100 frames/s. The listing
#                      holds one item per frame: a header declaring millions would hang it
COLOUR = 0.1  # a pixel is burnt-in colour if max(R,G,B) - min(R,G,B) > 10 % of full scale (ours; see read_dicom)
# fan_mask's levels, fractions of the frame's maximum (ours: UltraBench states none).
FAN_LEVEL = 0.02  # above it a pixel may be ultrasound
TEXT_LEVEL = 0.25  # above it a thin structure counts as burnt-in text, a caliper or a bar
_ANGLES = np.linspace(0, 2 * np.pi, 180, endpoint=False)  # the hull's directions, 2 degrees apart
_COS, _SIN = np.cos(_ANGLES), np.sin(_ANGLES)


def _runs(x, k, axis, op):
    """op (np.logical_and / np.logical_or) over every run of k consecutive values along axis:
    length n - k + 1. By doubling: ~log2(k) whole-array operations, not k."""
    x = np.moveaxis(x, axis, 0)
    w = 1
    while 2 * w <= k:
        x = op(x[:-w], x[w:])
        w *= 2
    if w < k:  # two overlapping runs of w cover the k
        x = op(x[: len(x) - (k - w)], x[k - w:])
    return np.moveaxis(x, 0, axis)


def _opening(t, k):
    """Pixels of t (H, W) bool covered by a k x k square that lies wholly in t and in the image (a
    morphological opening): strokes, lines and dots narrower than k vanish; whatever holds such a
    square keeps its exact outline."""
    full = _runs(_runs(t, k, 0, np.logical_and), k, 1, np.logical_and)  # square at (i, j) all in t
    full = np.pad(full, k - 1)  # a pixel is covered by squares starting up to k - 1 before it
    return _runs(_runs(full, k, 0, np.logical_or), k, 1, np.logical_or)


def _dilate(x, r):
    """x (H, W) bool grown by r px in all 8 directions (a (2r+1)-square)."""
    k = 2 * r + 1
    return _runs(_runs(np.pad(x, r), k, 0, np.logical_or), k, 1, np.logical_or)


def _any_cells(t, s):
    """(H, W) bool -> (ceil(H/s), ceil(W/s)): does the s x s cell hold any True. Max pooling with
    partial cells at the bottom and right, as F.max_pool2d(ceil_mode=True)."""
    h, w = -(-t.shape[0] // s), -(-t.shape[1] // s)
    t = np.pad(t, ((0, h * s - t.shape[0]), (0, w * s - t.shape[1])))
    return t.reshape(h, s, w * s).any(1).reshape(h, w, s).any(2)


def _largest_component(m):
    """The largest 4-connected component of m (h, w) bool; ties: the one that starts first in
    row-major order. Union-find with pointer jumping, vectorised: each round hooks every root to the
    smallest root it touches through an edge, then flattens the trees. Rounds grow like the log of
    a component's size, not with its diameter (a per-pixel label sweep needs a diameter of them)."""
    idx = np.arange(m.size).reshape(m.shape)
    right, down = m[:, :-1] & m[:, 1:], m[:-1] & m[1:]  # edges between foreground neighbours
    a = np.concatenate([idx[:, :-1][right], idx[:-1][down]])
    b = np.concatenate([idx[:, 1:][right], idx[1:][down]])
    parent = np.arange(m.size)
    while True:
        pa, pb = parent[a], parent[b]  # roots: the trees are flat after every round
        cross = pa != pb
        if not cross.any():
            break
        lo, hi = np.minimum(pa[cross], pb[cross]), np.maximum(pa[cross], pb[cross])
        np.minimum.at(parent, hi, lo)  # roots only ever point to smaller indices: no cycles
        while True:  # pointer jumping until every pixel points at its root
            up = parent[parent]
            if (up == parent).all():
                break
            parent = up
    root = parent.reshape(m.shape)  # the smallest flat index of each component
    return m & (root == np.bincount(root[m]).argmax())


def _hull(m):
    """Convex hull of m (h, w) bool as the intersection of 180 half-planes r cos + c sin <= its max
    over m, one per direction (they overshoot the exact hull by < 2e-4 of its size, well under a
    cell). Solved row by row: a row of the hull is the interval of columns that meets every
    half-plane, and only a row's first and last pixel of m can attain a maximum."""
    h, w = m.shape
    rows = np.flatnonzero(m.any(1))
    first, last = m[rows].argmax(1), w - 1 - m[rows, ::-1].argmax(1)
    r = np.concatenate([rows, rows]).astype(np.float64)[:, None]
    c = np.concatenate([first, last]).astype(np.float64)[:, None]
    top = (r * _COS + c * _SIN).max(0) + 1e-6  # (180,)
    room = top - np.arange(h, dtype=np.float64)[:, None] * _COS  # (h, 180): need c sin <= room
    with np.errstate(divide="ignore"):
        bound = room / _SIN  # angle 0 (sin = 0) bounds rows (room >= 0), not columns
    lo = np.where(_SIN < 0, bound, -np.inf).max(1, keepdims=True)
    hi = np.where(_SIN > 0, bound, np.inf).min(1, keepdims=True)
    cols = np.arange(w)
    return (room[:, _SIN == 0] >= 0).all(1, keepdims=True) & (cols >= lo) & (cols <= hi)


def fan_mask(a, colour=None, thin=None):
    """Valid-ultrasound pixels of a gray image (H, W) in [0, 1], when no mask file is given. Not
    stated in the paper; as UltraBench: threshold, keep the largest connected component
    (4-neighbours), fill its convex hull. colour (H, W) bool: burnt-in colour pixels; grid cells
    holding any join no component (ours, below). thin (px): bright structures that hold no
    thin x thin square (text, calipers, scale bars, ticks) are dropped before labelling (ours,
    below); None: sized from the image; 0: off, the plain rule."""
    s = max(1, max(a.shape) // 64)  # label on a <= 64 px grid: cheap, enough for a fan outline
    t = a > FAN_LEVEL
    if colour is not None:
        t &= ~colour
    # Text, calipers, scale bars and ticks that touch the fan would join it, and the hull would wrap
    # them. They are thin and bright, while speckle is solid at FAN_LEVEL: a bright pixel that no
    # thin x thin square of above-level pixels covers is an annotation, dropped with its 1-px
    # anti-aliasing fringe. Dim sparse speckle (faint tissue at the fan's edge) holds no square
    # either but is not bright: it stays. At full resolution, since on the <= 64 px grid a line of
    # text is a solid block. thin = a grid cell + 3 px (ours): the smallest that removes the GE
    # example's header at 320 x 240 (blurred 2-px strokes); 13 px at 640 x 480, 6 at 224.
    thin = s + 3 if thin is None else thin
    if thin > 1:
        t &= ~_dilate((a > TEXT_LEVEL) & ~_opening(t, thin), 1)
    m = _any_cells(t, s)
    # Colour cells are walls, not just dark: a thin coloured band (Philips' blue header) then keeps
    # its white text apart from the fan. Colour Doppler inside the fan still counts as fan: it
    # leaves holes the hull fills.
    if colour is not None:
        m &= ~_any_cells(colour, s)
    if not m.any():
        return np.ones_like(a, dtype=bool)
    m = _hull(_largest_component(m))
    return np.repeat(np.repeat(m, s, 0), s, 1)[: a.shape[0], : a.shape[1]]


def need_pydicom(path):
    """pydicom, imported; without it one line says how to install it (it is optional: for .dcm files only)."""
    try:
        import pydicom
        import pydicom.pixels  # 3.x decodes one frame of a cine, not all of it
    except ImportError:
        raise UserError(f'{path}: reading DICOM needs pydicom>=3: pip install "pydicom>=3" '
                        '(or pip install -e ".[dicom]")') from None
    return pydicom


def read_dicom(path, frame=None, count=False):
    """count=True: frames in the file from its header alone (NumberOfFrames, absent = 1; 0: no
    image, e.g. a report). Else one frame (None: the first) -> gray (H, W) float32 and colour (H, W)
    bool (None for 1-sample data). Either way the header is read and checked first (dicom_frames):
    no file is decoded past the caps."""
    pydicom = need_pydicom(path)
    regular_file(path)
    try:
        hdr = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as e:
        raise UserError(f"cannot read DICOM {path}: {' '.join(str(e).split())}") from None
    n = dicom_frames(path, hdr)
    if count:
        return n
    if n == 0:
        raise UserError(f"{path}: a DICOM without an image (no Rows)")
    ds = pydicom.Dataset()  # receives the header's image pixel elements (group 0028), palettes included
    try:  # YBR_FULL(_422) arrives as RGB
        a = pydicom.pixels.pixel_array(path, ds_out=ds, index=frame or 0)
    except Exception as e:
        why = " ".join(str(e).split())
        raise UserError(f"cannot read DICOM {path}{_syntax(hdr)}: {why}") from None
    if ds.PhotometricInterpretation == "PALETTE COLOR": a = pydicom.pixels.apply_color_lut(a, ds)  # -> (H, W, 3)
    if ds.PhotometricInterpretation == "MONOCHROME1": a = (1 << ds.BitsStored) - 1 - a  # 0 = white there: invert
    if a.ndim == 2: return a.astype(np.float32), None  # no Modality/VOI LUT: the percentile rescale follows
    # Burnt-in colour: text boxes, logos, colour bars, markers, Doppler. COLOUR = 10 % lies between the chroma noise of
    # gray tissue (SonoSite's 4:2:2 JPEG cine: max - min < 3.5 % for 99.9 % of fan pixels) and the faintest overlay
    # touching a fan here (Philips' dark-blue header, 15-20 %). Gray = BT.601 luma, as Pillow's "L" and YBR_FULL's Y.
    if not np.issubdtype(a.dtype, np.integer):  # COLOUR needs a full scale
        raise UserError(f"{path}: colour pixels of type {a.dtype}")
    return a @ np.float32([0.299, 0.587, 0.114]), np.ptp(a, axis=2) > COLOUR * np.iinfo(a.dtype).max


def dicom_frames(path, hdr):
    """Frames a DICOM header declares (0: no image), checked against the caps and the file's size
    before anything is listed or decoded: a 5 KB file that declares a million frames is refused."""
    if "Rows" not in hdr:
        return 0
    try:
        n = hdr.get("NumberOfFrames")
        n = 1 if n is None or n == "" else int(n)  # absent: one frame; 0 declares none
        rows, cols, bits = int(hdr.Rows), int(hdr.Columns), int(hdr.get("BitsAllocated") or 8)
    except Exception as e:  # a value that is not a number
        why = " ".join(str(e).split())[:120]
        raise UserError(f"{path}: unreadable DICOM image header ({why})") from None
    if not 1 <= n <= MAX_FRAMES:
        raise UserError(f"{path}: declares {n} frames (at most {MAX_FRAMES}, MAX_FRAMES)")
    check_size(path, rows, cols)
    # The pixels must fit in the file: uncompressed, every pixel holds at least one sample of
    # BitsAllocated bits; compressed, every frame is at least one 8-byte item. Deflated: no bound.
    uid = getattr(getattr(hdr, "file_meta", None), "TransferSyntaxUID", None)
    size = os.path.getsize(path)
    if uid is None or not (uid.is_encapsulated or uid.is_deflated):
        need, what = n * rows * cols * max(bits, 1) // 8, f"{n} frames of {cols} x {rows} px"
    elif uid.is_encapsulated:
        need, what = 8 * n, f"{n} compressed frames"
    else:
        need, what = 0, ""
    if need > size:
        raise UserError(f"{path}: declares {what} (>= {need} bytes) in a file of {size} bytes")
    return n


def _syntax(hdr):
    """' (transfer syntax NAME UID)' of a file whose pixels did not decode, for the error line:
    which decoder is missing (pip install -e ".[dicom]" adds pylibjpeg's JPEG Lossless, JPEG-LS
    and JPEG 2000)."""
    uid = getattr(getattr(hdr, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None:
        return ""
    if uid.name != str(uid):
        return f" (transfer syntax {uid.name} {uid})"
    return f" (transfer syntax {uid})"


FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
              (stat.S_ISSOCK, "a socket"))


def regular_file(path):
    """Refuse what is not a regular file, from its stat alone: opening a FIFO waits for a writer
    forever, a device may never end or act when opened. UserError naming the kind, or stat's
    reason."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise UserError(f"cannot read image {path}: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(mode):
        kind = next((k for test, k in FILE_KINDS if test(mode)), "not a file")
        raise UserError(f"{path}: not a regular file ({kind})")


def check_size(path, h, w):
    """Refuse a frame by the size its header declares, before decoding (MAX_SIDE, MIN_SIDE,
    MAX_ASPECT)."""
    if max(h, w) > MAX_SIDE:
        raise UserError(f"{path}: {w} x {h} px, larger than {MAX_SIDE} px on a side (MAX_SIDE)")
    if min(h, w) < MIN_SIDE:
        raise UserError(f"{path}: image too small ({w} x {h} px; at least {MIN_SIDE})")
    if max(h, w) > MAX_ASPECT * min(h, w):
        raise UserError(f"{path}: {w} x {h} px, longer than {MAX_ASPECT}:1 (MAX_ASPECT)")


HEADER_LOCK = threading.Lock()  # see decode


def decode(path, mask=False):
    """An image file (not DICOM) -> (H, W) float32, gray unless 16-bit or float; mask=True: (H, W)
    bool (> 0). Its size is checked from the header before the pixels are decoded; then it is
    turned upright by its EXIF orientation, as every viewer shows it (masks too: they still
    match)."""
    from PIL import Image, ImageOps
    regular_file(path)
    try:
        # Pillow's decompression-bomb warning (above 89 Mpx) would be a second line on stderr:
        # check_size refuses every such image with a reason of its own. The warning filters are
        # one process-wide list that catch_warnings saves and restores, so the loader's threads
        # take turns here: two threads' windows interleaved would leave the filter off.
        with HEADER_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)  # reads the header only
        with im:
            check_size(path, im.height, im.width)
            im = ImageOps.exif_transpose(im)  # decodes
            if mask:
                return np.asarray(im.convert("L")) > 0
            if im.mode not in ("I;16", "I;16B", "I", "F"):  # 16-bit and float keep their values
                im = im.convert("L")
            return np.asarray(im, np.float32)
    except UserError:
        raise
    except Image.DecompressionBombError as e:  # above 179 Mpx: Pillow refuses in Image.open
        raise UserError(f"{path}: larger than {MAX_SIDE} px on a side (MAX_SIDE; {e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    except Exception as e:  # MemoryError, a decoder's own error: this file's, said as such
        raise UserError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def read_image(path, frame=None, mask_path=None):
    """One file or DICOM frame -> gray (H, W) float32 scaled by its maximum, burnt-in colour (H, W)
    bool or None (DICOM only), and the fan from a mask file (H, W) bool or None. What it cannot use
    is a UserError naming the file and why: not a regular file, too large / small / elongated,
    undecodable, NaN or infinite values."""
    colour, fan = None, None
    if path.lower().endswith(".dcm"):
        a, colour = read_dicom(path, frame)
    else:
        a = decode(path)
    if mask_path:
        fan = decode(mask_path, mask=True)
    if a.ndim != 2 or min(a.shape) < MIN_SIDE:
        raise UserError(f"{path}: image too small or not 2-D ({a.shape})")
    if not np.isfinite(a).all():  # a float TIFF or DICOM: one NaN makes every loss it touches NaN
        raise UserError(f"{path}: NaN or infinite pixel values")
    if fan is not None and fan.shape != a.shape:
        raise UserError(f"{mask_path}: mask size {fan.shape} != image size {a.shape}")
    return a / max(float(a.max()), 1e-6), colour, fan


def preprocess(a, colour, fan, size):
    """-> (img float32 (1, S, S) in [0, 1], fan bool (1, S, S)). Fan computed when no mask file gave one; 2nd-98th
    percentile rescale inside the fan (paper); zero-pad to a square so shapes keep their aspect (ours); resize to S."""
    fan = fan_mask(a, colour) if fan is None else fan
    lo, hi = np.percentile(a[fan], [2, 98]) if fan.any() else (0.0, 1.0)
    a = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1) * fan
    t = torch.from_numpy(np.stack([a, fan]).astype(np.float32))[None]  # (1, 2, H, W)
    h, w = a.shape
    t = F.pad(t, ((max(h, w) - w) // 2, (max(h, w) - w + 1) // 2, (max(h, w) - h) // 2, (max(h, w) - h + 1) // 2))
    t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    fan = t[1:] > 0.5
    return t[:1].clamp(0, 1) * fan, fan


def load_image(path, size, mask_path=None, frame=None):
    """One file or DICOM frame -> (img float32 (1, S, S) in [0, 1], fan bool (1, S, S)): read, then preprocess."""
    return preprocess(*read_image(path, frame, mask_path), size)


def walk_images(root):
    """-> sorted paths of the image files below root, names taken literally (no glob patterns).
    Symlinked folders are followed once (a link loop or a second link to a folder lists nothing
    twice), in sorted order; a file reached by two names (a symlink, a hard link) is listed once, by
    its first name in sorted order, so that no held-out image is a training image renamed. Nothing
    is opened: a FIFO or a device named like an image is listed, and refused when read."""
    seen, out = set(), []
    for top, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()  # the name a linked folder is listed under must not depend on the disk's order
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        out += [os.path.join(top, f) for f in files if f.lower().endswith(IMAGE_EXTS)]
    ids, paths = set(), []
    for path in sorted(out):
        try:
            st = os.stat(path)  # stat, not open: safe on a FIFO
            key = (st.st_dev, st.st_ino)
        except OSError:  # a dangling link: listed, and refused with its reason when read
            key = path
        if key not in ids:
            ids.add(key)
            paths.append(path)
    return paths


def frame_list(path, every):
    """The frames of one file to list: [None] for an image or a 1-frame DICOM, 0, every, ... for
    a cine, [] for a DICOM without pixels. A file whose header is refused or unreadable, or that is
    not a regular file, is one item: reading it says why, and the build skips and counts it."""
    try:
        n = frames(path)
    except UserError:
        return [None]
    return [None] if n == 1 else list(range(0, n, every))


def find_images(root, every=1):
    """-> sorted (path, frame) items: frame None for an image or a 1-frame DICOM; 0, every, ...
    for a DICOM cine."""
    return [(p, i) for p, i, _ in file_items(root, every)[0]]


def frames(path):
    """Frames in a file: DICOM from its header alone (0: no pixel data), any other image 1."""
    return read_dicom(path, count=True) if path.lower().endswith(".dcm") else 1


def item_name(path, frame):
    """An item as messages name it: its path, and its frame when it is one of a cine's."""
    return path + (f" frame {frame}" if frame is not None else "")


def usable(items, max_bad, min_side):
    """The (path, frame) items that decode to an image of at least min_side px (a patch); the others
    are skipped and counted with their reason, and the run stops if they are more than a share
    max_bad: mostly broken files are a mistake, not noise. (--cache off only: with the cache this
    happens once, while it is built.)"""
    from concurrent.futures import ThreadPoolExecutor

    def why(item):  # a full decode, screened as the cache build screens it: "" if usable
        try:
            a = read_image(*item)[0]
        except UserError as e:
            return str(e).replace(f"{item[0]}: ", "").replace(f" {item[0]}", "")
        except Exception as e:  # anything else is this file's too
            return f"{type(e).__name__}: {e}"
        return "" if min(a.shape) >= min_side else f"smaller than {min_side} px"
    with ThreadPoolExecutor(8) as pool:
        whys = list(pool.map(why, items))  # decoders release the GIL
    bad = [item_name(p, i) + f" ({w})" for (p, i), w in zip(items, whys) if w]
    screen(bad, len(items), max_bad, min_side)
    return [f for f, w in zip(items, whys) if not w]


def screen(bad, n, max_bad, min_side, say=print):
    """Skip and count the unreadable or too small images; stop when they are more than a share max_bad."""
    if len(bad) > max_bad * n:
        raise UserError(f"{len(bad)} of {n} image files are unreadable or smaller than {min_side} px "
                        f"(e.g. {bad[0]}): more than --max_bad {max_bad}")
    if bad:
        say(one_line(f"[data] skipping {len(bad)} of {n} unreadable or too small image files, "
                     f"e.g. {bad[0]}"))


# ----------------------------------------------------------------------------------------------------
# The preprocessing cache. Decoding, the fan mask and the rescale cost 1-50 ms per frame and a training step
# ~1 ms per image at the demo size: so every (file, frame) is preprocessed once, into memory-mapped uint8
# arrays that every later run, DataLoader worker and DDP rank only slices. One cache folder holds:
#   index.json     version, the parameters, what was read (path, frame, size, mtime) and what came of it
#   images-G.npy   (N, S, S) uint8: the model's input image at 8-bit steps (S = --img_size, see below)
#   fans-G.npy     (N, S, ceil(S/8)) uint8: the fan masks, bit-packed along rows
#   lock           flock'd: shared while a run opens the cache, exclusive while one (re)builds it
# G is a generation: a build writes new arrays, then replaces index.json (atomically) to name them, then
# deletes the old ones. A build killed at any point leaves the old index (or none): never a cache that loads
# with rows missing. Readers map the arrays they opened, so a later rebuild does not pull them away.

# Bump whenever preprocessing changes what a row holds: every older cache is then rebuilt.
CACHE_VERSION = 2  # 2: EXIF orientation applied


def cache_folder(choice, kind, name, params):
    """--cache: "" = $US_JEPA_CACHE, else ~/.cache/us_jepa (ours: beside pip's and torch's caches, writable when
    the data folder is read-only, shared by every --out); else that folder. One subfolder per source and
    preprocessing parameters, so that a changed parameter builds a new cache instead of destroying one."""
    root = choice or os.environ.get("US_JEPA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "us_jepa")
    key = hashlib.sha1(json.dumps([CACHE_VERSION, kind, params], sort_keys=True).encode()).hexdigest()
    return os.path.join(root, f"{kind}-{os.path.basename(os.path.normpath(name)) or 'root'}-{key[:12]}")


class Cache:
    """An opened cache, read-only. Per row: keys[i] (what was read), shape[i] (its height and width before
    preprocessing), bad[i] (why it could not be read, "" if it could)."""
    def __init__(self, folder, index):
        self.folder, self.index, self.keys, self.side = folder, index, index["keys"], index["side"]
        self.shape = np.array(index["shape"], np.int64).reshape(-1, 2)  # (N, 2)
        self.bad = {int(r): why for r, why in index["bad"].items()}
        self.arrays = None

    def _open(self):  # mapped lazily, so a pickled Cache (a spawned DataLoader worker) maps its own
        self.arrays = [np.load(os.path.join(self.folder, self.index[a]), mmap_mode="r") for a in ("images", "fans")]
        for arr, width in zip(self.arrays, (self.side, (self.side + 7) // 8)):
            if arr.shape != (len(self.keys), self.side, width) or arr.dtype != np.uint8:
                raise ValueError(f"{arr.shape} {arr.dtype} where the index says {len(self.keys)} rows")

    def __getstate__(self): return dict(self.__dict__, arrays=None)

    def get(self, rows):
        """rows (B,) -> imgs float32 (B, 1, S, S) in [0, 1] at 8-bit steps, fans bool (B, 1, S, S)."""
        if self.arrays is None: self._open()
        rows = np.asarray(rows, np.int64)
        imgs = torch.from_numpy(self.arrays[0][rows]).float().div_(255)  # (B, S, S)
        fans = np.unpackbits(self.arrays[1][rows], axis=2, count=self.side).astype(bool)  # (B, S, S)
        return imgs[:, None], torch.from_numpy(fans)[:, None]


def _fill(job):
    """One build job, in a worker process: preprocess rows lo..lo+len(items) into the new arrays (mapped r+).
    -> [(row, h, w, why it is bad or "")]"""
    folder, names, side, lo, items, synth = job
    imgs, fans = (np.load(os.path.join(folder, n), mmap_mode="r+") for n in names)
    if synth:  # items: indices of the synthetic pool, made in one batch: (seed, task) in synth
        x, f, _ = synth_batch(items, side, *synth)
        x, f, shapes = x[:, 0], f[:, 0], [("", side, side)] * len(items)
    else:
        x, f, shapes = torch.zeros(len(items), side, side), torch.zeros(len(items), side, side, dtype=bool), []
        for j, (path, frame, mask) in enumerate(items):
            try:
                a, colour, fan = read_image(path, frame, mask)
                shapes.append(("", *a.shape))
                img, fan = preprocess(a, colour, fan, side)
                x[j], f[j] = img[0], fan[0]
            except Exception as e:  # any failure of one file is that file's: counted, said, never fatal here
                msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
                msg = msg.replace(f"{path}: ", "").replace(f" {path}", "")  # the line names the file anyway
                shapes.append((" ".join(msg.split())[:200] or type(e).__name__, 0, 0))
    imgs[lo:lo + len(items)] = (x * 255).round().to(torch.uint8).numpy()
    fans[lo:lo + len(items)] = np.packbits(f.numpy(), axis=2)
    imgs.flush()
    fans.flush()
    return [(lo + j, h, w, bad) for j, (bad, h, w) in enumerate(shapes)]


def _read_index(folder, params):
    """The folder's index if it is complete and of this version and these parameters, else (None, why)."""
    try:
        with open(os.path.join(folder, "index.json")) as f:
            index = json.load(f)
        if index.get("version") != CACHE_VERSION or index.get("params") != params:
            return None, "made by another version or with other parameters"
        cache = Cache(folder, index)
        cache._open()
        return cache, ""
    except FileNotFoundError as e:
        return None, "" if e.filename and e.filename.endswith("index.json") else f"missing {e.filename}"
    except Exception as e:  # a truncated array, an index that is not JSON, ...
        return None, f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"


def open_cache(folder, params, items, keys, synth=None, procs=None, say=print):
    """The cache in `folder` for these items (in this order), built or brought up to date first if needed.
    keys[i]: what identifies item i's content (path, frame, size, mtime): a row is reused only for the same key.
    synth: (seed, task) when items are indices of the synthetic pool. procs: build processes (default: cores)."""
    import fcntl
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, "lock"), os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError as e:
        raise UserError(f"cache {folder}: {e.strerror}; choose a writable --cache DIR, or --cache off") from None
    try:
        cache, why = _read_index(folder, params)
        if cache and cache.keys == keys:
            say(f"[cache] {len(keys)} images from {folder} (built {cache.index['built']})", flush=True)
            return cache
        fcntl.flock(fd, fcntl.LOCK_UN)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"[cache] waiting for another process building {folder}", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        cache, why = _read_index(folder, params)  # someone else may have built it while we waited
        if cache and cache.keys == keys:
            return cache
        return _build(folder, params, items, keys, synth, procs, cache, why, say, fd)
    finally:
        os.close(fd)  # releases the lock; the opened arrays stay mapped


def _build(folder, params, items, keys, synth, procs, old, why, say, lock_fd):
    """(Re)build under the exclusive lock: rows of unchanged items are copied from the old cache, the rest made."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing
    hashable = lambda k: tuple(k) if isinstance(k, list) else k  # noqa: E731  JSON gives lists back
    reuse = {hashable(k): r for r, k in enumerate(old.keys)} if old is not None else {}
    keyt = [hashable(k) for k in keys]
    todo = [i for i, k in enumerate(keyt) if k not in reuse]
    if why:
        say(f"[cache] warning: {folder} is unusable ({why}): rebuilding it", flush=True)
    elif old is not None:  # by file (a key's first element): added, changed (size or mtime), removed
        was, now = {k[0]: k for k in reuse if isinstance(k, tuple)}, {k[0]: k for k in keyt if isinstance(k, tuple)}
        n = [len(now.keys() - was.keys()), sum(was[f] != k for f, k in now.items() if f in was),
             len(was.keys() - now.keys())]
        say(f"[cache] the files changed since {folder} was built ({n[0]} added, {n[1]} changed, {n[2]} removed): "
            f"re-reading {len(todo)} of {len(items)} images", flush=True)
    else:
        say(f"[cache] building {folder}: {len(items)} images, once (later runs reuse it)", flush=True)
    gens = [int(f.split("-")[1][:-4]) for f in os.listdir(folder) if f.startswith("images-") and f.endswith(".npy")
            and f.split("-")[1][:-4].isdigit()]
    gen = max(gens, default=0) + 1  # never a file name in use: a running reader may still map the older ones
    names = [f"{a}-{gen}.npy" for a in ("images", "fans")]
    side = params["side"]
    for name, width in zip(names, (side, (side + 7) // 8)):  # sparse files of the final size
        np.lib.format.open_memmap(os.path.join(folder, name), "w+", np.uint8, (len(items), side, width)).flush()
    shape, bad = np.zeros((len(items), 2), np.int64), {}
    if old is not None:  # copy the unchanged rows, in order of their new position
        new = [i for i in range(len(items)) if keyt[i] in reuse]
        src = [reuse[keyt[i]] for i in new]
        arrs = [np.load(os.path.join(folder, n), mmap_mode="r+") for n in names]
        for a, b in zip(arrs, old.arrays):
            for j in range(0, len(new), 4096):
                a[new[j:j + 4096]] = b[src[j:j + 4096]]
            a.flush()
        shape[new] = old.shape[src]
        bad.update({i: old.bad[r] for i, r in zip(new, src) if r in old.bad})
    jobs = [(folder, names, side, lo, [items[i] for i in run], synth)
            for lo, run in _runs_of(todo, 64 if synth else 16)]
    procs = procs or len(os.sched_getaffinity(0))
    tic, done, last = time.time(), 0, 0.0
    pool = None  # the build's parallelism is its processes, one thread each
    if procs > 1 and len(jobs) > 1:
        pool = ProcessPoolExecutor(procs, multiprocessing.get_context("fork"), initializer=_build_process,
                                   initargs=(lock_fd, os.getpid()))
    results = pool.map(_fill, jobs) if pool else map(_fill, jobs)
    try:
        for res in results:
            for row, h, w, why in res:
                shape[row] = h, w
                if why:
                    bad[row] = why
            done += len(res)
            rate = done / max(time.time() - tic, 1e-9)
            if time.time() - last > 5 or done == len(todo):
                last = time.time()
                say(f"[cache] {done}/{len(todo)} images, {rate:.0f} img/s, ETA {(len(todo) - done) / rate:.0f} s",
                    flush=True)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    index = dict(version=CACHE_VERSION, params=params, side=side, gen=gen, images=names[0], fans=names[1],
                 built=time.strftime("%Y-%m-%d %H:%M:%S"), keys=keys, shape=shape.ravel().tolist(),
                 bad={str(r): why for r, why in sorted(bad.items())})
    return _commit(folder, names, index)


def _build_process(lock_fd, builder):
    """A build process (forked): one thread; it closes its copy of the builder's lock, which stays held by the
    builder alone, and ends when the builder does. A builder killed by SIGKILL (kill -9, the OOM killer) would
    otherwise leave its processes waiting for work forever, holding the lock every later run waits on."""
    torch.set_num_threads(1)
    os.close(lock_fd)

    def watch():
        while os.getppid() == builder:
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _runs_of(rows, chunk):
    """-> (first row, rows) for runs of consecutive rows, at most chunk long: a build job fills one run."""
    for j in range(0, len(rows), chunk):
        run, start = rows[j:j + chunk], 0
        for t in range(1, len(run) + 1):
            if t == len(run) or run[t] != run[t - 1] + 1:
                yield run[start], run[start:t]
                start = t


def _commit(folder, names, index):
    """Make a build the cache: arrays synced, then the index that names them replaced atomically, then
    whatever else is in the folder (older generations, a killed build's files) removed."""
    for name in names:  # the pixels are on disk before the index that names them
        with open(os.path.join(folder, name), "rb+") as f:
            os.fsync(f.fileno())
    tmp = os.path.join(folder, f"index.json.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(index, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, "index.json"))
    for f in os.listdir(folder):  # old generations and what killed builds left behind
        if f not in names + ["index.json", "lock"]:
            os.remove(os.path.join(folder, f))
    cache = Cache(folder, index)
    cache._open()
    return cache


class Images:
    """The pretraining images by index: generated (synthetic: unlabeled images of --pool, by default all
    three lesion3 classes, seeds apart from the probes'; deterministic per index) or read from files. With
    the cache (default) they are preprocessed once and sliced from memory-mapped arrays; with --cache off
    made on demand as they are drawn.
    Nothing is held in memory, so a corpus of any size works and DataLoader workers can build any batch."""
    def __init__(self, d, seed, min_side=16, say=print):
        self.d, self.seed, self.cache, self.files, self.rows = d, seed, None, None, None
        self.pool = getattr(d, "pool", "lesion3")  # the synthetic pool's task(s) (configs before --pool: lesion3)
        if not d.data and not set(self.pool.split("+")) <= set(TASKS):
            raise UserError(f"--pool {self.pool}: one of {list(TASKS)} or several joined by +, e.g. lesion3+liver")
        if d.cache == "off":
            self.files = usable(find_images(d.data, d.every), d.max_bad, min_side) if d.data else None
            return
        if not d.data:
            params = dict(side=d.img_size, n=d.n_images, seed=1000 + seed, task=self.pool)
            folder = cache_folder(d.cache, "synthetic", self.pool, params)
            self.cache = open_cache(folder, params, list(range(d.n_images)), list(range(d.n_images)),
                                    (1000 + seed, self.pool), say=say)
            return
        root = os.path.realpath(d.data)
        params = dict(side=d.img_size, root=root, every=d.every)
        folder = cache_folder(d.cache, "files", root, params)
        items, keys = file_items(root, d.every, folder, params)
        self.cache = open_cache(folder, params, items, keys, say=say)
        c = self.cache
        ok = (c.shape.min(1) >= min_side) & ~np.isin(np.arange(len(c.keys)), list(c.bad))
        bad = [item_name(os.path.join(root, c.keys[r][0]), c.keys[r][1]) + (f" ({c.bad[r]})" if r in c.bad else "")
               for r in np.flatnonzero(~ok)]
        screen(bad, len(ok), d.max_bad, min_side, say)
        self.rows = np.flatnonzero(ok)

    def __len__(self):
        if self.rows is not None: return len(self.rows)
        return len(self.files) if self.files else self.d.n_images

    def item(self, i):
        """Image i's (path, frame) (frame None but in a cine), or (None, i) in the synthetic pool."""
        if self.rows is not None:
            path, frame = self.cache.keys[self.rows[i]][:2]
            return os.path.join(self.d.data, path), frame
        return self.files[i] if self.files else (None, i)

    def name(self, i):
        """What image i is, for a message: its file (and frame), or its index in the synthetic pool."""
        if self.rows is not None:
            path, frame = self.cache.keys[self.rows[i]][:2]
            return item_name(os.path.join(self.d.data, path), frame)
        if self.files:
            return item_name(*self.files[i])
        return f"synthetic image {i}"

    def __getitem__(self, idx):  # indices (B,) -> imgs (B, 1, S, S) in [0, 1], 8-bit steps like a stored image; fans
        idx, S = [int(i) for i in idx], self.d.img_size
        if self.cache is not None:
            return self.cache.get(idx if self.rows is None else self.rows[idx])
        if self.files is None: imgs, fans, _ = synth_batch(idx, S, 1000 + self.seed, self.pool)
        else:
            pairs = [load_image(path, S, frame=frame) for path, frame in (self.files[i] for i in idx)]
            imgs, fans = torch.stack([a for a, _ in pairs]), torch.stack([f for _, f in pairs])  # (B, 1, S, S) each
        return (imgs * 255).round() / 255, fans


def file_items(root, every, folder=None, params=None):
    """The (path, frame, mask) items below root and their keys (relative path, frame, size, mtime). DICOM headers
    are read again only for files whose size or mtime changed since the cache in `folder` was built."""
    known = {}
    try:
        with open(os.path.join(folder, "index.json")) as f:
            index = json.load(f)
        if index.get("params") == params:
            for rel, frame, size, mtime in index["keys"]:
                known.setdefault((rel, size, mtime), []).append(frame)
    except Exception:  # no folder, no usable index: every file is new
        pass
    items, keys, paths = [], [], walk_images(root)
    dcm = [p for p in paths if p.lower().endswith(".dcm")]
    if dcm:
        need_pydicom(dcm[0])  # without pydicom the run stops, rather than skipping every .dcm file
    for path in paths:
        rel = os.path.relpath(path, root)
        try:
            st = os.stat(path)
            sig = (rel, st.st_size, st.st_mtime_ns)
        except OSError:  # a dangling link, or gone since the listing: one item, refused when read
            sig = (rel, None, None)
        if sig in known and path.lower().endswith(".dcm"):
            fr = known[sig]
        else:
            fr = frame_list(path, every)  # opens nothing that is not a regular file
        for i in fr:
            items.append((path, i, None))
            keys.append([sig[0], i, sig[1], sig[2]])
    if not items: raise UserError(f"--data {root}: no images ({', '.join(IMAGE_EXTS)}) below it")
    return items, keys


# ----------------------------------------------------------------------------------------------------
# Probe datasets: the labelled train / val / test splits of a task.

class Split:
    """One split of a probe task: labels (N,) in memory, images fetched batch by batch (a probe holds features,
    not images): get(rows) -> imgs float32 (b, 1, S, S) in [0, 1], fans bool (b, 1, S, S)."""
    def __init__(self, get, labels):
        self.get, self.labels = get, torch.as_tensor(labels, dtype=torch.int64)

    def __len__(self):
        return len(self.labels)

    def batches(self, size=256):
        """-> (first row, imgs, fans) per batch of `size` rows, in order."""
        for i in range(0, len(self), size):
            yield (i, *self.get(np.arange(i, min(i + size, len(self)))))


def in_memory(imgs, fans):
    return lambda rows: (imgs[rows], fans[rows])


def probe_data(p, size):
    """-> {split: Split} and the class names. With the cache (p.cache != "off") the images of every split are
    preprocessed once into it (8-bit rows, as the pretraining images); --cache off reads them into memory."""
    if not p.data:
        if p.task not in TASKS: raise UserError(f"--task {p.task}: choose one of {list(TASKS)}")
        bounds, names = np.cumsum([0, p.n_train, p.n_val, p.n_test]), ("train", "val", "test")
        labels = synth_labels(range(bounds[-1]), p.task)
        if p.cache == "off":
            made = [synth_batch(range(bounds[i], bounds[i + 1]), size, 1, p.task) for i in range(3)]
            return {s: Split(in_memory(x, f), y) for s, (x, f, y) in zip(names, made)}, TASKS[p.task]
        params = dict(side=size, n=int(bounds[-1]), seed=1, task=p.task)
        cache = open_cache(cache_folder(p.cache, "synthetic", p.task, params), params, list(range(bounds[-1])),
                           list(range(bounds[-1])), (1, p.task))
        return {s: Split(lambda rows, lo=bounds[i]: cache.get(rows + lo), labels[bounds[i]:bounds[i + 1]])
                for i, s in enumerate(names)}, TASKS[p.task]
    recs, classes = probe_records(p.data)
    out = {}
    for split, rs in recs.items():
        if any(not os.path.exists(r[0]) for r in rs):
            raise UserError(f"{split}: image {next(r[0] for r in rs if not os.path.exists(r[0]))} does not exist")
    one_file_one_label(recs)
    if p.cache == "off":
        for split, rs in recs.items():
            pairs = [load_image(f, size, mp, i) for f, _, mp, i in rs]
            imgs, fans = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
            out[split] = Split(in_memory(imgs, fans), [r[1] for r in rs])
        return out, classes
    root = os.path.realpath(p.data)
    items = sorted({(f, i, mp) for rs in recs.values() for f, _, mp, i in rs}, key=str)  # one cache, all splits
    params = dict(side=size, root=root, probe=True)
    cache = open_cache(cache_folder(p.cache, "probe", root, params), params, items,
                       [stat_key(root, *it) for it in items])
    row = {it: r for r, it in enumerate(items)}
    if cache.bad:  # a probe needs every one of its images: a broken one is an error
        r = min(cache.bad)
        raise UserError(f"cannot use probe image {item_name(*items[r][:2])}: {cache.bad[r]}")
    for split, rs in recs.items():
        rows = np.array([row[(f, i, mp)] for f, _, mp, i in rs], np.int64)
        out[split] = Split(lambda r, rows=rows: cache.get(rows[r]), [r[1] for r in rs])
    return out, classes


def one_file_one_label(recs):
    """Refuse one file (by device and inode: another name or a link is the same file) under two
    labels, or in test and in train or val: a test image the probe trained on raises its score
    silently."""
    seen = {}
    for split in ("train", "val", "test"):
        for f, y, _, i in recs[split]:
            st = os.stat(f)
            key = (st.st_dev, st.st_ino, i)
            if key not in seen:
                seen[key] = split, f, y
                continue
            s0, f0, y0 = seen[key]
            if y0 != y:
                raise UserError(f"{f} ({split}, label {y}) is {f0} ({s0}, label {y0}): "
                                "one image, two labels")
            if (split == "test") != (s0 == "test"):
                raise UserError(f"{f} ({split}) is {f0} ({s0}): "
                                "a test image the probe would also train on")


def stat_key(root, path, frame, mask):
    """What identifies a probe item's content: its image's and its mask's path, size and mtime, and the frame."""
    key = [os.path.relpath(path, root), frame]
    for f in (path, mask):
        st = os.stat(f) if f else None
        key += [st.st_size, st.st_mtime_ns] if st else [None, None]
    return key + [os.path.relpath(mask, root) if mask else None]


def probe_records(root):
    """-> {split: [(image path, label, mask path or None, frame or None)]} and the class names, from
    an UltraBench folder (JSON records) or an ImageFolder (DIR/{train,val,test}/<class>/*). Every
    label of every split is one of the training split's classes; anything else is one line naming
    the record or the folder."""
    if not os.path.isdir(root):
        raise UserError(f"--data {root}: no such directory")
    recs = {}
    ub = {"train": "train.json", "val": "validation.json", "test": "test.json"}  # UltraBench 1.0.1
    if os.path.exists(os.path.join(root, "train_val.json")):  # UltraBench's GitHub layout
        ub = {"train": "train_val.json", "test": "test.json"}
    if os.path.exists(os.path.join(root, ub["train"])):
        for split, name in ub.items():  # train first: its labels are the classes of every split
            if not os.path.exists(os.path.join(root, name)):
                raise UserError(f"{root}: no {name}")
            recs[split] = [_record(root, name, k, r) for k, r in enumerate(_json_list(root, name))]
            if split == "train":
                classes = [str(c) for c in sorted({r[1] for r in recs["train"]})]
                if [int(c) for c in classes] != list(range(len(classes))):
                    raise UserError(f"{root}: labels must be 0..C-1, found {classes}")
            for k, r in enumerate(recs[split]):
                if not 0 <= r[1] < len(classes):
                    raise UserError(f"{os.path.join(root, name)} record {k}: label {r[1]} is not a "
                                    f"class of {ub['train']} (0..{len(classes) - 1})")
    else:  # ImageFolder: DIR/{train,val,test}/<class>/*.png
        if not os.path.isdir(os.path.join(root, "train")):
            raise UserError(f"{root}: neither ImageFolder (train/<class>/) nor UltraBench "
                            "(train_val.json)")
        classes = sorted(e.name for e in os.scandir(os.path.join(root, "train")) if e.is_dir())
        if len(classes) < 2:
            raise UserError(f"{root}/train: need at least 2 class folders, found {classes}")
        for split in ("train", "val", "test"):
            folder = os.path.join(root, split)
            if not os.path.isdir(folder):
                continue
            for e in sorted(os.scandir(folder), key=lambda e: e.name):
                if e.is_dir() and e.name not in classes:  # dropped before: silently unscored
                    raise UserError(f"{e.path}: a class folder that {root}/train lacks "
                                    f"(its classes: {classes})")
                if not e.is_dir() and e.name.lower().endswith(IMAGE_EXTS):  # no class: dropped
                    raise UserError(f"{e.path}: an image outside the class folders "
                                    f"({split}/<class>/...)")
            recs[split] = [(f, c, None, i) for c, name in enumerate(classes)  # i: a cine's frame
                           for f, i in find_images(os.path.join(folder, name))]
    if len(classes) < 2:
        raise UserError(f"{root}: need at least 2 classes, found {classes}")
    if "test" not in recs:
        raise UserError(f"{root}: no test split")
    if "val" not in recs:  # carve 10 % of train, fixed seed (the paper does not say how it did)
        perm = np.random.default_rng(0).permutation(len(recs["train"]))
        cut = max(1, len(perm) // 10)
        recs["val"] = [recs["train"][i] for i in perm[:cut]]
        recs["train"] = [recs["train"][i] for i in perm[cut:]]
    return recs, classes


def _json_list(root, name):
    """The records of one UltraBench JSON file: a list, or one line saying what the file holds."""
    path = os.path.join(root, name)
    try:
        regular_file(path)  # a FIFO would hang the open
        with open(path, encoding="utf-8") as f:
            recs = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        raise UserError(f"{path}: not valid JSON ({' '.join(str(e).split())[:120]})") from None
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None
    if not isinstance(recs, list):
        raise UserError(f'{path}: a JSON list of records {{"image": ..., "label": ...}} expected, '
                        f"found {type(recs).__name__}")
    if not recs:
        raise UserError(f"{path}: no records")
    return recs


def _record(root, name, k, r):
    """Record k of a JSON file -> (image path, label, mask path or None, None). Paths are relative
    to the dataset folder and stay inside it; the label is an integer (a float only if integral:
    1.0, as some exporters write it; never a string or a bool)."""
    where = f"{os.path.join(root, name)} record {k}"
    if not isinstance(r, dict):
        raise UserError(f'{where}: {{"image": ..., "label": ...}} expected, '
                        f"found {json.dumps(r)[:60]}")
    for key in ("image", "label"):
        if key not in r:
            raise UserError(f'{where}: no "{key}"')
    y = r["label"]
    integral = isinstance(y, int) or (isinstance(y, float) and y.is_integer())
    if isinstance(y, bool) or not integral:
        raise UserError(f"{where}: label {json.dumps(y)[:60]} is not an integer")
    mask = r.get("scan_mask")
    mask = mask and _inside(root, where, "scan_mask", mask)
    return _inside(root, where, "image", r["image"]), int(y), mask, None


def _inside(root, where, key, rel):
    """root joined with a record's path, refused unless it is a relative path that stays in root
    (not absolute, no .. that leaves it): the file names the dataset, not what lies beside it.
    Links inside root are the user's own: followed."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise UserError(f'{where}: "{key}" is not a path ({json.dumps(rel)[:60]})')
    base, path = os.path.abspath(root), os.path.abspath(os.path.join(root, rel))
    if os.path.isabs(rel) or os.path.commonpath([base, path]) != base or path == base:
        raise UserError(f'{where}: "{key}" {rel} is not inside {root} '
                        "(paths are relative to the dataset folder)")
    return os.path.normpath(os.path.join(root, rel))


# Test-time corruptions of probe images (the paper's robustness protocol; `probe --corrupt`).

CORRUPTIONS = ("blur", "contrast", "speckle")


def blur(x, eps):
    """Separable Gaussian blur of (N, 1, S, S): sigma = eps, 2*floor(2 eps) + 1 taps."""
    r = int(2 * eps)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1.0) / eps) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, r, r), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))


def corrupt(imgs, fans, kind, eps, seed=0):
    """The paper's test-time corruptions (method notes 7) of (N, 1, S, S) images in [0, 1]."""
    if kind == "blur":
        x = blur(imgs, eps)
    elif kind == "contrast":  # toward the median inside the fan: alpha 0.7, 0.5, 0.3
        m = torch.stack([x[f].median() if f.any() else x.median() for x, f in zip(imgs, fans)])
        x = m.view(-1, 1, 1, 1) + (0.9 - 0.2 * eps) * (imgs - m.view(-1, 1, 1, 1))
    else:  # correlated multiplicative speckle: eta ~ N(0, (0.35 eps)^2) smoothed by the blur (ours)
        eta = torch.randn(imgs.shape, generator=torch.Generator().manual_seed(seed)) * 0.35 * eps
        x = imgs * (1 + blur(eta, eps))
    return x.clamp(0, 1) * fans
