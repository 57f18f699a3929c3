"""Our LLaVA-1.6 ("anyres") pairs run in upstream llama.cpp with no flags: `llama-mtmd-cli` (built by
`make upstream-tools`) loads each converted pair (llava-hf layout and liuhaotian layout) and answers,
and it tiles the image by the pinpoints we wrote: its prompt has one image chunk for the base image and
one per tile, as many tiles as transformers' `select_best_resolution` picks for that image. Upstream's
legacy 1.6 mmproj (tests/test_convert_next.py `write_legacy_next_mmproj`) runs with our LLM too.

    .venv/bin/python -m pytest -q -m slow tests/test_upstream_next.py -s

Upstream's 1.6 path is not exact (it never appends `image_newline` and does not unpad, on top of the
CLS-position defect of 1.5): this checks that it loads and uses our files, not its numbers.
"""
from __future__ import annotations

import json
import re
import time

import pytest

from conftest import random_image
from test_convert_next import write_legacy_next_mmproj
from test_upstream_tools import mtmd_cli

pytestmark = pytest.mark.slow

WIDE = (200, 60)    # width, height: 3 tiles of 56 px side by side (pinpoint 56x168, height x width)


def _expected_tiles(pinpoints_hw, width: int, height: int, tile: int) -> int:
    from transformers.image_processing_utils import select_best_resolution
    h, w = select_best_resolution((height, width), [list(p) for p in pinpoints_hw])
    return (h // tile) * (w // tile)


@pytest.fixture(scope="module")
def next_pairs(tiny_next_ckpt, converted_next_f32, tmp_path_factory):
    """{name: (LLM, mmproj)}: both layouts converted, and the legacy mmproj with our LLM."""
    from convert import convert
    model, _, orig, clip = tiny_next_ckpt
    out = tmp_path_factory.mktemp("upstream-next")
    o = convert(orig, out / "orig", outtype="f16", vision_tower=clip)
    legacy = write_legacy_next_mmproj(out / "mmproj-model-f16.gguf", model,
                                      json.loads((orig / "config.json").read_text()))
    return {"hf-f32": (converted_next_f32.llm_path, converted_next_f32.mmproj_path),
            "orig-f16": (o.llm_path, o.mmproj_path),
            "legacy-mmproj": (converted_next_f32.llm_path, legacy)}


@pytest.mark.parametrize("which", ["hf-f32", "orig-f16", "legacy-mmproj"])
def test_upstream_mtmd_cli_runs_our_llava_16_pair(which, next_pairs, converted_next_f32, tmp_path):
    llm, mmproj = next_pairs[which]
    image = tmp_path / "wide.png"
    random_image(*WIDE, seed=7).save(image)
    t0 = time.perf_counter()
    proc = mtmd_cli(llm, mmproj, image, "Describe this image.", n_predict=8)
    answer = proc.stdout.strip()
    print(f"upstream llama-mtmd-cli, LLaVA-1.6 {which}: {answer!r} ({time.perf_counter() - t0:.1f}s)")
    assert answer
    tiles = _expected_tiles(converted_next_f32.manifest["anyres"]["grid_pinpoints"], *WIDE, tile=56)
    totals = re.findall(r"encoding mtmd batch, n_chunks = \d+ \(done = \d+, total = (\d+)\)", proc.stderr)
    # chunks: the text before, the base image, one per tile, the text after (a 1.5 file: 3)
    assert totals and int(totals[-1]) == 3 + tiles == 6, proc.stderr[-3000:]
