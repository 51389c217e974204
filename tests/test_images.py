"""Every byte an image file can hold (``oneshui_jax/data/images.py``): each PIL mode decoded to
what it shows or refused with one line naming the file, only regular files read, byte and pixel
caps; through the portrait reader and the request command line (``cli.request.main``, which is
``python -m oneshui_jax.unlearn``), the dataset records, the audit and the TFDS build.

Each image is a few pixels with known values, written with PIL to a temporary file; the expected
pixels are computed here from those values, not by the module. Modes no file format holds once
read back (``HSV``, ``I;16N``, in-memory ``RGBa``, a palette with alpha) are converted
directly.
"""

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import threading
import tracemalloc
import types
import zlib

import doubles
import numpy as np
import pytest
from PIL import Image

from oneshui_jax import serve
from oneshui_jax.cli import request as request_cli
from oneshui_jax.data import audit, datasets, images
from oneshui_jax.errors import DataError
from oneshui_jax.serve import request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHITE = 255  # what transparent pixels show (images.BACKGROUND)


# --------------------------------------------------------------------------------------------
# Helpers


def save(tmp_path, image: Image.Image, fmt: str, name: str | None = None, **kwargs) -> str:
    path = str(tmp_path / (name or f"image.{fmt.lower()}"))
    image.save(path, fmt, **kwargs)
    return path


def decoded(path: str, **kwargs) -> np.ndarray:
    """The portrait reader's array (what the request command line serves)."""
    array, _ = request.read_portrait(path, **kwargs)
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    return array


def grey(values) -> np.ndarray:
    values = np.asarray(values, np.uint8)
    return np.stack([values] * 3, axis=-1)


def over_white(rgb, alpha) -> np.ndarray:
    """``rgb`` with ``alpha`` over white, rounded: computed in floats here."""
    rgb, alpha = np.asarray(rgb, np.float64), np.asarray(alpha, np.float64)[..., None] / 255
    return np.floor(rgb * alpha + WHITE * (1 - alpha) + 0.5).astype(np.uint8)


def refused(fn, *words: str):
    """``fn()`` raises one DataError (one line) naming every word; returns the message."""
    with pytest.raises(DataError) as error:
        fn()
    message = str(error.value)
    assert "\n" not in message, message
    missing = [w for w in words if w not in message]
    assert not missing, f"{missing} not in {message!r}"
    return message


def within(seconds: float, fn, *args, unblock=None):
    """``fn(*args)`` in a thread that must end within ``seconds``: ``(value, exception)``.

    A call that hangs (a FIFO opened for reading waits for a writer) is freed by ``unblock``
    before the test fails, so a failing test ends too."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    hung = thread.is_alive()
    if hung and unblock is not None:
        unblock()
        thread.join(10)
    assert not hung, f"{getattr(fn, '__name__', fn)} did not return within {seconds} s"
    return result.get("value"), result.get("error")


def fifo(tmp_path, name: str = "portrait.png") -> tuple[str, object]:
    """A named pipe, and what frees a reader blocked on it (a writer that opens and closes)."""
    path = str(tmp_path / name)
    os.mkfifo(path)

    def unblock():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    return path, unblock


def tiff_with_associated_alpha(tmp_path, image: Image.Image, name: str) -> str:
    """``image`` (LA or RGBA) as a TIFF whose alpha is *associated* (premultiplied:
    ExtraSamples = 1), which PIL cannot write itself: the tag is patched after saving."""
    buffer = io.BytesIO()
    image.save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, entry)[0] == 338:  # ExtraSamples, one SHORT
            struct.pack_into("<H", data, entry + 8, 1)
            break
    else:
        raise AssertionError("no ExtraSamples tag")
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(bytes(data))
    return path


def png_claiming(width: int, height: int) -> bytes:
    """A few bytes of PNG whose header claims ``width`` x ``height`` pixels (no pixel data)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------------
# Every mode, as shown


RGB = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]],
                [[0, 0, 0], [255, 255, 255], [128, 64, 32], [1, 2, 3]],
                [[200, 100, 50], [7, 77, 177], [90, 90, 90], [254, 253, 252]]], np.uint8)
