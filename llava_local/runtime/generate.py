"""THE prefill and THE decode loop. `prefill` evaluates a prompt's text parts and image embeddings in
order; then `Decode` samples a token from the last logits, stop at an end-of-generation
token, at max_tokens or when the context is full, else evaluate the token and go on. Chat sessions,
text generation (the datagen teacher, the eval judge) and the quantization report run it; the
batched decoder (batch_decode.py) applies the same stop rule (`next_token`) to many sequences.

    prefill(llm, [before_ids, after_ids], [image_embd])      # text, image, text
    dec = Decode(llm, Sampler(SamplingParams()), max_tokens=64)
    for tok in dec:
        print(llm.token_bytes(tok).decode(errors="replace"), end="")
    print(dec.finish_reason)            # "stop" | "length" | "interrupted"
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from llava_local.runtime.sampling import Sampler


def prefill(llm, text_parts: Sequence[Sequence[int]], embeds: Sequence[np.ndarray] = ()) -> int:
    """Evaluate text_parts[0], embeds[0], text_parts[1], ... on the current cache (n images between
    n + 1 text parts, as the prompt builder splits a prompt); returns the positions evaluated."""
    if len(text_parts) != len(embeds) + 1:
        raise ValueError(f"{len(embeds)} images need {len(embeds) + 1} text parts, got {len(text_parts)}")
    n0 = llm.n_past
    for i, ids in enumerate(text_parts):
        if i:
            llm.eval_embeddings(embeds[i - 1])
        if ids:
            llm.eval_tokens(list(ids))
    return llm.n_past - n0


def next_token(llm, sampler: Sampler, logits: np.ndarray, history: list[int], *,
               eog_mask: np.ndarray | None = None) -> int | None:
    """The stop rule shared by every loop: the sampled token, or None at the end of generation.
    `eog_mask`: end-of-generation ids never sampled (llama.cpp's --ignore-eos: benchmarks compare
    equal amounts of work). `logits` may be a view of llama.cpp's buffer: it is never written."""
    if eog_mask is not None:
        logits = logits.copy()
        logits[eog_mask] = -np.inf
    tok = sampler(logits, history)
    return None if llm.is_eog(tok) else tok


class Decode:
    """One sequence's answer on `llm` (sequence 0), after the prompt was evaluated. Iterating yields
    each token as it is sampled; a token is evaluated into the KV cache before the next is sampled,
    so after a full run the cache holds the whole answer (a chat's next turn extends it)."""

    def __init__(self, llm, sampler: Sampler, max_tokens: int, *, ignore_eos: bool = False,
                 should_stop: Callable[[], bool] | None = None):
        self.llm, self.sampler, self.max_tokens = llm, sampler, max_tokens
        self.should_stop = should_stop          # polled before each token (a signal handler sets it)
        self._eog = llm.eog_ids if ignore_eos else None
        self.tokens: list[int] = []
        self.n_evaluated = 0                    # answer tokens in the KV cache
        self.finish_reason = "interrupted"      # unless the loop ends otherwise

    def __iter__(self) -> Iterator[int]:
        llm = self.llm
        for _ in range(self.max_tokens):
            if self.should_stop is not None and self.should_stop():
                return
            tok = next_token(llm, self.sampler, llm.last_logits(), self.tokens, eog_mask=self._eog)
            if tok is None:
                self.finish_reason = "stop"
                return
            self.tokens.append(tok)
            yield tok
            if llm.n_past >= llm.n_ctx:
                self.finish_reason = "length"
                return
            llm.eval_tokens([tok])
            self.n_evaluated += 1
        self.finish_reason = "length"

    def run(self) -> list[int]:
        """Decode to the end; the answer's token ids."""
        for _ in self:
            pass
        return self.tokens

    def settle(self) -> bool:
        """Evaluate tokens sampled but not yet in the cache (the caller stopped iterating right after
        one); True when the cache holds the whole answer."""
        missing = self.tokens[self.n_evaluated:]
        if missing and self.llm.n_past + len(missing) <= self.llm.n_ctx:
            self.llm.eval_tokens(missing)
            self.n_evaluated = len(self.tokens)
        return self.n_evaluated == len(self.tokens)
