"""The one training loop, for both stages: CPU, one GPU, or many processes under torchrun
(DDP, or FSDP with --fsdp; see distributed.py).

    llava-local train stage1 --vision-tower clip/ --llm llm/ --data captions.json --out runs/s1
    llava-local train stage2 --model runs/s1 --data instruct.json --out runs/s2 [--lora]
    torchrun --nproc_per_node 8 -m train.cli stage2 --model runs/s1 --data instruct.json --out runs/s2
    torchrun --nproc_per_node 8 -m train.cli stage2 --fsdp ...  # LLM sharded over the 8 GPUs
    torchrun --nproc_per_node 2 -m train.cli stage1 ...         # CPU: gloo

Every process sees a disjoint slice of each global batch; the loss is summed over labelled tokens
and divided by the global count of labelled tokens, so the update does not depend on how the batch
is split into processes and micro-batches (tests/test_train_loop.py compares 1 and 2 processes).

Outputs, in the llava-hf layout that `llava-local convert` reads:
    OUT/                       the final model (config.json is replaced last: its presence = complete)
    OUT/checkpoints/step-N/    periodic checkpoints (--save-every), each with trainer_state/ for --resume
    OUT/train_log.jsonl        one line per step: loss, lr, labelled tokens, seconds
A checkpoint is written into a temporary directory and renamed, so a crash never leaves half of one.
--resume restores the weights, the optimizer, the scheduler, the step and every RNG; the data
order is a function of (seed, epoch), so a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from llava_local.prompts.templates import get_template

from .config import Stage2Config, TrainConfig
from .data import DataConfig, LlavaDataset, collate, default_image_folder, n_targets
from .distributed import (Dist, all_sum, barrier, compute_cleanup, compute_init, full_model_state, grad_sync,
                          load_optimizer_state, optimizer_state, wrap)
from .errors import TrainConfigError
from .lora import add_lora, has_lora, merged_state_dict, trainable_state
from .forward import LlavaForTraining
from .model import (apply_freeze, build_from_parts, load_llava, n_image_tokens, parts, preprocess_config,
                    read_output_vocab, save_llava)
from .tokenizer import load_tokenizer, tokenizer_from_gguf

log = logging.getLogger(__name__)

STATE_DIR = "trainer_state"


# --- schedule ---

def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to min_ratio (transformers' get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Plan:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def make_plan(cfg: TrainConfig, n_records: int) -> Plan:
    if n_records < cfg.batch_size:
        raise TrainConfigError(f"{cfg.data}: {n_records} records, fewer than one global batch ({cfg.batch_size})")
    per_epoch = n_records // cfg.batch_size      # the last partial batch of an epoch is dropped
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * per_epoch))
    return Plan(per_epoch, total, int(math.ceil(cfg.warmup_ratio * total)))


def step_indices(step: int, plan: Plan, cfg: TrainConfig, d: Dist, n_records: int,
                 lengths: list[int] | None = None) -> list[int]:
    """This process's records for one optimizer step: a contiguous slice of the global batch, taken
    from the epoch's permutation (a function of seed and epoch only, so resume needs no sampler state).
    With cfg.group_by_length = N and `lengths`, the permutation is cut into windows of N global
    batches; each window is sorted by length, cut into its N batches, and those are shuffled: every
    record still comes once per epoch, and a batch holds records of similar length (less padding)."""
    epoch, i = divmod(step, plan.steps_per_epoch)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    perm = torch.randperm(n_records, generator=g)
    n, b = cfg.group_by_length, cfg.batch_size
    if n > 1 and lengths is not None:
        w, k = divmod(i, n)
        start = w * n * b
        n_here = min(n, plan.steps_per_epoch - w * n)          # the epoch's last window may be shorter
        window = sorted(perm[start:start + n_here * b].tolist(), key=lambda r: lengths[r])
        order = torch.randperm(n_here, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 7919 + w))
        j = int(order[k])
        batch = window[j * b:(j + 1) * b]
    else:
        batch = perm[i * b:(i + 1) * b].tolist()
    per_rank = b // d.world
    return batch[d.rank * per_rank:(d.rank + 1) * per_rank]


class StepBatches(torch.utils.data.Sampler):
    """Yields this process's micro-batches (lists of record indices), step after step from `start`.
    Within a step, records are sorted by length before being cut into micro-batches (less padding;
    the update is the same, the loss being normalised over the whole global batch)."""

    def __init__(self, plan: Plan, cfg: TrainConfig, d: Dist, n_records: int, start: int,
                 lengths: list[int] | None = None):
        self.plan, self.cfg, self.d, self.n, self.start = plan, cfg, d, n_records, start
        self.lengths = lengths

    def micro_batches(self, step: int) -> list[list[int]]:
        idx = step_indices(step, self.plan, self.cfg, self.d, self.n, self.lengths)
        if self.lengths is not None:
            idx = sorted(idx, key=lambda i: self.lengths[i])
        m = self.cfg.micro_batch_size
        return [idx[j:j + m] for j in range(0, len(idx), m)]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.plan.total_steps):
            yield from self.micro_batches(step)

    def __len__(self) -> int:
        return sum(len(self.micro_batches(s)) for s in range(self.start, self.plan.total_steps))


# --- model set-up ---

def _tokenizer_source(cfg: TrainConfig, out: Path) -> Path:
    if cfg.model:
        return Path(cfg.model)
    llm = Path(cfg.llm)
    if llm.suffix == ".gguf":   # unpack the GGUF's vocabulary next to the outputs, once
        return tokenizer_from_gguf(llm, out / "tokenizer")
    return llm


@dataclass
class Prepared:
    model: object                      # LlavaForConditionalGeneration, freeze rules (and LoRA) applied
    tokenizer_dir: Path
    preprocess: object                 # llava_local.image.preprocess.PreprocessConfig
    output_vocab: list[int] | None     # see LlavaForTraining


def prepare_model(cfg: TrainConfig, resume_from: Path | None) -> Prepared:
    lora = isinstance(cfg, Stage2Config) and cfg.lora
    init = Path(cfg.model) if cfg.model else None
    if resume_from is not None and not lora:
        init = resume_from                 # full weights of the checkpoint; LoRA restores adapters below
    if init is not None:
        model = load_llava(init)
    elif cfg.vision_tower and cfg.llm:
        model = build_from_parts(cfg.vision_tower, cfg.llm)
    else:
        raise TrainConfigError("give --model (a llava-hf checkpoint) or both --vision-tower and --llm")
    tok_dir = _tokenizer_source(cfg, Path(cfg.out))
    pp = preprocess_config(model, init if init is not None else None)
    if init is not None:
        vocab = read_output_vocab(init)
    else:
        vocab = read_output_vocab(cfg.llm) if Path(cfg.llm).is_dir() else None
    if lora:
        add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    else:
        apply_freeze(model, "projector" if cfg.stage == "stage1" else "projector+llm")
    return Prepared(model, tok_dir, pp, vocab)


def _precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32). CPU always trains in fp32."""
    if device.type != "cuda" or cfg.precision == "fp32":
        return None
    if cfg.precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]


