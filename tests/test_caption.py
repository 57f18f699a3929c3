"""`llava-local caption`: inputs, journal, resume, fingerprints, bad images, parallel decoding.

Crash faults (a worker that aborts, SIGKILL of the job) are in test_caption_faults.py. Jobs run on
the tiny converted model with the mtmd backend and one thread: the worker starts in about a second.
"""
from __future__ import annotations

import csv
import errno
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import random_image
from llava_local.caption.inputs import discover_inputs, in_shard
from llava_local.caption.job import _JobLock, caption_config
from llava_local.caption.journal import CaptionOutputError, JournalWriter, read_journal
from llava_local.caption.worker import CaptionItem, WorkerConfig
from llava_local.cli.main import main
from llava_local.runtime.options import EngineOptions
from llava_local.runtime.sampling import SamplingParams
from test_cli_run import _bad_images, _odd_images
from test_images import fake_eps, fake_fits, fake_psd

FAST = ["--vision-backend", "mtmd", "--threads", "1", "--max-tokens", "8"]


@pytest.fixture(scope="module")
def model_dir(pair_f32):
    return pair_f32.llm_path.parent


def caption(*args, env=None):
    return CliRunner().invoke(main, ["caption", *map(str, args)], env=env)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def good_images(d: Path, n: int, seed0: int = 0) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = d / f"good{i:02d}.{'png' if i % 2 else 'jpg'}"
        random_image(30 + 3 * i, 40, seed=seed0 + i).save(p)
        out.append(p)
    return out


# --- inputs ---------------------------------------------------------------------------------------

def test_discover_files_dirs_globs_lists_and_jsonl(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("imgs/a.jpg", "imgs/B.PNG", "imgs/sub/c.webp", "imgs/notes.txt", "imgs/.hidden.jpg",
                 "imgs/sub/._c.webp", "other/x.png", "other/y.png"):
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_bytes(b"x")
    Path("imgs/dir.jpg").mkdir()                   # an entry named like an image: an item (its error record)
    Path("list.txt").write_text("# comment\nimgs/a.jpg\n\nother/x.png\n")
    Path("meta").mkdir()
    Path("meta/m.jsonl").write_text(json.dumps({"image": "../other/y.png", "id": 7}) + "\n")
    items = discover_inputs(["imgs", "other/*.png", "list.txt", "meta/m.jsonl", "gone.jpg"],
                            path_field="image", key_field="id")
    keys = [it.key for it in items]
    assert keys == ["imgs/B.PNG", "imgs/a.jpg", "imgs/dir.jpg", "imgs/sub/c.webp", "other/x.png", "other/y.png",
                    "7", "gone.jpg"]
    assert items[-2] == CaptionItem("7", str(Path("meta") / "../other/y.png"))
    only_png = discover_inputs(["imgs"], extensions=["png"])
    assert [it.key for it in only_png] == ["imgs/B.PNG"]


def test_shards_partition_keys_stably():
    keys = [f"img{i}.jpg" for i in range(400)]
    parts = [[k for k in keys if in_shard(k, (i, 4))] for i in range(4)]
    assert sorted(sum(parts, [])) == sorted(keys)
    assert all(60 < len(p) < 140 for p in parts)
    assert in_shard("img0.jpg", (1, 4)) and in_shard("photos/cat.png", (0, 3))   # sha256: fixed forever


# --- journal --------------------------------------------------------------------------------------

def test_torn_last_line_and_garbage_are_repaired_on_resume(tmp_path, model_dir):
    imgs = good_images(tmp_path / "imgs", 3)
    out = tmp_path / "out.jsonl"
    res = caption(imgs[0], imgs[1], "-o", out, "--model", model_dir, *FAST)
    assert res.exit_code == 0, res.output
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"key": "half')                # killed mid-write (or a power cut)
    state = read_journal(out)
    assert state.torn_tail and len(state.records) == 2 and state.good_bytes == len(whole)
    res = caption(*imgs, "-o", out, "--model", model_dir, *FAST)
    assert res.exit_code == 0, res.output
    recs = records(out)
    assert sorted(r["key"] for r in recs) == sorted(map(str, imgs))
    assert recs[:2] == [json.loads(x) for x in whole.splitlines()]    # earlier work kept, not redone
    lines = out.read_bytes().splitlines()
    out.write_bytes(lines[0] + b"\n\x00\x00garbage\n" + b"\n".join(lines[1:]) + b"\n")
    res = caption(*imgs, "-o", out, "--model", model_dir, *FAST)
    assert res.exit_code == 0 and "resuming: 3 of 3" in res.stderr
    assert len(records(out)) == 3


def test_disk_full_leaves_only_whole_records(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    w = JournalWriter(out)
    w.write({"key": "a", "caption": "first"})
    real_write = os.write
    calls = []

    def half_then_enospc(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:10]))  # the kernel took part of the record, then the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", half_then_enospc)
    with pytest.raises(CaptionOutputError, match="No space left on device.*resume"):
        w.write({"key": "b", "caption": "second record, longer than ten bytes"})
    monkeypatch.setattr(os, "write", real_write)
    w.close()
    assert [json.loads(x) for x in out.read_text().splitlines()] == [{"key": "a", "caption": "first"}]


