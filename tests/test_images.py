"""Tests for llava_local.image.load (safe loading) and llava_local.image.preprocess (LLaVA-1.5 pixels).

Every image is crafted here with Pillow or raw bytes into tmp_path; nothing is downloaded. Each
row of the "Images" table in RELIABILITY.md has a test below.

    .venv/bin/python -m pytest -q tests/test_images.py
"""

import io
import os
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from llava_local.errors import ImageError, LlavaLocalError
import llava_local.image.preprocess as preprocess_mod
from llava_local.image.load import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, LoadedImage, load_image
from llava_local.image.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    PreprocessConfig,
    expand_to_square,
    padded_resize,
    normalize,
    preprocess,
    preprocess_batch,
    resize_square,
    square_image,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def save(img, path, fmt=None, **kw):
    img.save(path, fmt, **kw)
    return path


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_with_header_size(width, height):
    """A valid 1x1 PNG whose IHDR claims width x height (CRC fixed): a bomb that costs nothing."""
    data = bytearray(encode(Image.new("1", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then chunk length + b"IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))  # type + 13-byte IHDR body
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def assert_close(pixel, expected, tol=8):
    assert max(abs(a - b) for a, b in zip(pixel, expected)) <= tol, (pixel, expected)


# ---------------------------------------------------------------- not an image at all


def test_missing_path(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.jpg")


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty.jpg: empty file"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageError, match="empty input"):
        load_image(b"")


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a picture\n")
    with pytest.raises(ImageError, match=r"notes.jpg: not a recognised image"):
        load_image(tmp_path / "notes.jpg")


def test_directory_named_jpg(tmp_path):
    (tmp_path / "x.jpg").mkdir()
    with pytest.raises(ImageError, match=r"x.jpg: is a directory"):
        load_image(tmp_path / "x.jpg")


def test_fifo_named_jpg_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(ImageError, match=r"pipe.jpg: not a regular file"):
        load_image(tmp_path / "pipe.jpg")


def test_image_error_is_a_llava_local_error():
    assert issubclass(ImageError, LlavaLocalError)


# ---------------------------------------------------------------- format allow-list


def fake_eps():
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"


def fake_psd():
    # "8BPS" v1, 3 channels, 4x4, 8-bit RGB, then empty colour-mode / resources / layer sections
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 4, 4, 8, 3)
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + bytes(48)


def fake_fits():
    cards = ["SIMPLE  = T", "BITPIX  = 8", "NAXIS   = 2", "NAXIS1  = 4", "NAXIS2  = 4", "END"]
    header = "".join(c.ljust(80) for c in cards).ljust(2880).encode()
    return header + bytes(2880)


@pytest.mark.parametrize(
    "fmt, make",
    [
        ("TIFF", lambda: encode(Image.new("RGB", (8, 8)), "TIFF")),
        ("ICO", lambda: encode(Image.new("RGB", (16, 16)), "ICO")),
        ("PPM", lambda: encode(Image.new("RGB", (8, 8)), "PPM")),
        ("TGA", lambda: encode(Image.new("RGB", (8, 8)), "TGA")),
        ("EPS", fake_eps),
        ("PSD", fake_psd),
        ("FITS", fake_fits),
    ],
)
def test_disallowed_format_refused_from_header(tmp_path, fmt, make):
    data = make()
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow does identify the crafted header
    path = tmp_path / "img.jpg"  # the extension is irrelevant: the header decides
    path.write_bytes(data)
    allowed = r"\(allowed: BMP, GIF"
    with pytest.raises(ImageError, match=rf"img.jpg: format {fmt} is not allowed {allowed}"):
        load_image(path)
    with pytest.raises(ImageError, match=rf"<bytes>: format {fmt} is not allowed"):
        load_image(data)


def test_allow_list_is_configurable(tmp_path):
    path = save(Image.new("RGB", (8, 8), RED), tmp_path / "a.tiff")
    assert load_image(path, allowed_formats=ALLOWED_FORMATS | {"TIFF"}).format == "TIFF"
    png = save(Image.new("RGB", (8, 8)), tmp_path / "a.png")
    with pytest.raises(ImageError, match="format PNG is not allowed"):
        load_image(png, allowed_formats=frozenset({"JPEG"}))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_allowed_formats_load(tmp_path, fmt):
    path = save(Image.new("RGB", (12, 8), BLUE), tmp_path / f"a.{fmt.lower()}", fmt)
    loaded = load_image(path)
    assert isinstance(loaded, LoadedImage)
    assert (loaded.format, loaded.image.mode, loaded.image.size) == (fmt, "RGB", (12, 8))
    assert loaded.source == str(path)
    assert_close(loaded.image.getpixel((6, 4)), BLUE)


def test_multi_picture_jpeg_loads_as_jpeg(tmp_path):
    # Pillow reports phone JPEGs carrying extra (depth / preview) pictures as "MPO"
    second = Image.new("RGB", (16, 8), BLUE)
    first = Image.new("RGB", (16, 8), RED)
    path = save(first, tmp_path / "a.jpg", "MPO", save_all=True, append_images=[second])
    with Image.open(path) as check:
        assert check.format == "MPO"
    loaded = load_image(path)
    assert loaded.format == "JPEG"
    assert_close(loaded.image.getpixel((8, 4)), RED)


# ---------------------------------------------------------------- decompression bombs


def test_bomb_20000x10000_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_header_size(20000, 10000))
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"bomb.png: .*pixels"):
        load_image(path)
    assert time.perf_counter() - start < 1.0


def test_bomb_10000x10000_refused_at_default_cap(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_header_size(10000, 10000))
    start = time.perf_counter()
    expected = r"10000x10000 = 100,000,000 pixels exceeds the cap of 50,000,000"
    with pytest.raises(ImageError, match=expected):
        load_image(path)
    assert time.perf_counter() - start < 1.0
    assert DEFAULT_MAX_PIXELS < 10000 * 10000


def test_pillow_bomb_warning_never_escapes(tmp_path):
    # Under -W error Pillow's DecompressionBombWarning (> 89 MP) would be an exception of its own.
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_header_size(10000, 10000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError):
            load_image(path)


def test_pixel_cap_is_configurable(tmp_path):
    path = save(Image.new("RGB", (100, 100), RED), tmp_path / "a.png")
    with pytest.raises(ImageError, match="exceeds the cap of 5,000"):
        load_image(path, max_pixels=5_000)
    assert load_image(path, max_pixels=10_000).image.size == (100, 100)
    # raised past the 100 MP header: the cap passes and the (fake, 1x1-bodied) data fails to decode
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(png_with_header_size(300, 200), max_pixels=10_000_000)


# ---------------------------------------------------------------- truncated files


def photo(size=(64, 48)):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_an_error(tmp_path, fmt):
    data = encode(photo(), fmt)
    path = tmp_path / f"half.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"half\.\w+: truncated or corrupt image"):
        load_image(path)
    with pytest.raises(ImageError, match="<bytes>: truncated or corrupt image"):
        load_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------- orientation


@pytest.mark.parametrize(
    "orientation, corner",
    [
        (6, lambda w, h: (w - 1 - 4, 4)),  # rotate 90 CW: stored top-left -> top-right
        (8, lambda w, h: (4, h - 1 - 4)),  # rotate 90 CCW: stored top-left -> bottom-left
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, corner):
    img = Image.new("RGB", (64, 32), BLUE)
    img.paste(RED, (0, 0, 16, 16))  # marks the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    path = save(img, tmp_path / "phone.jpg", "JPEG", exif=exif, quality=95)
    out = load_image(path).image
    assert out.size == (32, 64)
    assert_close(out.getpixel(corner(*out.size)), RED)
    assert_close(out.getpixel((4, 4)) if orientation == 8 else out.getpixel((4, 60)), BLUE)


# ---------------------------------------------------------------- modes


def test_rgba_composited_on_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    img.putpixel((1, 0), (0, 0, 255, 128))
    out = load_image(save(img, tmp_path / "a.png")).image
    assert out.getpixel((5, 5)) == WHITE
    assert out.getpixel((0, 0)) == RED
    assert_close(out.getpixel((1, 0)), (127, 127, 255), tol=2)


def test_la_composited_on_white(tmp_path):
    img = Image.new("LA", (8, 8), (0, 0))
    img.putpixel((0, 0), (40, 255))
    out = load_image(save(img, tmp_path / "a.png")).image
    assert out.getpixel((5, 5)) == WHITE
    assert out.getpixel((0, 0)) == (40, 40, 40)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_composited_on_white(tmp_path, fmt):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))  # index 0 black, index 1 red
    img.putpixel((0, 0), 1)
    out = load_image(save(img, tmp_path / f"a.{fmt.lower()}", fmt, transparency=0)).image
    assert out.getpixel((5, 5)) == WHITE
    assert out.getpixel((0, 0)) == RED


