"""The plan of one training stage: how many optimizer steps, the learning rate at each, and which
records each process trains on at each.

    plan = make_plan(cfg, len(dataset))                  # steps per epoch, total, warm-up
    sched = make_scheduler(opt, plan, cfg)               # linear warm-up, then cosine decay
    sampler = StepBatches(plan, cfg, dist, len(dataset), start=0, lengths=dataset.length_hints())

The data order is a function of (seed, epoch) only, so a run resumed at step N needs no sampler
state to continue exactly where it stopped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from .config import TrainConfig
from .distributed import Dist
from .errors import TrainConfigError


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


def make_scheduler(opt: torch.optim.Optimizer, plan: Plan, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, plan.total_steps, plan.warmup_steps, cfg.min_lr_ratio))


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
