"""Text-only generation with a local GGUF LLM: the datagen teacher and the evaluation judge.

Neither sees an image: the paper's teacher (GPT-4) and judge read the image as text (captions and
boxes). The prompt is rendered with the GGUF's own chat template (prompt_format.py, sandboxed), so
an instruct model gets the turn markers it was trained with.

    gen = TextGenerator("SmolLM2-135M-Instruct.Q4_1.gguf", threads=1)
    text = gen.generate([Message("system", "..."), Message("user", "...")], max_tokens=128)
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from llava_local.errors import ContextOverflowError
from llava_local.formats.gguf_check import read_gguf_info
from llava_local.runtime.llm import LlamaLLM
from llava_local.prompts.render import choose_format
from llava_local.runtime.sampling import Sampler, SamplingParams
from llava_local.prompts.templates import Message

log = logging.getLogger(__name__)


class TextGenerator:
    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 2048, threads: int | None = None,
                 verbose: bool = False):
        self.path = Path(path)
        chat_template = read_gguf_info(self.path).get("tokenizer.chat_template")
        self.llm = LlamaLLM(self.path, n_ctx=n_ctx, n_threads=threads, verbose=verbose)
        bos = self.llm.bos
        # Without a template in the GGUF, choose_format falls back to vicuna_v1 (with a warning).
        self.format = choose_format(override=None, gguf_template=chat_template, named=None,
                                    bos_text=self.llm.token_text(bos) if bos is not None else "",
                                    eos_text=self.llm.token_text(self.llm.eos))
        self.n_generated = 0                 # counter over the generator's life (datagen reports it)
        self._cached: list[int] = []         # token ids in the KV cache, for prefix reuse
        self.last_finish = ""                # "stop" (end of turn) or "length" (max_tokens / n_ctx reached)

    def render(self, messages: Sequence[Message]) -> str:
        return self.format.render(list(messages), add_generation_prompt=True)

    def generate(self, messages: Sequence[Message], *, max_tokens: int = 256,
                 sampling: SamplingParams = SamplingParams()) -> str:
        """The assistant's reply to `messages` (calls are independent; only the KV cache of a shared prompt prefix is reused)."""
        llm = self.llm
        ids = llm.tokenize(self.render(messages))
        if llm.bos is not None and (not ids or ids[0] != llm.bos):
            ids = [llm.bos] + ids
        if len(ids) + 1 >= llm.n_ctx:
            raise ContextOverflowError(f"the prompt needs {len(ids)} tokens, the teacher's n_ctx is {llm.n_ctx}")
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
        llm.eval_tokens(ids[keep:])
        evaluated = list(ids)
        sampler = Sampler(sampling)
        out: list[int] = []
        self.last_finish = "length"
        for _ in range(max_tokens):
            tok = sampler(llm.last_logits(), out)
            if llm.is_eog(tok):
                self.last_finish = "stop"
                break
            out.append(tok)
            if llm.n_past + 1 >= llm.n_ctx:
                break
            llm.eval_tokens([tok])
            evaluated.append(tok)
        self._cached = evaluated
        self.n_generated += len(out)
        return llm.detokenize(out).strip()

    def close(self) -> None:
        self.llm.close()
