"""LLaVA-1.5 image preprocessing, written once and shared by every vision backend.

LLaVA-1.5 (`image_aspect_ratio="pad"`) pads the image to a square with the CLIP mean colour
(`expand2square` in llava/mm_utils.py), then runs CLIPImageProcessor: bicubic resize to 336x336
(shortest edge 336 + centre crop, which is a plain resize for a square), rescale by 1/255 and
normalise with the CLIP mean/std. The stages are separate functions because backends enter at
different points: PyTorch/ONNX take the normalised float array, llama.cpp's mtmd takes the padded
and resized uint8 RGB image.

    from llava_local.image.load import load_image
    from llava_local.image.preprocess import PreprocessConfig, preprocess, square_image
    img = load_image("photo.jpg").image
    pixels = preprocess(img)                      # (3, 336, 336) float32
    rgb336 = square_image(img, PreprocessConfig())  # 336x336 RGB PIL image for mtmd

Inputs must be RGB (what `load_image` returns): transparency and 16-bit data are handled there,
not by a silent `convert("RGB")` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from llava_local.errors import ImageError

# OpenAI CLIP's normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_STRIP_PIXELS = 4_000_000  # padded_resize works on strips of about this many pixels (12 MB RGB)
_MAX_RESIZE_PIXELS = 64_000_000  # resize_square's shortest-edge intermediate: ~200 MB RGB at most


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 336  # LLaVA-1.5: CLIP ViT-L/14-336 -> 24x24 = 576 patch tokens
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    pad_to_square: bool = True  # LLaVA-1.5 image_aspect_ratio="pad"; False = CLIP's centre crop

    @property
    def background(self) -> tuple[int, int, int]:
        """The pad colour, truncated exactly as LLaVA's expand2square call does: (122, 116, 104)."""
        return tuple(int(x * 255) for x in self.image_mean)


def expand_to_square(img: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's expand2square: paste centred on a square canvas of the longer side."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), background)
    # Offsets floor-divide like upstream, so an odd margin puts the extra pixel after the image.
    result.paste(img, ((side - width) // 2, (side - height) // 2))
    return result


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """CLIPImageProcessor's geometry: bicubic resize of the shortest edge to `size`, centre crop.

    For a square input (the LLaVA-1.5 pad path) this is a plain bicubic resize to size x size.
    """
    width, height = img.size
    if width == height:
        return img.resize((size, size), resample=Image.Resampling.BICUBIC)
    # transformers' get_resize_output_image_size(default_to_square=False): the long side truncates
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if new_w * new_h > _MAX_RESIZE_PIXELS:
        # Only reachable with pad_to_square=False: a 10x20000 strip would become 336x672000.
        # Pillow's resize(box=...) would avoid the intermediate, but its pixels differ from
        # resize-then-crop (up to 21/255 measured on a 97x410 image), so it would no longer
        # match CLIPImageProcessor.
        raise ImageError(
            f"{width}x{height} image is too elongated to centre-crop: resizing it would need "
            f"{new_w}x{new_h} pixels (use pad_to_square=True, as LLaVA-1.5 does)"
        )
    resized = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2  # transformers' center_crop floors
    return resized.crop((left, top, left + size, top + size))


def padded_resize(img: Image.Image, background: tuple[int, ...], size: int) -> Image.Image:
    """`resize_square(expand_to_square(img, background), size)`, without the side x side canvas.

    A 20000x4000 panorama would pad to 400 MP (over 1.5 GB in Pillow). Pillow's bicubic resize is
    separable: a horizontal pass into an 8-bit (size x side) intermediate, then a vertical pass.
    We build that intermediate strip by strip: rows of pure padding stay the background (the
    kernel weights sum to one), every other row sees the same padded input, and the result is
    byte-identical to the literal version (tests/test_images.py checks it). Time still grows with
    the padded canvas for tall images (about 3 s for 4000x20000 on one core).
    """
    width, height = img.size
    side = max(width, height)
    if width == height:
        return resize_square(img, size)
    left, top = (side - width) // 2, (side - height) // 2
    intermediate = Image.new("RGB", (size, side), background)  # (size wide, side tall)
    rows = max(1, _STRIP_PIXELS // side)
    for y0 in range(top, top + height, rows):
        y1 = min(y0 + rows, top + height)
        strip = Image.new("RGB", (side, y1 - y0), background)
        strip.paste(img.crop((0, y0 - top, width, y1 - top)), (left, 0))
        intermediate.paste(strip.resize((size, y1 - y0), Image.Resampling.BICUBIC), (0, y0))
    return intermediate.resize((size, size), Image.Resampling.BICUBIC)  # vertical pass only


def square_image(img: Image.Image, cfg: PreprocessConfig = PreprocessConfig()) -> Image.Image:
    """The uint8 RGB image the vision tower sees, before normalisation (size x size).

    An image that is already size x size is returned itself: padding a square is a no-op and Pillow's
    resize to an image's own size is a copy, so the pixels are the same (the caption worker squares
    its images ahead, in its loader threads)."""
    _check_rgb(img)
    if img.size == (cfg.image_size, cfg.image_size):
        return img
    if cfg.pad_to_square:
        return padded_resize(img, cfg.background, cfg.image_size)
    return resize_square(img, cfg.image_size)


def normalize(img: Image.Image, cfg: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """Rescale by 1/255 and normalise with mean/std; returns (3, H, W) float32, channels first."""
    _check_rgb(img)
    x = np.asarray(img, dtype=np.float64) / 255.0  # (H, W, 3); float64 like transformers' rescale
    x = (x - np.asarray(cfg.image_mean)) / np.asarray(cfg.image_std)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)  # (3, H, W)


def preprocess(img: Image.Image, cfg: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """Full LLaVA-1.5 preprocessing of one RGB image: (3, S, S) float32."""
    return normalize(square_image(img, cfg), cfg)


def preprocess_batch(
    imgs: Sequence[Image.Image], cfg: PreprocessConfig = PreprocessConfig()
) -> np.ndarray:
    """Preprocess several RGB images: (B, 3, S, S) float32 (B may be 0)."""
    if len(imgs) == 0:
        return np.empty((0, 3, cfg.image_size, cfg.image_size), dtype=np.float32)
    return np.stack([preprocess(img, cfg) for img in imgs])  # (B, 3, S, S)


def _check_rgb(img: Image.Image) -> None:
    if img.mode != "RGB":
        raise ValueError(
            f"expected an RGB image, got mode {img.mode} "
            "(load it with llava_local.image.load.load_image)"
        )
