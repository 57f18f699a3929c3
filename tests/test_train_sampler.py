"""train/schedule.py's step sampler: every record once per epoch, length grouping, and no state to resume.

    .venv/bin/python -m pytest -q tests/test_train_sampler.py
"""
from __future__ import annotations

import random

import pytest
import torch

from train.config import Stage2Config
from train.distributed import Dist
from train.schedule import StepBatches, make_plan, step_indices

N = 203                      # not a multiple of the batch: the epoch's last partial batch is dropped


def _lengths(seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(20, 400) for _ in range(N)]


def _cfg(**kw) -> Stage2Config:
    return Stage2Config(data="d.json", batch_size=8, micro_batch_size=4, seed=3, epochs=2, **kw)


def _dist(rank: int = 0, world: int = 1) -> Dist:
    return Dist(rank, world, rank, torch.device("cpu"))


def _padded(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("group", [0, 6, 64], ids=["off", "window-6", "window-longer-than-epoch"])
def test_every_record_at_most_once_per_epoch(group):
    cfg, lengths = _cfg(group_by_length=group), _lengths()
    plan = make_plan(cfg, N)
    d = _dist()
    for epoch in range(2):
        seen = [i for s in range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch)
                for i in step_indices(s, plan, cfg, d, N, lengths)]
        assert len(seen) == len(set(seen)) == plan.steps_per_epoch * cfg.batch_size


def test_grouping_by_length_cuts_padding_and_keeps_the_epoch():
    lengths = _lengths()
    plain, grouped = _cfg(), _cfg(group_by_length=8)
    plan = make_plan(plain, N)
    d = _dist()
    steps = range(plan.steps_per_epoch)
    a = [step_indices(s, plan, plain, d, N, lengths) for s in steps]
    b = [step_indices(s, plan, grouped, d, N, lengths) for s in steps]
    assert sorted(i for x in a for i in x) == sorted(i for x in b for i in x)     # the same records
    print(f"padded tokens per epoch: {_padded(a, lengths)} plain, {_padded(b, lengths)} grouped "
          f"({sum(lengths[i] for x in a for i in x)} real)")
    assert _padded(b, lengths) < 0.8 * _padded(a, lengths)
    # grouped batches are not in length order: the windows' batches are shuffled
    firsts = [min(lengths[i] for i in x) for x in b[:8]]
    assert firsts != sorted(firsts)


def test_sampler_resumes_without_state():
    cfg, lengths = _cfg(group_by_length=5), _lengths()
    plan = make_plan(cfg, N)
    d = _dist()
    whole = list(StepBatches(plan, cfg, d, N, 0, lengths))
    k = 7
    tail = list(StepBatches(plan, cfg, d, N, k, lengths))
    assert tail == whole[k * 2:]                          # 2 micro-batches per step
    assert all(len(m) == cfg.micro_batch_size for m in whole)


def test_processes_split_each_grouped_batch():
    cfg, lengths = _cfg(group_by_length=4), _lengths()
    plan = make_plan(cfg, N)
    one = step_indices(5, plan, cfg, _dist(), N, lengths)
    two = [step_indices(5, plan, cfg, _dist(r, 2), N, lengths) for r in range(2)]
    assert two[0] + two[1] == one