def test_unwritable_output_is_one_clear_error_before_any_work(tmp_path, model_dir):
    img = good_images(tmp_path / "imgs", 1)[0]
    (tmp_path / "afile").write_text("x")
    cases = [tmp_path / "afile" / "out.jsonl"]          # parent is a file: refused even for root
    if os.geteuid() != 0:                               # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        cases.append(ro / "out.jsonl")
    for out in cases:
        res = caption(img, "-o", out, "--model", model_dir, *FAST)
        assert res.exit_code == 1, res.output
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "out.jsonl" in lines[0], res.stderr
        assert "cannot open the output" in lines[0]


def test_second_job_on_the_same_output_is_refused(tmp_path, model_dir):
    img = good_images(tmp_path / "imgs", 1)[0]
    out = tmp_path / "out.jsonl"
    lock = _JobLock(out)                                # a first job, still running
    try:
        res = caption(img, "-o", out, "--model", model_dir, *FAST)
        assert res.exit_code == 1 and "another caption job is writing it" in res.stderr, res.output
    finally:
        lock.release()
    assert caption(img, "-o", out, "--model", model_dir, *FAST).exit_code == 0


def test_shards_split_a_job_between_machines(tmp_path, model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)                         # keys "imgs/good00.jpg"...: the same on every machine
    good_images(Path("imgs"), 6)
    keys = []
    for i in range(2):
        out = tmp_path / f"part{i}.jsonl"
        res = caption("imgs", "-o", out, "--shard", f"{i}/2", "--model", model_dir, *FAST)
        assert res.exit_code == 0, res.output
        keys.append({r["key"] for r in records(out)})
    assert keys[0] == {"imgs/good00.jpg", "imgs/good02.jpg", "imgs/good04.jpg", "imgs/good05.png"}
    assert keys[1] == {"imgs/good01.png", "imgs/good03.png"}
    res = caption("imgs", "--shard", "2/2", "--model", model_dir)
    assert res.exit_code == 1 and "need 0 <= i < n" in res.stderr


# --- fingerprints ---------------------------------------------------------------------------------

def test_fingerprint_covers_model_prompt_sampling_and_template(pair_f32, other_width_pair):
    base = WorkerConfig(llm_path=str(pair_f32.llm_path), mmproj_path=str(pair_f32.mmproj_path), prompt="Caption.")
    fp = caption_config(base).fingerprint()
    assert fp == caption_config(WorkerConfig(**vars(base))).fingerprint()
    variants = [dict(prompt="Describe."), dict(system="Be brief."), dict(max_tokens=64),
                dict(sampling=SamplingParams(temperature=0.7, seed=1)), dict(sampling=SamplingParams(top_k=5)),
                dict(engine=EngineOptions(template="plain")), dict(engine=EngineOptions(vision_backend="mtmd")),
                dict(llm_path=str(other_width_pair.llm_path)), dict(mmproj_path=str(other_width_pair.mmproj_path))]
    fps = {caption_config(WorkerConfig(**{**vars(base), **v})).fingerprint() for v in variants}
    assert fp not in fps and len(fps) == len(variants)
    assert caption_config(WorkerConfig(**{**vars(base), "parallel": 8})).fingerprint() == fp   # speed only


