"""SynthFaces: the embedded default dataset of oneshui_jax.

SynthFaces is a licence-free, procedurally generated stand-in for CelebA / CelebA-HQ: small
face-like portraits of ``num_identities`` synthetic people, each photographed 2..30 times, with a
CelebA-like multi-label {0, 1} attribute task. Nothing is downloaded; every image is rendered with
numpy from ``(seed, identity, image-within-identity)``, so any image can be rendered on its own
(random access) and the whole dataset is reproducible from its :class:`SynthFacesConfig`.

The task is attribute prediction, NOT identity, exactly as in 1-SHUI. The attributes come in three
kinds (:data:`IDENTITY_ATTRIBUTES`, :data:`IMAGE_ATTRIBUTES`, :data:`QUIRK_ATTRIBUTES`):

(a) identity attributes are rendered and constant for a person (hair colour, baldness, long hair,
    skin tone, beard, nose size, eye shape, face shape, eyebrows);
(b) image attributes are rendered and vary from photo to photo (smile, open mouth, glasses, hat,
    bright light, blur, tilted head);
(c) annotator-quirk attributes are subjective judgements ("Attractive", "Trustworthy", ...): drawn
    at random once per person (independently of everything rendered) and copied to each of that
    person's images with a little per-image label noise. They are NOT visible in the image.

A model can fit (c) on a person only by recognising, i.e. memorising, that person: a model trained
on the person fits them, a model that never saw the person is at chance (50 %). That memorisation
gap between the original model and a model retrained without the person is what makes identity
unlearning measurable. Identities are therefore made recognisable: besides their face geometry and
colours, every person carries a few birthmarks at person-specific positions and a person-specific
fringe.

Per-image variation: background, clothing, pose (shift, rotation, scale), lighting (gain, contrast,
colour cast, side light), sensor noise and optional blur. Identity traits depend only on
``(seed, identity)`` and images per identity are a prefix-stable draw, so a config with fewer
identities (same seed) contains the same people as the first identities of a bigger one.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Iterator
from typing import TypedDict

import numpy as np
from PIL import Image

IDENTITY_ATTRIBUTES: tuple[str, ...] = (
    "Black_Hair",
    "Brown_Hair",
    "Blond_Hair",
    "Gray_Hair",
    "Bald",
    "Long_Hair",
    "Pale_Skin",
    "Beard",
    "Big_Nose",
    "Narrow_Eyes",
    "Round_Face",
    "Bushy_Eyebrows",
)
IMAGE_ATTRIBUTES: tuple[str, ...] = (
    "Smiling",
    "Mouth_Open",
    "Eyeglasses",
    "Wearing_Hat",
    "Bright_Light",
    "Blurry",
    "Head_Tilted",
)
QUIRK_ATTRIBUTES: tuple[str, ...] = (
    "Attractive",
    "Trustworthy",
    "Friendly",
    "Confident",
    "Intelligent",
)
ATTRIBUTE_NAMES: tuple[str, ...] = IDENTITY_ATTRIBUTES + IMAGE_ATTRIBUTES + QUIRK_ATTRIBUTES

QUIRK_LABEL_NOISE = 0.05
"""Probability that an annotator flips a quirk label on one image."""

MEAN_IMAGES_TARGET = (7.0, 9.0)
"""Documented range of the mean number of images per identity (default 2..30 spread)."""

_GEOMETRIC_P = 1.0 / 7.0  # images - min_images ~ truncated geometric: mean ~7.9 for 2..30

# Independent random streams, all keyed by the config seed.
_COUNTS_STREAM, _IDENTITY_STREAM, _QUIRK_STREAM, _IMAGE_STREAM = 1, 2, 3, 4

# Hair colours (RGB) and the attribute each one sets; red hair sets none.
_HAIR_COLOURS = np.array(
    [[25, 20, 20], [95, 60, 35], [215, 180, 105], [165, 165, 160], [150, 60, 30]], np.float32
)
_HAIR_LABELS = ("Black_Hair", "Brown_Hair", "Blond_Hair", "Gray_Hair", None)
_HAIR_PROBS = (0.3, 0.3, 0.18, 0.12, 0.1)
_EYE_COLOURS = np.array([[60, 40, 25], [40, 90, 140], [60, 110, 60], [110, 90, 40]], np.float32)
_MARK_COLOURS = np.array([[105, 55, 35], [150, 40, 50], [40, 30, 30], [70, 50, 120]], np.float32)


@dataclasses.dataclass(frozen=True)
class SynthFacesConfig:
    """What to generate: identities, spread of images per identity, resolution and seed."""

    num_identities: int = 1200
    min_images: int = 2
    max_images: int = 30
    image_size: int = 48
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_identities < 1:
            raise ValueError(f"num_identities must be >= 1, got {self.num_identities}")
        if self.min_images < 1:
            raise ValueError(f"min_images must be >= 1, got {self.min_images}")
        if self.max_images < self.min_images:
            raise ValueError(
                f"max_images must be >= min_images ({self.min_images}), got {self.max_images}"
            )
        if not 32 <= self.image_size <= 64:
            raise ValueError(f"image_size must be in 32..64, got {self.image_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


CONFIGS: dict[str, SynthFacesConfig] = {
    "medium": SynthFacesConfig(num_identities=600),
    "large": SynthFacesConfig(),
    "small": SynthFacesConfig(num_identities=150, image_size=32),
}
"""Named configs (also the TFDS builder configs). ``medium`` (600 identities, 48 px) is the
default study's: all nine rows and the privacy attacks fit 10 minutes on 2 CPU cores. ``large``
(1,200 identities; named ``default`` before the attacks joined the default study) and ``small``
(150 identities at 32 px, for tests). Fewer identities are a prefix of more: the first 600 of
``large`` are ``medium``. A config's name is not part of the data's fingerprint: checkpoints
made under the old name are reused as ``large`` once their folder ``<checkpoint_dir>/synthfaces``
is renamed ``synthfaces_large`` (left where they are, the ``medium`` study refuses them, naming
the difference)."""

DEFAULT_CONFIG = "medium"
"""The builder's default config and the default of ``configs/synthfaces.py``."""


