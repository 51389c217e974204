"""Small data folders in the exact on-disk formats of CelebA, CelebA-HQ and MUFAC.

CelebA and CelebA-HQ images are not available here: these writers take the first rows of the
real annotation files in ../shared/data (or made-up attributes where the real file is missing)
and write tiny JPEGs under the original names. MUFAC subsets link the real images.
"""

from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes "
    "No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling "
    "Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
    "Wearing_Necktie Young").split()


def write_jpeg(path: str, seed: int, size: tuple[int, int]) -> None:
    """A small random RGB JPEG (``size`` is width, height)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize(size, Image.NEAREST)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, format="JPEG", quality=90)


def _first_rows(path: str, n: int, skip: int = 0) -> list[str]:
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    return lines[skip:skip + n]


def write_celeba(root: str, shared_data: str, n: int = 40, seed: int = 0) -> np.ndarray:
    """``root/celeba/`` with ``n`` images, real identities, made-up attributes (returned, ±1)."""
    folder = os.path.join(root, "celeba")
    os.makedirs(folder, exist_ok=True)
    rows = _first_rows(os.path.join(shared_data, "celeba", "identity_CelebA.txt"), n)
    names = [r.split()[0] for r in rows]
    with open(os.path.join(folder, "identity_CelebA.txt"), "w", newline="\r\n") as f:
        f.write("\n".join(rows) + "\n")
    attrs = np.where(np.random.default_rng(seed).random((n, 40)) < 0.3, 1, -1)
    with open(os.path.join(folder, "list_attr_celeba.txt"), "w", newline="\r\n") as f:
        f.write(f"{n}\n" + " ".join(CELEBA_ATTRIBUTES) + " \n")
        for name, row in zip(names, attrs, strict=True):  # values padded to two characters
            f.write(name + " " + " ".join(f"{v:2d}" for v in row) + "\n")
    with open(os.path.join(folder, "list_eval_partition.txt"), "w", newline="\r\n") as f:
        f.write("".join(f"{name} {min(i % 10, 2)}\n" for i, name in enumerate(names)))
    for i, name in enumerate(names):
        write_jpeg(os.path.join(folder, "img_align_celeba", name), seed + i, (178, 218))
    return attrs


def write_celebahq(root: str, shared_data: str, n: int = 30, seed: int = 0) -> None:
    """``root/CelebAMask-HQ/`` with images ``0.jpg .. {n-1}.jpg`` and the real annotation rows."""
    folder = os.path.join(root, "CelebAMask-HQ")
    os.makedirs(folder, exist_ok=True)
    src = os.path.join(shared_data, "CelebAMask-HQ")
    identity_rows = [r for r in _first_rows(os.path.join(src, "CelebA-HQ-identity.txt"), 10**6)
                     if r.strip() and int(r.split()[0].split(".")[0]) < n]
    with open(os.path.join(folder, "CelebA-HQ-identity.txt"), "w") as f:
        f.write("\n".join(identity_rows) + "\n")
    header = _first_rows(os.path.join(src, "CelebAMask-HQ-attribute-anno.txt"), 1, skip=1)
    attr_rows = _first_rows(os.path.join(src, "CelebAMask-HQ-attribute-anno.txt"), n, skip=2)
    with open(os.path.join(folder, "CelebAMask-HQ-attribute-anno.txt"), "w") as f:
        f.write(f"{n}\n{header[0]}\n" + "\n".join(attr_rows) + "\n")
    for k in range(n):
        write_jpeg(os.path.join(folder, "CelebA-HQ-img", f"{k}.jpg"), seed + k, (64, 64))


def write_mufac_subset(root: str, shared_data: str, rows: dict[str, int]) -> None:
    """``root/mufac/`` with the first ``rows[split]`` rows of each real CSV (images linked)."""
    folder = os.path.join(root, "mufac")
    for split in ("train", "val", "test"):
        with open(os.path.join(shared_data, "mufac", f"custom_{split}_dataset.csv"),
                  newline="") as f:
            table = list(csv.reader(f))
        kept = table[:1 + rows[split]]
        os.makedirs(os.path.join(folder, f"{split}_images"), exist_ok=True)
        with open(os.path.join(folder, f"custom_{split}_dataset.csv"), "w", newline="") as f:
            csv.writer(f).writerows(kept)
        for row in kept[1:]:
            src = os.path.abspath(os.path.join(shared_data, "mufac", f"{split}_images", row[-1]))
            dst = os.path.join(folder, f"{split}_images", row[-1])
            if not os.path.exists(dst):
                os.symlink(src, dst)