def test_16bit_gradient_stays_a_gradient(tmp_path):
    row = np.linspace(0, 65535, 512).astype(np.uint16)
    img = Image.fromarray(np.tile(row, (4, 1)))
    assert img.mode == "I;16"
    out = load_image(save(img, tmp_path / "deep.png")).image
    red = np.asarray(out)[0, :, 0].astype(int)
    assert np.all(np.diff(red) >= 0)  # monotonic
    assert red[0] == 0 and red[-1] == 255
    assert len(np.unique(red)) == 256  # Pillow's naive convert() leaves 2 values (0, 255)
    assert_close(out.getpixel((256, 0)), (128, 128, 128), tol=1)


def test_cmyk_jpeg_red(tmp_path):
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    loaded = load_image(save(img, tmp_path / "print.jpg", "JPEG", quality=95))
    assert loaded.image.mode == "RGB"
    assert_close(loaded.image.getpixel((8, 8)), RED)


@pytest.mark.parametrize("mode, value, expected", [("1", 1, WHITE), ("L", 77, (77, 77, 77))])
def test_bilevel_and_grayscale_to_rgb(tmp_path, mode, value, expected):
    img = Image.new(mode, (8, 8), 0)
    img.putpixel((3, 3), value)
    out = load_image(save(img, tmp_path / "a.png")).image
    assert out.mode == "RGB"
    assert out.getpixel((3, 3)) == expected
    assert out.getpixel((0, 0)) == (0, 0, 0)


