"""Small tokenizers of the LLaVA family's LLM kinds, built in a moment and nothing downloaded, for tiny
test models (train/tiny_models.py `TinySpec.tokenizer_dir`):

    from train.tiny_tokenizers import llama3_tokenizer_dir, spm_tokenizer_dir
    llama3_tokenizer_dir("tok-llama3")                  # Llama-3 kind: byte-level BPE, "llama-bpe" split
    spm_tokenizer_dir("tok-mistral")                    # Llama-2 / Vicuna / Mistral kind: SentencePiece BPE
    spm_tokenizer_dir("tok-yi", space_prefix=False, add_bos=False, specials=CHATML_SPECIALS)   # Yi kind

Each is a tokenizer.json (+ tokenizer_config.json) with the structure of the real one (normalizer,
pre-tokenizer, byte fallback, added special tokens, BOS rule), so the converter treats it as it
treats the real one and llama.cpp must tokenize as transformers does:
- `llama3_tokenizer_dir`: SmolLM2's first tokens and the merges among them (a smaller byte-level
  BPE, every byte still a token) under Llama-3's pre-tokenizer (its split regex, whole-word lookups),
  with Llama-3's special tokens added and "<|begin_of_text|>" as the BOS the tokenizer adds.
- `spm_tokenizer_dir`: a few hundred SentencePiece-style pieces ("▁" for spaces, byte fallback for
  the rest) learnt from a fixed text, with merges written as SentencePiece BPE implies them (every
  split of a piece, in the pieces' order), as transformers' converter of a Llama tokenizer.model does.
"""
from __future__ import annotations

import json
from pathlib import Path

from convert.tokenizer_gguf import LLAMA3_SPLIT_REGEX

from .tiny_models import smollm2_tokenizer_dir

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
CHATML_SPECIALS = ("<|im_start|>", "<|im_end|>")        # Yi-34B's (LLaVA-1.6-34B); the last is its EOS
SPM_BASE = ("<unk>", "<s>", "</s>")                     # ids 0, 1, 2, then the 256 byte tokens, as in Llama's
# the text the SentencePiece-style pieces are learnt from: the words of the tests' conversations
SPM_CORPUS = ("A chat between a curious human and an artificial intelligence assistant. What colour is the "
              "circle? And the square? The red circle is at the top left, the blue square at the bottom right. "
              "Answer the questions. There are three shapes on a white background: a green star, a red circle "
              "and a blue square. Hello world! It's 2024 and the cats' 12.5 lives.")


def _write_config(out: Path, **fields) -> None:
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend", **fields}, indent=1))


def llama3_tokenizer_dir(out_dir: str | Path, n_base: int = 2048) -> Path:
    """A Llama-3-kind tokenizer: SmolLM2's first `n_base` tokens (its ids are in merge order, so the
    merges that form them use only them), then LLAMA3_SPECIALS."""
    from tokenizers import Tokenizer
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tj = json.loads((smollm2_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = {t: i for t, i in tj["model"]["vocab"].items() if i < n_base}
    pairs = (m if isinstance(m, list) else m.split(" ", 1) for m in tj["model"]["merges"])
    tj["model"]["merges"] = [[a, b] for a, b in pairs if a + b in vocab and a in vocab and b in vocab]
    tj["model"]["vocab"] = vocab
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["id"] < n_base]
    n = len(vocab)
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    tj["model"]["ignore_merges"] = True
    tj["added_tokens"] += [{"id": n + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for i, t in enumerate(LLAMA3_SPECIALS)]
    bos = LLAMA3_SPECIALS[0]
    tj["post_processor"] = {"type": "TemplateProcessing",
                            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                            "special_tokens": {bos: {"id": bos, "ids": [n], "tokens": [bos]}}}
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    Tokenizer.from_file(str(out / "tokenizer.json"))          # it loads
    _write_config(out, bos_token=bos, eos_token="<|eot_id|>")
    return out


def spm_tokenizer_dir(out_dir: str | Path, *, space_prefix: bool = True, add_bos: bool = True,
                      specials: tuple[str, ...] = (), vocab_size: int = 400) -> Path:
    """A SentencePiece-kind tokenizer: `space_prefix` prepends "▁" to the text (Llama/Mistral; Yi: no),
    `add_bos` adds "<s>"; `specials` are added as special tokens after the pieces, the last of them
    being the EOS (else "</s>")."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    base = list(SPM_BASE) + [f"<0x{i:02X}>" for i in range(256)]
    finder = Tokenizer(models.BPE(unk_token="<unk>"))
    finder.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")   # pieces never span a space
    finder.train_from_iterator([SPM_CORPUS], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=base,
                                                                 min_frequency=1, show_progress=False))
    vocab = finder.get_vocab()
    merges = sorted((vocab[p], vocab[p[:i]], vocab[p[i:]], p[:i], p[i:]) for p in vocab
                    if p not in base and len(p) > 1 for i in range(1, len(p)) if p[:i] in vocab and p[i:] in vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if space_prefix else [])
                                          + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*SPM_BASE, *specials)])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    _write_config(out, bos_token="<s>", eos_token=specials[-1] if specials else "</s>", unk_token="<unk>",
                  add_bos_token=add_bos, add_eos_token=False)
    return out


def special_ids(tokenizer_dir: str | Path) -> tuple[int | None, int | None, int]:
    """(BOS id, EOS id, number of tokens) of a tokenizer dir, as transformers reads them."""
    from tokenizers import Tokenizer
    d = Path(tokenizer_dir)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    ids = [tok.token_to_id(cfg[k]) if isinstance(cfg.get(k), str) else None for k in ("bos_token", "eos_token")]
    return ids[0], ids[1], tok.get_vocab_size(with_added_tokens=True)
