"""Text-only generation with a local GGUF LLM: the datagen teacher and the evaluation judge.

Neither sees an image: the paper's teacher (GPT-4) and judge read the image as text (captions and
boxes). The prompt is rendered with the GGUF's own chat template (prompts/render.py, sandboxed; prompts/turns.py tokenizes), so
an instruct model gets the turn markers it was trained with.

    gen = TextGenerator("SmolLM2-135M-Instruct.Q4_1.gguf", threads=1)
    text = gen.generate([Message("system", "..."), Message("user", "...")], max_tokens=128)
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from llava_local.formats.gguf_check import read_gguf_info
from llava_local.prompts.render import choose_format
from llava_local.prompts.templates import Message
from llava_local.prompts.turns import PromptBuilder
from llava_local.runtime.context_fit import check_fit
from llava_local.runtime.generate import Decode, prefill
from llava_local.runtime.llm import LlamaLLM
from llava_local.runtime.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)


class TextGenerator:
    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 2048, threads: int | None = None,
                 verbose: bool = False):
        self.path = Path(path)
        chat_template = read_gguf_info(self.path).get("tokenizer.chat_template")
        self.llm = LlamaLLM(self.path, n_ctx=n_ctx, n_threads=threads, verbose=verbose)
        bos = self.llm.bos
        # Without a template in the GGUF, choose_format falls back to vicuna_v1 (with a warning).
        fmt = choose_format(override=None, gguf_template=chat_template, named=None,
                            bos_text=self.llm.token_text(bos) if bos is not None else "",
                            eos_text=self.llm.token_text(self.llm.eos))
        self.prompt = PromptBuilder(fmt, self.llm.tokenize, bos)
        self.n_generated = 0                 # counter over the generator's life (datagen reports it)
        self._cached: list[int] = []         # token ids in the KV cache, for prefix reuse
        self.last_finish = ""                # "stop" (end of turn) or "length" (max_tokens / n_ctx reached)

    def render(self, messages: Sequence[Message]) -> str:
        return self.prompt.render(messages)

    def generate(self, messages: Sequence[Message], *, max_tokens: int = 256,
                 sampling: SamplingParams = SamplingParams()) -> str:
        """The assistant's reply to `messages` (calls are independent; only the KV cache of a shared prompt prefix is reused)."""
        llm = self.llm
        ids = self.prompt.ids(messages)
        check_fit(n_ctx=llm.n_ctx, n_text=len(ids), reserve=1, hint="raise the teacher's n_ctx")
        # Reuse the KV cache for the prefix shared with the previous call (the system prompt and
        # few-shot seeds repeat across datagen tasks); at least one token is evaluated for fresh logits.
        keep = 0
        for a, b in zip(self._cached, ids[:-1]):
            if a != b:
                break
            keep += 1
        if keep == 0:
            llm.reset()
        else:
            llm.truncate(keep)
        self._cached = []            # unknown while evaluating (an exception leaves it unusable)
        prefill(llm, [ids[keep:]])
        dec = Decode(llm, Sampler(sampling), max_tokens)
        out = dec.run()
        self.last_finish = dec.finish_reason
        self._cached = ids + out[:dec.n_evaluated]
        self.n_generated += len(out)
        return llm.detokenize(out).strip()

    def close(self) -> None:
        self.llm.close()
