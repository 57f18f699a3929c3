"""The shapes world: questions answered by the scene, a held-out split, the exact-match scorer.

    .venv/bin/python -m pytest -q tests/test_train_shapes.py
"""
from __future__ import annotations

import json
import random

import numpy as np

from llava_local.scoring import exact_match, normalize_answer
from train.shapes import (COLOURS, EVAL_KINDS, POSITIONS, caption, conversation, description, eval_records,
                          questions, random_scene, render, scene_from_dict, write_dataset)


def _article_free(answer: str) -> str:
    return normalize_answer(answer)


def test_every_answer_follows_from_the_scene():
    rng = random.Random(3)
    n = 0
    for _ in range(300):
        sc = random_scene(rng)
        for qa in questions(sc, rng):
            q, a = qa.question, _article_free(qa.answer)
            n += 1
            if qa.kind == "count" and "shapes" in q:
                assert a == str(len(sc.shapes))
            elif qa.kind == "count":
                kind = q.split("How many ")[1].split("s are")[0]
                assert a == str(sum(s.shape == kind for s in sc.shapes))
            elif qa.kind == "colour" and "background" in q:
                assert a == sc.background
            elif qa.kind == "colour":
                kind = q.rstrip("?").split(" ")[-1]
                (only,) = [s for s in sc.shapes if s.shape == kind]       # asked only when unique
                assert a == only.colour
            elif qa.kind == "shape" and " at the " in q:
                pos = q.split(" at the ")[1].rstrip("?")
                assert a == next(s.shape for s in sc.shapes if POSITIONS[s.cell] == pos)
            elif qa.kind == "shape":
                colour = next(c for c in COLOURS if f" {c} " in q)
                (only,) = [s for s in sc.shapes if s.colour == colour]
                assert a == only.shape
            elif qa.kind == "position":
                (only,) = [s for s in sc.shapes if f" {s.name}" in q]
                assert a == POSITIONS[only.cell]
            elif qa.kind == "reasoning":
                rel = next(r for r in ("left of", "right of", "above", "below") if f" {r} " in q)
                (ref,) = [s for s in sc.shapes if q.rstrip("?").endswith(s.name)]
                dr, dc = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}[rel]
                cell = 2 * (ref.row + dr) + ref.col + dc
                other = [s for s in sc.shapes if s.cell == cell]
                if not other:
                    assert a == "nothing"
                else:
                    assert a in (other[0].shape, other[0].colour)
    assert n > 2000


def test_render_is_deterministic_and_draws_the_scene():
    sc = random_scene(random.Random(5))
    a, b = np.asarray(render(sc)), np.asarray(render(sc))
    assert a.shape == (224, 224, 3) and np.array_equal(a, b)
    for s in sc.shapes:                    # the middle of each shape has (about) its colour
        x0, y0, x1, y1 = s.box
        px = a[(y0 + y1) // 2 + (y1 - y0) // 6, (x0 + x1) // 2].astype(int)
        assert np.abs(px - np.asarray(COLOURS[s.colour])).max() <= 20, (s, px)


def test_language_of_captions_and_descriptions():
    sc = scene_from_dict({"background": "grey", "seed": 1, "shapes": [
        {"shape": "circle", "colour": "red", "cell": 0, "box": [10, 10, 70, 70]},
        {"shape": "square", "colour": "orange", "cell": 3, "box": [130, 130, 190, 190]}]})
    assert caption(sc) == "A red circle and an orange square on a grey background."
    assert description(sc) == ("There are 2 shapes on a grey background. A red circle is at the top left. "
                                "An orange square is at the bottom right.")
    turns = conversation(sc, random.Random(0), 6)
    assert len({qa.question for qa in turns}) == len(turns) >= 6


def test_held_out_split_is_disjoint_and_deterministic(tmp_path):
    split = write_dataset(tmp_path, n_train=300, n_eval=20, seed=4)
    ev = json.loads(split.eval.read_text())
    as_json = lambda recs: json.loads(json.dumps(recs))                             # tuples -> lists
    assert ev == as_json(eval_records(20, seed=4))
    assert as_json(eval_records(5, seed=4)) == [r for r in ev if int(r["id"].split("-")[1]) < 5]   # a prefix
    held = {r["signature"] for r in ev}
    train_scenes = [scene_from_dict(r["scene"]) for r in json.loads(split.scenes.read_text())]
    assert len(train_scenes) == 300 and not held & {s.signature() for s in train_scenes}
    kinds = [r["kind"] for r in ev]
    assert all(kinds.count(k) == 20 for k in EVAL_KINDS)
    assert all((tmp_path / r["image"]).is_file() for r in ev)
    conv = json.loads(split.instruct.read_text())
    assert len(conv) == 300 and all("<image>" in c["conversations"][0]["value"] for c in conv)


def test_exact_match_normalisation():
    assert exact_match(" red.", "Red.") and exact_match("A circle", "a circle.")
    assert exact_match("circle", "A circle.") and exact_match("three", "3.")
    assert exact_match("Top left!", "Top left.") and exact_match("An orange  square.", "an orange square")
    assert not exact_match("Top right.", "Top left.") and not exact_match("2.", "3.")
    assert not exact_match("", "Red.") and not exact_match("Red circle.", "Red.")


def test_clip_pretraining_regions_and_twins():
    """The tiny CLIP's region term: every patch belongs to exactly one grid cell, and a cell's phrase
    names what is in it (or "nothing"), where, and on which background; a twin differs from its
    scene in exactly one shape."""
    import random
    from dataclasses import asdict

    from train.clip_pretrain import PHRASES, cell_patches, cell_phrase, twin
    from train.shapes import random_scene
    assert cell_patches(2) == [[0], [1], [2], [3]]
    assert cell_patches(4)[0] == [0, 1, 4, 5] and cell_patches(4)[3] == [10, 11, 14, 15]
    assert sorted(i for cell in cell_patches(4) for i in cell) == list(range(16))
    rng = random.Random(3)
    for _ in range(50):
        scene = asdict(random_scene(rng))
        phrases = [cell_phrase(scene, c) for c in range(4)]
        assert all(p in PHRASES for p in phrases)
        for s in scene["shapes"]:
            assert phrases[s["cell"]].startswith(f"{s['colour']} {s['shape']} ")
        assert sum(p.startswith("nothing") for p in phrases) == 4 - len(scene["shapes"])
        assert all(p.endswith(f" on {scene['background']}") for p in phrases)
        t = twin(scene, rng)
        changed = [(a, b) for a, b in zip(scene["shapes"], t["shapes"]) if a != b]
        assert len(changed) == 1 and changed[0][0]["shape"] != changed[0][1]["shape"]
        assert {k: v for k, v in changed[0][0].items() if k != "shape"} == \
               {k: v for k, v in changed[0][1].items() if k != "shape"}
