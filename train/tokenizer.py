"""The tokenizer of a checkpoint, and the two facts training needs from it: does it add BOS, and
which id ends a turn. The ids it produces must equal llama.cpp's for the converted model
(tests/test_train_data.py checks this through `LlamaLLM.tokenize`).

    tok = load_tokenizer("checkpoints/stage1")          # a dir with tokenizer.json
    tokenizer_from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "tok/")   # unpack a GGUF's vocabulary once
    train_bpe(texts, "tok/", vocab_size=512)            # a small byte-level BPE of one's own (demo model)
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from llava_local.fileio import atomic_path

from .errors import TrainConfigError, TrainFilesError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


@dataclass(frozen=True)
class TextTokenizer:
    hf: object                       # transformers PreTrainedTokenizerBase
    bos_id: int | None               # None: the tokenizer adds no BOS (SmolLM2, many BPE vocabularies)
    eos_id: int                      # appended after every assistant turn (templates.Segment.eos)
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Text -> ids with no BOS/EOS: the `tokenize` that templates.tokenize_segments expects."""
        return self.hf(text, add_special_tokens=False)["input_ids"]


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    from transformers import AutoTokenizer
    path = Path(path)
    if path.suffix == ".gguf":
        hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        hf = AutoTokenizer.from_pretrained(str(path))
    probe = hf("a", add_special_tokens=True)["input_ids"]
    bos = hf.bos_token_id if hf.bos_token_id is not None and probe and probe[0] == hf.bos_token_id else None
    if hf.eos_token_id is None:
        raise TrainConfigError(f"{path}: the tokenizer has no EOS token (needed to end assistant turns)")
    pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
    return TextTokenizer(hf, bos, int(hf.eos_token_id), int(pad))


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> None:
    """Copy the tokenizer files a checkpoint needs (the converter reads them from the checkpoint dir)."""
    src, dst = Path(src_dir), Path(dst_dir)
    found = False
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
            found = True
    if not found:
        raise TrainFilesError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")


def tokenizer_from_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Unpack a GGUF's vocabulary into tokenizer.json/tokenizer_config.json (once; atomic)."""
    from transformers import AutoTokenizer
    gguf_path, out = Path(gguf_path), Path(out_dir)
    if (out / "tokenizer.json").is_file():
        return out
    if not gguf_path.is_file():
        raise TrainFilesError(f"{gguf_path}: GGUF not found")
    return _save_atomic(AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name), out)


def _save_atomic(hf, out: Path) -> Path:
    """Save a transformers tokenizer as the dir `out`, replacing it whole (no half-written dir)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        hf.save_pretrained(str(tmp))
        (tmp / "chat_template.jinja").unlink(missing_ok=True)   # the LLaVA template is written by the converter
        shutil.rmtree(out, ignore_errors=True)                  # a rename cannot replace a non-empty dir
    return out


# The special tokens of train_bpe's vocabularies (ids 0, 1, 2), named as in SmolLM2's: the templates
# need only an end-of-turn token; BOS exists for llama.cpp but is not added to prompts.
BPE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_bpe(texts: Iterable[str], out_dir: str | os.PathLike, *, vocab_size: int = 512,
              min_frequency: int = 2) -> Path:
    """Train a byte-level BPE (GPT-2's pre-tokenizer: llama.cpp's "gpt-2") on `texts` and save it as a
    tokenizer dir (atomic). Every byte is in the vocabulary, so any text stays encodable; the merges
    make the training language's words single tokens. For a model that only ever speaks one small
    language (the shapes demo), this replaces a 49152-token vocabulary whose output matrix would be
    most of the per-token compute."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(BPE_SPECIALS), initial_alphabet=byte_level.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BPE_SPECIALS[1], eos_token=BPE_SPECIALS[2],
                                 pad_token=BPE_SPECIALS[2], unk_token=BPE_SPECIALS[0])
    return _save_atomic(hf, Path(out_dir))
