"""Safe image loading: the one door every entry point (CLI, batch, server) opens images through.

`load_image` accepts a path, raw bytes or an already-open `PIL.Image.Image` and returns a
`LoadedImage` whose `.image` is an upright, fully decoded RGB image, or raises `ImageError` with a
one-line message naming the image and the reason. In order, it:

1. reads only the header and refuses formats outside an allow-list (TIFF, PSD, EPS, FITS, ... have
   a history of decoder CVEs) and images over a pixel cap (decompression bombs), before decoding;
2. decodes fully inside the guard (`img.load()`), so a truncated file is an error, never a
   half-grey picture (`ImageFile.LOAD_TRUNCATED_IMAGES` is never touched);
3. applies the EXIF orientation, keeps the first frame of animations, composites transparency on
   white and maps every mode (16-bit, CMYK, 1-bit, palette, grayscale) to 8-bit RGB.

    from llava_local.image.load import load_image
    loaded = load_image("photo.jpg")              # or load_image(data_bytes), load_image(pil_img)
    pixels = preprocess(loaded.image)             # llava_local.image.preprocess
    cache_key = loaded.pixel_hash

See the "Images" table of RELIABILITY.md for the cases this must survive; tests/test_images.py
crafts each of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from llava_local.errors import ImageError

log = logging.getLogger(__name__)

_BASE_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP"})
try:  # HEIC/HEIF (phone photos) only when the optional plugin is installed
    import pillow_heif

    pillow_heif.register_heif_opener()
    ALLOWED_FORMATS = _BASE_FORMATS | {"HEIF"}
except ImportError:
    ALLOWED_FORMATS = _BASE_FORMATS

# Pillow names some allowed encodings differently; the allow-list speaks of the decoder used.
FORMAT_ALIASES = {
    "MPO": "JPEG",  # multi-picture JPEG: phone and 3D cameras with depth/preview frames
}

# 50 MP: above the 48-50 MP sensors of current phones (108/200 MP ones save 12 MP by default),
# below both RELIABILITY.md bombs (10000x10000 = 100 MP, 20000x10000 = 200 MP). Pillow holds
# RGB at 4 bytes a pixel, so 50 MP is 200 MB, twice that while the RGB copy is made: as much as
# one image may cost a batch job on a laptop. LLaVA-1.5 sees 336x336, so little is lost.
DEFAULT_MAX_PIXELS = 50_000_000

# What Pillow's plugins raise on malformed data. OSError covers UnidentifiedImageError and
# "image file is truncated"; SyntaxError is PNG's "broken PNG file"; the rest come from header
# parsers doing arithmetic on hostile fields. DecompressionBombError is Pillow's own cap
# (2 * Image.MAX_IMAGE_PIXELS), which stays as an outer bound even when max_pixels is raised.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    MemoryError,
    Image.DecompressionBombError,
)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # mode "RGB", upright, fully decoded, detached from any file
    source: str  # the path as given, "<bytes>" or "<PIL image>"
    format: str  # header format after FORMAT_ALIASES ("JPEG", "PNG", ...); PIL input: its .format
    pixel_hash: str  # sha256 of size + RGB bytes: the embedding-cache key, independent of the file


def load_image(
    src: str | os.PathLike | bytes | Image.Image,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: frozenset[str] = ALLOWED_FORMATS,
) -> LoadedImage:
    """Open, check, fully decode and normalise one image; raise `ImageError` for any bad input.

    An already-open PIL image skips the format allow-list (the caller chose to decode it) but still
    goes through the pixel cap, the full decode and the mode/orientation normalisation.
    """
    if isinstance(src, Image.Image):
        name = "<PIL image>"
        with _pillow_warnings_logged(name):
            return _finish(src, name, src.format or "unknown", max_pixels)
    if isinstance(src, (bytes, bytearray, memoryview)):
        name = "<bytes>"
        if len(src) == 0:
            raise ImageError(f"{name}: empty input (0 bytes)")
        with _pillow_warnings_logged(name):
            return _open_and_finish(io.BytesIO(bytes(src)), name, max_pixels, allowed_formats)
    if not isinstance(src, (str, os.PathLike)):
        kind = type(src).__name__
        raise ImageError(f"{src!r}: expected a path, bytes or a PIL image, got {kind}")

    name = os.fspath(src)
    if not os.path.exists(name):
        raise ImageError(f"{name}: no such file")
    if os.path.isdir(name):
        raise ImageError(f"{name}: is a directory, not an image file")
    if not os.path.isfile(name):  # a FIFO or device would block or never end
        raise ImageError(f"{name}: not a regular file")
    try:
        with open(name, "rb") as fp, _pillow_warnings_logged(name):
            if os.fstat(fp.fileno()).st_size == 0:
                raise ImageError(f"{name}: empty file (0 bytes)")
            return _open_and_finish(fp, name, max_pixels, allowed_formats)
    except OSError as exc:  # permission denied, I/O error: anything before Pillow sees the file
        raise ImageError(f"{name}: cannot read file ({exc.strerror or exc})") from exc


def _open_and_finish(
    fp, name: str, max_pixels: int, allowed_formats: frozenset[str]
) -> LoadedImage:
    try:
        img = Image.open(fp)  # header only: no pixel data is decoded here
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"{name}: too many pixels (cap {max_pixels:,}), refused before decoding ({exc})"
        ) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageError(
            f"{name}: not a recognised image file (allowed: {_names(allowed_formats)})"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{name}: corrupt image header ({exc})") from exc

    with img:
        fmt = FORMAT_ALIASES.get(img.format, img.format)
        if fmt not in allowed_formats:
            raise ImageError(
                f"{name}: format {fmt} is not allowed (allowed: {_names(allowed_formats)})"
            )
        return _finish(img, name, fmt, max_pixels)


def _finish(img: Image.Image, name: str, fmt: str, max_pixels: int) -> LoadedImage:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: {width}x{height} = {width * height:,} pixels exceeds the cap of "
            f"{max_pixels:,} (possible decompression bomb; raise max_pixels to allow it)"
        )
    try:
        # Only the current frame is decoded: for GIF/APNG that is frame 0 as opened, and nothing
        # here touches n_frames / is_animated, which would walk every frame.
        img.load()
        upright = ImageOps.exif_transpose(img)  # phone photos: EXIF orientation 6/8 etc.
        rgb = _to_rgb(upright, name)
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{name}: truncated or corrupt image ({exc})") from exc

    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    log.debug("loaded %s: %s %dx%d", name, fmt, rgb.width, rgb.height)
    return LoadedImage(image=rgb, source=name, format=fmt, pixel_hash=digest.hexdigest())


@contextlib.contextmanager
def _pillow_warnings_logged(name: str):
    """Turn Pillow's warnings ("Corrupt EXIF data", ...) into log lines naming the image.

    Pillow warns and carries on; as warnings they would name no file, and under `-W error` they
    would escape as exceptions that are not ImageError.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Our own pixel cap replaces Pillow's DecompressionBombWarning (it fires at 89 MP).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            yield
        finally:
            for w in caught:
                log.warning("%s: %s", name, w.message)


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Map any Pillow mode to 8-bit RGB: alpha over white, 16-bit rescaled (not clipped).

    ICC profiles are ignored on purpose: LLaVA was trained on `Image.open(f).convert("RGB")`, so
    Pillow's plain conversion is what the vision tower expects.
    """
    mode = img.mode
    if mode == "RGB":
        # exif_transpose already returned a new image, so the caller's image is never aliased
        return img if "transparency" not in img.info else _over_white(img.convert("RGBA"))
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert("RGB") clips 16-bit values at 255, turning a gradient into a step.
        # "I" is how older Pillows decode 16-bit PNGs (and what callers pass as PIL input), so it
        # is read in the same 0..65535 range.
        arr = np.asarray(img, dtype=np.float64)
        arr8 = np.clip(np.rint(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8)  # (H, W)
        return Image.fromarray(arr8).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        # palette / L / RGB with a tRNS entry become RGBA with real alpha here
        return _over_white(img.convert("RGBA"))
    try:
        return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, RGBX, F, ...
    except ValueError as exc:  # e.g. LAB, HSV: only reachable with PIL input
        raise ImageError(f"{name}: image mode {mode} cannot be converted to RGB ({exc})") from exc


def _over_white(rgba: Image.Image) -> Image.Image:
    # VLMs describe transparent regions as black when alpha is simply dropped.
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _names(formats: frozenset[str]) -> str:
    return ", ".join(sorted(formats))
