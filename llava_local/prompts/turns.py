"""THE prompt builder: a conversation becomes one rendered string (images as IMAGE_MARKER, BOS/EOS as
their token texts), then token ids per text part around the images, with one BOS rule. Chat
sessions, the caption worker, text generation (datagen teacher, eval judge) and the quantization
report all build prompts here, so one conversation gives the same ids on every path.

    pb = PromptBuilder(fmt, llm.tokenize, llm.bos)     # fmt: prompts.render.choose_format(...)
    msgs = [Message("user", user_content("What is it?", n_images=1))]
    before, after = pb.parts(msgs, n_images=1)          # ids before and after the image

The BOS rule (llama.cpp's, with add_special): when the vocabulary adds a BOS token and the text at
the start of the context does not begin with it, it is prepended; never elsewhere.
"""
from __future__ import annotations

from typing import Callable, Sequence

from llava_local.errors import LlavaLocalError
from llava_local.prompts.render import PromptFormat
from llava_local.prompts.templates import IMAGE_MARKER, Message


def user_content(prompt: str, n_images: int) -> str:
    """LLaVA puts the image before the question: "<image>\\nQ". Explicit markers are respected."""
    n_markers = prompt.count(IMAGE_MARKER)
    if n_markers == 0:
        return (IMAGE_MARKER + "\n") * n_images + prompt
    if n_markers != n_images:
        raise LlavaLocalError(f"the prompt has {n_markers} {IMAGE_MARKER} markers but {n_images} images were given")
    return prompt


class PromptBuilder:
    def __init__(self, fmt: PromptFormat, tokenize: Callable[[str], list[int]], bos_id: int | None):
        """`tokenize(text)` must parse special-token texts and add no BOS/EOS itself (LlamaLLM.tokenize)."""
        self.format, self._tokenize, self.bos_id = fmt, tokenize, bos_id

    @property
    def name(self) -> str:
        return self.format.name

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        return self.format.render(list(messages), add_generation_prompt=add_generation_prompt)

    def tokenize(self, text: str, *, at_start: bool) -> list[int]:
        """Ids of `text`; `at_start`: it begins the context, so the BOS rule applies."""
        ids = self._tokenize(text) if text else []
        if at_start and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def split(self, text: str, *, at_start: bool) -> list[list[int]]:
        """Ids of the text parts around the images of a rendered string (n images: n + 1 parts)."""
        return [ids for _, ids in self.pieces(text, at_start=at_start)]

    def pieces(self, text: str, *, at_start: bool) -> list[tuple[str, list[int]]]:
        """(text, ids) of the text parts around the images of a rendered string."""
        return [(p, self.tokenize(p, at_start=at_start and i == 0)) for i, p in enumerate(text.split(IMAGE_MARKER))]

    def parts(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
              n_images: int | None = None) -> list[list[int]]:
        """The whole conversation's ids, split at its images; `n_images`: how many the template must place."""
        text = self.render(messages, add_generation_prompt=add_generation_prompt)
        check_images(text, n_images)
        return self.split(text, at_start=True)

    def ids(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """A text-only conversation's ids (the teacher's and the judge's prompts)."""
        return self.parts(messages, add_generation_prompt=add_generation_prompt, n_images=0)[0]


ANSWER_SENTINEL = "\x00answer\x00"   # stands for the answer when finding the template's end-of-turn text


def answer_span(builder: PromptBuilder, messages: Sequence[Message], answer: str) -> tuple[str, str] | None:
    """How the template writes `answer` after the generation prompt of `messages`: (the text that
    stands for it right after `builder.render(messages)`, the text that closes the turn), or None
    when the template does not extend the prompt that way (then a cache cannot be extended by text)."""
    prompt = builder.render(messages)
    probe = builder.render(list(messages) + [Message("assistant", ANSWER_SENTINEL)], add_generation_prompt=False)
    if not probe.startswith(prompt) or probe.count(ANSWER_SENTINEL) != 1:
        return None
    after = probe.split(ANSWER_SENTINEL, 1)[1]
    closed = builder.render(list(messages) + [Message("assistant", answer)], add_generation_prompt=False)
    if not closed.startswith(prompt) or not closed.endswith(after) or IMAGE_MARKER in after \
            or len(closed) < len(prompt) + len(after):
        return None
    return closed[len(prompt):len(closed) - len(after)], after


def check_images(text: str, n_images: int | None) -> None:
    if n_images is not None and text.count(IMAGE_MARKER) != n_images:
        raise LlavaLocalError(f"the chat template placed {text.count(IMAGE_MARKER)} images, "
                              f"the conversation has {n_images}")
