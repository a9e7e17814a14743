"""A synthetic ChestX-ray8 set: `write_chestxray8` writes `images/*.png`, `Data_Entry_2017.csv` and
`BBox_List_2017.csv` with the real headers, `train_val_list.txt` / `test_list.txt` (patient-
disjoint). Chest-like grey images (lungs, mediastinum, heart, ribs, clavicles, diaphragm) with
findings (nodule, mass, effusion, cardiomegaly, infiltration, atelectasis, pneumothorax); about
half of the abnormal images get boxes. Boxes are written in the 1024-pixel frame of the released
PNGs, as the real list is. Three images exercise the other PNG modes (16-bit, RGB, RGBA).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data_modules.errors import DataError
from data_modules.synthetic.noise import sigmoid, smooth_noise

CHEST_DATA_ENTRY_COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)
CHEST_BBOX_COLUMNS = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")
# Box coordinates of the real BBox_List_2017.csv refer to the released 1024 x 1024 PNGs.
CHEST_BBOX_FRAME = 1024
_CHEST_FINDINGS = (
    "Nodule",
    "Mass",
    "Effusion",
    "Cardiomegaly",
    "Infiltration",
    "Atelectasis",
    "Pneumothorax",
)


@dataclass(frozen=True)
class _Chest:
    """A radiograph's anatomy: pixel coordinates (normalised to [0, 1]) and the parts findings use."""

    x: np.ndarray  # (1, S) horizontal coordinate
    y: np.ndarray  # (S, 1) vertical coordinate
    lungs: np.ndarray  # (S, S) soft lung fields
    vessels: np.ndarray  # (S, S) vessel texture
    centres: list[float]  # the two lungs' x centres
    lung_cy: float
    lung_w: float
    lung_h: float
    heart: tuple[float, float, float]  # (x, y, radius)


