"""Real-data layouts: a folder of images for pretraining, ImageFolder and UltraBench JSON for probing."""
import json

import numpy as np
import pytest
from PIL import Image

import us_data as D
import us_jepa as U


def write_images(root, n, task="lesion", size=80, seed=5):
    """Synthetic ultrasound saved as 8-bit PNGs (plus 0/1 fan masks), as a user's export would look."""
    imgs, fans, labels = D.synth_batch(range(n), size, seed, task)
    paths = []
    for i in range(n):
        p = root / f"img_{i}.png"
        Image.fromarray((imgs[i, 0].numpy() * 255).astype(np.uint8)).save(p)
        Image.fromarray(fans[i, 0].numpy().astype(np.uint8)).save(root / f"mask_{i}.png")
        paths.append((p.name, f"mask_{i}.png", int(labels[i])))
    return paths


def test_pretrain_on_a_folder_of_images(tmp_path):
    data = tmp_path / "data" / "site_a" / "case_1"  # any depth below --data
    data.mkdir(parents=True)
    write_images(data, 40)
    (data / "notes.txt").write_text("ignored: not an image")
    U.main(["teacher", "--data", str(tmp_path / "data"), "--img_size", "64", "--batch_size", "8", "--steps", "2",
            "--depth", "1", "--pred_depth", "1", "--out", str(tmp_path / "t")])
    ck = U.load_checkpoint(str(tmp_path / "t" / "last.pt"))
    assert ck["step"] == 2 and ck["config"]["data"]["data"] == str(tmp_path / "data")


@pytest.mark.parametrize("with_val", [True, False])
def test_probe_imagefolder(tmp_path, with_val):
    root = tmp_path / "folder"
    for split, n in (("train", 24), ("val", 8), ("test", 12)) if with_val else (("train", 30), ("test", 12)):
        for cls in ("benign", "malignant"):
            (root / split / cls).mkdir(parents=True)
            write_images(root / split / cls, n // 2, seed=hash((split, cls)) % 1000)
    res = U.main(["probe", "--encoder", "pixels", "--data", str(root), "--seeds", "1", "--epochs", "5",
                  "--out", str(tmp_path / "r.json")])
    out = json.load(open(tmp_path / "r.json"))
    assert out["classes"] == ["benign", "malignant"] and "pixels" in res[str(root)]  # results by task
    assert len(out["results"]["pixels"]["runs"]) == 1


def test_probe_ultrabench_layout(tmp_path):
    root = tmp_path / "aul_mass_v1.0.1"
    (root / "images").mkdir(parents=True)
    recs = [{"image": f"images/{a}", "scan_mask": f"images/{m}", "label": y, "patient": i}
            for i, (a, m, y) in enumerate(write_images(root / "images", 36, task="lesion3"))]
    json.dump(recs[:24], open(root / "train_val.json", "w"))
    json.dump(recs[24:], open(root / "test.json", "w"))
    U.main(["probe", "--encoder", "pixels", "--data", str(root), "--seeds", "1", "--epochs", "5",
            "--out", str(tmp_path / "r.json")])
    out = json.load(open(tmp_path / "r.json"))
    assert out["classes"] == ["0", "1", "2"]
    recs[30]["image"] = "images/missing.png"
    json.dump(recs[24:], open(root / "test.json", "w"))
    with pytest.raises(SystemExit):  # a record pointing at a missing image: one clear line, exit 2
        U.main(["probe", "--encoder", "pixels", "--data", str(root), "--out", str(tmp_path / "r2.json")])