# ---------------------------------------------------------------- animation


def frames(n=1000, size=(8, 8)):
    return [Image.new("RGB", size, (i % 256, (7 * i) % 256, 50)) for i in range(n)]


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])  # PNG with save_all = APNG
def test_animation_with_1000_frames_gives_first_frame_quickly(tmp_path, fmt):
    seq = frames()
    seq[0] = Image.new("RGB", (8, 8), RED)
    path = save(seq[0], tmp_path / f"anim.{fmt.lower()}", fmt, save_all=True, append_images=seq[1:])
    with Image.open(path) as check:
        assert check.n_frames == 1000
    start = time.perf_counter()
    out = load_image(path).image
    assert time.perf_counter() - start < 2.0
    assert out.size == (8, 8)
    assert np.all(np.asarray(out) == RED)


# ---------------------------------------------------------------- sizes and inputs


@pytest.mark.parametrize("size", [(1, 1), (10000, 20), (20, 10000)])
def test_extreme_sizes_load(tmp_path, size):
    out = load_image(save(Image.new("RGB", size, RED), tmp_path / "a.png")).image
    assert out.size == size
    assert preprocess(out).shape == (3, 336, 336)


def test_bytes_and_pil_inputs(tmp_path):
    img = Image.new("RGB", (10, 6), RED)
    from_bytes = load_image(encode(img, "PNG"))
    assert (from_bytes.source, from_bytes.format) == ("<bytes>", "PNG")
    assert from_bytes.image.size == (10, 6)
    from_pil = load_image(img)
    assert from_pil.source == "<PIL image>"
    assert from_pil.pixel_hash == from_bytes.pixel_hash
    assert from_pil.image is not img


