"""`caption --ray` and llava_local.caption.ray_job on a real Ray cluster: two nodes of
`ray.cluster_utils.Cluster` on this machine (2 CPUs each), the demo model, 200 tiny images of which
three are bad. Every job runs in a driver process of its own (the CLI, or a short script using the
Python API), as users run it; outputs are counted from the raw JSONL lines and Parquet rows.

These tests need the [ray] extra (`make test-slow` installs it); without Ray they fail. The one fast
test checks that the single-machine path never imports Ray.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import random_image
from llava_local.cli.main import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["--vision-backend", "mtmd", "--threads", "1", "--max-tokens", "8"]
N_IMAGES = 200
BAD = {"img017.png": "truncated", "img088.jpg": "not an image", "img150.png": "empty"}
BLOCK = 16
RAY_ARGS = ["--ray-actors", "2", "--block-size", str(BLOCK)]
DRIVER_TIMEOUT_S = 420


def make_images(d: Path) -> list[str]:
    """200 tiny images (the keys as `caption imgs` names them, relative to d's parent), 3 of them bad."""
    d.mkdir(parents=True, exist_ok=True)
    for i in range(N_IMAGES):
        name = f"img{i:03d}.{'jpg' if i % 4 == 0 else 'png'}"
        if name in BAD:
            continue
        random_image(20 + i % 13, 24 + i % 7, seed=500 + i).save(d / name)
    buf = io.BytesIO()
    random_image(40, 40, seed=1).save(buf, format="PNG")
    (d / "img017.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "img088.jpg").write_text("not a JPEG at all")
    (d / "img150.png").write_bytes(b"")
    return sorted(f"{d.name}/{p.name}" for p in d.iterdir())


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster            # no Ray: this fails (the test does not skip)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    c.add_node(num_cpus=2)
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-caption")
    return root, make_images(root / "imgs")


@pytest.fixture(scope="module")
def single(work):
    """The single-machine `caption --parallel 1` records, by key: the reference."""
    root, _ = work
    cwd = os.getcwd()
    os.chdir(root)
    try:
        res = CliRunner().invoke(main, ["caption", "imgs", "-o", "single.jsonl", "--parallel", "1", *FAST])
    finally:
        os.chdir(cwd)
    assert res.exit_code == len(BAD), res.output
    return {r["key"]: r for r in map(json.loads, (root / "single.jsonl").read_text().splitlines())}


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def caption_cli(root: Path, address: str, out: str, *extra) -> list[str]:
    return [sys.executable, "-m", "llava_local.cli.main", "caption", "imgs", "-o", out, "--ray", address,
            "--parallel", "1", *RAY_ARGS, *FAST, *extra]


def run_script(root: Path, code: str) -> dict:
    """A driver using the Python API; it leaves its findings as JSON in RESULT (Ray's own log lines
    may reach its stdout at any time)."""
    script, result = root / "driver.py", root / "driver-result.json"
    script.write_text(f"from pathlib import Path\nRESULT = Path({str(result)!r})\n" + textwrap.dedent(code))
    result.unlink(missing_ok=True)
    res = subprocess.run([sys.executable, str(script)], cwd=root, env=env(), capture_output=True, text=True,
                         timeout=DRIVER_TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(result.read_text())


def jsonl_lines(out: Path) -> list[dict]:
    """Every line of every block, parsed with json (not our reader)."""
    return [json.loads(line) for p in sorted(out.glob("part-*.jsonl")) for line in p.read_text().splitlines()]


def block_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*")}


def assert_bad_ones_are_error_records(by_key: dict, key_of=lambda name: f"imgs/{name}"):
    for name in BAD:
        r = by_key[key_of(name)]
        assert r["status"] == "error" and r["caption"] is None and name in r["error"], r


# --- fast: the single-machine path stays free of Ray ----------------------------------------------

def test_single_machine_caption_never_imports_ray(tmp_path):
    random_image(30, 30).save(tmp_path / "a.png")
    code = f"""
        import sys
        from click.testing import CliRunner
        from llava_local.cli.main import main
        res = CliRunner().invoke(main, ["caption", {str(tmp_path / 'a.png')!r}, "-o", {str(tmp_path / 'o.jsonl')!r},
                                        *{FAST!r}])
        assert res.exit_code == 0, res.output
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "pyarrow")
                        or m.startswith("llava_local.caption.ray") or m == "llava_local.caption.blocks")
        assert not loaded, loaded
        sys.modules["ray"] = None                     # as if the [ray] extra were not installed
        res = CliRunner().invoke(main, ["caption", {str(tmp_path / 'a.png')!r}, "--ray", "local", *{FAST!r}])
        print(res.exit_code, res.stderr)
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    code, _, err = res.stdout.partition(" ")
    assert code == "1" and err.strip().startswith("Error: captioning on Ray needs Ray Data: pip install "
                                                  "'llava-local[ray]'"), res.stdout


# --- slow: a two-node cluster ---------------------------------------------------------------------

@pytest.mark.slow
def test_every_key_once_and_captions_equal_single_machine(cluster, work, single):
    root, keys = work
    cmd = caption_cli(root, cluster.address, "out.jsonl")
    res = subprocess.run(cmd, cwd=root, env=env(), capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)
    assert res.returncode == len(BAD), res.stderr          # exit status: the failed images
    out = root / "out.jsonl"
    lines = jsonl_lines(out)
    assert len(lines) == N_IMAGES and sorted(r["key"] for r in lines) == keys     # every key exactly once
    by_key = {r["key"]: r for r in lines}
    good = [k for k in keys if k.split("/")[1] not in BAD]
    for k in good:
        mine, ref = by_key[k], single[k]
        assert mine["status"] == "ok" and (mine["caption"], mine["n_tokens"]) == (ref["caption"], ref["n_tokens"]), k
        assert {f: mine[f] for f in ("fingerprint", "model", "prompt", "vision_backend", "vision_device")} == \
            {f: ref[f] for f in ("fingerprint", "model", "prompt", "vision_backend", "vision_device")}
        assert set(mine) == set(ref)                         # the same record fields
    assert_bad_ones_are_error_records(by_key)
    blocks = sorted(out.glob("part-*.jsonl"))
    assert len(blocks) == -(-N_IMAGES // BLOCK) and all(b.name.startswith(f"part-{lines[0]['fingerprint']}-")
                                                         for b in blocks)
    err = res.stderr
    assert f"{N_IMAGES - len(BAD)} captioned, {len(BAD)} failed this run" in err, err
    assert "parallel 1 per actor; 2 actors" in err and "images/s" in err and "ETA" in err, err
    before = block_stats(out)
    res = subprocess.run(cmd, cwd=root, env=env(), capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)
    assert res.returncode == len(BAD), res.stderr
    assert f"resuming: {N_IMAGES} of {N_IMAGES} images done before, 0 to caption" in res.stderr, res.stderr
    assert block_stats(out) == before                        # nothing recomputed, nothing rewritten


@pytest.mark.slow
def test_bytes_dataset_to_parquet_with_the_python_api(cluster, work, single):
    root, keys = work
    got = run_script(root, f"""
        import dataclasses, json
        import ray
        from llava_local.caption.ray_job import RayOptions, caption_dataset, run_captions
        from llava_local.runtime.options import EngineOptions
        ray.init(address={cluster.address!r})
        ds = ray.data.read_binary_files({str(root / 'imgs')!r}, include_paths=True)    # rows: path, bytes
        kw = dict(parallel=1, max_tokens=8, engine=EngineOptions(threads=1, vision_backend="mtmd"))
        lazy = caption_dataset(ds.limit(3), options=RayOptions(actors=1), **kw)         # nothing runs yet
        taken = lazy.take_all()
        summary = run_captions(ds, "out.parquet", options=RayOptions(actors=2, block_size={BLOCK}), **kw)
        stats = lambda: sorted((p.name, p.stat().st_mtime_ns) for p in Path("out.parquet").iterdir())
        before = stats()
        again = run_captions(ds, "out.parquet", options=RayOptions(actors=2, block_size={BLOCK}), **kw)  # resumes
        RESULT.write_text(json.dumps({{"taken": taken, "summary": dataclasses.asdict(summary),
                                      "again": dataclasses.asdict(again), "unchanged": stats() == before}},
                                     default=str))
    """)
    import pyarrow.parquet as pq
    table = pq.read_table(root / "out.parquet")              # the folder of blocks as one Parquet dataset
    rows = table.to_pylist()
    assert table.num_rows == N_IMAGES and len({r["key"] for r in rows}) == N_IMAGES
    by_name = {Path(r["key"]).name: r for r in rows}
    assert sorted(f"imgs/{n}" for n in by_name) == keys
    for name, r in by_name.items():
        if name not in BAD:
            assert r["status"] == "ok" and r["caption"] == single[f"imgs/{name}"]["caption"], r
            assert r["fingerprint"] == single[f"imgs/{name}"]["fingerprint"]
    assert_bad_ones_are_error_records(by_name, key_of=lambda name: name)   # named by their path, not "<bytes>"
    s = got["summary"]
    assert (s["total"], s["captioned"], s["failed"], s["done_before"]) == (N_IMAGES, N_IMAGES - len(BAD), len(BAD), 0)
    assert s["blocks"] == len(list((root / "out.parquet").glob("part-*.parquet")))
    a = got["again"]                                          # the rerun skips every committed key
    assert (a["done_before"], a["failed_before"], a["captioned"], a["failed"], a["blocks"]) == \
        (N_IMAGES - len(BAD), len(BAD), 0, 0, 0) and got["unchanged"]
    assert len(got["taken"]) == 3 and all(
        t["caption"] == single[f"imgs/{Path(t['key']).name}"]["caption"] for t in got["taken"] if t["status"] == "ok")


@pytest.mark.slow                                  # fast, but pyarrow comes with the [ray] extra
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_plan_skips_committed_keys_and_drops_stale_records(tmp_path, suffix):
    from llava_local.caption.blocks import BlockStore, records_table
    from llava_local.caption.job import JobSummary
    from llava_local.caption.ray_plan import plan_job
    from llava_local.caption.worker import CaptionItem

    def rec(key, fp="A", status="ok", prompt="p"):
        return {"key": key, "path": key, "status": status, "caption": "c" if status == "ok" else None,
                "error": None if status == "ok" else "bad", "fingerprint": fp, "prompt": prompt}

    def keys_in(store):
        return sorted(r["key"] for n in store.names() for r in store.read(n))

    store = BlockStore(tmp_path / f"out{suffix}")
    first = store.commit(records_table([rec("a"), rec("b"), rec("c", status="error")]), "A")
    store.commit(records_table([rec("d", fp="B", prompt="q"), rec("e")]), "A")
    store.commit(records_table([rec("a"), rec("x")]), "A")      # "a" twice: the plan repairs it
    (store.root / f".{first}.123.tmp").write_bytes(b"half")     # a commit cut short
    items = [CaptionItem(k, k) for k in "abcdef"]
    s = JobSummary()
    plan = plan_job(store, items, "A", "p", s, retry_failed=False, overwrite=False)
    assert [it.key for it in plan.todo] == ["d", "f"] and plan.skip == {"a", "b", "c", "e", "x"}
    assert (s.done_before, s.failed_before, s.replaced) == (3, 1, 1)
    assert keys_in(store) == ["a", "b", "c", "e", "x"]          # d (another prompt) dropped, a once, x kept
    assert not list(store.root.glob(".part-*"))
    assert {r["key"]: r for n in store.names() for r in store.read(n)}["a"] == rec("a")   # kept as it was
    plan = plan_job(store, items, "A", "p", JobSummary(), retry_failed=True, overwrite=False)
    assert [it.key for it in plan.todo] == ["c", "d", "f"] and keys_in(store) == ["a", "b", "e", "x"]
    plan = plan_job(store, None, "A", "p", JobSummary(), retry_failed=False, overwrite=False)   # a Dataset
    assert plan.todo is None and plan.skip == {"a", "b", "e", "x"}
    plan_job(store, items, "A", "p", JobSummary(), retry_failed=False, overwrite=True)
    assert store.names() == []


HOOK = """\
import json, os, signal, time
from pathlib import Path
from llava_local.caption import worker

STATE, OUT, POISON, AFTER = Path({state!r}), Path({out!r}), {poison!r}, {after}
_encode = worker._Worker._encode


def _encode_hooked(self, batch):
    with open(STATE / "encoded.log", "a") as f:       # one line per image encoded: when, which actor
        f.write("".join(f"{{time.time()}} {{os.getppid()}} {{item.key}}\\n" for item, _, _ in batch))
    if any(item.key == POISON for item, _, _ in batch):
        os.abort()                                    # llama.cpp's failed assertion, on this image every time
    blocks = {{p.name: [p.stat().st_ino, p.stat().st_mtime_ns] for p in OUT.glob("part-*")}} if OUT.is_dir() else {{}}
    if len(blocks) >= AFTER:
        try:
            fd = os.open(STATE / "killed.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return _encode(self, batch)
        os.write(fd, json.dumps({{"time": time.time(), "actor": os.getppid(), "blocks": blocks}}).encode())
        os.close(fd)
        os.kill(os.getppid(), signal.SIGKILL)         # the Ray actor (this worker's parent), mid-block
        time.sleep(60)                                # PR_SET_PDEATHSIG ends this worker with it
    return _encode(self, batch)


worker._Worker._encode = _encode_hooked
"""


@pytest.mark.slow
def test_actor_sigkilled_mid_job(cluster, work):
    """One actor SIGKILLed mid-block (after 4 commits) and a poison image that aborts the engine: the
    job completes, every key once, the poison is an error record, and nothing committed is recomputed:
    the blocks committed at the kill are untouched and none of their keys is encoded after it."""
    root, keys = work
    state, out, poison = root / "kill-state", root / "killed.jsonl", "imgs/img101.png"
    state.mkdir()
    (state / "sitecustomize.py").write_text(HOOK.format(state=str(state), out=str(out), poison=poison, after=4))
    s = run_script(root, f"""
        import dataclasses, json
        import ray
        from llava_local.caption.inputs import discover_inputs
        from llava_local.caption.ray_job import RayOptions, run_captions
        from llava_local.runtime.options import EngineOptions
        ray.init(address={cluster.address!r}, runtime_env={{"env_vars": {{"PYTHONPATH": {str(state)!r}}}}})
        summary = run_captions(discover_inputs(["imgs"]), {str(out)!r}, parallel=2, max_tokens=8,
                               engine=EngineOptions(threads=1, vision_backend="mtmd"),
                               options=RayOptions(actors=2, block_size={BLOCK}))
        RESULT.write_text(json.dumps(dataclasses.asdict(summary), default=str))
    """)
    killed = json.loads((state / "killed.json").read_text())
    lines = jsonl_lines(out)
    assert sorted(r["key"] for r in lines) == keys                          # every key exactly once
    by_key = {r["key"]: r for r in lines}
    assert by_key[poison]["status"] == "error" and "SIGABRT" in by_key[poison]["error"], by_key[poison]
    assert_bad_ones_are_error_records(by_key)
    assert (s["captioned"], s["failed"]) == (N_IMAGES - len(BAD) - 1, len(BAD) + 1) and s["restarts"] >= 1
    assert s["info"]["actors"] >= 3                                          # the two, and the killed one's restart
    # nothing committed before the kill was touched or recomputed
    assert len(killed["blocks"]) >= 4
    assert {n: list(v) for n, v in block_stats(out).items() if n in killed["blocks"]} == killed["blocks"]
    committed = {r["key"] for n in killed["blocks"] for r in map(json.loads, (out / n).read_text().splitlines())}
    encodes: dict[str, list[float]] = {}
    for line in (state / "encoded.log").read_text().splitlines():
        t, _, key = line.split(" ", 2)
        encodes.setdefault(key, []).append(float(t))
    assert not [k for k in committed if any(t > killed["time"] for t in encodes.get(k, []))]   # bad ones: never
    # only the killed actor's block in flight was encoded again (by its restarted actor)
    again = {k for k, ts in encodes.items() if len(ts) > 1 and k != poison}
    assert 1 <= len(again) <= BLOCK and not again & committed, again


@pytest.mark.slow
def test_driver_killed_then_rerun(cluster, work):
    root, keys = work
    out = root / "rerun.jsonl"
    cmd = caption_cli(root, cluster.address, out.name)
    proc = subprocess.Popen(cmd, cwd=root, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + DRIVER_TIMEOUT_S
    while len(block_stats(out)) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    at_kill = block_stats(out)                               # the driver commits: nothing changes after its death
    done = len(jsonl_lines(out))
    assert 4 <= len(at_kill) < -(-N_IMAGES // BLOCK) and done >= 3 * BLOCK
    res = subprocess.run(cmd, cwd=root, env=env(), capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)
    assert res.returncode == len(BAD), res.stderr
    assert f"resuming: {done} of {N_IMAGES} images done before, {N_IMAGES - done} to caption" in res.stderr
    lines = jsonl_lines(out)
    assert sorted(r["key"] for r in lines) == keys                          # every key exactly once
    assert {n: v for n, v in block_stats(out).items() if n in at_kill} == at_kill   # committed blocks kept as they were
    assert not list(out.glob(".part-*"))                                    # a commit cut short: cleaned up
    assert_bad_ones_are_error_records({r["key"]: r for r in lines})


@pytest.mark.slow
def test_model_files_missing_on_nodes_is_one_clear_error(cluster, work):
    """Every node checks the model files before any actor starts (one error naming each node); an
    actor whose node lacks them (a node that joined later) fails the job with the same one line."""
    root, _ = work
    got = run_script(root, f"""
        import json
        import ray
        import dataclasses
        from llava_local.caption.ray_actors import domain_error, prepare, preflight, records_dataset
        from llava_local.caption.ray_job import Columns, RayOptions, worker_config
        from llava_local.errors import ModelFilesError
        from llava_local.runtime.options import EngineOptions
        ray.init(address={cluster.address!r})
        out = {{}}
        try:
            preflight({{"/nowhere/m-llm.gguf": "m-llm.gguf:1:0"}}, None)
        except ModelFilesError as exc:
            out["preflight"] = str(exc)
        worker, pair = worker_config(None, parallel=1, max_tokens=8,
                                     engine=EngineOptions(threads=1, vision_backend="mtmd"))
        prep = prepare(worker, pair, RayOptions())
        ident = dict(prep.identity)
        ident[next(iter(ident))] = "another:1:0"                 # this node's file is not the driver's
        bad = dataclasses.replace(prep, identity=ident)
        ds = ray.data.from_items([{{"key": "imgs/img001.png", "path": "imgs/img001.png"}}])
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            records_dataset(ds, bad, Columns("key", "path", None), RayOptions(actors=1)).take_all()
        except ray.exceptions.RayError as exc:
            out["actor"] = str(domain_error(exc))
        RESULT.write_text(json.dumps(out))
    """)
    msg = got["preflight"]
    assert msg.startswith("2 of 2 Ray nodes cannot run the job") and msg.count("/nowhere/m-llm.gguf: no such model "
                                                                               "file") == 2, msg
    assert "\n" not in got["actor"] and "Ray node" in got["actor"] and "not the driver's file" in got["actor"], got

