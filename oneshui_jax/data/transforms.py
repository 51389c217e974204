"""Image transforms of the reference (SPEC.md 1.4), in numpy and PIL.

* Train: ``RandomResizedCrop(size)`` with torchvision's defaults (scale 0.08-1, ratio 3/4-4/3,
  ten tries then a centre-crop fallback) on the PIL image, so the resize is PIL's antialiased
  bilinear; then a horizontal flip with p = 0.5; values mapped to [-1, 1] (mean = std = 0.5).
* Eval: values mapped to [-1, 1], then a bilinear resize to ``size x size`` with half-pixel
  centres and **no antialiasing** (torchvision's tensor ``Resize(antialias=None)``); the aspect
  ratio is not kept. Normalising before or after a bilinear resize gives the same result.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]: ``ToDtype(scale=True)`` + ``Normalize(0.5, 0.5)``."""
    return image.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def random_resized_crop_params(height: int, width: int, rng: np.random.Generator,
                               scale=SCALE, ratio=RATIO) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: (top, left, crop height, crop width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(image: np.ndarray, size: int, rng: np.random.Generator,
                    scale: tuple[float, float] = SCALE) -> np.ndarray:
    """RandomResizedCrop (PIL bilinear, antialiased) + horizontal flip; float32 in [-1, 1]."""
    top, left, h, w = random_resized_crop_params(image.shape[0], image.shape[1], rng, scale)
    pil = Image.fromarray(image).crop((left, top, left + w, top + h))
    out = np.asarray(pil.resize((size, size), Image.BILINEAR))
    if rng.uniform() < 0.5:
        out = out[:, ::-1]
    return normalize(out)


@functools.lru_cache(maxsize=64)
def _linear_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix of bilinear weights: half-pixel centres, edge clamp, no antialias."""
    # Coordinates in float32, as torch computes them, so the weights match its kernel.
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    src = np.maximum((np.arange(out_size, dtype=f32) + f32(0.5)) * scale - f32(0.5), f32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo.astype(f32)
    weights = np.zeros((out_size, in_size), f32)
    rows = np.arange(out_size)
    np.add.at(weights, (rows, lo), f32(1.0) - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float HWC image without antialiasing (torch ``antialias=False``)."""
    if image.shape[:2] == (height, width):
        return image.astype(np.float32, copy=False)
    h, w, c = image.shape
    wy = _linear_weights(h, height)
    wx = _linear_weights(w, width)
    # Two plain matrix products (rows, then columns): no einsum path search per image.
    rows = (wy @ image.astype(np.float32).reshape(h, w * c)).reshape(height, w, c)
    out = rows.transpose(0, 2, 1).reshape(height * c, w) @ wx.T
    return out.reshape(height, c, width).transpose(0, 2, 1)


def eval_transform(image: np.ndarray, size: int) -> np.ndarray:
    """Normalise to [-1, 1], then resize to ``size x size`` without antialiasing."""
    return resize_bilinear(normalize(image), size, size)


def preprocess_eval(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Eval-transform a list of uint8 HWC images of any size (e.g. portraits) into a batch."""
    return np.stack([eval_transform(np.asarray(im), size) for im in images])
