"""The one training loop, for both stages: CPU, one GPU, or many processes under torchrun
(DDP, or FSDP with --fsdp; see distributed.py).

    llava-local train stage1 --vision-tower clip/ --llm llm/ --data captions.json --out runs/s1
    llava-local train stage2 --model runs/s1 --data instruct.json --out runs/s2 [--lora]
    torchrun --nproc_per_node 8 -m train.cli stage2 --model runs/s1 --data instruct.json --out runs/s2
    torchrun --nproc_per_node 8 -m train.cli stage2 --fsdp ...  # LLM sharded over the 8 GPUs
    torchrun --nproc_per_node 2 -m train.cli stage1 ...         # CPU: gloo

Every process sees a disjoint slice of each global batch; the loss is summed over labelled tokens
and divided by the global count of labelled tokens, so the update does not depend on how the batch
is split into processes and micro-batches (tests/test_train_ddp.py compares 1 and 2 processes).

Outputs, in the llava-hf layout that `llava-local convert` reads:
    OUT/                       the final model (config.json is replaced last: its presence = complete)
    OUT/checkpoints/step-N/    periodic checkpoints (--save-every), each with trainer_state/ for --resume
    OUT/train_log.jsonl        one line per step: loss, lr, labelled tokens, seconds
--resume restores the weights, the optimizer, the scheduler, the step and every RNG; the data
order is a function of (seed, epoch), so a resumed run continues exactly where it stopped.

The pieces: prepare.py (model, data, optimizer), schedule.py (steps, learning rate, data order),
checkpoints.py (saving, resuming), step_log.py (what each step reports).
"""
from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from llava_local.fileio import atomic_write

from .checkpoints import find_checkpoint, restore_checkpoint, save_checkpoint, save_final, set_rng_state
from .config import Stage2Config, TrainConfig
from .data import n_targets
from .distributed import Dist, all_sum, barrier, compute_cleanup, compute_init, grad_sync
from .errors import TrainConfigError
from .forward import LlavaForTraining
from .model import parts
from .prepare import Prepared, make_dataset, make_loader, make_optimizer, place_model, precision, prepare_model
from .schedule import Plan, StepBatches, make_plan, make_scheduler
from .step_log import StepLog
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    out: Path
    losses: list[float] = field(default_factory=list)   # per optimizer step, mean over labelled tokens
    steps: int = 0


@dataclass
class Run:
    """One stage's training state: built by _start, advanced by _step."""
    cfg: TrainConfig
    d: Dist
    prep: Prepared
    core: LlavaForTraining
    module: torch.nn.Module                # core, wrapped for DDP / FSDP
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    plan: Plan
    sampler: StepBatches
    batches: Iterator[dict]                # the DataLoader's micro-batches, in the sampler's order
    amp: torch.dtype | None                # autocast dtype; None: fp32
    scaler: torch.amp.GradScaler | None    # fp16 only
    n_records: int
    start: int = 0                         # the first step to run (> 0 when resumed)
    losses: list[float] = field(default_factory=list)

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.core.parameters() if p.requires_grad]


def train(cfg: TrainConfig, callbacks: tuple[Callable[[int, float], None], ...] = ()) -> TrainResult:
    """Run one stage. `callbacks(step, loss)` run after every optimizer step (and its checkpoint)."""
    d = compute_init(cfg.threads)
    try:
        return _train(cfg, d, callbacks)
    finally:
        compute_cleanup(d)


def _train(cfg: TrainConfig, d: Dist, callbacks) -> TrainResult:
    _check_options(cfg, d)
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    run = _start(cfg, d, find_checkpoint(cfg))
    if d.is_main:
        _announce(run)
        atomic_write(out / "train_config.json", (cfg.to_json() + "\n").encode("utf-8"))
    with StepLog(out, d, run.plan.total_steps, run.start, cfg.log_every) as steps:
        run.prep.model.train()
        parts(run.prep.model)[0].eval()      # the vision tower is frozen in both stages
        for step in range(run.start, run.plan.total_steps):
            loss, lr, tokens = _step(run, step)
            run.losses.append(loss)
            steps.record(step + 1, loss, lr, tokens)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < run.plan.total_steps:
                save_checkpoint(out / "checkpoints" / f"step-{step + 1:06d}", run.prep, run.core, run.module,
                                opt=run.opt, sched=run.sched, step=step + 1, cfg=cfg, d=d, losses=run.losses)
            for cb in callbacks:
                cb(step + 1, loss)
    run.prep.model.eval()
    save_final(run.prep, run.core, run.module, out, d)
    barrier(d)
    return TrainResult(out, run.losses, run.plan.total_steps)


