"""`llava-local train ...`: the two LLaVA stages, the shapes world and the demo model.

    llava-local train stage1 --vision-tower clip/ --llm llm/ --data captions.json --out runs/s1
    llava-local train stage2 --model runs/s1 --data instruct.json --out runs/s2 [--lora]
    torchrun --nproc_per_node 8 -m train.cli stage2 --model runs/s1 --data instruct.json --out runs/s2
    llava-local train shapes --out data/shapes --train 2000
    llava-local train demo-model --out llava_local/data/demo

Options of stage1/stage2 are generated from the dataclasses in config.py (defaults = the paper's).
"""
from __future__ import annotations

import functools
import os

import click

from llava_local.logs import setup_logging

from .config import Stage1Config, Stage2Config, click_options, config_from_kwargs


def _setup_logging() -> None:
    """INFO on rank 0, which reports progress; WARNING on the other torchrun processes. Every line
    names its rank."""
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank == 0, fmt=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")


def _user_errors(fn):
    """Bad inputs (missing files, malformed data, bad options: LlavaLocalError, including train.errors)
    become one `Error:` line; anything else is a bug and keeps its traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from llava_local.errors import LlavaLocalError
        try:
            return fn(*args, **kwargs)
        except (LlavaLocalError, FileNotFoundError) as exc:
            root = click.get_current_context().find_root()
            if (root.params or {}).get("debug"):
                raise
            raise click.ClickException(str(exc)) from None
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def train() -> None:
    """Train LLaVA in two stages (paper: feature alignment, then visual instruction tuning).

    \b
    Examples:
      llava-local train stage1 --vision-tower clip/ --llm vicuna/ --data captions.json --out runs/s1
      llava-local train stage2 --model runs/s1 --data instruct.json --out runs/s2 --lora --lr 2e-4
      llava-local convert runs/s2 -o out/
    """


@train.command()
@click_options(Stage1Config)
@_user_errors
def stage1(**kwargs):
    """Stage 1, feature alignment: train only the projector on image-caption pairs.

    CLIP and the LLM are frozen. Start from parts (--vision-tower and --llm, a directory or a GGUF)
    or from a llava-hf checkpoint (--model).

    \b
    Examples:
      llava-local train stage1 --vision-tower clip-vit-large-patch14-336/ --llm vicuna-7b/ \\
          --data blip_laion_cc_sbu_558k.json --image-folder images/ --out runs/s1
      torchrun --nproc_per_node 2 -m train.cli stage1 ... --out runs/s1     # several processes (DDP)
    """
    from .loop import train as run
    _setup_logging()
    res = run(config_from_kwargs(Stage1Config, kwargs))
    click.echo(str(res.out))


@train.command()
@click_options(Stage2Config)
@_user_errors
def stage2(**kwargs):
    """Stage 2, visual instruction tuning: train the projector and the LLM (full, or LoRA merged on save).

    Loss only on the assistant's answers; CLIP frozen.

    \b
    Examples:
      llava-local train stage2 --model runs/s1 --data llava_v1_5_mix665k.json --image-folder images/ --out runs/s2
      llava-local train stage2 --model runs/s1 --data instruct.json --out runs/s2-lora --lora --lr 2e-4 --projector-lr 2e-5
      llava-local train stage2 ... --save-every 500 --resume auto      # continue after an interruption
    """
    from .loop import train as run
    _setup_logging()
    res = run(config_from_kwargs(Stage2Config, kwargs))
    click.echo(str(res.out))


@train.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--train", "n_train", type=click.IntRange(1), default=2000, show_default=True, help="Training images.")
@click.option("--eval", "n_eval", type=click.IntRange(1), default=100, show_default=True, help="Held-out images.")
@click.option("--text", "n_text", type=click.IntRange(0), default=0, show_default=True,
              help="Text-only conversations (language warm-up).")
@click.option("--seed", type=int, default=0, show_default=True)
def shapes(out, n_train, n_eval, n_text, seed):
    """Write a shapes-world dataset: PNG images and LLaVA JSON (captions, conversations, eval).

    \b
    Examples:
      llava-local train shapes --out data/shapes --train 2000 --eval 100
    """
    from .shapes import write_dataset
    split = write_dataset(out, n_train=n_train, n_eval=n_eval, n_text=n_text, seed=seed)
    for p in (split.captions, split.instruct, split.text, split.scenes, split.eval):
        click.echo(str(p))


@train.command("demo-model")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Where the GGUF pair goes (default: llava_local/data/demo).")
@click.option("--work", default=None, type=click.Path(file_okay=False), help="Intermediate files (default: .cache/demo-build).")
@_user_errors
def demo_model(out, work):
    """Build the shapes demo model from nothing on CPU (see train/demo_model.py).

    \b
    Examples:
      llava-local train demo-model --out llava_local/data/demo
    """
    from pathlib import Path

    from .demo_model import LOG_DATEFMT, LOG_FORMAT, REPO, DemoConfig, build
    setup_logging(True, fmt=LOG_FORMAT, datefmt=LOG_DATEFMT)
    report = build(Path(out or REPO / "llava_local" / "data" / "demo"), Path(work or REPO / ".cache" / "demo-build"),
                   REPO / "llava_local" / "data" / "samples", DemoConfig())
    click.echo(f"built in {report['seconds']:.0f}s, {report['size_mb']:.1f} MB")


if __name__ == "__main__":
    train()