L = np.array([[0, 1, 127, 128], [254, 255, 30, 60], [90, 120, 150, 180]], np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP"])
def test_8bit_rgb_is_stored_pixels_and_the_references_decode(tmp_path, fmt):
    path = save(tmp_path, Image.fromarray(RGB), fmt)
    np.testing.assert_array_equal(decoded(path), RGB)


def test_jpeg_decodes_as_the_reference_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    for mode in ("RGB", "L", "CMYK"):
        image = Image.fromarray(pixels).convert(mode)
        path = save(tmp_path, image, "JPEG", f"{mode}.jpg", quality=90)
        with Image.open(path) as reference:  # the reference: Image.open(p).convert("RGB")
            expected = np.asarray(reference.convert("RGB"))
        np.testing.assert_array_equal(decoded(path), expected)
        with open(path, "rb") as f:
            np.testing.assert_array_equal(datasets.decode_image(f.read()), expected)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "JPEG"])
def test_greyscale_l(tmp_path, fmt):
    path = save(tmp_path, Image.fromarray(L), fmt)
    if fmt == "JPEG":  # lossy: the decoded grey, replicated
        with Image.open(path) as image:
            expected = grey(np.asarray(image))
    else:
        expected = grey(L)
    np.testing.assert_array_equal(decoded(path), expected)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_bilevel_1(tmp_path, fmt):
    bits = L >= 128
    path = save(tmp_path, Image.fromarray(bits), fmt)
    assert Image.open(path).mode == "1"
    np.testing.assert_array_equal(decoded(path), grey(np.where(bits, 255, 0)))


PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0]], np.uint8)
INDICES = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [0, 0, 3, 3]], np.uint8)


def palette_image() -> Image.Image:
    image = Image.fromarray(INDICES, "P")
    image.putpalette(PALETTE.ravel().tolist())
    return image


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "TIFF", "BMP"])
def test_palette_p_shows_its_colours(tmp_path, fmt):
    path = save(tmp_path, palette_image(), fmt)
    np.testing.assert_array_equal(decoded(path), PALETTE[INDICES])


def test_palette_with_transparency_is_shown_over_white(tmp_path):
    # PNG tRNS: index 0 transparent, 1 half (alpha 128), 2 and 3 opaque
    alphas = np.array([0, 128, 255, 255])
    path = save(tmp_path, palette_image(), "PNG", transparency=bytes(alphas.tolist()))
    assert Image.open(path).mode == "P"
    expected = over_white(PALETTE[INDICES], alphas[INDICES])
    np.testing.assert_array_equal(decoded(path), expected)
    assert (decoded(path)[0, 0] == 255).all()  # index 0 (red), transparent: white
    np.testing.assert_array_equal(decoded(path)[0, 1], [127, 255, 127])  # green at alpha 128
    # GIF: one transparent index
    path = save(tmp_path, palette_image(), "GIF", transparency=3)
    np.testing.assert_array_equal(decoded(path), over_white(PALETTE[INDICES],
                                                            np.where(INDICES == 3, 0, 255)))


def test_colour_key_of_rgb_and_l_pngs_is_shown_over_white(tmp_path):
    path = save(tmp_path, Image.fromarray(RGB), "PNG", "rgb_key.png", transparency=(0, 0, 0))
    key = (RGB == 0).all(axis=-1)
    np.testing.assert_array_equal(decoded(path), np.where(key[..., None], 255, RGB))
    path = save(tmp_path, Image.fromarray(L), "PNG", "l_key.png", transparency=0)
    np.testing.assert_array_equal(decoded(path), grey(np.where(L == 0, 255, L)))


