"""Image files in, uint8 RGB arrays out: the one place the package reads and decodes images.

Portraits of a deletion request (``serve.request.read_portrait``), the records of the real
datasets (``datasets.decode_image``), their integrity audit (``audit``) and their TFDS build
(``tfds_builders.faces``) all read and decode through here, so each refuses the same files with
the same message. Every failure is one :class:`ImageError` (a ``DataError``) naming the file or
record and what was expected.

**Reading** (:func:`read_bytes`): regular files only. A named pipe, device, socket or directory
is refused from its ``stat`` before it is opened, and again from ``fstat`` of the opened file
(opened non-blocking, so a FIFO put in its place meanwhile cannot hang the open). A byte cap
(``DEFAULT_MAX_BYTES``, 64 MiB) is checked against the size ``stat`` gives before reading and
again while reading (at most ``max_bytes + 1`` bytes are read), so ``/dev/zero`` or a file that
grows cannot take the memory.

**Decoding** (:func:`decode`): the image as a viewer shows it, as uint8 ``(H, W, 3)`` RGB.

* A pixel cap (``DEFAULT_MAX_PIXELS``, 8192 x 8192) is checked from the header, before any
  pixel is decoded; PIL's own ``DecompressionBombError`` (twice ``Image.MAX_IMAGE_PIXELS``) is
  reported the same way. A width or height of 0 is refused.
* Multi-frame files (animated GIF / PNG / WebP, multi-page TIFF) give their first frame.
* EXIF orientation (2 to 8) is applied, as viewers and ``ImageOps.exif_transpose`` do; a tag
  that cannot be parsed is ignored, as viewers ignore it. No MUFAC image carries EXIF data at
  all (every one of the 13,068 files of ``mufac/*_images/`` was checked when this module was
  written: 128x128 RGB JPEGs, none with an orientation tag), so applying it to dataset records
  decodes every MUFAC image exactly as the reference's ``Image.open(p).convert("RGB")`` (also
  checked: every decoded array is bit-identical). The CelebA / CelebA-HQ images are not here
  to be checked.
* 8-bit modes are PIL's ``convert("RGB")``, bit for bit what the reference decodes: ``RGB`` as
  stored, ``L`` and ``1`` as grey, ``P`` through its palette, ``CMYK`` (PIL's naive conversion,
  no colour profile), ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``. ICC profiles are not applied
  (applying them would change ordinary JPEGs that carry an sRGB profile).
* Transparency (modes ``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``, a ``P`` palette with alpha, a
  ``tRNS`` colour key of ``P`` / ``L`` / ``RGB``): the colours (premultiplied ones divided by
  alpha first, by PIL's ``convert("RGBA")``) are composited over **white**,
  ``round((c * a + 255 * (255 - a)) / 255)`` in integers. White because that is what a web
  page, a document or an ID-photo form shows behind a cut-out portrait, so it is what the
  person saw when they handed it in; the reference's ``convert("RGB")`` instead drops alpha and
  shows whatever colour hides under transparent pixels (often black), which the file does not
  show.
* 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``): ``v`` becomes
  ``(v + 128) // 257``, which is ``round(v / 257)`` (no integer falls on a half): 65535 -> 255,
  32768 -> 128, 257 * k -> k. (PIL's ``convert("RGB")`` clips them at 255: almost every 16-bit
  image became an all-white square.)
* 32-bit integers (``I``): scaled as 16-bit when every value lies in [0, 65535]; otherwise
  refused, naming the range found.
* Floats (``F``): values in [0, 1] are multiplied by 255, values in [0, 255] kept, then rounded
  (halves up); other ranges, NaN and infinities are refused, naming the range found. An image
  whose maximum is at most 1 is read as [0, 1].
* The colour key of a 16-bit or float image and the lower byte of a 16-bit-per-channel RGB PNG
  (PIL keeps the high byte) are ignored.

:func:`check` is the audit's cheaper decode: a JPEG at 1/8 scale (still every entropy-coded
byte, so truncation and corruption are caught), everything else in full, without EXIF.
"""

from __future__ import annotations

import errno
import io
import os
import stat as stat_lib

import numpy as np

from oneshui_jax.errors import DataError

DEFAULT_MAX_BYTES = 64 * 2**20
"""Largest image file read, in bytes (64 MiB)."""
DEFAULT_MAX_PIXELS = 8192 * 8192
"""Largest image decoded, in pixels (width x height)."""
BACKGROUND = 255
"""What transparent pixels show: white (see the module docstring)."""

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_ORIENTATION = 0x0112
_EXPECTED = "expected a regular image file"