def make_optimizer(core: LlavaForTraining, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over what trains (the projector in its own group, for --projector-lr)."""
    proj = {id(p) for p in parts(core.llava)[1].parameters()}
    proj_lr = getattr(cfg, "projector_lr", 0.0) or cfg.lr
    params = [p for p in core.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in proj], "lr": cfg.lr},
              {"params": [p for p in params if id(p) in proj], "lr": proj_lr}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)


# --- checkpoints ---

def _rng_state() -> dict:
    """Every RNG, in types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    s = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _save_model_files(prep: Prepared, dst: Path, gathered: dict | None) -> None:
    model = prep.model
    state = merged_state_dict(model) if has_lora(model) else gathered
    save_llava(model, dst, tokenizer_dir=prep.tokenizer_dir, preprocess=prep.preprocess, state_dict=state,
               output_vocab=prep.output_vocab)


def save_checkpoint(ckpt: Path, prep: Prepared, core: LlavaForTraining, module, *, opt, sched, step: int,
                    cfg: TrainConfig, d: Dist, losses: list[float]) -> None:
    """A resumable checkpoint: the model in the llava-hf layout plus trainer_state/.
    Saving must not move any RNG (merging LoRA builds modules): the state is taken first, saved,
    and put back at the end, so a resumed run and an uninterrupted one draw the same numbers."""
    rng = _rng_state()
    core.sync_vocab()
    gathered = full_model_state(module, d)           # collectives first, on every rank
    opt_state = optimizer_state(module, opt)
    tmp = ckpt.with_name("." + ckpt.name + ".tmp")
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / STATE_DIR).mkdir(parents=True)
    barrier(d)
    torch.save(rng, tmp / STATE_DIR / f"rng-rank{d.rank}.pt")
    if d.is_main:
        _save_model_files(prep, tmp, gathered)
        if has_lora(prep.model):
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in trainable_state(prep.model).items()},
                      str(tmp / STATE_DIR / "trainable.safetensors"))
        torch.save(opt_state, tmp / STATE_DIR / "optimizer.pt")
        torch.save(sched.state_dict(), tmp / STATE_DIR / "scheduler.pt")
        (tmp / STATE_DIR / "state.json").write_text(json.dumps(
            {"step": step, "world": d.world, "losses": losses, "config": json.loads(cfg.to_json())}, indent=1))
    barrier(d)
    if d.is_main:
        _replace_dir(tmp, ckpt)
        old = sorted(p for p in ckpt.parent.glob("step-*") if p.is_dir())
        for p in old[:-cfg.keep_checkpoints] if cfg.keep_checkpoints > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    barrier(d)
    _set_rng_state(rng)


