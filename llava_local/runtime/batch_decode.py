"""Several sequences decoded together in one llama.cpp batch, sharing the prompt prefix in the KV cache.

Captioning asks the same question about many images. Every prompt is

    [shared prefix: BOS, system prompt, "USER: "] [image embeddings] [suffix: "\\nQ ASSISTANT:"] [answer]

so the prefix is evaluated once (sequence 0) and copied to the other sequences with
`llama_memory_seq_cp`, which in a unified KV cache only tags the same cells with more sequence ids.
Each step then puts one new token of every generating sequence into a single `llama_decode`, which
costs little more than one token on its own: the weights are read once for the whole batch.
Continuous batching: when a sequence finishes its cells after the prefix are freed
(`llama_memory_seq_rm`) and the next image takes its slot.

The server keeps conversations instead (no shared prefix): a request names its slot, the positions
of that slot's cache it extends (`start`: the conversation so far) and `keep=True`, so its cells stay
after it finishes, held by the idle slot until a later turn extends them or `evict` frees them.

    llm = LlamaLLM(path, n_ctx=4096, n_seq_max=8)
    dec = BatchDecoder(llm, prefix_tokens, n_seq=8)
    results = dec.generate([SeqRequest("a.jpg", [embd_a, suffix], Sampler(params), max_tokens=64), ...])

The LLM's context must have been created with `n_seq_max >= n_seq` (llm.py sets `kv_unified` then).
Sampling is per sequence (its own `Sampler`, seeded per sequence by the caller). Batching changes
llama.cpp's arithmetic only in the last bits (matmul kernels depend on the batch size, and the F16
KV cache can round such a difference up to ~1e-3 in the logits), so greedy answers equal those
decoded one at a time except where two tokens nearly tie: none of the test model's, a few late
tokens on untrained random models (bench/caption_throughput.py reports it). For a given
sequence of admissions the results are deterministic.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from llava_local.errors import LlavaLocalError
from llava_local.runtime.context_fit import check_fit
from llava_local.runtime.generate import next_token
from llava_local.runtime.sampling import Sampler

log = logging.getLogger(__name__)

Part = list | np.ndarray   # token ids, or (n, n_embd) float32 embeddings (an image)


@dataclass
class SeqRequest:
    key: str
    parts: Sequence[Part]     # what follows the shared prefix (or `start`), in order
    sampler: Sampler
    max_tokens: int
    slot: int | None = None   # the sequence to run in (None: any free one)
    start: int | None = None  # positions of the slot's cache it extends (None: just the shared prefix)
    keep: bool = False        # keep the cells when finished (a conversation's next turn extends them)
    on_token: Callable[[int], bool] | None = None   # called with each token; True stops the answer there


@dataclass
class SeqResult:
    key: str
    tokens: list[int]
    text: str
    finish_reason: str        # "stop" (end-of-generation token, or on_token said so) | "length" | "cancelled"
    n_prompt: int             # positions evaluated for this sequence, shared prefix excluded
    seconds: float            # admitted -> finished (wall time, shared with the batch)
    request: SeqRequest = field(repr=False, default=None)
    prompt_end: int = 0       # positions of the sequence once its prompt was evaluated
    n_cached: int = 0         # positions in its cache when it finished (the answer's evaluated tokens too)


@dataclass
class _Seq:
    req: SeqRequest
    slot: int
    pos: int                                  # next position in the sequence
    todo: deque = field(default_factory=deque)  # prompt parts not evaluated yet
    tokens: list[int] = field(default_factory=list)
    pending: int | None = None                # sampled, not yet evaluated
    t0: float = 0.0
    n_prompt: int = 0
    prompt_end: int = 0
    cells: int = 0                            # KV cells promised to it beyond the shared prefix


def request_positions(req: SeqRequest) -> int:
    """KV cells one request may need at most: its prompt after the prefix plus its answer."""
    return sum(len(p) for p in req.parts) + req.max_tokens


class BatchDecoder:
    def __init__(self, llm, prefix: Sequence[int], *, n_seq: int, ignore_eos: bool = False):
        """`llm`: a LlamaLLM with n_seq_max >= n_seq; its n_ctx cells hold the prefix and the sequences.
        `ignore_eos`: end-of-generation tokens are never sampled, so every answer runs to its
        max_tokens (llama.cpp's --ignore-eos: benchmarks compare equal amounts of work)."""
        if n_seq < 1:
            raise LlavaLocalError(f"n_seq must be >= 1, got {n_seq}")
        self.llm = llm
        self.n_seq = n_seq
        self.prefix = list(prefix)
        self.capacity = llm.n_ctx - len(self.prefix)
        self.free = list(range(n_seq - 1, -1, -1))   # slots (= sequence ids), popped from the end
        self.active: dict[int, _Seq] = {}
        self.reserved = 0                            # KV cells promised to active sequences
        self.held: dict[int, int] = {}               # cells (beyond the prefix) kept by idle slots
        self._eog = llm.eog_ids if ignore_eos else None
        self.reset()

    # --- state ---
    def reset(self) -> None:
        """Drop every sequence and evaluate the shared prefix again (after an error, or at start)."""
        llm = self.llm
        llm.clear_memory()
        self.free = list(range(self.n_seq - 1, -1, -1))
        self.active.clear()
        self.reserved = 0
        self.held.clear()
        if self.prefix:
            for i in range(0, len(self.prefix), self.llm.n_batch):
                chunk = self.prefix[i:i + self.llm.n_batch]
                b = llm.new_batch(len(chunk))
                b.token[:] = chunk
                b.pos[:] = np.arange(i, i + len(chunk))
                llm.decode(b)
            for s in range(1, self.n_seq):
                llm.seq_copy(0, s)

    @property
    def n_free(self) -> int:
        return len(self.free)

    def _cells(self, req: SeqRequest) -> int:
        """KV cells beyond the shared prefix the request's sequence may use: what it extends, then its worst case."""
        start = len(self.prefix) if req.start is None else req.start
        return start - len(self.prefix) + request_positions(req)

    def _slot_free(self, req: SeqRequest) -> bool:
        return req.slot in self.free if req.slot is not None else bool(self.free)

    def fits(self, req: SeqRequest) -> bool:
        """A free slot (the one asked for) and room in the KV cache for this request's worst case;
        the cells of idle slots count as used until `evict` frees them."""
        held = sum(n for s, n in self.held.items() if s != req.slot)
        return self._slot_free(req) and self.reserved + held + self._cells(req) <= self.capacity

    def admit(self, req: SeqRequest) -> None:
        start = len(self.prefix) if req.start is None else req.start
        parts = [p for p in req.parts if len(p)]
        if not parts or not isinstance(parts[-1], list):
            raise LlavaLocalError(f"{req.key}: a prompt must end with text tokens")
        images = [len(p) for p in parts if isinstance(p, np.ndarray)]
        need = request_positions(req)
        check_fit(n_ctx=self.capacity + len(self.prefix), in_use=start, images=images,
                  n_text=need - sum(images) - req.max_tokens, n_answer=req.max_tokens,
                  hint="raise --ctx or lower --max-tokens", what=req.key)
        if req.max_tokens < 1:
            raise LlavaLocalError(f"max_tokens must be >= 1, got {req.max_tokens}")
        if not self.fits(req):
            raise LlavaLocalError("no free sequence slot (check fits() before admit())")
        if req.slot is not None and not len(self.prefix) <= start <= len(self.prefix) + self.held.get(req.slot, 0):
            raise LlavaLocalError(f"slot {req.slot} holds {self.held.get(req.slot, 0)} positions, not {start}")
        slot = req.slot if req.slot is not None else self.free[-1]
        self.free.remove(slot)
        self.held.pop(slot, None)
        self.llm.seq_remove(slot, start)             # what a previous turn left beyond `start`
        seq = _Seq(req, slot, pos=start, todo=deque(parts), t0=time.perf_counter(), cells=self._cells(req))
        self.reserved += seq.cells
        self.active[slot] = seq

    def evict(self, slot: int) -> None:
        """Free the cells an idle slot keeps (beyond the shared prefix)."""
        if slot in self.active:
            raise LlavaLocalError(f"slot {slot} is decoding")
        if self.held.pop(slot, None) is not None:
            self.llm.seq_remove(slot, len(self.prefix))

    def cancel(self, key: str) -> SeqResult | None:
        """Stop the active sequence `key` now (its client went away); its result, or None if unknown."""
        done: list[SeqResult] = []
        for seq in list(self.active.values()):
            if seq.req.key == key:
                self._finish(seq, "cancelled", done)
        return done[0] if done else None

    # --- decoding ---
    @property
    def n_decode_calls(self) -> int:
        return self.llm.n_decode_calls

    def _sample(self, seq: _Seq, logits: np.ndarray, done: list[SeqResult]) -> None:
        req = seq.req
        tok = next_token(self.llm, req.sampler, logits, seq.tokens, eog_mask=self._eog)
        if tok is None:
            return self._finish(seq, "stop", done)
        seq.tokens.append(tok)
        if req.on_token is not None and req.on_token(tok):
            return self._finish(seq, "stop", done)
        if len(seq.tokens) >= req.max_tokens:
            return self._finish(seq, "length", done)
        seq.pending = tok

    def _finish(self, seq: _Seq, reason: str, done: list[SeqResult]) -> None:
        # keep the shared prefix cells of this sequence; free (or, to keep, hold) the rest
        if seq.req.keep:
            self.held[seq.slot] = seq.pos - len(self.prefix)
        else:
            self.llm.seq_remove(seq.slot, len(self.prefix))
        del self.active[seq.slot]
        self.free.append(seq.slot)
        self.reserved -= seq.cells
        text = self.llm.detokenize(seq.tokens).strip()
        done.append(SeqResult(seq.req.key, seq.tokens, text, reason, seq.n_prompt, time.perf_counter() - seq.t0,
                              seq.req, prompt_end=seq.prompt_end or seq.pos, n_cached=seq.pos))

    def _prefill_embeddings(self, done: list[SeqResult]) -> None:
        """Evaluate, for every sequence whose next prompt part is not its final token part, that part;
        image embeddings of all sequences go into shared batches of up to n_batch rows."""
        while True:
            heads = [s for s in self.active.values()
                     if s.todo and not (len(s.todo) == 1 and isinstance(s.todo[0], list))]
            if not heads:
                return
            emb = [s for s in heads if isinstance(s.todo[0], np.ndarray)]
            txt = [s for s in heads if not isinstance(s.todo[0], np.ndarray)]
            for group, is_embd in ((emb, True), (txt, False)):
                rows = []   # (seq, start row within its part, n rows)
                for s in group:
                    part = s.todo.popleft()
                    if isinstance(part, np.ndarray):
                        part = np.ascontiguousarray(part, np.float32)
                        if part.ndim != 2 or part.shape[1] != self.llm.n_embd:
                            raise LlavaLocalError(f"{s.req.key}: image embeddings of shape {part.shape} do not "
                                                  f"match LLM width {self.llm.n_embd}")
                    rows.append((s, part, not s.todo, True))
                self._eval_parts(rows, is_embd, done)

    def _eval_parts(self, rows, is_embd: bool, done: list[SeqResult]) -> None:
        """Evaluate whole parts of several sequences, chunked to n_batch rows per llama_decode.
        `rows`: (seq, part, final part of its prompt?, counts as prompt?)."""
        segs = deque()   # pieces of parts that fit the current chunk: filled with slices, not per row
        for s, part, final, is_prompt in rows:
            s.n_prompt += len(part) if is_prompt else 0
            segs.append([s, part, 0, final])
        nb = self.llm.n_batch
        while segs:
            n = min(nb, sum(len(p) - j for _, p, j, _ in segs))
            b = self.llm.new_batch(n, embd=is_embd)
            i, want = 0, []
            while i < n:
                seg = segs[0]
                s, part, j, final = seg
                k = min(len(part) - j, n - i)
                if is_embd:
                    b.embd[i:i + k] = part[j:j + k]
                else:
                    b.token[i:i + k] = part[j:j + k]
                b.pos[i:i + k] = np.arange(s.pos, s.pos + k)
                b.seq[i:i + k] = s.slot
                s.pos += k
                i += k
                seg[2] = j + k
                if seg[2] == len(part):
                    segs.popleft()
                    if final:
                        b.logits[i - 1] = 1
                        want.append((i - 1, s))
                        if not s.prompt_end:
                            s.prompt_end = s.pos
            self.llm.decode(b)
            for i, s in want:
                self._sample(s, self.llm.logits_view(i), done)

    def step(self) -> list[SeqResult]:
        """Evaluate what is due (new prompts, one token of every generating sequence); return the
        sequences that finished."""
        done: list[SeqResult] = []
        self._prefill_embeddings(done)
        rows = []
        for s in list(self.active.values()):
            if s.todo:                               # the final token part of a new prompt
                rows.append((s, s.todo.popleft(), True, True))
            elif s.pending is not None:              # the answer's last token
                tok, s.pending = s.pending, None
                rows.append((s, [tok], True, False))
        if rows:
            self._eval_parts(rows, False, done)
        return done

    def generate(self, requests: Iterable[SeqRequest]) -> list[SeqResult]:
        """Run requests to completion, n_seq at a time; results in the order of the requests."""
        reqs = list(requests)
        queue = deque(reqs)
        out: dict[int, SeqResult] = {}
        while queue or self.active:
            while queue and (self.fits(queue[0]) or not self.active):
                self.admit(queue.popleft())          # alone and too big: ContextOverflowError with the numbers
            for r in self.step():
                out[id(r.request)] = r
        return [out[id(r)] for r in reqs]
