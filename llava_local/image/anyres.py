"""LLaVA-1.6 ("anyres") tiling and feature packing, exactly as transformers' LlavaNext does it.

An image is cut into a grid of S x S tiles (S = the CLIP image size, 336) at the pinpoint that fits it
best, and a base image (the whole image squashed to S x S) goes first. Each tile and the base are encoded
like one LLaVA-1.5 image; then the tile features are put back into one feature grid, the rows (or
columns) that only saw padding are cut off, and the mmproj's `image_newline` vector ends every row:

    base (g*g)  |  row 0 of the grid, newline  |  row 1, newline  | ...        g = S / patch (24)

    tiles = anyres_tiles(img, mmproj)                       # [base, tile(0,0), tile(0,1), ...] S x S RGB
    feats = backend.encode_pixels(preprocess_batch(tiles))  # (1 + n_tiles, g*g, n_embd)
    emb = pack_features(feats, newline, mmproj, *img.size)  # (image_token_count(mmproj, *img.size), n_embd)

`mmproj` is a formats.mmproj.MmprojInfo (its image_size, patch_size, image_tokens and anyres), taken as
it comes: image/ and formats/ sit side by side in the import layers, so neither imports the other, and
the newline vector is read by formats.mmproj.read_image_newline.

Each step mirrors one reference function (transformers 5, models/llava_next and image_processing_utils):
`select_best_resolution` (most effective pixels, then least waste, first in file order on a tie),
`get_patch_output_size` (resize keeping aspect, the short side rounded up), `_pad_for_patching` (centre on
black, the odd pixel after), `divide_to_patches` (row by row), `pack_image_features` + `unpad_image`,
and the processor's `_get_number_of_features` for the token count. Sizes are (height, width) as in
transformers, except where PIL takes (width, height). The pixels equal LlavaNextImageProcessorPil's: what
`LlavaNextImageProcessor` resolves to when torchvision is not installed (it is no dependency of ours), and
the PIL bicubic resize the LLaVA repo trained with. With torchvision installed, transformers 5 picks its
torchvision variant instead, whose tensor resize gives slightly different pixels.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from llava_local.errors import ImageError


def select_best_resolution(height: int, width: int, pinpoints: list[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) pinpoint that keeps most of the image's pixels, then wastes the fewest."""
    best, best_effective, best_wasted = pinpoints[0], 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    return best


def _anyres_pinpoint(mmproj, width: int, height: int, max_tiles: int | None) -> tuple[int, int]:
    if width <= 0 or height <= 0:
        raise ImageError(f"image of size {width}x{height} has no pixels")
    return select_best_resolution(height, width, mmproj.anyres.pinpoints(mmproj.image_size, max_tiles))


def resized_size(width: int, height: int, target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image scaled into `target` (height, width), aspect kept, the free side
    rounded up (transformers' get_patch_output_size)."""
    th, tw = target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)


def unpadded_window(rows: int, cols: int, width: int, height: int) -> tuple[slice, slice]:
    """The part of a (rows, cols) feature grid that saw the image and not its padding (unpad_image)."""
    if width / height > cols / rows:     # wider than the grid: padding above and below
        pad = (rows - int(round(height * (cols / width), 7))) // 2
        return slice(pad, rows - pad), slice(0, cols)
    pad = (cols - int(round(width * (rows / height), 7))) // 2
    return slice(0, rows), slice(pad, cols - pad)


def _feature_grid(mmproj, pinpoint: tuple[int, int]) -> tuple[int, int, int]:
    """(tile rows, tile columns, features per tile side) of a pinpoint."""
    s = mmproj.image_size
    return pinpoint[0] // s, pinpoint[1] // s, s // mmproj.patch_size


def image_token_count(mmproj, width: int, height: int, *, max_tiles: int | None = None) -> int:
    """Embeddings one image of this size becomes: 1.5 `mmproj.image_tokens`; 1.6 the base image, the
    unpadded feature grid and one newline per grid row (LlavaNextProcessor's count of image tokens)."""
    if mmproj.anyres is None:
        return mmproj.image_tokens
    rows_t, cols_t, g = _feature_grid(mmproj, _anyres_pinpoint(mmproj, width, height, max_tiles))
    rs, cs = unpadded_window(rows_t * g, cols_t * g, width, height)
    n_rows, n_cols = rs.stop - rs.start, cs.stop - cs.start
    return g * g + n_rows * (n_cols + 1)


def anyres_tiles(img: Image.Image, mmproj, *, max_tiles: int | None = None) -> list[Image.Image]:
    """The S x S RGB images the encoder sees for one 1.6 image: the base image (the whole image resized
    to S x S, aspect not kept) first, then the tiles of the resized and centre-padded image, row by row."""
    if mmproj.anyres is None:
        raise ValueError(f"{mmproj.path}: not an anyres (LLaVA-1.6) mmproj")
    s = mmproj.image_size
    width, height = img.size
    target = _anyres_pinpoint(mmproj, width, height, max_tiles)
    new_h, new_w = resized_size(width, height, target)
    resized = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (target[1], target[0]), (0, 0, 0))   # transformers pads the uint8 image with 0
    canvas.paste(resized, ((target[1] - new_w) // 2, (target[0] - new_h) // 2))
    base = img.resize((s, s), resample=Image.Resampling.BICUBIC)
    return [base] + [canvas.crop((x, y, x + s, y + s)) for y in range(0, target[0], s) for x in range(0, target[1], s)]


def pack_features(feats: np.ndarray, newline: np.ndarray, mmproj, width: int, height: int, *,
                  max_tiles: int | None = None) -> np.ndarray:
    """Encoder output of one image's base + tiles, (1 + n_tiles, g*g, n_embd), -> its embeddings
    (image_token_count, n_embd): base, then each unpadded grid row followed by `newline`."""
    rows_t, cols_t, g = _feature_grid(mmproj, _anyres_pinpoint(mmproj, width, height, max_tiles))
    n_embd = feats.shape[-1]
    if feats.shape != (1 + rows_t * cols_t, g * g, n_embd) or newline.shape != (n_embd,):
        raise ValueError(f"features {feats.shape} / newline {newline.shape} do not fit a {rows_t}x{cols_t} grid "
                         f"of {g}x{g} tiles")
    grid = feats[1:].reshape(rows_t, cols_t, g, g, n_embd).transpose(0, 2, 1, 3, 4)   # (rows_t, g, cols_t, g, D)
    grid = grid.reshape(rows_t * g, cols_t * g, n_embd)                                # (H, W, D)
    grid = grid[unpadded_window(rows_t * g, cols_t * g, width, height)]                # (h, w, D)
    ends = np.broadcast_to(newline, (grid.shape[0], 1, n_embd))
    rows = np.concatenate([grid, ends], axis=1).reshape(-1, n_embd)                    # (h * (w + 1), D)
    return np.concatenate([feats[0], rows]).astype(np.float32, copy=False)