def named_config(name: str) -> SynthFacesConfig:
    """The named config ``name`` (one of :data:`CONFIGS`)."""
    if name not in CONFIGS:
        hint = " ('default' is now called 'large')" if name == "default" else ""
        raise ValueError(f"unknown SynthFaces config {name!r}; expected one of "
                         f"{sorted(CONFIGS)}{hint}")
    return CONFIGS[name]


class Example(TypedDict):
    """One SynthFaces example, as yielded by :func:`examples`."""

    image: np.ndarray  # uint8 (S, S, 3)
    label: np.ndarray  # uint8 (len(ATTRIBUTE_NAMES),)
    identity: int
    index: int
    file_name: str


# --------------------------------------------------------------------------------------------
# Identities and the images-per-identity spread (cheap: no rendering).


@functools.lru_cache(maxsize=32)
def _counts(cfg: SynthFacesConfig) -> np.ndarray:
    # Truncated geometric by inverse CDF: mode at min_images, long tail up to max_images.
    # One uniform per identity from one stream, so identity i's count does not depend on K.
    u = np.random.default_rng([cfg.seed, _COUNTS_STREAM]).random(cfg.num_identities)
    q = 1.0 - _GEOMETRIC_P
    span = cfg.max_images - cfg.min_images + 1
    extra = np.floor(np.log1p(-u * (1.0 - q**span)) / np.log(q)).astype(np.int64)
    counts = cfg.min_images + np.minimum(extra, span - 1)
    counts.flags.writeable = False
    return counts


def images_per_identity(cfg: SynthFacesConfig) -> np.ndarray:
    """Number of images of each identity 0..K-1 (int64, skewed spread in min..max images)."""
    return _counts(cfg).copy()