ALPHA = np.array([[0, 255, 128, 102], [255, 0, 51, 204], [128, 128, 255, 0]], np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_la_over_white(tmp_path, fmt):
    path = save(tmp_path, Image.fromarray(np.stack([L, ALPHA], -1), "LA"), fmt)
    assert Image.open(path).mode == "LA"
    np.testing.assert_array_equal(decoded(path), over_white(grey(L), ALPHA))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_rgba_over_white(tmp_path, fmt):
    kwargs = {"lossless": True, "exact": True} if fmt == "WEBP" else {}
    path = save(tmp_path, Image.fromarray(np.concatenate([RGB, ALPHA[..., None]], -1), "RGBA"),
                fmt, **kwargs)
    assert Image.open(path).mode == "RGBA"
    expected = over_white(RGB, ALPHA)
    np.testing.assert_array_equal(decoded(path), expected)
    assert (expected[ALPHA == 0] == 255).all() and (expected[ALPHA == 255] == RGB[ALPHA == 255]
                                                     ).all()


def test_pa_over_white(tmp_path):
    image = palette_image().convert("PA")
    image.putalpha(Image.fromarray(ALPHA))
    path = save(tmp_path, image, "TIFF")
    assert Image.open(path).mode == "PA"
    np.testing.assert_array_equal(decoded(path), over_white(PALETTE[INDICES], ALPHA))


def test_premultiplied_alpha_la_and_rgba_over_white(tmp_path):
    """Associated (premultiplied) alpha: a colour ``c`` stored as ``p = c * a / 255`` shows
    ``p + 255 - a`` over white. PIL opens such a TIFF as ``La``, or ``RGBA`` from ``RGBa``."""
    alpha = np.array([[0, 255, 128, 128]], np.uint8)
    stored = np.array([[0, 200, 64, 0]], np.uint8)  # premultiplied values
    shown = stored.astype(int) + 255 - alpha
    path = tiff_with_associated_alpha(tmp_path, Image.fromarray(np.stack([stored, alpha], -1),
                                                                "LA"), "la.tif")
    assert Image.open(path).mode == "La"
    np.testing.assert_array_equal(decoded(path), grey(shown))
    rgb = np.stack([stored, stored // 2, np.zeros_like(stored)], -1)
    path = tiff_with_associated_alpha(
        tmp_path, Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1), "RGBA"),
        "rgba.tif")
    expected = rgb.astype(int) + (255 - alpha.astype(int))[..., None]
    np.testing.assert_allclose(decoded(path), expected, atol=1)  # PIL divides by alpha first
    np.testing.assert_array_equal(decoded(path)[0, :2], expected[0, :2])


def test_in_memory_modes_no_file_holds(tmp_path):
    """``RGBa``, ``HSV`` and ``I;16N`` come from no file PIL reads back; converted directly."""
    rgba = np.array([[[64, 32, 0, 128], [200, 100, 0, 255], [0, 0, 0, 0]]], np.uint8)
    out = images._to_rgb(Image.fromarray(rgba, "RGBA").convert("RGBa"), "x")
    premultiplied = np.asarray(Image.fromarray(rgba, "RGBA").convert("RGBa")).astype(int)
    expected = premultiplied[..., :3] + 255 - premultiplied[..., 3:]
    np.testing.assert_allclose(out, expected, atol=1)
    hsv = Image.fromarray(np.array([[[0, 255, 255], [85, 255, 255], [0, 0, 255]]], np.uint8),
                          "HSV")
    np.testing.assert_array_equal(images._to_rgb(hsv, "x"),
                                  [[[255, 0, 0], [0, 255, 0], [255, 255, 255]]])
    palette = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")  # a palette with alpha
    palette.putpalette([255, 0, 0, 0, 0, 255, 0, 128, 0, 0, 255, 255], "RGBA")
    assert palette.palette.mode == "RGBA" and "transparency" not in palette.info
    np.testing.assert_array_equal(images._to_rgb(palette, "x"),
                                  over_white([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]],
                                             [[0, 128, 255]]))
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    native = Image.frombytes("I;16N", (4, 1), values.astype("=u2").tobytes())
    np.testing.assert_array_equal(images._to_rgb(native, "x"), grey([[0, 1, 128, 255]]))


def test_cmyk_ycbcr_lab(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 0, 255],
                      [0, 128, 0, 0]]], np.uint8)
    path = save(tmp_path, Image.fromarray(cmyk, "CMYK"), "TIFF", "cmyk.tif")
    assert Image.open(path).mode == "CMYK"
    # PIL's conversion without a colour profile: R = 255 - min(255, C + K), ...
    expected = 255 - np.minimum(255, cmyk[..., :3].astype(int) + cmyk[..., 3:])
    np.testing.assert_array_equal(decoded(path), expected)

    ycbcr = np.array([[[128, 128, 128], [255, 128, 128], [0, 128, 128], [76, 85, 255]]],
                     np.uint8)
    path = save(tmp_path, Image.fromarray(ycbcr, "YCbCr"), "TIFF", "ycbcr.tif")
    assert Image.open(path).mode == "YCbCr"
    out = decoded(path).astype(int)
    np.testing.assert_array_equal(out[0, :3], grey([[128, 255, 0]])[0])
    # JPEG's YCbCr (ITU-R BT.601): Y 76, Cb 85, Cr 255 is pure red
    np.testing.assert_allclose(out[0, 3], [255, 0, 0], atol=2)

    lab = np.array([[[255, 0, 0], [0, 0, 0]]], np.uint8)  # L* 100 and 0, a* = b* = 0 (int8)
    path = save(tmp_path, Image.fromarray(lab, "LAB"), "TIFF", "lab.tif")
    assert Image.open(path).mode == "LAB"
    out = decoded(path)
    assert (out[0, 0] >= 250).all() and (out[0, 1] <= 5).all(), out


