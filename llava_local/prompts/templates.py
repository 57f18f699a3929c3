"""Conversation templates: the one source of truth for prompt layout, shared by train/ and the runtime.

A template turns a conversation into *segments*: text pieces and image slots. Training tokenizes the
same segments (and labels the assistant ones); the runtime tokenizes them with llama.cpp and puts
image embeddings in the slots. Tokenizing segment by segment (never the joined string) is what makes
the two agree token for token: `tokenize_segments` is the shared step.

    >>> t = get_template("vicuna_v1")
    >>> segs = t.segments([Message("user", "<image>\\nWhat colour?"), Message("assistant", "Red.")])

The Jinja form of each template (written to GGUF `tokenizer.chat_template`) renders the same text,
and contains the substrings by which upstream llama.cpp recognises the family (llama-chat.cpp
`llm_chat_detect_template`), so its tools run our files with no flags.

The registry holds the LLaVA repo's conversation modes for the LLMs LLaVA-1.5/1.6 ship with:

| name             | LLaVA repo conv       | LLM (checkpoints)                                | llama.cpp detects |
|------------------|-----------------------|--------------------------------------------------|-------------------|
| vicuna_v1        | conv_vicuna_v1 layout | Vicuna (llava-v1.5-*, llava-v1.6-vicuna-*)       | vicuna            |
| mistral_instruct | conv_mistral_instruct | Mistral-7B-Instruct-v0.2 (llava-v1.6-mistral-7b) | llama2-sys        |
| llama_3          | conv_llava_llama_3    | Llama-3-8B-Instruct (LLaVA-NeXT llama3-llava)    | llama3            |
| chatml_direct    | conv_chatml_direct    | Nous-Hermes-2-Yi-34B (llava-v1.6-34b)            | chatml            |
| plain            | conv_llava_plain      | stage-1 alignment data (no chat)                 | (none)            |
(conv_mistral_instruct and conv_chatml_direct are in haotian-liu/LLaVA's llava/conversation.py,
conv_llava_llama_3 in LLaVA-VL/LLaVA-NeXT's.)
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
    system: str               # the default system prompt ("" = none)
    user_prefix: str          # before each user message
    assistant_prefix: str     # after a user message, where the answer starts
    answer_prefix: str        # glued before the answer text (part of the target)
    turn_sep: str             # after the answer's end of turn, before the next user turn
    jinja: str = field(repr=False, default="")
    system_format: str = "{system} "    # how a non-empty system prompt is written (vicuna: then a space)
    system_in_first_user: bool = False  # LLaMA-2 style: the system block opens the first user message
    answer_suffix: str = ""             # after the answer text, before its end of turn (mistral: " ")
    end_of_turn: str | None = None      # closes an answer: None = the tokenizer's EOS (Segment.eos);
                                        # else this special-token text (llama_3 "<|eot_id|>")

    def segments(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> list[Segment]:
        """Split a conversation into segments. With add_generation_prompt the last message must be a
        user turn and the prompt ends where the assistant's answer begins."""
        msgs = list(messages)
        system = self.system
        if msgs and msgs[0].role == "system":
            system = msgs.pop(0).content
        system_text = self.system_format.format(system=system) if system else ""
        out: list[Segment] = []
        prompt = "" if self.system_in_first_user else system_text   # text waiting to become a prompt segment
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
                if i == 0 and self.system_in_first_user:
                    prompt += system_text
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
                answer = self.answer_prefix + m.content + self.answer_suffix + (self.end_of_turn or "")
                out.append(Segment(text=answer, target=True, eos=self.end_of_turn is None))
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


def _system_jinja(default: str) -> str:
    """The start every family's Jinja shares: the system prompt is the first message's if that is a
    system message, else the template's default; `ns.start` skips it in the turn loop."""
    return ("{%- set ns = namespace(system='" + default.replace("\\", "\\\\").replace("'", "\\'") + "', start=0) -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set ns.system = messages[0]['content'] -%}{%- set ns.start = 1 -%}{%- endif -%}")


