"""What a training stage is built from: the model (freeze rules or LoRA applied), its tokenizer and
image preprocessing, the dataset and its loader, the optimizer and the mixed-precision setting.

    prep = prepare_model(cfg, resume_from=None)      # from --model, or from --vision-tower + --llm
    data = make_dataset(cfg, prep, load_tokenizer(prep.tokenizer_dir))
    core, module = place_model(prep, cfg, dist)      # on the device, wrapped for DDP / FSDP
    opt = make_optimizer(core, cfg)

train/loop.py calls these in this order; the order matters where noted (RNG draws, FSDP).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from llava_local.prompts.templates import get_template

from .config import Stage2Config, TrainConfig
from .data import DataConfig, LlavaDataset, collate, default_image_folder
from .distributed import Dist, wrap
from .errors import TrainConfigError
from .forward import LlavaForTraining
from .lora import add_lora
from .model import (apply_freeze, build_from_parts, load_llava, n_image_tokens, parts, preprocess_config,
                    read_output_vocab)
from .schedule import StepBatches
from .tokenizer import TextTokenizer, tokenizer_from_gguf


@dataclass
class Prepared:
    model: object                      # LlavaForConditionalGeneration, freeze rules (and LoRA) applied
    tokenizer_dir: Path
    preprocess: object                 # llava_local.image.preprocess.PreprocessConfig
    output_vocab: list[int] | None     # see LlavaForTraining


def _tokenizer_source(cfg: TrainConfig, out: Path) -> Path:
    if cfg.model:
        return Path(cfg.model)
    llm = Path(cfg.llm)
    if llm.suffix == ".gguf":   # unpack the GGUF's vocabulary next to the outputs, once
        return tokenizer_from_gguf(llm, out / "tokenizer")
    return llm


def prepare_model(cfg: TrainConfig, resume_from: Path | None) -> Prepared:
    lora = isinstance(cfg, Stage2Config) and cfg.lora
    init = Path(cfg.model) if cfg.model else None
    if resume_from is not None and not lora:
        init = resume_from                 # full weights of the checkpoint; LoRA restores adapters later
    if init is not None:
        model = load_llava(init)
    elif cfg.vision_tower and cfg.llm:
        model = build_from_parts(cfg.vision_tower, cfg.llm)
    else:
        raise TrainConfigError("give --model (a llava-hf checkpoint) or both --vision-tower and --llm")
    tok_dir = _tokenizer_source(cfg, Path(cfg.out))
    pp = preprocess_config(model, init)
    if init is not None:
        vocab = read_output_vocab(init)
    else:
        vocab = read_output_vocab(cfg.llm) if Path(cfg.llm).is_dir() else None
    if lora:
        add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    else:
        apply_freeze(model, "projector" if cfg.stage == "stage1" else "projector+llm")
    return Prepared(model, tok_dir, pp, vocab)


def make_dataset(cfg: TrainConfig, prep: Prepared, tok: TextTokenizer) -> LlavaDataset:
    data_cfg = DataConfig(Path(cfg.data), default_image_folder(cfg.data, cfg.image_folder), get_template(cfg.template),
                          n_image_tokens(prep.model), prep.preprocess, cfg.max_len, cfg.image_position,
                          cfg.cache_data)
    return LlavaDataset(data_cfg, tok)


def place_model(prep: Prepared, cfg: TrainConfig, d: Dist) -> tuple[LlavaForTraining, torch.nn.Module]:
    """The model on this process's device, as (the loss module, that module wrapped for DDP / FSDP)."""
    model = prep.model
    model.to(d.device)
    if cfg.gradient_checkpointing:
        parts(model)[2].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.fsdp and prep.output_vocab is not None:
        raise TrainConfigError("--fsdp is not supported for closed-vocabulary models (output_vocab.json): use DDP")
    core = LlavaForTraining(model, prep.output_vocab)
    return core, wrap(core, d, fsdp=cfg.fsdp)


def make_optimizer(core: LlavaForTraining, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over what trains (the projector in its own group, for --projector-lr). Call it after
    wrapping: FSDP replaces the parameters."""
    proj = {id(p) for p in parts(core.llava)[1].parameters()}
    proj_lr = getattr(cfg, "projector_lr", 0.0) or cfg.lr
    params = [p for p in core.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in proj], "lr": cfg.lr},
              {"params": [p for p in params if id(p) in proj], "lr": proj_lr}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)


def precision(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """(the autocast dtype, None: fp32; the loss scaler fp16 needs). CPU always trains in fp32."""
    if device.type != "cuda" or cfg.precision == "fp32":
        return None, None
    if cfg.precision == "auto":
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    return amp, torch.amp.GradScaler("cuda") if amp == torch.float16 else None


def make_loader(data: LlavaDataset, sampler: StepBatches, cfg: TrainConfig, pad_id: int) -> torch.utils.data.DataLoader:
    """Micro-batches in the sampler's order (iter() on it draws the loader's base seed from torch's RNG)."""
    return torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=cfg.num_workers,
                                       collate_fn=functools.partial(collate, pad_id=pad_id),
                                       persistent_workers=False)
