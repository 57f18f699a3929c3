"""Shared pieces of the train/ tests: a small shapes dataset and tiny configs on the tiny LLaVA of
train/tiny_models.py (56 px CLIP, 2-layer Llama, SmolLM2 vocabulary). Nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.config import Stage1Config, Stage2Config
from train.shapes import ShapesSplit, write_dataset


def shapes_split(root: Path, n_train: int = 16) -> ShapesSplit:
    return write_dataset(root, n_train=n_train, n_eval=4, n_text=8, seed=0, turns=(2, 3))


def stage1_config(split: ShapesSplit, model: Path, out: Path, **kw) -> Stage1Config:
    base = dict(data=str(split.captions), model=str(model), out=str(out), batch_size=4, micro_batch_size=2,
                max_steps=3, lr=1e-2, log_every=1)
    return Stage1Config(**(base | kw))


def stage2_config(split: ShapesSplit, model: Path, out: Path, **kw) -> Stage2Config:
    base = dict(data=str(split.instruct), model=str(model), out=str(out), batch_size=4, micro_batch_size=2,
                max_steps=3, lr=1e-3, log_every=1)
    return Stage2Config(**(base | kw))


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture()
def no_weight_repacking(monkeypatch):
    """Quantized GGUFs on llama.cpp without its CPU weight repacking (LlamaLLM reads the variable
    at every load; the repacked kernels are covered by the probe's own tests)."""
    monkeypatch.setenv("LLAVA_LOCAL_EXTRA_BUFTS", "0")