class ImageError(DataError):
    """An image file or record that cannot be used: ``name`` (e.g. ``portrait a.png``) and
    ``reason`` (what was found and what was expected); the message is both."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"cannot read {name}: {reason}")

    def __reduce__(self):  # intact through a worker process's pickle
        return type(self), (self.name, self.reason)


# --------------------------------------------------------------------------------------------
# Reading


def _not_regular(mode: int) -> str | None:
    """What a file of ``st_mode`` is, when it is not a regular file."""
    if stat_lib.S_ISREG(mode):
        return None
    if stat_lib.S_ISDIR(mode):
        return f"{os.strerror(errno.EISDIR)}; {_EXPECTED}"
    kinds = ((stat_lib.S_ISFIFO, "a named pipe (FIFO)"), (stat_lib.S_ISCHR, "a character device"),
             (stat_lib.S_ISBLK, "a block device"), (stat_lib.S_ISSOCK, "a socket"))
    kind = next((what for test, what in kinds if test(mode)), "not a regular file")
    return f"{kind}, not a regular file; {_EXPECTED}"


def _check_stat(st: os.stat_result, name: str, max_bytes: int) -> None:
    problem = _not_regular(st.st_mode)
    if problem:
        raise ImageError(name, problem)
    if st.st_size > max_bytes:
        raise ImageError(name, f"{st.st_size:,} bytes, above the cap of {max_bytes:,} bytes "
                               "per image file")


def _os_reason(e: OSError) -> str:
    return e.strerror or f"{type(e).__name__}: {e}"


def read_bytes(path: str | os.PathLike, *, name: str | None = None,
               max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of the image file ``path``: a regular file of at most ``max_bytes`` bytes.

    ``name`` is how errors name the file (default ``image <path>``). Anything else (missing,
    not a regular file, too large, unreadable) is one :class:`ImageError`; a named pipe or a
    device is never read (see the module docstring).
    """
    path = os.fspath(path)
    name = name or f"image {path}"
    try:
        _check_stat(os.stat(path), name, max_bytes)  # refused before being opened
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise ImageError(name, _os_reason(e)) from None
    try:
        _check_stat(os.fstat(fd), name, max_bytes)  # what was opened, if it changed meanwhile
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ImageError(name, _os_reason(e)) from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ImageError(name, f"grew above the cap of {max_bytes:,} bytes per image file while "
                               "being read")
    return data


# --------------------------------------------------------------------------------------------
# Decoding


def _oriented(image):
    """``image`` turned as its EXIF orientation says (the same image when it says nothing)."""
    from PIL import Image

    try:
        orientation = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 (malformed EXIF: viewers ignore it, so do we)
        return image
    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}.get(orientation)
    return image if method is None else image.transpose(method)


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.uint8)[..., None], 3, axis=2)


def _has_alpha(image) -> bool:
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")


def _to_rgb(image, name: str) -> np.ndarray:
    """A loaded PIL image as uint8 (H, W, 3) RGB, as shown (see the module docstring)."""
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(image)
        if mode == "I":
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi > 65535:
                raise ImageError(name, f"32-bit integer pixels range from {lo} to {hi}; expected "
                                       "values in [0, 65535] (16-bit greyscale)")
        return _grey((values.astype(np.int64) + 128) // 257)
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ImageError(name, "floating-point pixels include NaN or infinity; expected "
                                   "finite values in [0, 1] or [0, 255]")
        lo, hi = float(values.min()), float(values.max())
        if lo < 0 or hi > 255:
            raise ImageError(name, f"floating-point pixels range from {lo:g} to {hi:g}; "
                                   "expected values in [0, 1] or [0, 255]")
        return _grey(np.floor(values * (255.0 if hi <= 1 else 1.0) + 0.5))
    if _has_alpha(image):
        if mode == "La":  # PIL converts La only to LA
            image = image.convert("LA")
        rgba = np.asarray(image.convert("RGBA"), dtype=np.int64)
        alpha = rgba[..., 3:]
        shown = (rgba[..., :3] * alpha + BACKGROUND * (255 - alpha) + 127) // 255
        return shown.astype(np.uint8)
    return np.asarray(image.convert("RGB"))  # the reference's decode, bit for bit


def _decode(data: bytes, name: str, max_pixels: int, exif: bool, draft: bool) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:  # the first frame of a multi-frame file
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(name, f"{width}x{height} = {width * height:,} pixels, above "
                                       f"the cap of {max_pixels:,} pixels per image")
            if not width or not height:
                raise ImageError(name, f"empty ({width}x{height} pixels)")
            if draft:
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
            return _to_rgb(_oriented(image) if exif else image, name)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(name, "not an image in a format PIL reads (jpg, png, webp, ...)"
                         ) from None
    except Image.DecompressionBombError as e:
        raise ImageError(name, f"refused as a decompression bomb ({e}); the cap is "
                               f"{max_pixels:,} pixels per image") from None
    except Exception as e:  # noqa: BLE001 (any decoder error makes the image unusable)
        raise ImageError(name, f"{type(e).__name__}: {e}".strip()) from None


def decode(data: bytes, name: str = "image", *, max_pixels: int = DEFAULT_MAX_PIXELS,
           exif: bool = True) -> np.ndarray:
    """An image file's bytes as uint8 ``(H, W, 3)`` RGB, as a viewer shows it (module
    docstring); ``name`` names it in errors. ``exif=False`` ignores the EXIF orientation."""
    return _decode(data, name, max_pixels, exif, draft=False)


def check(data: bytes, name: str = "image", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Raises the :class:`ImageError` :func:`decode` would raise on ``data``, at less cost: a
    JPEG is decoded at 1/8 scale (every entropy-coded byte is still read)."""
    _decode(data, name, max_pixels, exif=False, draft=True)


def read(path: str | os.PathLike, *, name: str | None = None,
         max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
         exif: bool = True) -> tuple[np.ndarray, bytes]:
    """``(decode(read_bytes(path)), the file's bytes)``; errors name ``name`` (default
    ``image <path>``)."""
    name = name or f"image {os.fspath(path)}"
    data = read_bytes(path, name=name, max_bytes=max_bytes)
    return decode(data, name, max_pixels=max_pixels, exif=exif), data