SIXTEEN = np.array([[0, 257, 32768, 65535], [128, 129, 32767, 65279], [1000, 2570, 40000, 514]],
                   np.uint16)


def sixteen_expected(values) -> np.ndarray:
    """16-bit to 8-bit: v / 257 rounded (65535 -> 255, 32768 -> 128, 128 -> 0, 129 -> 1)."""
    return grey(np.floor(np.asarray(values, np.float64) / 257 + 0.5))


@pytest.mark.parametrize("case", ["I;16 png", "I;16 tiff", "I;16B png", "I;16B tiff",
                                  "I;16L tiff", "I tiff"])
def test_16bit_greyscale_is_scaled_not_clipped(tmp_path, case):
    mode, fmt = case.split()
    if mode == "I":
        image = Image.fromarray(SIXTEEN.astype(np.int32))
    else:
        dtype = {"I;16": "<u2", "I;16B": ">u2", "I;16L": "<u2"}[mode]
        image = Image.frombytes(mode, (4, 3), SIXTEEN.astype(dtype).tobytes())
    assert image.mode == mode
    path = save(tmp_path, image, fmt.upper())
    assert Image.open(path).mode in ("I;16", "I;16B", "I")
    out = decoded(path)
    np.testing.assert_array_equal(out, sixteen_expected(SIXTEEN))
    assert out[0, 3, 0] == 255 and out[0, 2, 0] == 128 and out[0, 1, 0] == 1
    assert len(np.unique(out)) > 2  # not the all-white square of convert("RGB")


def test_32bit_integers_outside_16_bits_are_refused(tmp_path):
    for values, words in (([[-5, 0, 10]], ["-5", "10"]), ([[0, 70000, 3]], ["0", "70000"])):
        path = save(tmp_path, Image.fromarray(np.array(values, np.int32)), "TIFF")
        refused(lambda p=path: decoded(p), f"cannot read portrait {path}",
                "32-bit integer pixels range from", *words, "[0, 65535]")


def test_float_greyscale(tmp_path):
    unit = np.array([[0.0, 0.2, 0.5, 1.0], [0.1, 0.9, 0.998, 0.002]], np.float32)
    path = save(tmp_path, Image.fromarray(unit), "TIFF", "unit.tif")
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(decoded(path), grey(np.floor(unit.astype(np.float64) * 255
                                                               + 0.5)))
    np.testing.assert_array_equal(decoded(path)[0, :, 0], [0, 51, 128, 255])
    byte = np.array([[0.0, 12.4, 200.5, 255.0], [3.0, 1.5, 99.49, 254.6]], np.float32)
    path = save(tmp_path, Image.fromarray(byte), "TIFF", "byte.tif")
    np.testing.assert_array_equal(decoded(path), grey(np.floor(byte.astype(np.float64) + 0.5)))
    np.testing.assert_array_equal(decoded(path)[0, :, 0], [0, 12, 201, 255])


@pytest.mark.parametrize("values, words", [
    ([[-0.5, 0.5]], ["range from -0.5 to 0.5", "[0, 1] or [0, 255]"]),
    ([[0.0, 300.0]], ["range from 0 to 300", "[0, 1] or [0, 255]"]),
    ([[np.nan, 0.5]], ["NaN or infinity"]),
    ([[np.inf, 0.5]], ["NaN or infinity"]),
])
def test_float_out_of_range_or_nan_is_refused(tmp_path, values, words):
    path = save(tmp_path, Image.fromarray(np.array(values, np.float32)), "TIFF")
    refused(lambda: decoded(path), f"cannot read portrait {path}", *words)


