"""Which conversation each sequence's KV cache holds, so that a request extending one evaluates only
its new text (the server's multi-turn chats; OpenAI-style clients resend the whole history).

A sequence's cache is a list of segments: a piece of the rendered conversation (the prompt
builder's text, IMAGE_MARKER for an image, or an answer) and the positions it fills. A new request
is rendered the same way; the free sequence whose segments it begins with the longest (text equal,
images equal by decoded-pixel key) is chosen, and only the rest is tokenized and evaluated. An
answer's segment is the text the template writes for it, while its positions hold the ids that were
generated: a client sends back the text, whose re-tokenization need not equal those ids.

    cache = ConversationCache(n_slots=4)
    slot, kept = cache.choose(rendered, image_keys, free=[0, 1, 2, 3])
    # evaluate rendered[kept.chars:] on `slot` from position kept.positions, then:
    cache.record(slot, kept.segments + new_segments)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from llava_local.prompts.templates import IMAGE_MARKER


@dataclass(frozen=True)
class Segment:
    text: str                  # the rendered text its positions stand for (IMAGE_MARKER for an image)
    n: int                     # KV positions it fills
    image: str | None = None   # an image's key (mmproj identity + decoded pixels)
    pending: tuple[int, ...] = ()   # its last ids, not in the cache yet (an answer cut at max_tokens)


@dataclass(frozen=True)
class Kept:
    segments: tuple[Segment, ...] = ()
    chars: int = 0             # rendered text they stand for
    positions: int = 0         # KV positions they fill
    images: int = 0            # images among them
    pending: tuple[int, ...] = ()   # ids to evaluate before the new text (the last segment's)


@dataclass
class _Slot:
    segments: list[Segment] = field(default_factory=list)
    used: float = 0.0          # last use (least recently used goes first)


def kept_prefix(segments: Sequence[Segment], text: str, image_keys: Sequence[str]) -> Kept:
    """The longest run of `segments` that `text` (whose IMAGE_MARKERs are `image_keys`, in order) begins with."""
    chars = pos = n_img = k = 0
    for seg in segments:
        if seg.image is not None:
            if not text.startswith(IMAGE_MARKER, chars) or n_img >= len(image_keys) or image_keys[n_img] != seg.image:
                break
            n_img += 1
        elif not seg.text or IMAGE_MARKER in seg.text or not text.startswith(seg.text, chars):
            break
        chars += len(seg.text)
        pos += seg.n
        k += 1
        if seg.pending:        # what follows it is not in the cache
            break
    return Kept(tuple(segments[:k]), chars, pos, n_img, segments[k - 1].pending if k else ())


class ConversationCache:
    def __init__(self, n_slots: int):
        self._slots = [_Slot() for _ in range(n_slots)]

    def choose(self, text: str, image_keys: Sequence[str], free: Iterable[int]) -> tuple[int, Kept]:
        """The free slot whose cache holds the longest prefix of `text` (else the least recently used)
        and what of it is kept. When `text` is all cached (the same request again), its last segment
        is evaluated again: sampling needs the logits of the prompt's last position."""
        best: tuple | None = None
        for s in free:
            kept = kept_prefix(self._slots[s].segments, text, image_keys)
            if kept.chars == len(text) and kept.segments:
                kept = kept_prefix(kept.segments[:-1], text, image_keys)
            rank = (kept.positions, -self._slots[s].used)
            if best is None or rank > best[0]:
                best = (rank, s, kept)
        if best is None:
            raise ValueError("no free slot")
        return best[1], best[2]

    def record(self, slot: int, segments: Sequence[Segment]) -> None:
        """What `slot`'s cache holds now (its positions from 0)."""
        self._slots[slot].segments = list(segments)
        self._slots[slot].used = time.monotonic()

    def segments(self, slot: int) -> list[Segment]:
        return list(self._slots[slot].segments)

    def idle_order(self, slots: Iterable[int]) -> list[int]:
        """`slots` least recently used first (the order in which to free their cells)."""
        return sorted(slots, key=lambda s: self._slots[s].used)

    def forget(self, slot: int | None = None) -> None:
        """`slot`'s cache was freed (None: every slot's)."""
        for i in ([slot] if slot is not None else range(len(self._slots))):
            self._slots[i].segments = []