def _chest_anatomy(
    rng: np.random.Generator, size: int, cardiomegaly: bool
) -> tuple[np.ndarray, _Chest]:
    """A normal chest (size, size), not yet clipped, and its anatomy (an enlarged heart when
    `cardiomegaly`)."""
    y = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :]
    dx, dy = rng.uniform(-0.03, 0.03, 2)
    xc = 0.5 + dx
    # Torso: soft tissue, air outside.
    torso = sigmoid((1.0 - np.sqrt(((x - xc) / 0.47) ** 2 + ((y - 0.6 - dy) / 0.62) ** 2)) / 0.03)
    img = 0.06 + 0.38 * torso
    # Lungs: two tall ellipses, dark, with vessel texture denser near the hila.
    lung_w, lung_h = rng.uniform(0.15, 0.19), rng.uniform(0.3, 0.36)
    lung_cy = 0.47 + dy
    lungs = np.zeros((size, size), dtype=np.float32)
    centres = []
    for side in (-1.0, 1.0):
        lx = xc + side * rng.uniform(0.19, 0.22)
        centres.append(lx)
        dist = np.sqrt(((x - lx) / lung_w) ** 2 + ((y - lung_cy) / lung_h) ** 2)
        lungs = np.maximum(lungs, sigmoid((1.0 - dist) / 0.04))
    vessels = np.clip(smooth_noise(rng, (size, size), max(6, size // 6)), 0, None)
    hilum = np.exp(-(((np.abs(x - xc) - 0.1) / 0.12) ** 2 + ((y - lung_cy) / 0.2) ** 2))
    img = img - lungs * (0.25 - 0.05 * vessels * (0.4 + hilum))
    # Mediastinum + spine, heart (image right = patient's left), diaphragm, clavicles, ribs.
    img = img + 0.25 * sigmoid((0.06 - np.abs(x - xc)) / 0.015) * (y > 0.12)
    heart_r = rng.uniform(0.11, 0.14) * (1.45 if cardiomegaly else 1.0)
    heart_x, heart_y = xc + 0.06, lung_cy + 0.17
    heart = sigmoid(
        (1.0 - np.sqrt(((x - heart_x) / heart_r) ** 2 + ((y - heart_y) / (0.8 * heart_r)) ** 2))
        / 0.05
    )
    img = img + 0.28 * heart * (1.0 - 0.5 * (1.0 - lungs))
    dome = lung_cy + lung_h * 0.85 - 0.08 * np.cos((x - xc) * 6.0)
    img = img + 0.2 * sigmoid((y - dome) / 0.015) * torso
    for side in (-1.0, 1.0):
        clav = np.abs(y - (0.16 + dy + 0.12 * side * (x - xc))) < 0.012
        img = img + 0.12 * (clav & (np.abs(x - xc - side * 0.17) < 0.16))
    spacing = rng.uniform(0.055, 0.07)
    curve = (y - 0.18 - dy - 0.9 * (np.abs(x - xc) - 0.2) ** 2) % spacing
    img = img + 0.06 * (curve < 0.3 * spacing) * lungs
    chest = _Chest(
        x, y, lungs, vessels, centres, lung_cy, lung_w, lung_h, (heart_x, heart_y, heart_r)
    )
    return img, chest


def _add_finding(
    rng: np.random.Generator,
    img: np.ndarray,
    chest: _Chest,
    finding: str,
    strength: float,
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """`img` with `finding` drawn in at `strength`, and its box (x, y, w, h)."""
    x, y, lungs = chest.x, chest.y, chest.lungs
    lung_cy, lung_w, lung_h = chest.lung_cy, chest.lung_w, chest.lung_h
    side = chest.centres[int(rng.integers(2))]
    px = side + rng.uniform(-0.5, 0.5) * lung_w
    py = lung_cy + rng.uniform(-0.5, 0.6) * lung_h
    if finding in ("Nodule", "Mass"):
        rad = rng.uniform(0.02, 0.035) if finding == "Nodule" else rng.uniform(0.06, 0.1)
        blob = sigmoid((1.0 - np.sqrt((x - px) ** 2 + (y - py) ** 2) / rad) / 0.1)
        return img + 0.3 * strength * blob, (px - rad, py - rad, 2 * rad, 2 * rad)
    if finding == "Effusion":
        top = lung_cy + lung_h * rng.uniform(0.3, 0.6)
        region = (np.abs(x - side) < lung_w) & (y > top + 0.05 * ((x - side) / lung_w) ** 2)
        box = (side - lung_w, top, 2 * lung_w, lung_cy + lung_h - top)
        return img + 0.25 * strength * region * lungs, box
    if finding == "Cardiomegaly":
        heart_x, heart_y, heart_r = chest.heart
        return img, (heart_x - heart_r, heart_y - 0.8 * heart_r, 2 * heart_r, 1.6 * heart_r)
    if finding == "Pneumothorax":
        apex = (
            np.sqrt(
                ((x - side) / lung_w) ** 2 + ((y - lung_cy + 0.6 * lung_h) / (0.5 * lung_h)) ** 2
            )
            < 1
        )
        img = np.where(
            apex & (lungs > 0.5), img - 0.05 * strength - 0.05 * chest.vessels * lungs, img
        )
        return img, (side - lung_w, lung_cy - 1.1 * lung_h, 2 * lung_w, lung_h)
    # Infiltration / Atelectasis: cloudy opacity shaped by noise
    rad = rng.uniform(0.06, 0.1)
    cloud = np.exp(
        -((x - px) ** 2 + ((y - py) / (0.6 if finding == "Atelectasis" else 1.0)) ** 2) / rad**2
    )
    cloud = cloud * np.clip(1.0 + 0.6 * smooth_noise(rng, lungs.shape, 8), 0, None)
    img = img + 0.22 * strength * np.clip(cloud, 0, 1) * lungs
    return img, (px - rad, py - rad, 2 * rad, 2 * rad)


def _chest_image(
    rng: np.random.Generator, size: int, findings: list[str]
) -> tuple[np.ndarray, list[tuple[str, tuple[float, float, float, float]]]]:
    """One chest-like radiograph (size, size) float in [0, 1] and its finding boxes (x, y, w, h)."""
    img, chest = _chest_anatomy(rng, size, "Cardiomegaly" in findings)
    boxes: list[tuple[str, tuple[float, float, float, float]]] = []
    strength = rng.uniform(0.35, 1.0)  # obvious to subtle
    # Contrast and noise from their own stream: the findings change nothing else in the image.
    post = np.random.default_rng(rng.integers(2**32))
    for finding in findings:
        img, box = _add_finding(rng, img, chest, finding, strength)
        boxes.append((finding, box))
    gamma = post.uniform(0.85, 1.15)
    img = np.clip(img, 0.0, 1.0) ** gamma
    img = img + post.uniform(0.005, 0.02) * post.standard_normal((size, size)).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32), boxes


def _save_png(grey: np.ndarray, path: Path, mode: str) -> None:
    """Write a grey [0, 1] image as an 8-bit L, 16-bit, RGB or RGBA PNG."""
    if mode == "I;16":
        Image.fromarray(np.rint(grey * 65535).astype(np.uint16)).save(path)
        return
    g8 = np.rint(grey * 255).astype(np.uint8)
    if mode == "RGB":
        g8 = np.stack([g8] * 3, axis=-1)
    elif mode == "RGBA":
        g8 = np.stack([g8] * 3 + [np.full_like(g8, 255)], axis=-1)
    Image.fromarray(g8).save(path)


@dataclass
class _Patients:
    """Consecutive images grouped into patients of 1-3 follow-ups, and the patients' details."""

    patient_of: list[int]  # per image
    follow_up: list[int]  # per image
    gender: dict[int, str]
    age: dict[int, int]
    test: set[int]  # the patients of the test list


def _patients(rng: np.random.Generator, total: int, test_fraction: float) -> _Patients:
    patient_of: list[int] = []
    follow_up: list[int] = []
    pid = 0
    while len(patient_of) < total:
        pid += 1
        for fu in range(int(rng.integers(1, 4))):
            if len(patient_of) < total:
                patient_of.append(pid)
                follow_up.append(fu)
    patients = sorted(set(patient_of))
    gender = {p: ("M" if rng.random() < 0.5 else "F") for p in patients}
    age = {p: int(rng.integers(18, 85)) for p in patients}
    n_test_patients = max(1, round(test_fraction * len(patients)))
    test_patients = set(rng.permutation(patients)[:n_test_patients].tolist())
    return _Patients(patient_of, follow_up, gender, age, test_patients)


def _bbox_rows(
    name: str, boxes: list[tuple[str, tuple[float, float, float, float]]]
) -> list[list[str]]:
    """BBox_List_2017.csv rows of an image's boxes: normalised -> 1024-pixel frame, clipped."""
    rows = []
    for finding, (bx, by, bw, bh) in boxes:
        x0, y0 = max(bx, 0.0), max(by, 0.0)
        x1, y1 = min(bx + bw, 1.0), min(by + bh, 1.0)
        vals = [v * CHEST_BBOX_FRAME for v in (x0, y0, x1 - x0, y1 - y0)]
        rows.append([name, finding, *(f"{v:.6f}" for v in vals), "", "", ""])
    return rows


def _write_tables(
    root: Path,
    entries: list[list[object]],
    bbox_rows: list[list[str]],
    train_list: list[str],
    test_list: list[str],
) -> None:
    """The two CSVs with the real headers, and the two image lists."""
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CHEST_DATA_ENTRY_COLUMNS, ""])  # the real header ends with a comma
        writer.writerows(entries)
    with open(root / "BBox_List_2017.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CHEST_BBOX_COLUMNS, "", "", ""])
        writer.writerows(bbox_rows)
    (root / "train_val_list.txt").write_text("".join(n + "\n" for n in train_list))
    (root / "test_list.txt").write_text("".join(n + "\n" for n in test_list))


def write_chestxray8(
    root: str | Path,
    n_normal: int = 40,
    n_abnormal: int = 40,
    size: int = 256,
    seed: int = 0,
    boxed_fraction: float = 0.5,
    ap_fraction: float = 0.1,
    test_fraction: float = 0.35,
    mixed_modes: bool = True,
) -> Path:
    """Write a ChestX-ray8-style dataset into `root` (returned): `images/*.png` (size x size),
    `Data_Entry_2017.csv`, `BBox_List_2017.csv`, `train_val_list.txt`, `test_list.txt`.

    Patients have 1-3 images (follow-ups); `ap_fraction` of the images are AP views, the rest PA;
    `test_fraction` of the patients form the patient-disjoint test list; `boxed_fraction` of the
    abnormal images get boxes. With `mixed_modes`, images 2, 3, 4 are RGBA, RGB and 16-bit PNGs.
    """
    if n_normal < 1 or n_abnormal < 0 or size < 16:
        raise DataError(
            f"write_chestxray8: need n_normal >= 1 and size >= 16, got {n_normal}, {size}"
        )
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 8])
    total = n_normal + n_abnormal
    abnormal = np.zeros(total, dtype=bool)
    abnormal[rng.permutation(total)[:n_abnormal]] = True
    pts = _patients(rng, total, test_fraction)
    modes = {1: "RGBA", 2: "RGB", 3: "I;16"} if mixed_modes else {}
    entries, bbox_rows, train_list, test_list = [], [], [], []
    for i in range(total):
        img_rng = np.random.default_rng([seed, 8, i])
        patient, fu = pts.patient_of[i], pts.follow_up[i]
        name = f"{patient:08d}_{fu:03d}.png"
        findings: list[str] = []
        if abnormal[i]:
            n_find = 1 + int(img_rng.random() < 0.3)
            findings = [str(f) for f in img_rng.choice(_CHEST_FINDINGS, n_find, replace=False)]
        grey, boxes = _chest_image(img_rng, size, findings)
        _save_png(grey, root / "images" / name, modes.get(i, "L"))
        if findings and img_rng.random() < boxed_fraction:
            bbox_rows += _bbox_rows(name, boxes)
        view = "AP" if img_rng.random() < ap_fraction else "PA"
        orig_w, orig_h = int(img_rng.integers(2000, 3000)), int(img_rng.integers(2000, 3000))
        label = "|".join(findings) if findings else "No Finding"
        age, gender = pts.age[patient] + fu, pts.gender[patient]
        entries.append(
            [name, label, fu, patient, age, gender, view, orig_w, orig_h, 0.143, 0.143, ""]
        )
        (test_list if patient in pts.test else train_list).append(name)
    _write_tables(root, entries, bbox_rows, train_list, test_list)
    return root