def find_checkpoint(cfg: TrainConfig) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume != "auto":
        p = Path(cfg.resume)
        if not (p / STATE_DIR / "state.json").is_file():
            raise FileNotFoundError(f"{p}: not a resumable checkpoint (no {STATE_DIR}/state.json)")
        return p
    done = sorted(p for p in (cfg.out_dir / "checkpoints").glob("step-*") if (p / STATE_DIR / "state.json").is_file())
    return done[-1] if done else None


def save_final(prep: Prepared, core: LlavaForTraining, module, out: Path, d: Dist) -> None:
    """The final model at OUT/: files written in a temporary dir, moved in one by one, config.json last."""
    core.sync_vocab()
    gathered = full_model_state(module, d)
    if not d.is_main:
        return
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _save_model_files(prep, tmp, gathered)
    for stale in list(out.glob("model*.safetensors*")) + [out / "config.json"]:
        stale.unlink(missing_ok=True)
    files = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")
    for f in files:
        os.replace(f, out / f.name)
    tmp.rmdir()


# --- the loop ---

@dataclass
class TrainResult:
    out: Path
    losses: list[float] = field(default_factory=list)   # per optimizer step, mean over labelled tokens
    steps: int = 0


def train(cfg: TrainConfig, callbacks: tuple[Callable[[int, float], None], ...] = ()) -> TrainResult:
    """Run one stage. `callbacks(step, loss)` run after every optimizer step (and its checkpoint)."""
    d = compute_init(cfg.threads)
    try:
        return _train(cfg, d, callbacks)
    finally:
        compute_cleanup(d)