def test_resume_with_another_prompt_reuses_nothing(tmp_path, model_dir):
    imgs = good_images(tmp_path / "imgs", 3)
    out = tmp_path / "out.jsonl"
    assert caption(tmp_path / "imgs", "-o", out, "--model", model_dir, *FAST).exit_code == 0
    first = {r["key"]: r for r in records(out)}
    for extra in (["-p", "What is shown?"], ["-p", "What is shown?", "--temp", "0.8", "--seed", "3"]):
        res = caption(tmp_path / "imgs", "-o", out, "--model", model_dir, *FAST, *extra)
        assert res.exit_code == 0, res.output
        assert "3 recomputed" in res.stderr
        recs = records(out)
        assert sorted(r["key"] for r in recs) == sorted(map(str, imgs))    # replaced, not appended
        assert all(r["fingerprint"] != first[r["key"]]["fingerprint"] for r in recs)
        assert all(r["prompt"] == "What is shown?" for r in recs)
    fps = {r["fingerprint"] for r in recs}
    assert len(fps) == 1


# --- bad images -------------------------------------------------------------------------------------

def test_folder_with_every_bad_kind(tmp_path, model_dir):
    d = tmp_path / "mixed"
    d.mkdir()
    bad = _bad_images(d)                                    # empty, text, dir.jpg, truncated, bombs, tiff
    missing = bad.pop("missing")                            # cannot live in a folder: named on the command line
    for name, data in (("x.psd", fake_psd()), ("x.eps", fake_eps()), ("x.fits", fake_fits())):
        (d / name).write_bytes(data)
        bad[name] = d / name
    good = good_images(d, 5) + list(_odd_images(d).values())  # 1x1, 10000x20, RGBA, 16-bit, CMYK, GIF, EXIF
    out = tmp_path / "out.jsonl"
    res = caption(d, missing, "-o", out, "--model", model_dir, "--parallel", "4", *FAST)
    n_bad = len(bad) + 1
    assert res.exit_code == n_bad, res.output               # exit status = failed images
    recs = records(out)
    by_key = {r["key"]: r for r in recs}
    assert len(recs) == len(by_key) == len(good) + n_bad
    for p in good:
        assert by_key[str(p)]["status"] == "ok" and by_key[str(p)]["caption"], by_key[str(p)]
    for p in list(bad.values()) + [missing]:
        r = by_key[str(p)]
        assert r["status"] == "error" and r["caption"] is None and p.name in r["error"], r
    assert f"{len(good)} captioned, {n_bad} failed this run" in res.stderr
    assert res.stderr.count("failed: ") == min(n_bad, 10)
    res = caption(d, missing, "-o", out, "--model", model_dir, *FAST)   # resume: nothing to do, still failing
    assert res.exit_code == n_bad and f"{len(good) + n_bad} of {len(good) + n_bad} images done" in res.stderr
    assert len(records(out)) == len(recs)


def test_retry_failed_overwrite_csv_and_sidecars(tmp_path, model_dir):
    imgs = good_images(tmp_path / "imgs", 2)
    broken = tmp_path / "imgs" / "later.png"
    broken.write_bytes(b"not yet")
    out, table = tmp_path / "out.jsonl", tmp_path / "out.csv"
    (tmp_path / "imgs" / "good00.txt").write_text("a human caption")   # not ours: kept
    args = [tmp_path / "imgs", "-o", out, "--model", model_dir, *FAST, "--sidecar", "--csv", table]
    res = caption(*args)
    assert res.exit_code == 1 and (tmp_path / "imgs" / "good00.txt").read_text() == "a human caption"
    side = tmp_path / "imgs" / "good01.txt"
    assert side.read_text().strip() == {r["key"]: r for r in records(out)}[str(imgs[1])]["caption"]
    random_image(20, 20).save(broken, format="PNG")                   # fixed: only --retry-failed redoes it
    assert caption(*args).exit_code == 1
    res = caption(*args, "--retry-failed")
    assert res.exit_code == 0 and "1 captioned, 0 failed" in res.stderr
    recs = records(out)
    assert len(recs) == 3 and all(r["status"] == "ok" for r in recs)
    rows = list(csv.DictReader(table.open()))
    assert sorted(r["key"] for r in rows) == sorted(r["key"] for r in recs) and all(r["caption"] for r in rows)
    side.unlink()                                                     # killed before its sidecar was written
    res = caption(*args)
    assert res.exit_code == 0 and side.exists()
    res = caption(*args, "--overwrite")
    assert res.exit_code == 0 and "3 captioned" in res.stderr and len(records(out)) == 3
    assert side.exists() and (tmp_path / "imgs" / "good00.txt").read_text() != "a human caption"


