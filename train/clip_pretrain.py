"""A tiny CLIP vision tower, trained contrastively on shapes captions (no pretrained CLIP can be
downloaded here). The demo model's vision encoder; LLaVA keeps it frozen afterwards.

    python -m train.clip_pretrain --scenes shapes/scenes.json --out clip/ --steps 300

The image side is transformers' `CLIPVisionModel` (quick-GELU, pre-LN, CLS token: the exact
architecture the converter and llama.cpp's clip graph expect), saved alone as a CLIPVisionModel
directory. The text side is a small transformer over the words of the shapes language, used only
here. Two contrastive terms (CLIP's InfoNCE, one learned temperature):
- global: the CLS embedding against the scene's caption, among the batch's captions;
- region: every patch of layer -2 (what LLaVA feeds the LLM) against the phrase of the grid cell it
  lies in ("red circle top left on white", "nothing bottom right on teal"), among all such phrases.
  Without it, patches learn colours and layout but little of shape, and nothing of their place.
Half of each batch are "twins" of the other half (one shape changed): hard negatives for the
global term. The patch position embeddings start at std 0.5 instead of CLIP's 0.02, so that place
is not learned last.
"""
from __future__ import annotations

import copy
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

from llava_local.image.load import load_image
from llava_local.image.preprocess import PreprocessConfig, square_image
from llava_local.logs import setup_logging

from .shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, render, scene_from_dict

log = logging.getLogger(__name__)


@dataclass
class ClipConfig:
    image_size: int = 112          # 2x2 = 4 image tokens for the LLM: one per cell of the scene grid
    patch_size: int = 56
    hidden_size: int = 128
    layers: int = 4                # LLaVA reads layer -2: the last layer only serves this pre-training
    heads: int = 4
    text_layers: int = 2
    embed_dim: int = 96            # shared image-text space (not kept: LLaVA uses the patch features)
    steps: int = 300
    batch_size: int = 128
    position_init: float = 0.5     # std of the patch position embeddings at init
    hard_negatives: float = 0.5    # fraction of each batch that are "twins": a batch scene with one shape changed
    lr: float = 2e-3
    warmup: int = 20
    seed: int = 0


# what a cell of the scene can hold, where it is and on which background: "red circle top left on
# white", "nothing top right on teal"; the patches of the cell are trained to say all of it
PHRASES = [f"{what} {p} on {b}" for what in [f"{c} {k}" for c in COLOURS for k in SHAPES] + ["nothing"]
           for p in POSITIONS for b in BACKGROUNDS]
PHRASE_INDEX = {p: i for i, p in enumerate(PHRASES)}


def clip_caption(scene: dict) -> str:
    """The contrastive caption: background, then each shape with colour and position."""
    parts = [f"{scene['background']} background"]
    parts += [f"{s['colour']} {s['shape']} {POSITIONS[s['cell']]}" for s in scene["shapes"]]
    return " . ".join(parts)


