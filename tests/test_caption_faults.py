"""`llava-local caption` under faults (RELIABILITY.md "Long-running work"): a worker that aborts or
is OOM-killed on one image, and the whole job killed with SIGKILL at random moments, then resumed.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import random_image
from llava_local.cli.main import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["--vision-backend", "mtmd", "--threads", "1"]

# Loaded by every Python process started with `hook_dir` first on PYTHONPATH: the caption worker is a
# multiprocessing spawn child and inherits the job's environment. It wraps the worker's encode step
# so that a batch holding the victim's key kills the process: os.abort() (what llama.cpp does on a
# failed assertion) or the named signal (SIGKILL: the OOM killer; SIGSEGV: a crashing decoder).
CRASH_HOOK = """\
import os, signal, sys
sys.path.insert(0, {repo!r})
from llava_local.caption import worker

_encode = worker._Worker._encode

def _encode_or_crash(self, batch):
    if any(item.key == {victim!r} for item, _, _ in batch):
        if {sig!r}:
            os.kill(os.getpid(), signal.Signals[{sig!r}])
        os.abort()
    return _encode(self, batch)

worker._Worker._encode = _encode_or_crash
"""


def crash_env(hook_dir: Path, victim: str, sig: str | None) -> dict:
    """The environment of a job whose worker dies when it is about to encode `victim`."""
    hook_dir.mkdir(parents=True, exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(CRASH_HOOK.format(repo=str(REPO), victim=victim, sig=sig))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def model_dir(pair_f32):
    return pair_f32.llm_path.parent


def make_images(d: Path, n: int) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        random_image(24 + i % 17, 30, seed=100 + i).save(d / f"img{i:03d}.png")
    return sorted(str(d / f"img{i:03d}.png") for i in range(n))


@pytest.mark.parametrize("how", ["abort", "SIGKILL", "SIGSEGV"])
def test_worker_dying_on_one_image_fails_only_that_image(tmp_path, model_dir, how):
    keys = make_images(tmp_path / "imgs", 10)
    victim = keys[5]
    out = tmp_path / "out.jsonl"
    env = crash_env(tmp_path / "hook", victim, None if how == "abort" else how)
    res = CliRunner().invoke(main, ["caption", str(tmp_path / "imgs"), "-o", str(out), "--model", str(model_dir),
                                    "--parallel", "4", "--max-tokens", "6", *FAST], env=env)
    assert res.exit_code == 1, res.output
    recs = {r["key"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(recs) == keys
    bad = recs.pop(victim)
    sig = "SIGABRT" if how == "abort" else how
    assert bad["status"] == "error" and sig in bad["error"] and "img005.png" in bad["error"], bad
    assert all(r["status"] == "ok" for r in recs.values())
    assert "9 captioned, 1 failed this run" in res.stderr and "worker restarted" in res.stderr


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def _whole_lines(path: Path) -> tuple[list[dict], bool]:
    """Every complete line parsed (a parse error fails the test); and whether a torn tail follows."""
    if not path.exists():
        return [], False
    data = path.read_bytes()
    lines = data.split(b"\n")
    return [json.loads(x) for x in lines[:-1]], lines[-1] != b""


def _kill_and_resume(tmp_path: Path, model_dir: Path, n_kills: int, n_images: int, seed: int):
    keys = make_images(tmp_path / "imgs", n_images)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "llava_local.cli.main", "caption", str(tmp_path / "imgs"), "-o", str(out),
           "--model", str(model_dir), "--parallel", "2", "--max-tokens", "32", *FAST]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(seed)
    snapshots: list[dict[str, dict]] = []
    kills = 0
    for k in range(n_kills):
        before, _ = _whole_lines(out)
        log = open(tmp_path / f"run{k}.err", "w")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
        t0 = time.monotonic()
        if rng.random() < 0.25:                      # any moment: start-up, planning, model load, work
            time.sleep(rng.uniform(0, 1.5))
        else:                                        # while records are being written
            target = min(len(before) + rng.randint(0, 2), n_images - 1)
            while proc.poll() is None and len(_whole_lines(out)[0]) < target and time.monotonic() - t0 < 60:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.15))            # mid-batch, mid-answer, between records
        children = _children(proc.pid)
        if proc.poll() is not None:
            log.close()
            break                                    # finished before the kill: no more moments to try
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
        kills += 1
        deadline = time.monotonic() + 10             # the worker dies with the job (PR_SET_PDEATHSIG)
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(c) for c in children), "a worker outlived the killed job"
        recs, torn = _whole_lines(out)               # every whole line parses
        assert len({r["key"] for r in recs}) == len(recs), "a key was written twice"
        snapshots.append({r["key"]: r for r in recs})
        err = (tmp_path / f"run{k}.err").read_text()
        if k and "resuming:" in err:                 # skipped exactly what the previous kill left
            assert f"resuming: {len(snapshots[-2])} of {n_images}" in err, err
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    final, torn = _whole_lines(out)
    assert not torn
    assert sorted(r["key"] for r in final) == keys                       # every key exactly once
    by_key = {r["key"]: r for r in final}
    for snap in snapshots:                                               # finished work never recomputed
        for key, rec in snap.items():
            assert by_key[key] == rec
    done = len(snapshots[-1]) if snapshots else 0
    if done:
        assert f"resuming: {done} of {n_images} images done before, {n_images - done} to caption" in res.stderr
    assert all(r["status"] == "ok" for r in final)
    return kills, [len(s) for s in snapshots]


def test_sigkill_20_times_then_resume(tmp_path, model_dir):
    """RELIABILITY.md: SIGKILL at 20 random moments (start-up, model load, mid-batch, mid-write),
    resuming each time: every key once, every line parses, nothing finished is recomputed."""
    kills, progress = _kill_and_resume(tmp_path, model_dir, n_kills=20, n_images=120, seed=2)
    assert kills == 20, progress
    assert len(set(progress)) > 10, progress    # the kills landed all along the job
