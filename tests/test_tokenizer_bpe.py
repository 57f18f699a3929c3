"""train.tokenizer.train_bpe (the demo model's own vocabulary) and how the converter names its
pre-tokenizer for llama.cpp. That llama.cpp then tokenizes exactly like training is checked on a
converted model in tests/test_train_demo.py (toy build)."""
from __future__ import annotations

import json

from convert.tokenizer_gguf import pre_tokenizer_from_structure
from train.tokenizer import BPE_SPECIALS, load_tokenizer, train_bpe

CORPUS = ["What shape is at the top left?", "A red circle.", "How many stars are there?", "2.",
          "There are 3 shapes on a white background. A blue square is at the bottom right."] * 20


def test_train_bpe_makes_words_whole_and_keeps_every_byte(tmp_path):
    tok = load_tokenizer(train_bpe(CORPUS, tmp_path / "tok", vocab_size=400))
    assert 256 + len(BPE_SPECIALS) < len(tok.hf) <= 400
    assert [tok.hf.convert_ids_to_tokens(i) for i in range(3)] == list(BPE_SPECIALS)
    assert tok.bos_id is None and tok.eos_id == tok.pad_id == 2         # no BOS added; <|im_end|> ends turns
    assert [tok.hf.decode([i]) for i in tok.encode("A red circle.")] == ["A", " red", " circle", "."]
    for text in ("Ünïcödé 🦙 never seen", "tabs\tand\nnewlines  ", "12345"):
        ids = tok.encode(text)
        assert tok.hf.decode(ids) == text and all(0 <= i < len(tok.hf) for i in ids)


def test_pre_tokenizer_named_from_structure_only_when_it_is_gpt2s(tmp_path):
    d = train_bpe(CORPUS, tmp_path / "tok", vocab_size=300)
    assert pre_tokenizer_from_structure(d) == "gpt-2"
    tj = json.loads((d / "tokenizer.json").read_text())
    for change in ({"pre_tokenizer": {**tj["pre_tokenizer"], "add_prefix_space": True}},
                   {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [tj["pre_tokenizer"]]}},
                   {"normalizer": {"type": "NFC"}}):
        (d / "tokenizer.json").write_text(json.dumps({**tj, **change}))
        assert pre_tokenizer_from_structure(d) is None, change
