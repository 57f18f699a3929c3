"""Conversation templates: the one source of truth for prompt layout, shared by train/ and the runtime.

A template turns a conversation into *segments*: text pieces and image slots. Training tokenizes the
same segments (and labels the assistant ones); the runtime tokenizes them with llama.cpp and puts
image embeddings in the slots. Tokenizing segment by segment (never the joined string) is what makes
the two agree token for token: `tokenize_segments` is the shared step.

    >>> t = get_template("vicuna_v1")
    >>> segs = t.segments([Message("user", "<image>\\nWhat colour?"), Message("assistant", "Red.")])

The Jinja form of each template (written to GGUF `tokenizer.chat_template`) renders the same text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from llava_local.errors import TemplateError

IMAGE_MARKER = "<image>"  # where an image goes in a user message (LLaVA JSON uses the same marker)


@dataclass(frozen=True)
class Message:
    role: str       # "system" | "user" | "assistant"
    content: str    # may contain IMAGE_MARKER (user turns only)


@dataclass(frozen=True)
class Segment:
    """A piece of the prompt. Exactly one of `text` / `image_index` is meaningful."""

    text: str = ""
    image_index: int = -1        # >= 0: an image slot (the n-th image of the conversation)
    target: bool = False         # assistant text: trained on, and generated at run time
    bos: bool = False            # prepend the tokenizer's BOS token
    eos: bool = False            # append the end-of-turn token (EOS) after the text

    @property
    def is_image(self) -> bool:
        return self.image_index >= 0


@dataclass(frozen=True)
class Template:
    name: str
    system: str
    user_prefix: str          # before each user message
    assistant_prefix: str     # after a user message, where the answer starts
    answer_prefix: str        # glued before the answer text (part of the target)
    turn_sep: str             # after the answer's EOS, before the next user turn
    jinja: str = field(repr=False, default="")

    def segments(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> list[Segment]:
        """Split a conversation into segments. With add_generation_prompt the last message must be a
        user turn and the prompt ends where the assistant's answer begins."""
        msgs = list(messages)
        system = self.system
        if msgs and msgs[0].role == "system":
            system = msgs.pop(0).content
        out: list[Segment] = []
        prompt = system + (" " if system else "")   # text waiting to become a prompt segment
        first = True
        n_images = 0
        for i, m in enumerate(msgs):
            expected = "user" if i % 2 == 0 else "assistant"
            if m.role != expected:
                raise TemplateError(f"template {self.name}: message {i} has role {m.role!r}, expected {expected!r}")
            if m.role == "user":
                if i > 0:
                    prompt += self.turn_sep
                prompt += self.user_prefix
                pieces = m.content.split(IMAGE_MARKER)
                for j, piece in enumerate(pieces):
                    if j > 0:
                        out.append(Segment(text=prompt, bos=first))
                        first = False
                        out.append(Segment(image_index=n_images))
                        n_images += 1
                        prompt = ""
                    prompt += piece
                prompt += self.assistant_prefix
            else:
                if IMAGE_MARKER in m.content:
                    raise TemplateError(f"template {self.name}: an image marker in an assistant message")
                out.append(Segment(text=prompt, bos=first))
                first = False
                prompt = ""
                out.append(Segment(text=self.answer_prefix + m.content, target=True, eos=True))
        if add_generation_prompt:
            if not msgs or msgs[-1].role != "user":
                raise TemplateError(f"template {self.name}: a generation prompt needs a final user message")
            out.append(Segment(text=prompt, bos=first))
        elif msgs and msgs[-1].role == "user":
            raise TemplateError(f"template {self.name}: conversation ends with an unanswered user message")
        return [s for s in out if s.is_image or s.text or s.bos or s.eos]

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False,
               eos_text: str = "</s>") -> str:
        """The joined text (image slots become IMAGE_MARKER); equals the Jinja template's output."""
        parts = []
        for s in self.segments(messages, add_generation_prompt=add_generation_prompt):
            parts.append(IMAGE_MARKER if s.is_image else s.text + (eos_text if s.eos else ""))
        return "".join(parts)


# LLaVA-1.5 `conv_vicuna_v1` (llava/conversation.py): SeparatorStyle.TWO, sep " ", sep2 "</s>".
# "SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT:"
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")

# llama.cpp recognises a GGUF's template by substrings, not by rendering it (llama-chat.cpp
# `llm_chat_detect_template`: Vicuna = "USER: " and "ASSISTANT: ", and no "SYSTEM: ", which would make
# it Orca-Vicuna). The rendered text has "ASSISTANT:" right before a Jinja tag, so the leading comment
# carries both substrings: it renders nothing, and upstream tools then run our files without --jinja
# (with llama.cpp's own Vicuna layout; --jinja renders exactly this one). No "-" in the comment's tags:
# llama.cpp's Jinja lexer does not strip whitespace around comments.
VICUNA_V1_JINJA = (
    "{# LLaVA-1.5 vicuna_v1: system prompt, then USER: question ASSISTANT: answer #}"
    "{%- set ns = namespace(system='" + VICUNA_SYSTEM.replace("'", "\\'") + "', start=0) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = messages[0]['content'] -%}{%- set ns.start = 1 -%}{%- endif -%}"
    "{{ bos_token }}{%- if ns.system -%}{{ ns.system }} {% endif -%}"
    "{%- for m in messages[ns.start:] -%}"
    "{%- if m['role'] == 'user' -%}USER: {{ m['content'] }} ASSISTANT:"
    "{%- else -%}{{ ' ' + m['content'] }}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)

# LLaVA `conv_llava_plain` for stage-1 alignment: "<image>" then the caption, trained on the caption.
PLAIN_JINJA = (
    "{{ bos_token }}{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}{{ m['content'] }}{{ eos_token }}{%- endif -%}{%- endfor -%}"
)

TEMPLATES: dict[str, Template] = {
    "vicuna_v1": Template("vicuna_v1", VICUNA_SYSTEM, user_prefix="USER: ", assistant_prefix=" ASSISTANT:",
                          answer_prefix=" ", turn_sep="", jinja=VICUNA_V1_JINJA),
    "plain": Template("plain", "", user_prefix="", assistant_prefix="", answer_prefix="", turn_sep="",
                      jinja=PLAIN_JINJA),
}
DEFAULT_TEMPLATE = "vicuna_v1"


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise TemplateError(f"unknown chat template {name!r} (known: {', '.join(sorted(TEMPLATES))})") from None


@dataclass
class TokenizedConversation:
    """Token ids with image slots. `items` holds lists of ids and ints < 0 for image slots (-1 - index)."""

    items: list[list[int] | int]
    labels: list[list[bool] | int]    # parallel to items: per-token "is a target" flags


def tokenize_segments(segments: Iterable[Segment], tokenize: Callable[[str], list[int]],
                      bos_id: int | None, eos_id: int) -> TokenizedConversation:
    """Tokenize segment by segment: `tokenize(text)` must not add BOS/EOS itself.
    BOS is added only when the segment asks for it and the tokenizer uses one (bos_id not None)."""
    items: list[list[int] | int] = []
    labels: list[list[bool] | int] = []
    for s in segments:
        if s.is_image:
            items.append(-1 - s.image_index)
            labels.append(-1 - s.image_index)
            continue
        ids = ([bos_id] if s.bos and bos_id is not None else []) + (tokenize(s.text) if s.text else [])
        if s.eos:
            ids.append(eos_id)
        items.append(ids)
        labels.append([s.target] * len(ids))
    return TokenizedConversation(items, labels)
