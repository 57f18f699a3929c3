"""LLaVA JSON data -> token ids, labels and pixels, through the same templates the runtime uses.

    [{"id": "1", "image": "coco/0001.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                        {"from": "gpt", "value": "A cat."}, ...]}, ...]

Conversations are multi-turn; `<image>` may sit anywhere in the first human turn (LLaVA moves it
to the front, `image_position="front"`); a record without "image" is text-only. Ids and labels are
built by `templates.Template.segments` + `templates.tokenize_segments`, the very functions the
runtime tokenizes prompts with, so training and inference agree token for token. Only assistant
text and its end-of-turn token carry labels. Each image slot becomes `n_image_tokens` positions
marked IMAGE_PLACEHOLDER, where the model puts the projected CLIP features.

Images go through llava_local.image.load.load_image and llava_local.image.preprocess (LLaVA-1.5's
pad-to-square, bicubic resize, CLIP normalisation): the pixels the runtime's vision backends see.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llava_local.image.load import load_image
from llava_local.image.preprocess import PreprocessConfig, preprocess
from llava_local.prompts.templates import IMAGE_MARKER, Message, Template, tokenize_segments

from .errors import TrainDataError
from .tokenizer import TextTokenizer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100          # labels: not trained on (PyTorch cross_entropy's default ignore_index)
IMAGE_PLACEHOLDER = -200     # input_ids: an image-token position (LLaVA's IMAGE_TOKEN_INDEX)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def to_messages(conversations: list[dict], *, template: Template, has_image: bool,
                image_position: str = "front") -> list[Message]:
    """LLaVA JSON turns -> template Messages, with the image marker placed as configured."""
    msgs = []
    for i, turn in enumerate(conversations):
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise TrainDataError(f"turn {i}: unknown speaker {turn.get('from')!r} (expected human/gpt)")
        value = turn.get("value")
        if not isinstance(value, str):
            raise TrainDataError(f"turn {i}: value must be a string")
        msgs.append(Message(role, value))
    users = [i for i, m in enumerate(msgs) if m.role == "user"]
    n_markers = sum(m.content.count(IMAGE_MARKER) for m in msgs)
    if not has_image:
        if n_markers:
            raise TrainDataError(f"{IMAGE_MARKER} in a record without an image")
    elif n_markers > 1 or any(IMAGE_MARKER in m.content for j, m in enumerate(msgs) if users and j != users[0]):
        raise TrainDataError(f"exactly one {IMAGE_MARKER}, in the first human turn, is supported")
    elif users:
        first = msgs[users[0]].content
        if n_markers == 0 or image_position == "front":
            # LLaVA's preprocess_multimodal: drop the marker, strip, put "<image>\n" first
            first = IMAGE_MARKER + "\n" + first.replace(IMAGE_MARKER, "").strip()
        msgs[users[0]] = Message("user", first)
    if template.name == "plain":
        # LLaVA's preprocess_plain: the human turn is only the image; the caption is the target
        msgs = [Message(m.role, IMAGE_MARKER if IMAGE_MARKER in m.content else "") if m.role == "user" else m
                for m in msgs]
    return msgs


def encode(messages: list[Message], template: Template, tok: TextTokenizer,
           n_image_tokens: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels), image slots expanded to n_image_tokens IMAGE_PLACEHOLDER positions."""
    conv = tokenize_segments(template.segments(messages), tok.encode, tok.bos_id, tok.eos_id)
    ids: list[int] = []
    labels: list[int] = []
    for item, lab in zip(conv.items, conv.labels):
        if isinstance(item, int):          # an image slot
            ids += [IMAGE_PLACEHOLDER] * n_image_tokens
            labels += [IGNORE_INDEX] * n_image_tokens
        else:
            ids += item
            labels += [t if flag else IGNORE_INDEX for t, flag in zip(item, lab)]
    return ids, labels


def truncate(ids: list[int], labels: list[int], max_len: int) -> tuple[list[int], list[int], bool]:
    """Cut to max_len; an image cut in half is dropped with everything after it. Returns
    (ids, labels, image_kept)."""
    has_image = IMAGE_PLACEHOLDER in ids
    if len(ids) <= max_len:
        return ids, labels, has_image
    ids, labels = ids[:max_len], labels[:max_len]
    if has_image and ids[-1] == IMAGE_PLACEHOLDER:
        cut = ids.index(IMAGE_PLACEHOLDER)
        return ids[:cut], labels[:cut], False
    return ids, labels, has_image and IMAGE_PLACEHOLDER in ids


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]
    segments: list[int] | None = None    # independent turns: 0 = shared prefix, j >= 1 = turn j
    positions: list[int] | None = None   # independent turns: each turn's positions continue the prefix's


def encode_independent(conversations: list[dict], *, template: Template, tok: TextTokenizer, has_image: bool,
                       n_image_tokens: int, max_len: int) -> Encoded:
    """A record whose turns are independent questions about one image ("independent_turns": true):
    trained exactly as that many single-turn conversations, sharing their common prefix (system
    prompt, image, and any context lines before the first question). Each turn sees the prefix and
    itself, at the positions it would have alone (the attention mask is built in collate), so no
    turn can read another's answer."""
    if len(conversations) % 2 or len(conversations) < 2:
        raise TrainDataError("independent turns need human/gpt pairs")
    # shared context: the lines of the first human turn before its question (the image goes first)
    first = conversations[0].get("value", "")
    first = first.replace(IMAGE_MARKER, "").strip() if has_image else first
    context, _, question = first.rpartition("\n")
    pairs = []
    for j in range(0, len(conversations), 2):
        q = question if j == 0 else conversations[j].get("value", "")
        turn = [{"from": conversations[j].get("from"), "value": (context + "\n" if context else "") + q},
                conversations[j + 1]]
        pairs.append(encode(to_messages(turn, template=template, has_image=has_image), template, tok, n_image_tokens))
    # the longest common token prefix (causal states there are shared exactly), ending before the
    # token that precedes each turn's first label: every turn keeps an unlabelled first token,
    # which no other turn predicts
    k = min(next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX) - 1 for _, labels in pairs)
    for ids, _ in pairs[1:]:
        k = next((i for i, (a, b) in enumerate(zip(pairs[0][0][:k], ids)) if a != b), k)
    out = Encoded(list(pairs[0][0][:k]), list(pairs[0][1][:k]), [0] * k, list(range(k)))
    for j, (ids, labels) in enumerate(pairs, start=1):
        suffix = ids[k:]
        if len(out.ids) + len(suffix) > max_len:
            break                                       # whole turns only
        out.ids += suffix
        out.labels += labels[k:]
        out.segments += [j] * len(suffix)
        out.positions += list(range(k, k + len(suffix)))
    return out


