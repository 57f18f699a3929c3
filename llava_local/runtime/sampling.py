"""Token sampling from a logits vector: greedy at temperature 0, else temperature / top-k / top-p
with a seeded numpy generator (the same seed gives the same answer). With a grammar (grammar.py),
the tokens it forbids are masked out before anything else and the chosen one advances it.

    sampler = Sampler(SamplingParams(temperature=0.8, seed=1))
    token = sampler(logits, history)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from llava_local.errors import LlavaLocalError

if TYPE_CHECKING:
    from llava_local.runtime.grammar import Grammar


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0     # 0 = greedy (deterministic)
    top_k: int = 40              # llama.cpp's default
    top_p: float = 0.95          # llama.cpp's default
    repeat_penalty: float = 1.0  # 1 = off; >1 divides positive logits of recent tokens (CTRL-style)
    repeat_last_n: int = 64
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise LlavaLocalError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LlavaLocalError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LlavaLocalError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repeat_penalty > 0:
            raise LlavaLocalError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        return self


class Sampler:
    """One sequence's sampler: `grammar` (one per sequence: it holds the answer's state) constrains it."""

    def __init__(self, params: SamplingParams, grammar: "Grammar | None" = None):
        self.p = params.validate()
        self.rng = np.random.default_rng(params.seed)
        self.grammar = grammar

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        g = self.grammar
        if g is None:
            return self._choose(logits, history)
        p = self.p
        x = self._penalize(logits, history)   # commutes with the grammar's mask: -inf stays -inf
        if p.temperature == 0:
            # the best token is the best allowed one whenever the grammar allows it (llama-server's check):
            # the whole vocabulary is masked only when it does not
            tok = int(np.argmax(x))
            if not g.allows(tok):
                tok = self._draw(g.mask(x))
        elif p.top_k > 0:
            tok = self._draw(g.mask_best(x, p.top_k))
        else:
            tok = self._draw(g.mask(x))
        g.accept(tok)
        return tok

    def _choose(self, logits: np.ndarray, history: list[int]) -> int:
        return self._draw(self._penalize(logits, history))

    def _penalize(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        p = self.p
        if p.repeat_penalty != 1.0 and history:
            logits = logits.copy()
            recent = np.unique(np.asarray(history[-p.repeat_last_n:], dtype=np.int64))
            vals = logits[recent]
            logits[recent] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        return logits

    def _draw(self, logits: np.ndarray) -> int:
        p = self.p
        if p.temperature == 0:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / p.temperature
        idx = np.argsort(-x)
        if p.top_k > 0:
            idx = idx[:p.top_k]
        probs = np.exp(x[idx] - x[idx[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            idx, probs = idx[:keep], probs[:keep] / probs[:keep].sum()
        return int(idx[self.rng.choice(len(idx), p=probs)])