def test_pil_input_skips_allow_list_but_is_normalised(tmp_path):
    img = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    img.paste((255, 0, 0, 255), (0, 0, 5, 5))
    exif = Image.Exif()
    exif[0x0112] = 6
    with Image.open(save(img, tmp_path / "a.png", exif=exif)) as opened:  # lazily decoded
        out = load_image(opened).image
    assert out.mode == "RGB" and out.size == (10, 20)
    assert out.getpixel((8, 1)) == RED  # stored top-left moved to top-right
    assert out.getpixel((1, 18)) == WHITE
    tiff = save(Image.new("RGB", (4, 4), RED), tmp_path / "a.tiff")
    with pytest.raises(ImageError, match="format TIFF is not allowed"):
        load_image(tiff)
    with Image.open(tiff) as opened:  # the caller chose to decode it: accepted
        assert load_image(opened).format == "TIFF"


def test_pixel_hash_depends_on_pixels_not_container(tmp_path):
    img = photo((16, 16))
    png = load_image(save(img, tmp_path / "a.png"))
    bmp = load_image(save(img, tmp_path / "a.bmp"))
    assert png.pixel_hash == bmp.pixel_hash
    other = load_image(save(Image.new("RGB", (16, 16), RED), tmp_path / "b.png"))
    assert other.pixel_hash != png.pixel_hash
    # same bytes, different shape: the size is part of the key
    flat = load_image(Image.frombytes("RGB", (256, 1), img.tobytes()))
    assert flat.pixel_hash != png.pixel_hash


# ---------------------------------------------------------------- preprocess


def test_preprocess_shape_and_dtype():
    out = preprocess(photo((300, 100)))
    assert out.shape == (3, 336, 336) and out.dtype == np.float32
    batch = preprocess_batch([photo((300, 100)), photo((50, 80))])
    assert batch.shape == (2, 3, 336, 336) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0], out)
    assert preprocess_batch([]).shape == (0, 3, 336, 336)


def test_preprocess_rejects_non_rgb():
    with pytest.raises(ValueError, match="mode RGBA"):
        preprocess(Image.new("RGBA", (4, 4)))


def test_pad_region_is_the_mean_colour():
    cfg = PreprocessConfig(image_size=300)  # 300x100 pads to 300x300: no resize involved
    img = Image.new("RGB", (300, 100), RED)
    out = preprocess(img, cfg)  # (3, 300, 300)
    for c, (m, s) in enumerate(zip(CLIP_MEAN, CLIP_STD)):
        pad = (int(m * 255) / 255 - m) / s
        np.testing.assert_allclose(out[c, :100], pad, atol=1e-6)  # above: rows 0..99
        np.testing.assert_allclose(out[c, 200:], pad, atol=1e-6)  # below: rows 200..299
        np.testing.assert_allclose(out[c, 100:200], (RED[c] / 255 - m) / s, atol=1e-6)


def test_expand_to_square_offsets_match_llava():
    wide = expand_to_square(Image.new("RGB", (5, 2), RED), (0, 0, 0))
    assert wide.size == (5, 5)
    assert [wide.getpixel((0, y)) for y in range(5)] == [(0, 0, 0), RED, RED, (0, 0, 0), (0, 0, 0)]
    tall = expand_to_square(Image.new("RGB", (2, 5), RED), (0, 0, 0))
    assert [tall.getpixel((x, 0)) for x in range(5)] == [(0, 0, 0), RED, RED, (0, 0, 0), (0, 0, 0)]
    square = Image.new("RGB", (3, 3))
    assert expand_to_square(square, (0, 0, 0)) is square


@pytest.mark.parametrize(
    "size",
    [(301, 173), (173, 301), (700, 30), (30, 700), (337, 2), (2, 337), (5, 1), (1, 5), (60, 100)],
)
@pytest.mark.parametrize("strip_pixels", [1_000, 4_000_000])
def test_padded_resize_is_byte_identical_to_pad_then_resize(monkeypatch, size, strip_pixels):
    monkeypatch.setattr(preprocess_mod, "_STRIP_PIXELS", strip_pixels)  # one strip, or many
    img = photo(size)
    background = PreprocessConfig().background
    literal = resize_square(expand_to_square(img, background), 336)
    ours = padded_resize(img, background, 336)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(literal))


