"""The LLM side on llama.cpp: tokens and image embeddings in through `llama_batch`, logits out.

A thin layer over llama-cpp-python's ctypes bindings of the C API (no `Llama` class): one model,
one context, one sequence whose KV cache we manage ourselves (so a chat session can keep it).

    llm = LlamaLLM("model-llm-F16.gguf", n_ctx=4096)
    llm.eval_tokens(llm.tokenize("USER: hi ASSISTANT:"))
    llm.eval_embeddings(image_embd)            # (n_tokens, n_embd) float32, from any vision backend
    next_logits = llm.last_logits()
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import numpy as np

from llava_local.errors import ContextOverflowError, LlavaLocalError, ModelFilesError
from llava_local.llama_lib import llama_cpp_lib
from llava_local.runtime.context_fit import check_fit
from llava_local.runtime.extra_bufts_probe import extra_buffer_types_allowed

log = logging.getLogger(__name__)

class Batch:
    """A `llama_batch` over numpy buffers, filled with vector ops (not a Python loop per field): the
    only place a llama_batch is built. Rows are tokens (`token`) or embeddings (`embd`, an image)."""

    def __init__(self, L, n: int, n_embd: int = 0):
        self.n = n
        self.pos = np.zeros(n, np.int32)
        self.seq = np.zeros(n, np.int32)
        self.n_seq_id = np.ones(n, np.int32)
        self.logits = np.zeros(n, np.int8)
        self.token = None if n_embd else np.zeros(n, np.int32)
        self.embd = np.zeros((n, n_embd), np.float32) if n_embd else None
        # seq_id is int32** : one pointer per token, each to its own id in self.seq
        self._seq_ptrs = (self.seq.ctypes.data + 4 * np.arange(n, dtype=np.uint64)).astype(np.uint64)
        b = L.llama_batch()
        b.n_tokens = n
        i32p = ctypes.POINTER(ctypes.c_int32)
        b.token = self.token.ctypes.data_as(i32p) if self.token is not None else None
        b.embd = self.embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if self.embd is not None else None
        b.pos = self.pos.ctypes.data_as(i32p)
        b.n_seq_id = self.n_seq_id.ctypes.data_as(i32p)
        b.seq_id = self._seq_ptrs.ctypes.data_as(ctypes.POINTER(i32p))
        b.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.struct = b


class LlamaLLM:
    """One llama.cpp model and context. llama.cpp's default model and context parameters are kept
    except where a reason is written next to the change (context size, threads, sequences, precision).

    n_gpu_layers: layers offloaded (llama.cpp's meaning: > n_layer also offloads the output layer);
    extra_bufts: llama.cpp's extra CPU buffer types (weight repacking); None = on unless the
    once-per-CPU probe (extra_bufts_probe.py) saw them crash."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 4096, n_gpu_layers: int = 0,
                 n_threads: int | None = None, n_batch: int | None = None, all_logits: bool = False,
                 precise: bool = False, n_seq_max: int = 1, extra_bufts: bool | None = None,
                 verbose: bool = False):
        L = self._L = llama_cpp_lib(verbose)
        self.path = Path(path)
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        mparams.use_extra_bufts = extra_buffer_types_allowed() if extra_bufts is None else extra_bufts
        self.extra_bufts = bool(mparams.use_extra_bufts)
        self.model = L.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.model:
            raise ModelFilesError(f"{self.path}: llama.cpp could not load the model (run with --verbose for its log)")
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx                # the caller checks the image + prompt fit (model_pair.check_context)
        if n_batch:                          # default: llama.cpp's (2048 logical, 512 physical)
            cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max      # >1: several sequences decoded in one batch (captioning)
        cparams.kv_unified = n_seq_max > 1  # sequences share one cache, so a common prompt prefix can be shared
        if precise:  # F16 KV cache and CPU flash attention (Q rounded to F16) move logits by ~1e-2
            cparams.type_k = cparams.type_v = 0  # GGML_TYPE_F32
            cparams.flash_attn_type = 0          # disabled: CPU flash attention rounds Q to F16
        # llama.cpp defaults to 4 threads; a user with 8 cores expects them used (--threads lowers it)
        threads = n_threads or max(1, (os.cpu_count() or 2))
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise ModelFilesError(f"{self.path}: llama.cpp could not create a context of {n_ctx} tokens")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_ctx = L.llama_n_ctx(self.ctx)
        self.n_embd = L.llama_model_n_embd(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_batch = L.llama_n_batch(self.ctx)
        self.n_layer = L.llama_model_n_layer(self.model)
        self.n_gpu_layers = n_gpu_layers
        self.all_logits = all_logits
        self.n_past = 0                      # tokens in the KV cache (sequence 0)
        self.n_evaluated = 0                 # counter: positions decoded since load (tests assert KV reuse)
        self.n_decode_calls = 0              # counter: llama_decode calls (the caption worker reports it)
        self._logits: list[np.ndarray] = []  # per-position logits kept when all_logits
        self._last: np.ndarray | None = None

    @property
    def lib(self):
        """The llama.cpp bindings this model was loaded with (the grammar sampler uses them; batches
        and decoding stay here)."""
        return self._L

    # --- vocabulary ---
    @property
    def bos(self) -> int | None:
        L = self._L
        return L.llama_vocab_bos(self.vocab) if L.llama_vocab_get_add_bos(self.vocab) else None

    @property
    def eos(self) -> int:
        return self._L.llama_vocab_eos(self.vocab)

    @functools.cached_property
    def eog_ids(self) -> np.ndarray:
        """Every end-of-generation token of the vocabulary (masked out when ignoring EOS)."""
        return np.array([t for t in range(self.n_vocab) if self.is_eog(t)], np.int64)

    def is_eog(self, token: int) -> bool:
        return bool(self._L.llama_vocab_is_eog(self.vocab, token))

    def tokenize(self, text: str, *, parse_special: bool = True) -> list[int]:
        """Text -> ids without BOS/EOS (templates decide those)."""
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (self._L.llama_token * n_max)()
        n = self._L.llama_tokenize(self.vocab, data, len(data), buf, n_max, False, parse_special)
        if n < 0:
            n_max = -n
            buf = (self._L.llama_token * n_max)()
            n = self._L.llama_tokenize(self.vocab, data, len(data), buf, n_max, False, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._L.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._L.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def token_text(self, token: int) -> str:
        """The text of a (special) token as templates write it, e.g. "</s>" or "<|im_end|>"."""
        buf = ctypes.create_string_buffer(256)
        n = self._L.llama_token_to_piece(self.vocab, token, buf, 256, 0, True)
        return buf.raw[:max(n, 0)].decode("utf-8", errors="replace")

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    # --- KV cache ---
    def reset(self) -> None:
        self.clear_memory()
        self.n_past = 0
        self._logits.clear()
        self._last = None

    def truncate(self, n: int) -> None:
        """Forget positions >= n (e.g. roll back an interrupted answer)."""
        if n < self.n_past:
            self.seq_remove(0, n)
            self.n_past = n

    # --- evaluation ---
    def eval_tokens(self, tokens: list[int]) -> None:
        check_fit(n_ctx=self.n_ctx, n_text=len(tokens), in_use=self.n_past)
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i:i + self.n_batch]
            self._decode(len(chunk), tokens=chunk)

    def eval_embeddings(self, embd: np.ndarray) -> None:
        """Feed (n, n_embd) float32 embeddings at the next positions (an image, as mtmd does)."""
        embd = np.ascontiguousarray(embd, dtype=np.float32)
        if embd.ndim != 2 or embd.shape[1] != self.n_embd:
            raise ModelFilesError(f"image embeddings of shape {embd.shape} do not match LLM width {self.n_embd}")
        check_fit(n_ctx=self.n_ctx, images=[embd.shape[0]], in_use=self.n_past)
        for i in range(0, embd.shape[0], self.n_batch):
            chunk = embd[i:i + self.n_batch]
            self._decode(chunk.shape[0], embd=chunk)

    def _decode(self, n: int, *, tokens: list[int] | None = None, embd: np.ndarray | None = None) -> None:
        """Sequence 0: `n` tokens or embedding rows at the next positions."""
        b = self.new_batch(n, embd=embd is not None)
        if embd is not None:
            b.embd[:] = embd
        else:
            b.token[:] = tokens
        b.pos[:] = np.arange(self.n_past, self.n_past + n)
        if self.all_logits:
            b.logits[:] = 1
        else:
            b.logits[n - 1] = 1
        self.decode(b)
        if self.all_logits:
            for i in range(n):
                self._logits.append(self._logits_at(i))
        self._last = self._logits_at(n - 1)
        self.n_past += n
        self.n_evaluated += n

    # --- batches of several sequences (batch_decode.py) ---
    def new_batch(self, n: int, *, embd: bool = False) -> Batch:
        return Batch(self._L, n, self.n_embd if embd else 0)

    def decode(self, batch: Batch) -> None:
        """Run llama_decode on a filled batch; logits of the rows flagged in `batch.logits` follow."""
        rc = self._L.llama_decode(self.ctx, batch.struct)
        self.n_decode_calls += 1
        if rc == 1:
            raise ContextOverflowError(f"llama_decode found no KV cache slot at position {self.n_past} "
                                       f"(n_ctx {self.n_ctx}): raise --ctx")
        if rc != 0:
            raise LlavaLocalError(f"llama_decode failed with code {rc} "
                                  f"({'invalid batch' if rc == -1 else 'fatal'}) at position {self.n_past}")

    def logits_view(self, i: int) -> np.ndarray:
        """Row i's logits as a view of llama.cpp's buffer: valid until the next decode, never written."""
        ptr = self._L.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def clear_memory(self) -> None:
        """Drop every sequence's cells (batch_decode; `reset` also forgets sequence 0's bookkeeping)."""
        self._L.llama_memory_clear(self._L.llama_get_memory(self.ctx), True)

    def seq_copy(self, src: int, dst: int) -> None:
        """Give sequence `dst` the cells of `src` (a unified cache tags the same cells: no copy)."""
        self._L.llama_memory_seq_cp(self._L.llama_get_memory(self.ctx), src, dst, -1, -1)

    def seq_remove(self, seq: int, start: int) -> None:
        """Free the cells of sequence `seq` from position `start` on."""
        self._L.llama_memory_seq_rm(self._L.llama_get_memory(self.ctx), seq, start, -1)

    def _logits_at(self, i: int) -> np.ndarray:
        return self.logits_view(i).copy()

    def last_logits(self) -> np.ndarray:
        if self._last is None:
            raise RuntimeError("no logits yet: evaluate something first")
        return self._last

    def all_position_logits(self) -> np.ndarray:
        """(n_past, n_vocab) logits of every evaluated position (needs all_logits=True)."""
        return np.stack(self._logits)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._L.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self._L.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
