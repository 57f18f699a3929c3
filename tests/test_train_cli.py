"""`llava-local train ...`: the click group, options generated from the paper-default configs.

    .venv/bin/python -m pytest -q tests/test_train_cli.py
"""
from __future__ import annotations

import dataclasses
import json

import click
from click.testing import CliRunner

from train.cli import train
from train.config import Stage1Config, Stage2Config

from train_helpers import shapes_split


def test_configs_follow_the_paper():
    s1, s2 = Stage1Config(), Stage2Config()
    assert (s1.lr, s1.epochs, s1.template, s1.batch_size) == (2e-3, 1.0, "plain", 256)
    assert (s2.lr, s2.epochs, s2.template, s2.batch_size) == (2e-5, 3.0, "vicuna_v1", 128)
    assert s1.warmup_ratio == s2.warmup_ratio == 0.03 and s1.weight_decay == 0.0
    assert (s2.lora_r, s2.lora_alpha) == (128, 256) and not s2.lora
    assert all(f.metadata.get("help") for f in dataclasses.fields(Stage2Config))   # every field documented
    assert json.loads(s1.to_json())["stage"] == "stage1"


def test_group_and_options_come_from_the_dataclasses():
    assert isinstance(train, click.Group)
    assert {"stage1", "stage2", "shapes", "demo-model"} <= set(train.commands)
    for name, cfg in (("stage1", Stage1Config), ("stage2", Stage2Config)):
        params = {p.name: p for p in train.commands[name].params}
        assert set(params) == {f.name for f in dataclasses.fields(cfg)}
        assert params["lr"].default == cfg().lr and params["epochs"].default == cfg().epochs
    res = CliRunner().invoke(train, ["stage2", "--help"])
    assert res.exit_code == 0
    for flag in ("--lora / --no-lora", "--micro-batch-size", "--gradient-checkpointing", "--resume", "2e-05"):
        assert flag in res.output
    assert "--lora" not in CliRunner().invoke(train, ["stage1", "--help"]).output


def test_stage1_from_the_command_line(tiny_ckpt, tmp_path):
    split = shapes_split(tmp_path / "shapes", n_train=8)
    out = tmp_path / "s1"
    res = CliRunner().invoke(train, ["stage1", "--data", str(split.captions), "--model", str(tiny_ckpt[1]),
                                     "--out", str(out), "--batch-size", "4", "--micro-batch-size", "4",
                                     "--max-steps", "1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().endswith(str(out)) and (out / "config.json").is_file()
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["max_steps"] == 1 and cfg["lr"] == 2e-3


def test_bad_input_is_one_error_line(tmp_path):
    res = CliRunner().invoke(train, ["stage2", "--data", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert res.output.startswith("Error: ") and "Traceback" not in res.output


def test_train_is_a_subcommand_of_llava_local():
    from click.testing import CliRunner

    from llava_local.cli.main import main
    res = CliRunner().invoke(main, ["train", "--help"])
    assert res.exit_code == 0 and "stage1" in res.output and "stage2" in res.output
    res = CliRunner().invoke(main, ["train", "stage1", "--help"])
    assert res.exit_code == 0 and "2e-3" in res.output.replace("0.002", "2e-3")