@dataclass
class DataConfig:
    json_path: Path
    image_folder: Path
    template: Template
    n_image_tokens: int
    preprocess: PreprocessConfig
    max_len: int = 2048
    image_position: str = "front"
    cache: bool = False          # keep every item in memory after its first use


class LlavaDataset(torch.utils.data.Dataset):
    """Lazily tokenizes and loads one record per item (LLaVA's LazySupervisedDataset)."""

    def __init__(self, cfg: DataConfig, tok: TextTokenizer):
        self.cfg, self.tok = cfg, tok
        try:
            records = json.loads(Path(cfg.json_path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TrainDataError(f"{cfg.json_path}: cannot read LLaVA JSON ({exc})") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) and "conversations" in r for r in records):
            raise TrainDataError(f"{cfg.json_path}: expected a list of records with 'conversations'")
        self.records = records
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.records)

    def length_hints(self) -> list[int]:
        """A cheap proxy for each record's token count (characters; an image counts as its tokens)."""
        per_image = self.cfg.n_image_tokens * 4
        return [sum(len(t.get("value", "")) for t in r["conversations"]) + (per_image if "image" in r else 0)
                for r in self.records]

    def encode_record(self, rec: dict) -> tuple[Encoded, bool]:
        """(encoded record, whether its image is kept)."""
        has_image = rec.get("image") is not None
        if rec.get("independent_turns"):
            enc = encode_independent(rec["conversations"], template=self.cfg.template, tok=self.tok,
                                     has_image=has_image, n_image_tokens=self.cfg.n_image_tokens,
                                     max_len=self.cfg.max_len)
            keep = has_image and IMAGE_PLACEHOLDER in enc.ids
            if has_image and not keep:
                raise TrainDataError(f"the image does not fit in max_len {self.cfg.max_len}")
            return enc, keep
        msgs = to_messages(rec["conversations"], template=self.cfg.template, has_image=has_image,
                           image_position=self.cfg.image_position)
        ids, labels = encode(msgs, self.cfg.template, self.tok, self.cfg.n_image_tokens)
        ids, labels, keep = truncate(ids, labels, self.cfg.max_len)
        return Encoded(ids, labels), keep

    def __getitem__(self, i: int) -> dict:
        if i in self._cache:
            return self._cache[i]
        item = self._load(i)
        if self.cfg.cache:
            self._cache[i] = item
        return item

    def _load(self, i: int) -> dict:
        rec = self.records[i]
        try:
            enc, keep_image = self.encode_record(rec)
        except ValueError as exc:
            raise TrainDataError(f"{self.cfg.json_path}: record {rec.get('id', i)!r}: {exc}") from None
        pixels = None
        if keep_image:
            path = Path(self.cfg.image_folder) / rec["image"]
            pixels = torch.from_numpy(preprocess(load_image(path).image, self.cfg.preprocess))   # (3, S, S)
        item = {"input_ids": torch.tensor(enc.ids, dtype=torch.long),
                "labels": torch.tensor(enc.labels, dtype=torch.long), "pixel_values": pixels}
        if enc.segments is not None:
            item["segments"] = torch.tensor(enc.segments, dtype=torch.long)
            item["positions"] = torch.tensor(enc.positions, dtype=torch.long)
        return item


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest sequence; stack the images of the records that have one. With
    independent-turn records in the batch, "turn_mask" is the 4-D attention mask (B, 1, T, T):
    causal, and a turn sees only the shared prefix and itself; padding sees only itself."""
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k], labels[i, :k], mask[i, :k] = b["input_ids"], b["labels"], 1
    pix = [b["pixel_values"] for b in batch if b["pixel_values"] is not None]
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": torch.stack(pix) if pix else None}
    if any("segments" in b for b in batch):
        seg = torch.full((len(batch), n), -1, dtype=torch.long)            # -1: padding
        pos = torch.arange(n).repeat(len(batch), 1)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            seg[i, :k] = b["segments"] if "segments" in b else 0
            if "positions" in b:
                pos[i, :k] = b["positions"]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        sq, sk = seg[:, :, None], seg[:, None, :]                           # (B, T, 1), (B, 1, T)
        visible = causal & (((sk == 0) | (sk == sq)) & (sq >= 0))
        visible |= torch.eye(n, dtype=torch.bool)                           # padding rows: themselves
        out["turn_mask"] = visible[:, None]                                 # (B, 1, T, T) bool
        out["position_ids"] = pos
    return out


def n_targets(labels: torch.Tensor) -> int:
    """Labelled positions that a next-token loss counts (the first position predicts nothing)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def default_image_folder(json_path: str | os.PathLike, image_folder: str | os.PathLike | None) -> Path:
    return Path(image_folder) if image_folder else Path(json_path).resolve().parent