def twin(scene: dict, rng: random.Random) -> dict:
    """The scene with one object's shape changed: a hard negative that only that shape tells apart
    (random batches of scenes differ in colours and layout long before they differ in shape)."""
    s = copy.deepcopy(scene)
    obj = rng.choice(s["shapes"])
    obj["shape"] = rng.choice([k for k in SHAPES if k != obj["shape"]])
    return s


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
        words = [[1] + [self.index[x] for x in _words(t)][: self.max_len - 1] for t in texts]
        ids = torch.zeros(len(texts), max(map(len, words), default=1), dtype=torch.long)    # padded to the longest
        for i, w in enumerate(words):
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
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32, as llava_local.image.preprocess.normalize."""
    x = batch_u8.permute(0, 3, 1, 2).double() / 255.0
    mean = torch.tensor(pp.image_mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(pp.image_std, dtype=torch.float64).view(1, 3, 1, 1)
    return ((x - mean) / std).float()


def cell_patches(grid: int) -> list[list[int]]:
    """For each cell of the scene's 2x2 grid, the patch indices (row-major in the grid x grid patch
    map) that lie in it: every shape lies inside its own cell."""
    half = grid // 2
    return [[r * grid + c for r in range(grid) for c in range(grid) if (r >= half) == (cell >= 2) and (c >= half) == (cell % 2 == 1)]
            for cell in range(4)]


def cell_phrase(scene: dict, cell: int) -> str:
    shape = next((s for s in scene["shapes"] if s["cell"] == cell), None)
    what = f"{shape['colour']} {shape['shape']}" if shape else "nothing"
    return f"{what} {POSITIONS[cell]} on {scene['background']}"


class ClipModel(nn.Module):
    """The pre-training model: the vision tower plus what only pre-training needs."""

    def __init__(self, cfg: ClipConfig, vocab: list[str]):
        super().__init__()
        from transformers import CLIPVisionModel
        self.cfg = cfg
        self.vision = CLIPVisionModel(vision_config(cfg))
        with torch.no_grad():   # CLIP's init (std 0.02) leaves position 50x weaker than content: place is learned late
            self.vision.embeddings.position_embedding.weight.normal_(std=cfg.position_init)
        self.visual_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim, bias=False)       # CLS -> shared space
        self.region_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim, bias=False)       # layer -2 regions -> same
        self.text = TextEncoder(vocab, cfg.hidden_size, cfg.text_layers, cfg.heads, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        grid = cfg.image_size // cfg.patch_size
        self.cell_of = [c for p in range(grid * grid) for c, idx in enumerate(cell_patches(grid)) if p in idx]

    def loss(self, x: torch.Tensor, scenes: list[dict]) -> tuple[torch.Tensor, float, float]:
        """Global InfoNCE (CLS vs caption) + region InfoNCE (each layer -2 patch vs its cell's phrase,
        against every phrase). Returns (loss, image->text accuracy, patch->phrase accuracy)."""
        out = self.vision(pixel_values=x, output_hidden_states=True)
        scale = self.logit_scale.exp().clamp(max=100)
        img = F.normalize(self.visual_proj(out.pooler_output), dim=-1)                  # (B, E)
        txt = F.normalize(self.text([clip_caption(s) for s in scenes]), dim=-1)          # (B, E)
        logits = scale * img @ txt.T                                                     # (B, B)
        labels = torch.arange(len(scenes))
        global_loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        patches = out.hidden_states[-2][:, 1:]                                           # (B, P, D): what LLaVA reads
        regions = patches.flatten(0, 1)                                                  # (B*P, D): every patch
        targets = [PHRASE_INDEX[cell_phrase(scene, c)] for scene in scenes for c in self.cell_of]
        reg = F.normalize(self.region_proj(regions), dim=-1)                             # (B*P, E)
        phr = F.normalize(self.text(PHRASES), dim=-1)                                    # (n_phrases, E)
        region_logits = scale * reg @ phr.T
        region_loss = F.cross_entropy(region_logits, torch.tensor(targets))
        acc = float((logits.argmax(1) == labels).float().mean())
        region_acc = float((region_logits.argmax(1) == torch.tensor(targets)).float().mean())
        return global_loss + region_loss, acc, region_acc


def train_clip(records: list[dict], image_folder: str | Path, out: str | Path, cfg: ClipConfig = ClipConfig()) -> Path:
    """Train on records of {"image": path, "scene": scene dict}; save a CLIPVisionModel dir at `out`."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    pp = PreprocessConfig(image_size=cfg.image_size)
    pixels = load_pixels(records, Path(image_folder), pp)                          # (N, S, S, 3)
    vocab = sorted({w for r in records for w in _words(clip_caption(r["scene"]))} | {w for p in PHRASES for w in _words(p)})
    model = ClipModel(cfg, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    n_twins = int(cfg.batch_size * cfg.hard_negatives) // 2
    model.train()
    for step in range(cfg.steps):
        idx = rng.sample(range(len(records)), cfg.batch_size - n_twins)
        twins = [twin(records[i]["scene"], rng) for i in idx[:n_twins]]
        twin_pixels = [torch.from_numpy(np.array(square_image(render(scene_from_dict(t)), pp))) for t in twins]
        x = normalize(torch.cat([pixels[idx]] + ([torch.stack(twin_pixels)] if twins else [])), pp)   # (B, 3, S, S)
        loss, acc, region_acc = model.loss(x, [records[i]["scene"] for i in idx] + twins)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == cfg.steps - 1:
            log.info("clip step %d/%d loss %.4f image->text acc %.3f region acc %.3f", step + 1, cfg.steps,
                     float(loss.detach()), acc, region_acc)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.vision.eval().save_pretrained(str(out))
    (out / "clip_pretrain.json").write_text(json.dumps({"config": cfg.__dict__, "steps": cfg.steps}, indent=1))
    return out


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", required=True, help="JSON list of {image, scene} (shapes.write_dataset's scenes.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=ClipConfig.steps)
    a = ap.parse_args()
    setup_logging(True, fmt="%(message)s")
    torch.set_num_threads(2)
    try:
        recs = json.loads(Path(a.scenes).read_text())
    except (OSError, ValueError) as exc:
        ap.error(f"--scenes {a.scenes}: {exc}")
    train_clip(recs, Path(a.scenes).parent, a.out, ClipConfig(steps=a.steps))


if __name__ == "__main__":
    main()