# LLaVA-1.6-Mistral `conv_mistral_instruct` (SeparatorStyle.LLAMA_2, system "", sep "", sep2 "</s>"):
# "[INST] <image>\nQ [/INST] A </s>[INST] Q2 [/INST]"; a system prompt is LLaMA-2's <<SYS>> block at
# the start of the first [INST]. The BOS comes from the tokenizer (Mistral adds "<s>").
# llama.cpp: "[INST]" and "<<SYS>>" (and none of the official Mistral templates' markers) = its
# "llama2-sys" layout, which differs only in "[/INST]A</s>" (no spaces around the answer).
MISTRAL_INSTRUCT_JINJA = (
    "{# LLaVA mistral_instruct: [INST] question [/INST] answer, system prompt as <<SYS>> in the first turn #}"
    + _system_jinja("") +
    "{{ bos_token }}{%- for m in messages[ns.start:] -%}"
    "{%- if m['role'] == 'user' -%}{{ '[INST] ' }}"
    "{%- if loop.first and ns.system -%}{{ '<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' }}{%- endif -%}"
    "{{ m['content'] + ' [/INST]' }}"
    "{%- else -%}{{ ' ' + m['content'] + ' ' + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)

# LLaVA-NeXT `conv_llava_llama_3` (SeparatorStyle.LLAMA_3): the messages, with this system prompt, through
# Llama-3-Instruct's own chat template (add_generation_prompt=True): "<|begin_of_text|>" then
# "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>" per message. Answers end with
# <|eot_id|>, not the EOS. (Meta's template trims each content; LLaVA's contents never start or end
# with whitespace, and ours are kept as given, as LLaVA-NeXT's training code tokenizes them.)
# llama.cpp: "<|start_header_id|>" and "<|end_header_id|>" = its "llama3" layout (which trims).
LLAMA_3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                  "content that the user provides, and assist the user with a variety of tasks using natural language.")
LLAMA_3_JINJA = (
    "{# LLaVA llama_3: Llama-3 role headers, each message closed by <|eot_id|> #}"
    + _system_jinja(LLAMA_3_SYSTEM) +
    "{{ bos_token }}{%- if ns.system -%}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + ns.system + '<|eot_id|>' }}{%- endif -%}"
    "{%- for m in messages[ns.start:] -%}"
    "{%- if m['role'] == 'user' -%}{{ '<|start_header_id|>user<|end_header_id|>\\n\\n' + m['content']"
    " + '<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- else -%}{{ m['content'] + '<|eot_id|>' }}{%- endif -%}"
    "{%- endfor -%}"
)

# LLaVA-1.6-34B `conv_chatml_direct` (SeparatorStyle.MPT, sep "<|im_end|>"): ChatML turns with NO newline
# after <|im_end|> (unlike common ChatML): "<|im_start|>system\nAnswer the questions.<|im_end|>
# <|im_start|>user\n<image>\nQ<|im_end|><|im_start|>assistant\n" (one line). Yi adds no BOS, so the
# Jinja writes none: llama.cpp's --jinja passes the vocabulary's BOS text whether or not it adds one;
# where a vocabulary does add one, the tokenizer puts it (llama.cpp, and turns.py's BOS rule).
# llama.cpp: "<|im_start|>" = its "chatml" layout (which puts "\n" after each <|im_end|>).
CHATML_DIRECT_SYSTEM = "Answer the questions."
CHATML_DIRECT_JINJA = (
    "{# LLaVA chatml_direct: ChatML turns as LLaVA-1.6-34B was trained, no newline between them #}"
    + _system_jinja(CHATML_DIRECT_SYSTEM) +
    "{%- if ns.system -%}{{ '<|im_start|>system\\n' + ns.system + '<|im_end|>' }}{%- endif -%}"
    "{%- for m in messages[ns.start:] -%}"
    "{%- if m['role'] == 'user' -%}{{ '<|im_start|>user\\n' + m['content'] + '<|im_end|><|im_start|>assistant\\n' }}"
    "{%- else -%}{{ m['content'] + '<|im_end|>' }}{%- endif -%}"
    "{%- endfor -%}"
)

TEMPLATES: dict[str, Template] = {
    "vicuna_v1": Template("vicuna_v1", VICUNA_SYSTEM, user_prefix="USER: ", assistant_prefix=" ASSISTANT:",
                          answer_prefix=" ", turn_sep="", jinja=VICUNA_V1_JINJA),
    "plain": Template("plain", "", user_prefix="", assistant_prefix="", answer_prefix="", turn_sep="",
                      jinja=PLAIN_JINJA),
    "mistral_instruct": Template("mistral_instruct", "", user_prefix="[INST] ", assistant_prefix=" [/INST]",
                                 answer_prefix=" ", turn_sep="", jinja=MISTRAL_INSTRUCT_JINJA,
                                 system_format="<<SYS>>\n{system}\n<</SYS>>\n\n", system_in_first_user=True,
                                 answer_suffix=" "),
    "llama_3": Template("llama_3", LLAMA_3_SYSTEM, user_prefix="<|start_header_id|>user<|end_header_id|>\n\n",
                        assistant_prefix="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                        answer_prefix="", turn_sep="", jinja=LLAMA_3_JINJA,
                        system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
                        end_of_turn="<|eot_id|>"),
    "chatml_direct": Template("chatml_direct", CHATML_DIRECT_SYSTEM, user_prefix="<|im_start|>user\n",
                              assistant_prefix="<|im_end|><|im_start|>assistant\n", answer_prefix="", turn_sep="",
                              jinja=CHATML_DIRECT_JINJA, system_format="<|im_start|>system\n{system}<|im_end|>",
                              end_of_turn="<|im_end|>"),
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