def _check_options(cfg: TrainConfig, d: Dist) -> None:
    if not cfg.out:
        raise TrainConfigError("--out is required")
    if cfg.batch_size % d.world:
        raise TrainConfigError(f"batch size {cfg.batch_size} is not divisible by {d.world} processes")
    if cfg.fsdp and isinstance(cfg, Stage2Config) and cfg.lora:
        raise TrainConfigError("--fsdp with --lora is not supported (LoRA adapters are small: use DDP)")


def _start(cfg: TrainConfig, d: Dist, resume_from: Path | None) -> Run:
    """Everything the steps need, in an order that fixes every random draw: the seeds, the model,
    the optimizer, the checkpoint's state, the data iterator, and the checkpoint's RNG state last."""
    torch.manual_seed(cfg.seed)          # same init on every process (DDP also broadcasts rank 0's)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    prep = prepare_model(cfg, resume_from)
    tok = load_tokenizer(prep.tokenizer_dir)
    data = make_dataset(cfg, prep, tok)
    plan = make_plan(cfg, len(data))
    core, module = place_model(prep, cfg, d)
    opt = make_optimizer(core, cfg)      # after wrapping: FSDP replaces the parameters
    sched = make_scheduler(opt, plan, cfg)
    start, losses, saved_rng = 0, [], None
    if resume_from is not None:
        start, losses, saved_rng = restore_checkpoint(resume_from, prep.model, module, opt, sched, d)
        log.info("resumed from %s at step %d", resume_from, start)
    amp, scaler = precision(cfg, d.device)
    sampler = StepBatches(plan, cfg, d, len(data), start, data.length_hints())
    batches = iter(make_loader(data, sampler, cfg, tok.pad_id))   # draws the loader's base seed from torch's RNG
    if saved_rng is not None:
        set_rng_state(saved_rng)         # so the restored state goes last
    return Run(cfg, d, prep, core, module, opt, sched, plan, sampler, batches, amp, scaler, len(data), start, losses)


def _announce(run: Run) -> None:
    log.info("%s: %d records, %d steps (%d per epoch), %d trainable parameters, %d process(es)",
             run.cfg.stage, run.n_records, run.plan.total_steps, run.plan.steps_per_epoch,
             sum(p.numel() for p in run.trainable), run.d.world)


def _step(run: Run, step: int) -> tuple[float, float, float]:
    """One optimizer step over this process's micro-batches. Returns (the loss: mean over the global
    batch's labelled tokens, the learning rate it stepped with, the global count of labelled tokens)."""
    d, scaler = run.d, run.scaler
    micro = [next(run.batches) for _ in run.sampler.micro_batches(step)]
    n_global = all_sum(d, float(sum(n_targets(b["labels"]) for b in micro)))
    loss_sum = 0.0
    for j, b in enumerate(micro):
        b = {k: (v.to(d.device) if v is not None else None) for k, v in b.items()}
        autocast = torch.autocast(d.device.type, dtype=run.amp) if run.amp else contextlib.nullcontext()
        with grad_sync(run.module, j == len(micro) - 1), autocast:
            ls = run.module(**b)
            scaled = ls * (d.world / max(n_global, 1.0))     # DDP averages gradients over processes
            (scaler.scale(scaled) if scaler else scaled).backward()
        loss_sum += float(ls.detach())
    lr = _update(run)
    return all_sum(d, loss_sum) / max(n_global, 1.0), lr, n_global


def _update(run: Run) -> float:
    """Clip, step the optimizer and the schedule, clear the gradients; returns the step's learning rate."""
    opt, scaler = run.opt, run.scaler
    if scaler:
        scaler.unscale_(opt)
    if run.cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.trainable, run.cfg.max_grad_norm)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    lr = run.sched.get_last_lr()[0]
    run.sched.step()
    opt.zero_grad(set_to_none=True)
    return lr
