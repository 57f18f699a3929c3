"""Which chat template a converted checkpoint gets when `convert(..., template=None)` (no `--template`).

The first rule whose evidence the checkpoint has decides:

| # | evidence in the checkpoint                                              | template         |
|---|-------------------------------------------------------------------------|------------------|
| 1 | its own chat template (llava-hf `chat_template.json` / `.jinja`,         | the same one if  |
|   | `processor_config.json`, else `tokenizer_config.json`): one of ours      | it is ours, else |
|   | (templates.py, e.g. written by a training run), else by its markers:     | by its markers:  |
|   |   "<|start_header_id|>"                                                 | llama_3          |
|   |   "[INST]"                                                              | mistral_instruct |
|   |   "<|im_start|>"                                                        | chatml_direct    |
|   |   "ASSISTANT:"                                                          | vicuna_v1        |
| 2 | a Mistral LLM (model_type mistral / llava_mistral)                      | mistral_instruct |
| 3 | a vocabulary with "<|start_header_id|>" and "<|eot_id|>" (Llama-3)      | llama_3          |
| 4 | a SentencePiece vocabulary with "<|im_start|>" and "<|im_end|>" (Yi)    | chatml_direct    |
| 5 | a SentencePiece vocabulary without them (Vicuna, LLaMA-2)               | vicuna_v1        |
| 6 | none of the above (e.g. a byte-level BPE vocabulary of another family)  | vicuna_v1, with a warning naming this rule |

Why this order: a checkpoint's own template says how *this* model was trained (BakLLaVA is a Mistral
LLM trained in the Vicuna layout, and llava-hf/bakLlava-v1-hf's template says so); without one, the
LLM decides, as the LLaVA repo's own scripts pair them (llava-v1.6-mistral-7b: mistral_instruct,
llava-v1.6-34b: chatml_direct, LLaVA-NeXT llama3-llava: llava_llama_3, every Vicuna: vicuna_v1). The
markers are the ones llama.cpp's template detection uses. ChatML tokens in a byte-level BPE
vocabulary prove nothing (SmolLM2's, which our tiny test models and the demo use, has them and is
trained in the Vicuna layout), so rule 4 asks for a SentencePiece one.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from llava_local.prompts.render import jinja_body
from llava_local.prompts.templates import TEMPLATES

from .checkpoint import LlavaCheckpoint

log = logging.getLogger(__name__)

# files holding a checkpoint's own chat template, most specific first (the processor's is the VLM's)
TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja", "processor_config.json", "tokenizer_config.json")
# marker in a chat template -> our template; checked in this order (llama.cpp's detection order)
TEMPLATE_MARKERS = (
    ("<|start_header_id|>", "llama_3"),
    ("[INST]", "mistral_instruct"),
    ("<|im_start|>", "chatml_direct"),
    ("ASSISTANT:", "vicuna_v1"),
)
FAMILY_TEMPLATES = {"mistral": "mistral_instruct"}       # rule 2: LLM family (checkpoint.py _LLM_FAMILIES)
LLAMA3_TOKENS = ("<|start_header_id|>", "<|eot_id|>")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
FALLBACK = "vicuna_v1"


@dataclass(frozen=True)
class TemplateChoice:
    name: str
    reason: str     # the rule and its evidence, for the log


def _own_template(src: Path) -> tuple[str, str] | None:
    """(file name, template text) of the checkpoint's own chat template, if it has one."""
    for fname in TEMPLATE_FILES:
        path = src / fname
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
            value = text if fname.endswith(".jinja") else json.loads(text).get("chat_template")
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            continue
        if isinstance(value, list):   # [{"name": ..., "template": ...}, ...]: the default one
            value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(value, str) and value.strip():
            return fname, value
    return None


def _vocabulary(tokenizer_dir: Path) -> tuple[set[str], bool] | None:
    """(the token texts that matter here, whether it is a SentencePiece vocabulary), or None if unread."""
    wanted = set(LLAMA3_TOKENS + CHATML_TOKENS)
    tj = tokenizer_dir / "tokenizer.json"
    if tj.is_file():
        try:
            data = json.loads(tj.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        model = data.get("model") or {}
        texts = set(model.get("vocab") or {}) | {t.get("content") for t in data.get("added_tokens") or []}
        return texts & wanted, model.get("type") == "BPE" and bool(model.get("byte_fallback"))
    sp = tokenizer_dir / "tokenizer.model"
    if sp.is_file():    # a SentencePiece model: its pieces are stored as plain strings
        raw = sp.read_bytes()
        found = {t for t in wanted if t.encode() in raw}
        added = tokenizer_dir / "added_tokens.json"
        if added.is_file():
            try:
                found |= set(json.loads(added.read_text(encoding="utf-8"))) & wanted
            except (OSError, ValueError, UnicodeDecodeError, TypeError):
                pass
        return found, True
    return None


def choose_template(ck: LlavaCheckpoint) -> TemplateChoice:
    """The chat template for `ck`, by the rules in this module's docstring."""
    own = _own_template(ck.source)
    if own is not None:
        fname, text = own
        for name, t in TEMPLATES.items():
            if jinja_body(text) == jinja_body(t.jinja):
                return TemplateChoice(name, f"rule 1: the checkpoint's {fname} chat template is our {name}")
        for marker, name in TEMPLATE_MARKERS:
            if marker in text:
                return TemplateChoice(name, f"rule 1: the checkpoint's {fname} chat template has {marker!r}")
        log.info("%s: the chat template in %s matches none of %s; deciding by the LLM", ck.source, fname,
                 ", ".join(repr(m) for m, _ in TEMPLATE_MARKERS))
    family = ck.text.get("model_type", "llama")
    if family in FAMILY_TEMPLATES:
        return TemplateChoice(FAMILY_TEMPLATES[family], f"rule 2: a {family} LLM")
    vocab = _vocabulary(ck.tokenizer_dir)
    if vocab is not None:
        tokens, spm = vocab
        if all(t in tokens for t in LLAMA3_TOKENS):
            return TemplateChoice("llama_3", "rule 3: a Llama-3 vocabulary (" + ", ".join(LLAMA3_TOKENS) + ")")
        if spm and all(t in tokens for t in CHATML_TOKENS):
            return TemplateChoice("chatml_direct", "rule 4: a SentencePiece vocabulary with ChatML tokens (Yi)")
        if spm:
            return TemplateChoice(FALLBACK, "rule 5: a SentencePiece vocabulary without chat tokens (Vicuna)")
    return TemplateChoice(FALLBACK, "rule 6: no chat template, LLM family or vocabulary that names one")


def resolve_template(ck: LlavaCheckpoint, template: str | None) -> str:
    """`template` if given, else choose_template's, logged; rule 6 (a guess) is a warning."""
    if template:
        return template
    choice = choose_template(ck)
    if choice.reason.startswith("rule 6"):
        log.warning("%s: chat template %s by default (%s; convert/template_choice.py); pass --template NAME "
                    "if the model was trained with another", ck.source, choice.name, choice.reason)
    else:
        log.info("%s: chat template %s (%s)", ck.source, choice.name, choice.reason)
    return choice.name