@pytest.mark.parametrize("pad_to_square", [True, False])
def test_square_image_of_the_target_size_is_returned_as_is(pad_to_square):
    """The caption worker squares images ahead; squaring them again must change nothing: the fast path
    returns the image itself, with the pixels the full path (pad, bicubic resize) gives."""
    cfg = PreprocessConfig(pad_to_square=pad_to_square)
    img = photo((336, 336))
    assert square_image(img, cfg) is img
    full = resize_square(expand_to_square(img, cfg.background), cfg.image_size)
    np.testing.assert_array_equal(np.asarray(full), np.asarray(img))
    once = square_image(photo((301, 173)), cfg)
    assert square_image(once, cfg) is once
    np.testing.assert_array_equal(preprocess(once, cfg), normalize(once, cfg))
    other = photo((300, 300))                       # square, another size: still resized
    assert square_image(other, cfg).size == (336, 336)


def test_extreme_aspect_ratio_is_bounded():
    panorama = Image.new("RGB", (20000, 400), RED)  # would pad to a 400 MP canvas
    start = time.perf_counter()
    out = square_image(panorama)
    assert time.perf_counter() - start < 2.0
    assert out.getpixel((168, 168)) == RED
    assert out.getpixel((168, 2)) == PreprocessConfig().background
    with pytest.raises(ImageError, match="too elongated to centre-crop"):
        square_image(Image.new("RGB", (10, 20000)), PreprocessConfig(pad_to_square=False))


def llava_reference(img):
    """LLaVA-1.5: expand2square with the mean colour, then CLIPImageProcessor (PIL backend)."""
    from transformers.models.clip import image_processing_pil_clip as clip_pil  # must exist: never skip
    processor = clip_pil.CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        do_center_crop=True,
        resample=Image.Resampling.BICUBIC,
        rescale_factor=1 / 255,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return processor(img, return_tensors="np")["pixel_values"][0]


def test_matches_transformers_clip_processor():
    img = photo((301, 173))
    background = tuple(int(x * 255) for x in CLIP_MEAN)
    expected = llava_reference(expand_to_square(img, background))
    ours = preprocess(img)
    assert np.abs(ours - expected).max() <= 1e-5
    assert square_image(img).size == (336, 336)
    # pad_to_square=False is CLIP's own resize-shortest-edge + centre crop
    no_pad = preprocess(img, PreprocessConfig(pad_to_square=False))
    assert np.abs(no_pad - llava_reference(img)).max() <= 1e-5
    tall = photo((97, 410))
    assert np.abs(normalize(resize_square(tall, 336)) - llava_reference(tall)).max() <= 1e-5


def test_pillow_warnings_become_log_lines(tmp_path, caplog):
    # EXIF that claims 5 entries and holds none: Pillow warns "Corrupt EXIF data" and carries on
    bad_exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12"
    path = save(Image.new("RGB", (8, 4), RED), tmp_path / "odd.jpg", "JPEG", exif=bad_exif)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # escalated, it would escape as a UserWarning
        assert load_image(path).image.size == (8, 4)
    assert any("odd.jpg: Corrupt EXIF data" in r.getMessage() for r in caplog.records)


def test_mutated_files_raise_only_image_error():
    """Random byte flips, cuts and insertions in every allowed format: ImageError or an image."""
    rng = np.random.default_rng(7)
    img = photo((32, 24))
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds = [encode(img, fmt) for fmt in ("JPEG", "PNG", "GIF", "BMP", "WEBP")]
    seeds += [encode(img, "PNG", save_all=True, append_images=[img.rotate(90)] * 3)]  # APNG
    seeds += [encode(img, "JPEG", exif=exif), encode(img.convert("RGBA"), "PNG")]
    for _ in range(400):
        data = bytearray(seeds[rng.integers(len(seeds))])
        for _ in range(rng.integers(1, 6)):
            k = int(rng.integers(len(data)))
            if rng.random() < 0.7:
                data[k] = int(rng.integers(256))
            elif rng.random() < 0.5:
                del data[k : k + int(rng.integers(1, 9))]
            else:
                data[k:k] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
        try:
            loaded = load_image(bytes(data))
        except ImageError:
            continue
        assert loaded.image.mode == "RGB"
