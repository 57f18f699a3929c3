"""--resume after an interruption gives the same weights as an uninterrupted run (CPU, fixed seed).

    .venv/bin/python -m pytest -q tests/test_train_resume.py
"""
from __future__ import annotations

import json

import pytest

from llava_local.errors import LlavaLocalError
from train.loop import train

from train_helpers import max_abs_diff, shapes_split, stage2_config, weights


class Interrupted(Exception):
    pass


def _stop_after(k: int):
    def cb(step: int, loss: float) -> None:
        if step == k:
            raise Interrupted(f"stopped after step {k}")
    return cb


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return shapes_split(tmp_path_factory.mktemp("shapes"))


# full fine-tuning, and LoRA with dropout (the RNG state must be restored for it to match)
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-dropout"])
def test_resume_after_interruption_matches_uninterrupted_run(tiny_ckpt, split, tmp_path, lora):
    k, n = 3, 3                 # interrupt after step k, then run n more; 4 steps per epoch: crosses an epoch
    extra = dict(lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.3, lr=5e-3) if lora else {}
    whole = train(stage2_config(split, tiny_ckpt[1], tmp_path / "a", max_steps=k + n, save_every=k, **extra))

    cfg = stage2_config(split, tiny_ckpt[1], tmp_path / "b", max_steps=k + n, save_every=k, **extra)
    with pytest.raises(Interrupted):
        train(cfg, callbacks=(_stop_after(k),))
    assert not (tmp_path / "b" / "config.json").exists()          # no final model from the interrupted run
    ckpt = tmp_path / "b" / "checkpoints" / f"step-{k:06d}"
    assert json.loads((ckpt / "trainer_state" / "state.json").read_text())["step"] == k
    cfg.resume = "auto"
    resumed = train(cfg)

    delta = max_abs_diff(weights(tmp_path / "a"), weights(tmp_path / "b"))
    print(f"resume ({'lora' if lora else 'full'}): max |Δparam| at step {k + n} = {delta:.3g}")
    assert delta <= 1e-6
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-6, abs=1e-6)
    assert len(resumed.losses) == k + n


def test_resume_refuses_a_directory_that_is_not_a_checkpoint(tiny_ckpt, split, tmp_path):
    cfg = stage2_config(split, tiny_ckpt[1], tmp_path / "c", resume=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a resumable checkpoint") as exc:
        train(cfg)
    assert isinstance(exc.value, LlavaLocalError)        # `llava-local train` shows it as one Error: line
