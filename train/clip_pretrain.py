"""A tiny CLIP vision tower, trained contrastively on shapes captions (no pretrained CLIP can be
downloaded here). The demo model's vision encoder; LLaVA keeps it frozen afterwards.

    python -m train.clip_pretrain --images shapes/captions.json --out clip/ --steps 300

The image side is transformers' `CLIPVisionModel` (quick-GELU, pre-LN, CLS token: the exact
architecture the converter and llama.cpp's clip graph expect), saved alone as a CLIPVisionModel
directory. The text side is a small transformer over the words of the shapes language, used only
here. The loss is CLIP's symmetric InfoNCE with a learned temperature.

The captions name every shape with its colour and grid position, so matching an image to its
caption among a batch of similar scenes needs colour, shape and place: the features the LLM later
reads from layer -2.
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llava_local.images import load_image
from llava_local.preprocess import PreprocessConfig, square_image

from .shapes import POSITIONS

log = logging.getLogger(__name__)


@dataclass
class ClipConfig:
    image_size: int = 112          # 8x8 = 64 image tokens for the LLM
    patch_size: int = 14
    hidden_size: int = 96
    layers: int = 3                # LLaVA reads layer -2: the last layer only serves this pre-training
    heads: int = 4
    text_layers: int = 2
    embed_dim: int = 96            # shared image-text space (not kept: LLaVA uses the patch features)
    steps: int = 150
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 20
    seed: int = 0


def clip_caption(scene: dict) -> str:
    """The contrastive caption: background, then each shape with colour and position."""
    parts = [f"{scene['background']} background"]
    parts += [f"{s['colour']} {s['shape']} {POSITIONS[s['cell']]}" for s in scene["shapes"]]
    return " . ".join(parts)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|\.", text.lower())


class TextEncoder(nn.Module):
    """Word embeddings + a small pre-LN transformer; the first (CLS-like) position is the sentence."""

    def __init__(self, vocab: list[str], width: int, layers: int, heads: int, embed_dim: int, max_len: int = 32):
        super().__init__()
        self.index = {w: i + 2 for i, w in enumerate(vocab)}   # 0: pad, 1: start
        self.max_len = max_len
        self.tok = nn.Embedding(len(vocab) + 2, width)
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, width * 4, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def encode_ids(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        for i, t in enumerate(texts):
            w = [1] + [self.index[x] for x in _words(t)][: self.max_len - 1]
            ids[i, :len(w)] = torch.tensor(w)
        return ids, ids == 0

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids, pad = self.encode_ids(texts)
        x = self.tok(ids) + self.pos[: ids.shape[1]]              # (B, L, W)
        x = self.encoder(x, src_key_padding_mask=pad)             # (B, L, W)
        return self.proj(self.norm(x[:, 0]))                      # (B, E)


def vision_config(cfg: ClipConfig):
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 4,
                            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                            image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act="quick_gelu",
                            projection_dim=cfg.embed_dim)


def load_pixels(records: list[dict], image_folder: Path, pp: PreprocessConfig) -> torch.Tensor:
    """All images, LLaVA-preprocessed up to the uint8 square (normalised per batch): (N, S, S, 3) uint8."""
    return torch.from_numpy(np.stack([np.asarray(square_image(load_image(image_folder / r["image"]).image, pp))
                                      for r in records]))


def normalize(batch_u8: torch.Tensor, pp: PreprocessConfig) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32, as llava_local.preprocess.normalize."""
    x = batch_u8.permute(0, 3, 1, 2).double() / 255.0
    mean = torch.tensor(pp.image_mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(pp.image_std, dtype=torch.float64).view(1, 3, 1, 1)
    return ((x - mean) / std).float()


def train_clip(records: list[dict], image_folder: str | Path, out: str | Path, cfg: ClipConfig = ClipConfig()) -> Path:
    """Train on records of {"image": path, "scene": scene dict}; save a CLIPVisionModel dir at `out`."""
    from transformers import CLIPVisionModel
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    pp = PreprocessConfig(image_size=cfg.image_size)
    pixels = load_pixels(records, Path(image_folder), pp)                          # (N, S, S, 3)
    texts = [clip_caption(r["scene"]) for r in records]
    vocab = sorted({w for t in texts for w in _words(t)})
    vision = CLIPVisionModel(vision_config(cfg))
    visual_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim, bias=False)
    text = TextEncoder(vocab, cfg.hidden_size, cfg.text_layers, cfg.heads, cfg.embed_dim)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = list(vision.parameters()) + list(visual_proj.parameters()) + list(text.parameters()) + [logit_scale]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    labels = torch.arange(cfg.batch_size)
    vision.train()
    for step in range(cfg.steps):
        idx = rng.sample(range(len(records)), cfg.batch_size)
        x = normalize(pixels[idx], pp)
        img = F.normalize(visual_proj(vision(pixel_values=x).pooler_output), dim=-1)   # (B, E)
        txt = F.normalize(text([texts[i] for i in idx]), dim=-1)                      # (B, E)
        logits = logit_scale.exp().clamp(max=100) * img @ txt.T                       # (B, B)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == cfg.steps - 1:
            acc = float((logits.argmax(1) == labels).float().mean())
            log.info("clip step %d/%d loss %.4f image->text acc %.3f", step + 1, cfg.steps, float(loss.detach()), acc)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vision.eval().save_pretrained(str(out))
    (out / "clip_pretrain.json").write_text(json.dumps({"config": cfg.__dict__, "final_loss": float(loss.detach())}, indent=1))
    return out


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", required=True, help="JSON list of {image, scene} (shapes.write_dataset's scenes.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=ClipConfig.steps)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    recs = json.loads(Path(a.scenes).read_text())
    train_clip(recs, Path(a.scenes).parent, a.out, ClipConfig(steps=a.steps))


if __name__ == "__main__":
    main()
