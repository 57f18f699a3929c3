"""The LLaVA model for training: build it from parts or load a checkpoint, freeze per stage, run the
training forward, save in the llava-hf layout that convert/ reads.

    model = build_from_parts("clip-dir/", "llm-dir/")        # or an LLM .gguf (dequantized by transformers)
    model = load_llava("checkpoints/stage1")
    trainable = apply_freeze(model, "projector")              # stage 1
    save_llava(model, "out/", tokenizer_dir=..., preprocess=preprocess_config(model))

The training forward (image features into the text embeddings, loss on labelled tokens) is in
forward.py.

The model is transformers' `LlavaForConditionalGeneration` (CLIP ViT + 2-layer GELU projector +
Llama), with LLaVA-1.5's choices: features of CLIP layer -2, CLS dropped ("default" strategy).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from llava_local.image.preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig

from .errors import TrainConfigError
from .tokenizer import copy_tokenizer_files

log = logging.getLogger(__name__)

FREEZE_RULES = {
    # which parts train: (vision tower, projector, LLM)
    "projector": (False, True, False),      # stage 1: feature alignment
    "projector+llm": (False, True, True),   # stage 2, full fine-tuning
    "lora": (False, True, False),           # stage 2 with LoRA: adapters are added by lora.py
}


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def _load_vision_tower(path: Path):
    from transformers import CLIPVisionModel
    return CLIPVisionModel.from_pretrained(str(path), dtype=torch.float32)


def _load_llm(path: Path):
    from transformers import AutoModelForCausalLM
    if path.suffix == ".gguf":   # transformers dequantizes GGUF weights to float32
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def build_from_parts(vision_tower: str | os.PathLike, llm: str | os.PathLike, *,
                     image_token_index: int | None = None):
    """A LlavaForConditionalGeneration from a CLIP vision tower (CLIPVisionModel or CLIPModel dir)
    and a Llama-architecture LLM (HF dir or GGUF), with a freshly initialised projector."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    _quiet_transformers()
    clip = _load_vision_tower(Path(vision_tower))
    lm = _load_llm(Path(llm))
    tcfg = lm.config
    if tcfg.model_type != "llama":
        raise TrainConfigError(f"{llm}: LLM model_type {tcfg.model_type!r}; llama.cpp conversion needs a Llama-architecture LLM")
    tie = bool(getattr(tcfg, "tie_word_embeddings", False))
    cfg = LlavaConfig(vision_config=clip.config, text_config=tcfg, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      # unused by train/ and llava-local (image slots are placed by position);
                      # transformers' own LLaVA processor looks for this id in the prompt
                      image_token_index=tcfg.vocab_size - 1 if image_token_index is None else image_token_index,
                      tie_word_embeddings=tie)
    with no_init_weights():   # every weight but the projector's is loaded below
        model = LlavaForConditionalGeneration(cfg)
    model.model.vision_tower.load_state_dict(clip.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    if tie:
        model.tie_weights()
    else:
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
    proj = model.model.multi_modal_projector
    for layer in (proj.linear_1, proj.linear_2):
        layer.reset_parameters()   # nn.Linear's default init, as LLaVA's build_vision_projector
    return model.float().eval()


def load_llava(path: str | os.PathLike):
    from transformers import LlavaForConditionalGeneration
    _quiet_transformers()
    model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
    feature_layer = model.config.vision_feature_layer
    if not isinstance(feature_layer, int) or model.config.vision_feature_select_strategy != "default":
        raise TrainConfigError(f"{path}: only one vision feature layer with the 'default' strategy is supported (LLaVA-1.5)")
    return model.eval()


OUTPUT_VOCAB_FILE = "output_vocab.json"


def read_output_vocab(directory: str | os.PathLike | None) -> list[int] | None:
    """The token ids a model restricted to a closed vocabulary can emit (see forward.py), or None."""
    if not directory:
        return None
    p = Path(directory) / OUTPUT_VOCAB_FILE
    if not p.is_file():
        return None
    ids = json.loads(p.read_text())["ids"]
    return sorted({int(i) for i in ids})


def write_output_vocab(directory: str | os.PathLike, ids: list[int]) -> None:
    (Path(directory) / OUTPUT_VOCAB_FILE).write_text(json.dumps({
        "about": "every other token's embedding row is exactly zero; train/ computes the softmax over these "
                 "ids plus the zero logits of the rest (exact, and much cheaper for a small closed language)",
        "ids": sorted(set(int(i) for i in ids))}) + "\n")


def zero_rows_outside(model, ids: list[int]) -> None:
    """Pin the embedding (and untied LM head) rows of tokens outside `ids` to zero."""
    keep = torch.zeros(model.get_output_embeddings().weight.shape[0], dtype=torch.bool)
    keep[torch.tensor(ids)] = True
    with torch.no_grad():
        for w in {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            w[~keep] = 0.0


def parts(model) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(vision tower, projector, LLM incl. lm_head) of a LlavaForConditionalGeneration."""
    return model.model.vision_tower, model.model.multi_modal_projector, model.model.language_model


def apply_freeze(model, rule: str) -> list[str]:
    """Set requires_grad per FREEZE_RULES; returns the trainable parameter names."""
    if rule not in FREEZE_RULES:
        raise TrainConfigError(f"unknown freeze rule {rule!r} (known: {', '.join(FREEZE_RULES)})")
    vision_on, proj_on, llm_on = FREEZE_RULES[rule]
    vision, proj, llm = parts(model)
    for module, on in ((vision, vision_on), (proj, proj_on), (llm, llm_on), (model.lm_head, llm_on)):
        for p in module.parameters():
            p.requires_grad_(on)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def n_image_tokens(model) -> int:
    v = model.config.vision_config
    return (v.image_size // v.patch_size) ** 2


def preprocess_config(model, checkpoint_dir: str | os.PathLike | None = None) -> PreprocessConfig:
    """The image preprocessing of a checkpoint (its preprocessor_config.json, else CLIP's)."""
    mean, std = CLIP_MEAN, CLIP_STD
    if checkpoint_dir and (Path(checkpoint_dir) / "preprocessor_config.json").is_file():
        pp = json.loads((Path(checkpoint_dir) / "preprocessor_config.json").read_text())
        mean, std = tuple(pp.get("image_mean", mean)), tuple(pp.get("image_std", std))
    return PreprocessConfig(image_size=model.config.vision_config.image_size, image_mean=mean, image_std=std)


def write_preprocessor_config(out_dir: Path, cfg: PreprocessConfig) -> None:
    """CLIPImageProcessor's JSON for LLaVA-1.5 (pad-to-square happens before it, in preprocess.py)."""
    s = cfg.image_size
    data = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": s},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": s, "width": s}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(cfg.image_mean),
            "image_std": list(cfg.image_std), "do_convert_rgb": True}
    (out_dir / "preprocessor_config.json").write_text(json.dumps(data, indent=2) + "\n")


def save_llava(model, out_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike,
               preprocess: PreprocessConfig, state_dict: dict | None = None,
               output_vocab: list[int] | None = None) -> None:
    """The llava-hf layout: config.json, model.safetensors, tokenizer files, preprocessor_config.json.
    Not atomic by itself: callers write into a temporary directory and rename it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _quiet_transformers()
    model.save_pretrained(str(out), state_dict=state_dict)
    copy_tokenizer_files(tokenizer_dir, out)
    write_preprocessor_config(out, preprocess)
    if output_vocab is not None:
        write_output_vocab(out, output_vocab)