def identity_table(cfg: SynthFacesConfig) -> np.ndarray:
    """Identity id (int64) of every image in dataset order, without rendering anything.

    Ids are 0..K-1, the images of one identity are contiguous and identities come in order.
    """
    return np.repeat(np.arange(cfg.num_identities, dtype=np.int64), _counts(cfg))


def num_images(cfg: SynthFacesConfig) -> int:
    """Total number of images of the dataset."""
    return int(_counts(cfg).sum())


def file_name(identity: int, k: int) -> str:
    """File name of the ``k``-th image of ``identity``."""
    return f"{identity:05d}_{k:02d}.png"


# --------------------------------------------------------------------------------------------
# Identity traits, image parameters and labels.


@dataclasses.dataclass(frozen=True)
class _Person:
    """Identity-level traits (face-relative units: head semi-height ~0.47)."""

    hair: int  # index into _HAIR_COLOURS
    hair_rgb: np.ndarray
    skin_rgb: np.ndarray
    eye_rgb: np.ndarray
    lip_rgb: np.ndarray
    bald: bool
    long_hair: bool
    pale: bool
    beard: bool
    big_nose: bool
    narrow_eyes: bool
    round_face: bool
    bushy_brows: bool
    head_a: float  # head semi-width
    head_b: float  # head semi-height
    eye_dx: float  # half distance between the eyes
    eye_y: float
    mouth_w: float
    fringe_y: float  # hairline height at the parting
    fringe_slope: float
    parting: float  # horizontal position of the parting
    marks: np.ndarray  # (M, 2) positions relative to the head semi-axes
    mark_r: np.ndarray  # (M,)
    mark_rgb: np.ndarray  # (M, 3)
    quirks: np.ndarray  # uint8 (len(QUIRK_ATTRIBUTES),)


@functools.lru_cache(maxsize=4096)
def _person(seed: int, identity: int) -> _Person:
    rng = np.random.default_rng([seed, _IDENTITY_STREAM, identity])
    hair = int(rng.choice(len(_HAIR_COLOURS), p=_HAIR_PROBS))
    pale = bool(rng.random() < 0.25)
    tone = rng.uniform(0.8, 1.0) if pale else rng.uniform(0.3, 0.75)
    skin = np.array([85, 50, 35]) + tone * np.array([160, 160, 150]) + rng.normal(0, 6, 3)
    bald = bool(rng.random() < 0.1)
    round_face = bool(rng.random() < 0.4)
    head_b = rng.uniform(0.43, 0.5)
    aspect = rng.uniform(0.9, 0.98) if round_face else rng.uniform(0.7, 0.8)
    num_marks = int(rng.integers(2, 5))
    marks = np.stack(
        [rng.uniform(-0.65, 0.65, num_marks), rng.uniform(-0.45, 0.75, num_marks)], axis=1
    )
    quirk_rng = np.random.default_rng([seed, _QUIRK_STREAM, identity])
    return _Person(
        hair=hair,
        hair_rgb=_HAIR_COLOURS[hair] * rng.uniform(0.8, 1.15) + rng.normal(0, 8, 3),
        skin_rgb=skin.astype(np.float32),
        eye_rgb=_EYE_COLOURS[rng.integers(len(_EYE_COLOURS))] + rng.normal(0, 10, 3),
        lip_rgb=(skin * rng.uniform(0.55, 0.75) + np.array([40, 0, 0])).astype(np.float32),
        bald=bald,
        long_hair=bool(not bald and rng.random() < 0.35),
        pale=pale,
        beard=bool(rng.random() < 0.25),
        big_nose=bool(rng.random() < 0.3),
        narrow_eyes=bool(rng.random() < 0.3),
        round_face=round_face,
        bushy_brows=bool(rng.random() < 0.3),
        head_a=head_b * aspect,
        head_b=head_b,
        eye_dx=rng.uniform(0.14, 0.22),
        eye_y=rng.uniform(-0.1, 0.0),
        mouth_w=rng.uniform(0.1, 0.17),
        fringe_y=rng.uniform(-0.38, -0.22),
        fringe_slope=rng.uniform(-0.5, 0.5),
        parting=rng.uniform(-0.25, 0.25),
        marks=marks,
        mark_r=rng.uniform(0.045, 0.07, num_marks),
        mark_rgb=_MARK_COLOURS[rng.integers(len(_MARK_COLOURS), size=num_marks)],
        quirks=(quirk_rng.random(len(QUIRK_ATTRIBUTES)) < 0.5).astype(np.uint8),
    )


