"""Training configs as dataclasses, with the paper's defaults, and the one helper that turns their
fields into click options (`llava-local train stage1 --lr 1e-3 ...`).

Paper (Liu et al. 2023, and LLaVA-1.5's scripts where the paper is silent):
- stage 1, feature alignment: only the projector W trains, lr 2e-3, 1 epoch, global batch 256,
  the "plain" template (image, then the caption);
- stage 2, visual instruction tuning: W and the LLM train (CLIP frozen), lr 2e-5, 3 epochs,
  global batch 128, the conversation template, loss only on the assistant's answers;
- both: AdamW without weight decay, cosine schedule with 3 % linear warm-up, gradient clipping 1.0.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import click


def opt(default, help: str, **extra):
    """A field whose help text documents the default and becomes the click option's help."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """What both stages share. Paths are strings so a config round-trips through JSON."""

    data: str = opt("", "LLaVA JSON file: [{id, image, conversations: [{from, value}]}]")
    image_folder: str = opt("", "Folder the JSON's image paths are relative to (default: the JSON's folder)")
    out: str = opt("", "Output directory: final checkpoint here, periodic ones under checkpoints/")
    model: str = opt("", "Start from this llava-hf checkpoint (stage 2: the stage-1 output)")
    vision_tower: str = opt("", "Build from parts: CLIP vision tower directory (with --llm)")
    llm: str = opt("", "Build from parts: LLM directory or .gguf file (with --vision-tower)")
    template: str = opt("vicuna_v1", "Conversation template (llava_local.prompts.templates)")
    image_position: str = opt("front", "front: move <image> to the start of the first turn, as LLaVA's "
                                       "preprocess_multimodal does; keep: leave it where the data puts it",
                              choices=("front", "keep"))
    epochs: float = opt(1.0, "Passes over the data")
    max_steps: int = opt(0, "Optimizer steps; > 0 overrides --epochs")
    lr: float = opt(2e-5, "Peak learning rate")
    batch_size: int = opt(128, "Global batch (sequences per optimizer step, over all processes)")
    micro_batch_size: int = opt(16, "Sequences per forward pass per process; the rest is gradient accumulation")
    weight_decay: float = opt(0.0, "AdamW weight decay (LLaVA: 0)")
    warmup_ratio: float = opt(0.03, "Linear warm-up, as a fraction of the steps (paper: 3 %)")
    min_lr_ratio: float = opt(0.0, "Cosine schedule floor, as a fraction of --lr")
    max_grad_norm: float = opt(1.0, "Gradient clipping (HF Trainer's default, used by LLaVA)")
    max_len: int = opt(2048, "Longest sequence in tokens, image tokens included (LLaVA-1.5: 2048)")
    seed: int = opt(42, "Seed for initialisation, data order and RNG")
    gradient_checkpointing: bool = opt(False, "Recompute LLM activations in backward (less memory, ~30 % slower)")
    precision: str = opt("auto", "auto: bf16 autocast on GPUs with bf16, fp16 on older GPUs, fp32 on CPU",
                         choices=("auto", "fp32", "bf16", "fp16"))
    fsdp: bool = opt(False, "Shard the model over processes with FSDP instead of DDP (LLMs too large for one GPU)")
    save_every: int = opt(0, "Save a resumable checkpoint every N steps (0: only the final one)")
    keep_checkpoints: int = opt(2, "Periodic checkpoints kept (older ones are deleted)")
    resume: str = opt("", "'auto' (the newest checkpoint under OUT/checkpoints) or a checkpoint directory")
    log_every: int = opt(10, "Log the loss every N steps")
    group_by_length: int = opt(0, "Batch records of similar length together, sorting windows of N steps' "
                                  "records by length (less padding; 0: off)")
    cache_data: bool = opt(False, "Keep tokenized records and preprocessed images in memory after first use "
                                  "(small datasets trained for many epochs)")
    num_workers: int = opt(0, "DataLoader worker processes (0: load in the training process)")
    threads: int = opt(0, "torch CPU threads per process (0: torch's default)")

    # set by the stage subclasses, not options
    stage: typing.ClassVar[str] = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self) | {"stage": self.stage}, indent=2)

    @property
    def out_dir(self) -> Path:
        return Path(self.out)


@dataclass
class Stage1Config(TrainConfig):
    """Stage 1, feature alignment: only the projector trains; CLIP and the LLM are frozen."""

    stage: typing.ClassVar[str] = "stage1"
    template: str = opt("plain", "plain: the image then the caption (LLaVA-1.5's stage-1 format)")
    lr: float = opt(2e-3, "paper: projector-only alignment, lr 2e-3")
    epochs: float = opt(1.0, "paper: 1 epoch over the caption pairs")
    batch_size: int = opt(256, "paper (LLaVA-1.5): global batch 256")


@dataclass
class Stage2Config(TrainConfig):
    """Stage 2, visual instruction tuning: the projector and the LLM train (full or LoRA); CLIP frozen."""

    stage: typing.ClassVar[str] = "stage2"
    lr: float = opt(2e-5, "paper: lr 2e-5 for full fine-tuning (LoRA: LLaVA-1.5 uses 2e-4)")
    epochs: float = opt(3.0, "paper: 3 epochs on the instruction data")
    batch_size: int = opt(128, "paper (LLaVA-1.5): global batch 128")
    lora: bool = opt(False, "Train LoRA adapters on the LLM instead of all its weights (merged on save)")
    lora_r: int = opt(128, "LoRA rank (LLaVA-1.5 LoRA: 128)")
    lora_alpha: int = opt(256, "LoRA alpha (LLaVA-1.5 LoRA: 256)")
    lora_dropout: float = opt(0.05, "LoRA dropout (LLaVA-1.5 LoRA: 0.05)")
    projector_lr: float = opt(0.0, "Projector lr when it must differ from --lr (LLaVA-1.5 LoRA: 2e-5); 0: --lr")


def _click_type(f: dataclasses.Field):
    choices = f.metadata.get("choices")
    if choices:
        return click.Choice(choices)
    return {"int": int, "float": float, "str": str, "bool": bool}[f.type if isinstance(f.type, str) else f.type.__name__]


def click_options(config_cls):
    """Decorator: one click option per dataclass field (`micro_batch_size` -> `--micro-batch-size`,
    booleans as `--x/--no-x`), defaults and help taken from the field."""
    def deco(fn):
        for f in reversed(dataclasses.fields(config_cls)):
            flag = "--" + f.name.replace("_", "-")
            kind = _click_type(f)
            if kind is bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=f.default, show_default=True,
                                  help=f.metadata.get("help"))(fn)
            else:
                fn = click.option(flag, f.name, type=kind, default=f.default, show_default=True,
                                  help=f.metadata.get("help"))(fn)
        return fn
    return deco


def config_from_kwargs(config_cls, kwargs: dict):
    """Build a config from click's keyword arguments (unknown keys are an error)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(kwargs) - names
    if unknown:
        raise TypeError(f"unknown {config_cls.__name__} fields: {sorted(unknown)}")
    return config_cls(**kwargs)