def test_multi_frame_files_give_their_first_frame(tmp_path):
    first, second = Image.fromarray(RGB), Image.fromarray(255 - RGB)
    path = save(tmp_path, first, "TIFF", "pages.tif", save_all=True, append_images=[second])
    assert Image.open(path).n_frames == 2
    np.testing.assert_array_equal(decoded(path), RGB)
    first, second = palette_image(), palette_image().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    path = save(tmp_path, first, "GIF", "anim.gif", save_all=True, append_images=[second])
    assert Image.open(path).n_frames == 2
    np.testing.assert_array_equal(decoded(path), PALETTE[INDICES])


@pytest.mark.parametrize("orientation, turn", [
    (1, lambda a: a), (3, lambda a: np.rot90(a, 2)),
    (6, lambda a: np.rot90(a, -1)),  # "rotate 90 clockwise to display"
    (8, lambda a: np.rot90(a, 1)),  # counter-clockwise
])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path, Image.fromarray(RGB), "PNG", exif=exif)
    np.testing.assert_array_equal(decoded(path), turn(RGB))
    # a phone's JPEG: the same compressed pixels with and without the tag
    plain = save(tmp_path, Image.fromarray(RGB), "JPEG", "plain.jpg", quality=95)
    tagged = save(tmp_path, Image.fromarray(RGB), "JPEG", "tagged.jpg", quality=95, exif=exif)
    np.testing.assert_array_equal(decoded(tagged), turn(decoded(plain)))
    with open(tagged, "rb") as f:  # dataset records too
        np.testing.assert_array_equal(datasets.decode_image(f.read()), turn(decoded(plain)))


def test_orientation_turns_palette_and_alpha_images_with_their_transparency(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path, palette_image(), "PNG", exif=exif, transparency=bytes([0, 255, 255, 255]))
    expected = over_white(PALETTE[INDICES], np.where(INDICES == 0, 0, 255))
    np.testing.assert_array_equal(decoded(path), np.rot90(expected, -1))


# --------------------------------------------------------------------------------------------
# Only regular files, caps on bytes and pixels


def test_a_fifo_is_refused_without_hanging(tmp_path, monkeypatch):
    path, unblock = fifo(tmp_path)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    for fn in (images.read_bytes, request.read_portrait):
        _, error = within(2, fn, path, unblock=unblock)
        assert isinstance(error, DataError), error
        assert path in str(error) and "named pipe (FIFO), not a regular file" in str(error)
    assert path not in opened  # refused from its stat, never opened


def test_a_fifo_swapped_in_after_the_stat_is_refused_without_hanging(tmp_path, monkeypatch):
    """The file checked by ``stat`` is replaced by a FIFO before it is opened: the open does not
    wait for a writer, and ``fstat`` of what was opened refuses it."""
    path, unblock = fifo(tmp_path)
    regular = os.stat(__file__)
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: regular if p == path
                        else real_stat(p, *a, **k))
    _, error = within(2, images.read_bytes, path, unblock=unblock)
    assert isinstance(error, DataError), error
    assert path in str(error) and "named pipe (FIFO), not a regular file" in str(error)


def test_devices_and_directories_are_refused(tmp_path):
    refused(lambda: images.read_bytes("/dev/zero"), "cannot read image /dev/zero",
            "a character device, not a regular file")
    refused(lambda: request.read_portrait("/dev/null"), "cannot read portrait /dev/null",
            "character device")
    refused(lambda: request.read_portrait(str(tmp_path)), f"cannot read portrait {tmp_path}",
            "Is a directory", "expected a regular image file")
    refused(lambda: request.read_portrait(str(tmp_path / "none.png")),
            f"cannot read portrait {tmp_path / 'none.png'}", "No such file or directory")


def test_a_file_above_the_byte_cap_is_refused_before_and_while_reading(tmp_path, monkeypatch):
    path = save(tmp_path, Image.fromarray(RGB), "PNG")
    size = os.path.getsize(path)
    assert decoded(path, max_bytes=size).shape == (3, 4, 3)
    refused(lambda: decoded(path, max_bytes=size - 1), f"cannot read portrait {path}",
            f"{size:,} bytes, above the cap of {size - 1:,} bytes")
    # a file that grows after its size was read (64 MiB, sparse, while stat says 10 bytes): the
    # read itself stops at the cap, holding no more than the cap in memory
    big = tmp_path / "growing.png"
    with open(big, "wb") as f:
        f.truncate(64 * 2**20)
    real_stat, real_fstat = os.stat, os.fstat

    def small(st):
        return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid,
                               st.st_gid, 10, st.st_atime, st.st_mtime, st.st_ctime))

    monkeypatch.setattr(os, "stat", lambda p, *a, **k: small(real_stat(p, *a, **k)))
    monkeypatch.setattr(os, "fstat", lambda fd: small(real_fstat(fd)))
    tracemalloc.start()
    try:
        refused(lambda: images.read_bytes(big, max_bytes=20), f"cannot read image {big}",
                "grew above the cap of 20 bytes")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak:,} bytes held while reading a file capped at 20 bytes"