@dataclasses.dataclass(frozen=True)
class _Shot:
    """Per-image draws: expression, accessories, pose, lighting and camera."""

    smiling: bool
    mouth_open: bool
    glasses: bool
    hat: bool
    bright: bool
    blurry: bool
    tilted: bool
    angle: float  # radians
    shift: np.ndarray  # (2,) in image half-widths
    scale: float
    gain: float
    contrast: float
    cast: np.ndarray  # (3,) per-channel gain
    side_light: float
    blur_sigma: float  # pixels at 48 px
    noise_sigma: float
    background: np.ndarray  # (2, 3) top and bottom colours
    cloth_rgb: np.ndarray
    accessory_rgb: np.ndarray
    quirk_flips: np.ndarray  # bool (len(QUIRK_ATTRIBUTES),)
    noise_seed: int


def _shot(seed: int, identity: int, k: int) -> _Shot:
    rng = np.random.default_rng([seed, _IMAGE_STREAM, identity, k])
    smiling = bool(rng.random() < 0.5)
    tilted = bool(rng.random() < 0.3)
    bright = bool(rng.random() < 0.3)
    blurry = bool(rng.random() < 0.15)
    angle = rng.uniform(0.2, 0.4) if tilted else rng.uniform(-0.07, 0.07)
    return _Shot(
        smiling=smiling,
        mouth_open=bool(rng.random() < (0.45 if smiling else 0.25)),
        glasses=bool(rng.random() < 0.2),
        hat=bool(rng.random() < 0.15),
        bright=bright,
        blurry=blurry,
        tilted=tilted,
        angle=float(angle * rng.choice([-1.0, 1.0])),
        shift=rng.uniform(-0.08, 0.08, 2),
        scale=rng.uniform(1.12, 1.3),
        gain=rng.uniform(1.3, 1.5) if bright else rng.uniform(0.75, 1.05),
        contrast=rng.uniform(0.8, 1.1),
        cast=rng.uniform(0.92, 1.08, 3),
        side_light=rng.uniform(-0.15, 0.15),
        blur_sigma=rng.uniform(0.9, 1.3) if blurry else 0.0,
        noise_sigma=rng.uniform(1.0, 4.0),
        background=rng.uniform(40, 220, (2, 3)),
        cloth_rgb=rng.uniform(20, 230, 3),
        accessory_rgb=rng.uniform(10, 200, 3),
        quirk_flips=rng.random(len(QUIRK_ATTRIBUTES)) < QUIRK_LABEL_NOISE,
        noise_seed=int(rng.integers(2**31)),
    )


def _labels(person: _Person, shot: _Shot) -> np.ndarray:
    on = {
        _HAIR_LABELS[person.hair],
        "Bald" if person.bald else None,
        "Long_Hair" if person.long_hair else None,
        "Pale_Skin" if person.pale else None,
        "Beard" if person.beard else None,
        "Big_Nose" if person.big_nose else None,
        "Narrow_Eyes" if person.narrow_eyes else None,
        "Round_Face" if person.round_face else None,
        "Bushy_Eyebrows" if person.bushy_brows else None,
        "Smiling" if shot.smiling else None,
        "Mouth_Open" if shot.mouth_open else None,
        "Eyeglasses" if shot.glasses else None,
        "Wearing_Hat" if shot.hat else None,
        "Bright_Light" if shot.bright else None,
        "Blurry" if shot.blurry else None,
        "Head_Tilted" if shot.tilted else None,
    }
    visible = np.array([name in on for name in ATTRIBUTE_NAMES[: -len(QUIRK_ATTRIBUTES)]])
    quirks = person.quirks ^ shot.quirk_flips.astype(np.uint8)
    return np.concatenate([visible.astype(np.uint8), quirks])