def _train(cfg: TrainConfig, d: Dist, callbacks) -> TrainResult:
    if not cfg.out:
        raise TrainConfigError("--out is required")
    if cfg.batch_size % d.world:
        raise TrainConfigError(f"batch size {cfg.batch_size} is not divisible by {d.world} processes")
    if cfg.fsdp and isinstance(cfg, Stage2Config) and cfg.lora:
        raise TrainConfigError("--fsdp with --lora is not supported (LoRA adapters are small: use DDP)")
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    resume_from = find_checkpoint(cfg)
    torch.manual_seed(cfg.seed)          # same init on every process (DDP also broadcasts rank 0's)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    prep = prepare_model(cfg, resume_from)
    model, pp = prep.model, prep.preprocess
    tok = load_tokenizer(prep.tokenizer_dir)
    template = get_template(cfg.template)
    data = LlavaDataset(DataConfig(Path(cfg.data), default_image_folder(cfg.data, cfg.image_folder), template,
                                   n_image_tokens(model), pp, cfg.max_len, cfg.image_position, cfg.cache_data), tok)
    plan = make_plan(cfg, len(data))
    model.to(d.device)
    lm = parts(model)[2]
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.fsdp and prep.output_vocab is not None:
        raise TrainConfigError("--fsdp is not supported for closed-vocabulary models (output_vocab.json): use DDP")
    core = LlavaForTraining(model, prep.output_vocab)
    module = wrap(core, d, fsdp=cfg.fsdp)
    opt = make_optimizer(core, cfg)         # after wrapping: FSDP replaces the parameters
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, plan.total_steps, plan.warmup_steps, cfg.min_lr_ratio))
    start, losses, rng_state = 0, [], None
    if resume_from is not None:
        start, losses, rng_state = _restore(resume_from, model, module, opt, sched, d)
        log.info("resumed from %s at step %d", resume_from, start)
    amp = _precision(cfg, d.device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    sampler = StepBatches(plan, cfg, d, len(data), start, data.length_hints())
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         collate_fn=functools.partial(collate, pad_id=tok.pad_id),
                                         persistent_workers=False)
    it = iter(loader)                     # draws the loader's base seed from torch's RNG
    if rng_state is not None:
        _set_rng_state(rng_state)         # so the restored state goes last
    trainable = [p for p in core.parameters() if p.requires_grad]
    if d.is_main:
        log.info("%s: %d records, %d steps (%d per epoch), %d trainable parameters, %d process(es)",
                 cfg.stage, len(data), plan.total_steps, plan.steps_per_epoch, sum(p.numel() for p in trainable),
                 d.world)
        (out / "train_config.json").write_text(cfg.to_json() + "\n")
    log_file = open(out / "train_log.jsonl", "a") if d.is_main else None
    bar = _progress(d, plan.total_steps, start)
    model.train()
    parts(model)[0].eval()      # the vision tower is frozen in both stages
    t0 = time.perf_counter()
    try:
        for step in range(start, plan.total_steps):
            micro = [next(it) for _ in sampler.micro_batches(step)]
            n_local = sum(n_targets(b["labels"]) for b in micro)
            n_global = all_sum(d, float(n_local))
            loss_sum = 0.0
            for j, b in enumerate(micro):
                b = {k: (v.to(d.device) if v is not None else None) for k, v in b.items()}
                autocast = torch.autocast(d.device.type, dtype=amp) if amp else contextlib.nullcontext()
                with grad_sync(module, j == len(micro) - 1), autocast:
                    ls = module(**b)
                    scaled = ls * (d.world / max(n_global, 1.0))
                    (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += float(ls.detach())
            if scaler:
                scaler.unscale_(opt)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            lr = sched.get_last_lr()[0]
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss = all_sum(d, loss_sum) / max(n_global, 1.0)
            losses.append(loss)
            if log_file:
                log_file.write(json.dumps({"step": step + 1, "loss": loss, "lr": lr, "tokens": int(n_global),
                                           "seconds": round(time.perf_counter() - t0, 3)}) + "\n")
                log_file.flush()
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            elif d.is_main and (step + 1) % max(1, cfg.log_every) == 0:
                log.info("step %d/%d loss %.4f lr %.2e", step + 1, plan.total_steps, loss, lr)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < plan.total_steps:
                save_checkpoint(out / "checkpoints" / f"step-{step + 1:06d}", prep, core, module, opt=opt,
                                sched=sched, step=step + 1, cfg=cfg, d=d, losses=losses)
            for cb in callbacks:
                cb(step + 1, loss)
    finally:
        if bar:
            bar.close()
        if log_file:
            log_file.close()
    model.eval()
    save_final(prep, core, module, out, d)
    barrier(d)
    return TrainResult(out, losses, plan.total_steps)


def _restore(ckpt: Path, model, module, opt, sched, d: Dist) -> tuple[int, list[float], dict | None]:
    """Weights, optimizer, scheduler and step; returns the RNG state for the caller to apply last
    (building the data iterator draws from torch's RNG, and must not shift the restored state)."""
    sd = ckpt / STATE_DIR
    state = json.loads((sd / "state.json").read_text())
    if has_lora(model):
        from safetensors.torch import load_file
        saved = load_file(str(sd / "trainable.safetensors"))
        params = dict(model.named_parameters())
        missing = [k for k in saved if k not in params]
        if missing:
            raise TrainConfigError(f"{ckpt}: trainable tensors {missing[:3]} do not exist in the model (different LoRA setup?)")
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)
    load_optimizer_state(module, opt, torch.load(sd / "optimizer.pt", map_location="cpu", weights_only=True))
    sched.load_state_dict(torch.load(sd / "scheduler.pt", weights_only=True))
    rng = sd / f"rng-rank{d.rank}.pt"
    rng_state = torch.load(rng, weights_only=True) if rng.is_file() else None
    if rng_state is None and d.is_main:
        log.warning("%s: no RNG state for rank %d (saved with %d processes)", ckpt, d.rank, state.get("world", 1))
    return int(state["step"]), list(state.get("losses", [])), rng_state


def _progress(d: Dist, total: int, start: int):
    if not d.is_main:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    import sys
    return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, disable=None)