def test_dev_zero_through_the_request_cli_is_one_line_and_bounded(tmp_path):
    """``/dev/zero`` as a portrait, through ``python -m oneshui_jax.unlearn``: one error line,
    exit 2. Run in a subprocess whose memory is capped after its imports, so that a reader that
    reads it anyway fails there (MemoryError) instead of taking this machine's memory."""
    code = (
        "import resource, runpy, sys\n"
        "import oneshui_jax.serve.service\n"
        "vm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize')]\n"
        "cap = vm[0] * 1024 + 2**30\n"
        "resource.setrlimit(resource.RLIMIT_AS, (cap, cap))\n"
        "sys.argv = ['oneshui_jax.unlearn'] + sys.argv[1:]\n"
        "runpy.run_module('oneshui_jax.unlearn', run_name='__main__')\n")
    out = str(tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-c", code, "--checkpoint", str(tmp_path / "run"), "--portrait",
         "/dev/zero", "--out", out], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: cannot read portrait /dev/zero: a character device")
    assert not os.path.exists(out)


def test_pixel_caps_name_the_file_and_the_cap(tmp_path, monkeypatch):
    path = save(tmp_path, Image.fromarray(np.zeros((100, 60, 3), np.uint8)), "PNG")
    assert decoded(path, max_pixels=6000).shape == (100, 60, 3)
    refused(lambda: decoded(path, max_pixels=5999), f"cannot read portrait {path}",
            "60x100 = 6,000 pixels, above the cap of 5,999 pixels")
    # a header claiming 9000 x 9000 pixels in 60 bytes: refused before any pixel is decoded
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(9000, 9000))
    refused(lambda: decoded(str(bomb)), f"cannot read portrait {bomb}", "81,000,000 pixels",
            f"cap of {images.DEFAULT_MAX_PIXELS:,} pixels")
    # one far above PIL's own limit: its DecompressionBombError, named the same way
    bomb.write_bytes(png_claiming(60000, 60000))
    refused(lambda: decoded(str(bomb), max_pixels=10**10), f"cannot read portrait {bomb}",
            "decompression bomb", "10,000,000,000 pixels")