# --------------------------------------------------------------------------------------------
# Drawing: soft (anti-aliased) shapes on a face-relative coordinate grid.


class _Canvas:
    """RGB float canvas plus the face-relative coordinates (u right, v down) of its pixels."""

    def __init__(self, size: int, shot: _Shot) -> None:
        centres = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
        x, y = np.meshgrid(centres - shot.shift[0], centres - shot.shift[1])
        cos, sin = np.cos(shot.angle), np.sin(shot.angle)
        self.u = (cos * x + sin * y) / shot.scale
        self.v = (-sin * x + cos * y) / shot.scale
        self.px = size / 2.0 * shot.scale  # pixels per face unit
        ramp = ((centres + 1.0) / 2.0)[:, None, None]
        self.rgb = np.broadcast_to(
            shot.background[0] * (1.0 - ramp) + shot.background[1] * ramp, (size, size, 3)
        ).copy()

    def ellipse(self, cx: float, cy: float, a: float, b: float) -> np.ndarray:
        """Coverage (0..1) of an axis-aligned ellipse."""
        r = np.sqrt(((self.u - cx) / a) ** 2 + ((self.v - cy) / b) ** 2)
        return np.clip(0.5 - (r - 1.0) * min(a, b) * self.px, 0.0, 1.0)

    def below(self, y: np.ndarray | float) -> np.ndarray:
        """Coverage of the half-plane v > y (y may vary per pixel)."""
        return np.clip(0.5 + (self.v - y) * self.px, 0.0, 1.0)

    def paint(self, alpha: np.ndarray, colour: np.ndarray) -> None:
        self.rgb += alpha[..., None] * (np.asarray(colour, np.float32) - self.rgb)


def _draw_body_and_head(c: _Canvas, p: _Person, shot: _Shot) -> np.ndarray:
    if p.long_hair:
        back = c.ellipse(0.0, 0.12, p.head_a * 1.35, p.head_b * 1.25) * (1 - c.below(0.75))
        c.paint(back, p.hair_rgb * 0.85)
    c.paint(c.ellipse(0.0, 1.2, 0.9, 0.55), shot.cloth_rgb)
    c.paint(c.ellipse(0.0, 0.55, p.head_a * 0.5, 0.3), p.skin_rgb * 0.85)
    for side in (-1.0, 1.0):
        c.paint(c.ellipse(side * p.head_a, 0.02, 0.07, 0.11), p.skin_rgb * 0.9)
    head = c.ellipse(0.0, 0.0, p.head_a, p.head_b)
    c.paint(head, p.skin_rgb)
    return head


def _draw_hair(c: _Canvas, p: _Person, head: np.ndarray) -> None:
    hairline = p.fringe_y + p.fringe_slope * (c.u - p.parting) * (c.u > p.parting)
    scalp = c.ellipse(0.0, -0.03, p.head_a * 1.08, p.head_b * 1.06)
    if p.bald:  # a fringe of hair above the ears only
        sides = c.below(-0.12) * (1 - c.below(0.08)) * (np.abs(c.u) > p.head_a * 0.8)
        c.paint(scalp * sides, p.hair_rgb)
        return
    c.paint(scalp * (1 - c.below(hairline)), p.hair_rgb)
    parting_line = np.clip(1.0 - np.abs(c.u - p.parting) * c.px, 0.0, 1.0)
    c.paint(0.5 * parting_line * head * (1 - c.below(p.fringe_y)), p.skin_rgb)