# --- parallel decoding ------------------------------------------------------------------------------

def test_batch_decoder_matches_one_at_a_time_chat_answers(pair_f32):
    """BatchDecoder (shared prefix, 3 sequences, continuous batching) against Engine.ask."""
    from llava_local.runtime import engine as engine_mod
    from llava_local.runtime.batch_decode import BatchDecoder, SeqRequest
    from llava_local.errors import ContextOverflowError
    from llava_local.prompts.templates import Message
    from llava_local.prompts.turns import user_content
    from llava_local.runtime.sampling import Sampler
    imgs = [random_image(30 + 7 * i, 40, seed=i) for i in range(5)]
    lengths = [3, 9, 5, 12, 1]                          # sequences finish at different steps
    ref = engine_mod.Engine(pair_f32, vision_backend="mtmd", threads=1)
    want = [ref.ask("Describe it.", [im], max_tokens=n).tokens for im, n in zip(imgs, lengths)]
    ref.close()
    eng = engine_mod.Engine(pair_f32, vision_backend="mtmd", threads=1, n_ctx=512, n_seq_max=3)
    # the caption worker's prompt: the prompt builder's ids before and after the image
    prefix, suffix = eng.prompt.parts([Message("user", user_content("Describe it.", 1))], n_images=1)
    llm = eng.llm
    dec = BatchDecoder(llm, prefix, n_seq=3)
    emb = eng.encode_images(imgs)
    reqs = [SeqRequest(str(i), [emb[i], suffix], Sampler(SamplingParams()), n)
            for i, n in enumerate(lengths)]
    got = dec.generate(reqs)
    assert [r.tokens for r in got] == want
    assert all(r.finish_reason == "length" for r in got) and not dec.active and dec.n_free == 3
    with pytest.raises(ContextOverflowError, match="raise --ctx"):   # image + answer do not fit n_ctx 512
        dec.admit(SeqRequest("big", [emb[0], suffix], Sampler(SamplingParams()), 512 - len(prefix)))
    eng.close()


def test_greedy_captions_identical_with_parallel_1_and_8(tmp_path, model_dir):
    good_images(tmp_path / "imgs", 12)
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tmp_path / "imgs" / "tiny.png")
    runs = {}
    for n in (1, 8):
        out = tmp_path / f"p{n}.jsonl"
        res = caption(tmp_path / "imgs", "-o", out, "--model", model_dir, "--parallel", n,
                      "--vision-backend", "mtmd", "--threads", "1", "--max-tokens", "24")
        assert res.exit_code == 0, res.output
        assert f"parallel {n}" in res.stderr
        runs[n] = {r["key"]: (r["caption"], r["n_tokens"]) for r in records(out)}
        # each record names what ran (--vision-device and -ngl were auto: resolved on this CPU build)
        assert {(r["vision_backend"], r["vision_device"], r["llm_device"]) for r in records(out)} == \
            {("mtmd", "cpu", "cpu")}
    assert len(runs[1]) == 13 and runs[1] == runs[8]


def test_seeded_sampling_is_reproducible_and_differs_per_image(tmp_path, model_dir):
    good_images(tmp_path / "imgs", 6)
    runs = []
    for k in range(2):
        out = tmp_path / f"s{k}.jsonl"
        res = caption(tmp_path / "imgs", "-o", out, "--model", model_dir, "--parallel", "4", *FAST,
                      "--temp", "0.9", "--seed", "42")
        assert res.exit_code == 0, res.output
        runs.append({r["key"]: r["caption"] for r in records(out)})
    assert runs[0] == runs[1] and len(set(runs[0].values())) == 6   # one seed per image, derived from its key