def test_files_that_are_not_images(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    message = refused(lambda: decoded(str(text)), f"cannot read portrait {text}",
                      "not an image in a format PIL reads")
    with pytest.raises(images.ImageError) as error:  # intact through a worker process
        decoded(str(text))
    again = pickle.loads(pickle.dumps(error.value))
    assert str(again) == message and isinstance(again, DataError) and again.reason
    truncated = tmp_path / "cut.png"
    data = open(save(tmp_path, Image.fromarray(RGB), "PNG"), "rb").read()
    truncated.write_bytes(data[:60])
    refused(lambda: decoded(str(truncated)), f"cannot read portrait {truncated}")


# --------------------------------------------------------------------------------------------
# Dataset records, the audit, the TFDS build


def test_dataset_records_decode_as_shown_and_name_the_record():
    sixteen = io.BytesIO()
    Image.fromarray(SIXTEEN).save(sixteen, "PNG")
    broken = io.BytesIO()
    Image.fromarray(np.array([[-1.0, 2.0]], np.float32)).save(broken, "TIFF")
    records = [{"image": sixteen.getvalue(), "label": 0, "identity": 0, "index": 0,
                "file_name": b"train_images/a.png"},
               {"image": broken.getvalue(), "label": 1, "identity": 1, "index": 1,
                "file_name": b"train_images/b.tif"}]
    source = datasets.DecodedSource(records, np.array([5, 6]), "mufac")
    np.testing.assert_array_equal(source[0]["image"], sixteen_expected(SIXTEEN))
    refused(lambda: source[1], "cannot read mufac record 1 (train_images/b.tif)",
            "range from -1 to 2")


def test_the_audit_refuses_what_cannot_be_decoded_without_hanging(tmp_path):
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    save(data_dir, Image.fromarray(RGB), "JPEG", "ok.jpg")
    save(data_dir, Image.fromarray(SIXTEEN), "PNG", "sixteen.png")
    save(data_dir, Image.fromarray(np.array([[0, 70000]], np.int32)), "TIFF", "wide.tif")
    pipe, unblock = fifo(data_dir, "pipe.jpg")
    files = ("ok.jpg", "sixteen.png", "wide.tif", "pipe.jpg", "gone.jpg")
    checks, error = within(5, audit.check_files, str(data_dir), files, str(tmp_path / "c.jsonl"),
                           unblock=unblock)
    assert error is None, error
    assert [c.error for c in checks[:2]] == [None, None]
    assert "32-bit integer pixels range from 0 to 70000" in checks[2].error
    assert checks[3].error.startswith("a named pipe (FIFO)") and checks[3].sha256 is None
    assert checks[4].error == "missing"
    # a cache written by the audit before these checks is not trusted
    with open(tmp_path / "old.jsonl", "w") as f:
        f.write(json.dumps({"file": "wide.tif", "size": checks[2].size, "sha256": "x",
                            "mtime_ns": checks[2].mtime_ns, "error": None}) + "\n")
    again = audit.check_files(str(data_dir), ("wide.tif",), str(tmp_path / "old.jsonl"))
    assert "70000" in again[0].error


def test_the_tfds_build_reads_only_regular_files(tmp_path):
    from oneshui_jax.data.tfds_builders import faces

    pipe, unblock = fifo(tmp_path, "0.jpg")
    table = types.SimpleNamespace(files=("0.jpg",), identities=np.array([0]),
                                  labels=types.SimpleNamespace(values=np.array([0])),
                                  sha256=("x",))
    builder = types.SimpleNamespace(_table=table, name="mufac", LAYOUT="mufac/")
    examples = faces._FaceBuilder._generate_examples(builder, str(tmp_path))
    _, error = within(2, next, examples, unblock=unblock)
    assert isinstance(error, DataError), error
    assert pipe in str(error) and "named pipe" in str(error) and "building mufac" in str(error)


# --------------------------------------------------------------------------------------------
# Through the request command line (cli.request.main, i.e. python -m oneshui_jax.unlearn)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The cheapest servable request (tests/doubles.py): a vit_tiny_test model and a
    support_ascent method run."""
    root = str(tmp_path_factory.mktemp("images_chain"))
    pretrain, method, _ = doubles.request_chain(root, doubles.TINY_SPLITS)
    return types.SimpleNamespace(root=root, method=method)


def serve_main(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = request_cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_16bit_portrait_is_served_as_its_8bit_twin(chain, tmp_path, capsys):
    """The same picture as an 8-bit PNG and as a 16-bit PNG (each value times 257): the
    request command line forgets the same thing from both (equal output parameters). Read as
    convert("RGB") did, the 16-bit one was an all-white square."""
    pattern = (np.add.outer(np.arange(20) * 9, np.arange(24) * 5) % 256).astype(np.uint8)
    eight = save(tmp_path, Image.fromarray(pattern), "PNG", "eight.png")
    sixteen = save(tmp_path, Image.fromarray(pattern.astype(np.uint16) * 257), "PNG",
                   "sixteen.png")
    assert Image.open(sixteen).mode == "I;16"
    hashes = []
    for portrait in (eight, sixteen):
        out = str(tmp_path / ("out_" + os.path.basename(portrait)[:-4]))
        code, stdout, stderr = serve_main(capsys, "--checkpoint", chain.method, "--portrait",
                                          portrait, "--out", out)
        assert code == 0, stderr
        with open(os.path.join(out, serve.RECEIPT_FILE)) as f:
            hashes.append(json.load(f)["params_hash_after"])
    assert hashes[0] == hashes[1]


def test_a_fifo_portrait_is_one_error_line_and_exit_2(chain, tmp_path, capsys):
    pipe, unblock = fifo(tmp_path)
    out = str(tmp_path / "out")
    args = ("--checkpoint", chain.method, "--portrait", pipe, "--out", out)
    result, error = within(5, serve_main, capsys, *args, unblock=unblock)
    assert error is None, error
    code, stdout, stderr = result
    assert code == 2 and stdout == "" and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"error: cannot read portrait {pipe}: a named pipe (FIFO), not a "
                             "regular file")
    assert not os.path.exists(out)