def _draw_marks(c: _Canvas, p: _Person, head: np.ndarray) -> None:
    for (mu, mv), r, rgb in zip(p.marks, p.mark_r, p.mark_rgb, strict=True):
        c.paint(c.ellipse(mu * p.head_a, mv * p.head_b, r, r) * head, rgb)


def _draw_eyes(c: _Canvas, p: _Person) -> None:
    eye_h = 0.028 if p.narrow_eyes else 0.05
    brow_h = 0.035 if p.bushy_brows else 0.016
    for side in (-1.0, 1.0):
        x = side * p.eye_dx
        c.paint(c.ellipse(x, p.eye_y, 0.075, eye_h), np.array([240, 240, 235]))
        c.paint(c.ellipse(x, p.eye_y, 0.036, min(eye_h, 0.036)), p.eye_rgb)
        c.paint(c.ellipse(x, p.eye_y, 0.016, min(eye_h, 0.016)), np.array([10, 10, 10]))
        c.paint(c.ellipse(x, p.eye_y - 0.09, 0.09, brow_h), p.hair_rgb * 0.8)


def _draw_nose_and_mouth(c: _Canvas, p: _Person, shot: _Shot) -> None:
    size = 1.5 if p.big_nose else 1.0
    c.paint(c.ellipse(0.0, 0.1, 0.035 * size, 0.09 * size), p.skin_rgb * 0.82)
    c.paint(c.ellipse(0.0, 0.1 + 0.08 * size, 0.05 * size, 0.025 * size), p.skin_rgb * 0.65)
    y, w = 0.3, p.mouth_w
    if shot.mouth_open:
        inside = c.ellipse(0.0, y, w, 0.07)
        if shot.smiling:  # D-shaped open smile with teeth
            inside = inside * c.below(y - 0.01)
            c.paint(inside, np.array([90, 20, 25]))
            c.paint(inside * (1 - c.below(y + 0.025)), np.array([235, 235, 225]))
        else:
            c.paint(inside, np.array([90, 20, 25]))
    elif shot.smiling:  # upward arc: lower part of an elliptic ring
        ring = c.ellipse(0.0, y - 0.05, w, 0.08) * (1 - c.ellipse(0.0, y - 0.065, w, 0.075))
        c.paint(ring * c.below(y - 0.04), p.lip_rgb)
    else:
        c.paint(c.ellipse(0.0, y, w, 0.02), p.lip_rgb)


def _draw_beard(c: _Canvas, p: _Person, shot: _Shot, head: np.ndarray) -> None:
    jaw = c.ellipse(0.0, 0.02, p.head_a * 1.04, p.head_b * 1.06) * c.below(0.2)
    mouth = c.ellipse(0.0, 0.3, p.mouth_w + 0.02, 0.1 if shot.mouth_open else 0.045)
    c.paint(0.85 * np.maximum(jaw, head * c.below(0.22)) * (1 - mouth), p.hair_rgb)


def _draw_glasses(c: _Canvas, p: _Person, shot: _Shot) -> None:
    for side in (-1.0, 1.0):
        x = side * p.eye_dx
        outer = c.ellipse(x, p.eye_y, 0.115, 0.085)
        inner = c.ellipse(x, p.eye_y, 0.09, 0.062)
        c.paint(0.15 * inner, np.array([200, 220, 255]))
        c.paint(outer * (1 - inner), shot.accessory_rgb * 0.4)
    bridge = c.ellipse(0.0, p.eye_y - 0.01, p.eye_dx - 0.1, 0.015)
    c.paint(bridge, shot.accessory_rgb * 0.4)


