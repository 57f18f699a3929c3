"""Saving and resuming: periodic checkpoints under OUT/checkpoints/step-N/ and the final model at OUT/.

    save_checkpoint(out / "checkpoints" / "step-000500", prep, core, module, opt=opt, sched=sched,
                    step=500, cfg=cfg, d=d, losses=losses)
    ckpt = find_checkpoint(cfg)                      # --resume auto|DIR -> the checkpoint, or None
    start, losses, rng = restore_checkpoint(ckpt, model, module, opt, sched, d)
    save_final(prep, core, module, out, d)

A checkpoint is the model in the llava-hf layout plus trainer_state/ (optimizer, scheduler, step,
losses, every process's RNG state). It is written into a temporary directory and renamed, so a
crash never leaves half of one; the final model's config.json is moved in last (its presence means
the model is complete).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .distributed import Dist, barrier, full_model_state, load_optimizer_state, optimizer_state
from .errors import TrainConfigError, TrainFilesError
from .forward import LlavaForTraining
from .lora import has_lora, merged_state_dict, trainable_state
from .model import save_llava
from .prepare import Prepared

log = logging.getLogger(__name__)

STATE_DIR = "trainer_state"


def rng_state() -> dict:
    """Every RNG, in types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    s = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished directory `tmp` at `final`. Not llava_local.fileio.atomic_path: every rank
    writes into `tmp` (one fixed name they all know), and os.replace cannot replace a non-empty
    directory, so the previous one is moved aside first and deleted only once the new one is in place."""
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


def _save_trainer_state(sd: Path, prep: Prepared, opt_state: dict, sched, *, step: int, cfg: TrainConfig,
                        d: Dist, losses: list[float]) -> None:
    """trainer_state/ of rank 0: LoRA adapters, optimizer, scheduler, step and losses."""
    if has_lora(prep.model):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in trainable_state(prep.model).items()},
                  str(sd / "trainable.safetensors"))
    torch.save(opt_state, sd / "optimizer.pt")
    torch.save(sched.state_dict(), sd / "scheduler.pt")
    (sd / "state.json").write_text(json.dumps(
        {"step": step, "world": d.world, "losses": losses, "config": json.loads(cfg.to_json())}, indent=1))


def _prune(checkpoints: Path, keep: int) -> None:
    """Delete all but the newest `keep` periodic checkpoints (keep <= 0: keep them all)."""
    old = sorted(p for p in checkpoints.glob("step-*") if p.is_dir())
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(ckpt: Path, prep: Prepared, core: LlavaForTraining, module, *, opt, sched, step: int,
                    cfg: TrainConfig, d: Dist, losses: list[float]) -> None:
    """A resumable checkpoint: the model in the llava-hf layout plus trainer_state/.
    Saving must not move any RNG (merging LoRA builds modules): the state is taken first, saved,
    and put back at the end, so a resumed run and an uninterrupted one draw the same numbers."""
    rng = rng_state()
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
        _save_trainer_state(tmp / STATE_DIR, prep, opt_state, sched, step=step, cfg=cfg, d=d, losses=losses)
    barrier(d)
    if d.is_main:
        _replace_dir(tmp, ckpt)
        _prune(ckpt.parent, cfg.keep_checkpoints)
    barrier(d)
    set_rng_state(rng)


def find_checkpoint(cfg: TrainConfig) -> Path | None:
    """The checkpoint --resume names: a directory, or with 'auto' the newest under OUT/checkpoints."""
    if not cfg.resume:
        return None
    if cfg.resume != "auto":
        p = Path(cfg.resume)
        if not (p / STATE_DIR / "state.json").is_file():
            raise TrainFilesError(f"{p}: not a resumable checkpoint (no {STATE_DIR}/state.json)")
        return p
    done = sorted(p for p in (cfg.out_dir / "checkpoints").glob("step-*") if (p / STATE_DIR / "state.json").is_file())
    return done[-1] if done else None


def _move_in(tmp: Path, out: Path) -> None:
    """Move the files of `tmp` into `out` (which holds other outputs: logs, checkpoints/), config.json
    last: readers take a model dir with config.json as complete. Not llava_local.fileio.atomic_path,
    which replaces one file or a whole directory."""
    for stale in list(out.glob("model*.safetensors*")) + [out / "config.json"]:
        stale.unlink(missing_ok=True)
    for f in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
        os.replace(f, out / f.name)
    tmp.rmdir()


def save_final(prep: Prepared, core: LlavaForTraining, module, out: Path, d: Dist) -> None:
    """The final model at OUT/: files written in a temporary dir, moved in one by one, config.json last."""
    core.sync_vocab()
    gathered = full_model_state(module, d)
    if not d.is_main:
        return
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _save_model_files(prep, tmp, gathered)
    _move_in(tmp, out)


def _restore_adapters(ckpt: Path, model) -> None:
    from safetensors.torch import load_file
    saved = load_file(str(ckpt / STATE_DIR / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [k for k in saved if k not in params]
    if missing:
        raise TrainConfigError(f"{ckpt}: trainable tensors {missing[:3]} do not exist in the model (different LoRA setup?)")
    with torch.no_grad():
        for k, v in saved.items():
            params[k].copy_(v)


def restore_checkpoint(ckpt: Path, model, module, opt, sched, d: Dist) -> tuple[int, list[float], dict | None]:
    """Weights (LoRA adapters; full weights were loaded with the model), optimizer, scheduler and
    step; returns (step, losses, RNG state) for the caller to apply the RNG state last (building the
    data iterator draws from torch's RNG, and must not shift the restored state)."""
    sd = ckpt / STATE_DIR
    state = json.loads((sd / "state.json").read_text())
    if has_lora(model):
        _restore_adapters(ckpt, model)
    load_optimizer_state(module, opt, torch.load(sd / "optimizer.pt", map_location="cpu", weights_only=True))
    sched.load_state_dict(torch.load(sd / "scheduler.pt", weights_only=True))
    rng = sd / f"rng-rank{d.rank}.pt"
    saved_rng = torch.load(rng, weights_only=True) if rng.is_file() else None
    if saved_rng is None and d.is_main:
        log.warning("%s: no RNG state for rank %d (saved with %d processes)", ckpt, d.rank, state.get("world", 1))
    return int(state["step"]), list(state.get("losses", [])), saved_rng