def _draw_hat(c: _Canvas, p: _Person, shot: _Shot) -> None:
    brim_y = p.fringe_y - 0.02
    crown = c.ellipse(0.0, brim_y, p.head_a * 1.1, p.head_b * 0.7) * (1 - c.below(brim_y))
    c.paint(crown, shot.accessory_rgb)
    c.paint(c.ellipse(0.0, brim_y, p.head_a * 1.45, 0.04), shot.accessory_rgb * 0.8)


def _photograph(c: _Canvas, shot: _Shot, size: int) -> np.ndarray:
    """Lighting, blur and sensor noise; returns the uint8 image."""
    light = 1.0 + shot.side_light * c.u[..., None]
    rgb = ((c.rgb - 128.0) * shot.contrast + 128.0) * shot.gain * shot.cast * light
    if shot.blur_sigma > 0:
        sigma = shot.blur_sigma * size / 48.0
        kernel = _blur_matrix(size, round(sigma * 100))
        rgb = (kernel @ rgb.transpose(2, 0, 1) @ kernel.T).transpose(1, 2, 0)
    noise = np.random.default_rng(shot.noise_seed).normal(0.0, shot.noise_sigma, rgb.shape)
    return np.clip(rgb + noise, 0, 255).round().astype(np.uint8)


@functools.lru_cache(maxsize=256)
def _blur_matrix(size: int, sigma_centi: int) -> np.ndarray:
    """Row-normalised Gaussian blur as a (size, size) matrix (sigma given in 1/100 px)."""
    pos = np.arange(size, dtype=np.float32)
    kernel = np.exp(-0.5 * ((pos[:, None] - pos[None, :]) / (sigma_centi / 100.0)) ** 2)
    return kernel / kernel.sum(axis=1, keepdims=True)


def _render_one(cfg: SynthFacesConfig, identity: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    p = _person(cfg.seed, identity)
    shot = _shot(cfg.seed, identity, k)
    c = _Canvas(cfg.image_size, shot)
    head = _draw_body_and_head(c, p, shot)
    _draw_marks(c, p, head)
    _draw_hair(c, p, head)
    _draw_eyes(c, p)
    if p.beard:
        _draw_beard(c, p, shot, head)
    _draw_nose_and_mouth(c, p, shot)
    if shot.glasses:
        _draw_glasses(c, p, shot)
    if shot.hat:
        _draw_hat(c, p, shot)
    return _photograph(c, shot, cfg.image_size), _labels(p, shot)


# --------------------------------------------------------------------------------------------
# Public rendering API.


def render(cfg: SynthFacesConfig, index: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Render image ``index`` (dataset order): ``(image uint8 (S, S, 3), labels uint8, identity)``.

    Random access: equal to the ``index``-th example of :func:`examples`.
    """
    counts = _counts(cfg)
    total = int(counts.sum())
    if not 0 <= index < total:
        raise IndexError(f"index {index} out of range for {total} images")
    starts = np.cumsum(counts) - counts
    identity = int(np.searchsorted(starts, index, side="right") - 1)
    image, labels = _render_one(cfg, identity, index - int(starts[identity]))
    return image, labels, identity


def label_table(cfg: SynthFacesConfig) -> np.ndarray:
    """Labels (uint8, ``(num_images, num_attributes)``) in dataset order, without rendering."""
    return np.stack(
        [
            _labels(_person(cfg.seed, identity), _shot(cfg.seed, identity, k))
            for identity, count in enumerate(_counts(cfg).tolist())
            for k in range(count)
        ]
    )


def examples(cfg: SynthFacesConfig) -> Iterator[Example]:
    """Yield every example in dataset order (identity by identity)."""
    index = 0
    for identity, count in enumerate(_counts(cfg).tolist()):
        for k in range(count):
            image, labels = _render_one(cfg, identity, k)
            yield Example(
                image=image,
                label=labels,
                identity=identity,
                index=index,
                file_name=file_name(identity, k),
            )
            index += 1


def encode_png(image: np.ndarray) -> bytes:
    """PNG-encode a uint8 (H, W, 3) image with PIL."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
