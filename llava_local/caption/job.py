"""Offline batch captioning as a library: the job's fingerprint, resume, shards and exports around
the crash-safe journal (journal.py) and the supervised worker process (supervisor.py, worker.py).
`llava-local caption` (cli/caption.py) is a thin layer.

    items = discover_inputs(["photos/", "more/*.png", "list.txt", "meta.jsonl"])
    worker = WorkerConfig(llm_path="out/m-llm-F16.gguf", mmproj_path="out/m-mmproj-F16.gguf",
                          prompt=PROMPTS["short"], parallel=8, engine=EngineOptions(threads=8))
    summary = run_job(CaptionJob(items, Path("captions.jsonl"), worker), on_record=print)
    print(summary.captioned, summary.n_failed, summary.images_per_s)

The output JSONL is the job's journal: one whole record per line (key, path, status, caption or
error, fingerprint, model, prompt, timings). On resume a torn last line is cut off, unparsable
lines are dropped, and keys already done with the same fingerprint are skipped; records made with
another fingerprint (model files, prompt, sampling, template, backend) are never reused: they are
recomputed and replaced. `--retry-failed` redoes error records; `--overwrite` starts afresh.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from llava_local.caption.export import Sidecars, check_sidecar_names, export_csv
from llava_local.caption.inputs import in_shard
from llava_local.caption.journal import (FSYNC_INTERVAL_S, CaptionOutputError, JournalState, JournalWriter,
                                         read_journal, rewrite_journal, write_whole)
from llava_local.caption.supervisor import WorkerSupervisor
from llava_local.caption.worker import CaptionItem, WorkerConfig, resolve_worker

if TYPE_CHECKING:
    from llava_local.runtime.model_pair import ModelPair

log = logging.getLogger(__name__)

QUICK_HASH_BYTES = 1 << 20                  # model identity: size + hash of the first and last MiB


# --------------------------------------------------------------------------------------------------
# The job's identity
# --------------------------------------------------------------------------------------------------

def file_identity(path: str | os.PathLike) -> str:
    """name, size and a hash of the first and last MiB: cheap on a 4 GB GGUF, changes when the
    file is re-quantized or re-converted (its header or tensor data differ), stable across copies."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(QUICK_HASH_BYTES))
        if size > QUICK_HASH_BYTES:
            f.seek(max(QUICK_HASH_BYTES, size - QUICK_HASH_BYTES))
            h.update(f.read(QUICK_HASH_BYTES))
    return f"{p.name}:{size}:{h.hexdigest()[:16]}"


@dataclass(frozen=True)
class CaptionConfig:
    """Everything that decides a caption; its hash is the `fingerprint` in every record."""
    llm: str                   # file_identity of the LLM GGUF
    mmproj: str                # file_identity of the mmproj GGUF (+ --image-max-tiles: LLaVA-1.6's tiling)
    prompt: str
    system: str | None
    template: str | None       # --template override (else the GGUF's, covered by `llm`)
    vision_backend: str        # as resolved (never "auto"): backends differ (mtmd has upstream #25814)
    vision_device: str         # "cpu" or "gpu", as resolved: kernels differ in rounding
    llm_device: str            # "cpu" or "gpu" (any layer offloaded), as resolved
    sampling: dict             # SamplingParams fields + max_tokens (+ ignore_eos, json_schema when set)

    def fingerprint(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def llm_device(worker: WorkerConfig) -> str:
    """"gpu" when any LLM layer is offloaded (after resolve_worker), else "cpu"."""
    layers = worker.engine.gpu_layers
    return "gpu" if isinstance(layers, int) and layers > 0 else "cpu"


def caption_config(worker: WorkerConfig) -> CaptionConfig:
    eng = worker.engine
    tiles = f" tiles<={eng.image_max_tiles}" if eng.image_max_tiles is not None else ""
    return CaptionConfig(llm=file_identity(worker.llm_path), mmproj=file_identity(worker.mmproj_path) + tiles,
                         prompt=worker.prompt, system=worker.system, template=eng.template,
                         vision_backend=eng.vision_backend, vision_device=eng.vision_device,
                         llm_device=llm_device(worker),
                         sampling={**dataclasses.asdict(worker.sampling), "max_tokens": worker.max_tokens,
                                   **({"ignore_eos": True} if worker.ignore_eos else {}),
                                   **({"json_schema": worker.json_schema} if worker.json_schema is not None else {})})


# --------------------------------------------------------------------------------------------------
# Plan and run
# --------------------------------------------------------------------------------------------------

@dataclass
class CaptionJob:
    items: list[CaptionItem]
    output: Path
    worker: WorkerConfig
    config: CaptionConfig | None = None     # default: caption_config(worker)
    retry_failed: bool = False
    overwrite: bool = False
    shard: tuple[int, int] | None = None
    csv_path: Path | None = None
    sidecar_ext: str | None = None          # e.g. ".txt": the caption next to each image
    fsync_interval: float = FSYNC_INTERVAL_S
    stall_timeout: float | None = None      # None: the supervisor's default
    pair: ModelPair | None = None           # the worker's files, resolved by the caller (the CLI); None: here


@dataclass
class JobSummary:
    total: int = 0                # items in this job (after --shard)
    done_before: int = 0          # skipped: captioned by an earlier run with the same fingerprint
    failed_before: int = 0        # skipped: failed in an earlier run (use --retry-failed)
    replaced: int = 0             # records of another fingerprint, recomputed
    captioned: int = 0            # captioned by this run
    failed: int = 0               # failed in this run
    elapsed_s: float = 0.0        # this run, model loading included
    load_s: float = 0.0           # model loading (all worker starts)
    restarts: int = 0             # worker processes that died and were replaced
    blocks: int = 0               # Ray jobs (ray_job.py): blocks committed by this run
    worker_cpu_s: float = 0.0     # CPU seconds of the worker(s), model load excluded
    info: dict = field(default_factory=dict)   # vision backend, effective parallel, n_ctx
    failures: list[tuple[str, str]] = field(default_factory=list)   # (path, error) of every failed item
    fingerprint: str = ""

    @property
    def n_failed(self) -> int:
        """Failed items of this job, this run or earlier (the exit code reports it)."""
        return self.failed + self.failed_before

    @property
    def images_per_s(self) -> float:
        work = self.elapsed_s - self.load_s
        return (self.captioned + self.failed) / work if work > 0 else 0.0


def judge_record(rec: dict | None, fingerprint: str, retry_failed: bool, summary: JobSummary) -> str:
    """What resume does with an item whose earlier record is `rec` (None: none), counted in `summary`:
    "new" (caption it), "keep" (done, or failed without --retry-failed) or "drop" (recompute it
    and drop `rec`: another fingerprint, or failed with --retry-failed)."""
    if rec is None:
        return "new"
    if rec.get("fingerprint") != fingerprint:
        summary.replaced += 1
        return "drop"
    if rec.get("status") == "ok":
        summary.done_before += 1
        return "keep"
    if retry_failed:
        return "drop"
    summary.failed_before += 1
    summary.failures.append((rec.get("path", rec["key"]), rec.get("error") or "failed"))
    return "keep"


def warn_replaced(output, summary: JobSummary, stale_prompt: bool) -> None:
    if summary.replaced:
        log.warning("%s: %d records were made with another %s; they are recomputed and replaced",
                    output, summary.replaced, "prompt" if stale_prompt else "model, sampling, template or backend")


def record_stamp(worker: WorkerConfig, fingerprint: str) -> dict:
    """What every record of the job carries besides the worker's fields (before its "time")."""
    return {"fingerprint": fingerprint, "model": Path(worker.llm_path).name, "prompt": worker.prompt,
            "vision_backend": worker.engine.vision_backend, "vision_device": worker.engine.vision_device,
            "llm_device": llm_device(worker)}


def record_time() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _plan(job: CaptionJob, fingerprint: str, summary: JobSummary):
    """Repair the journal, decide what to redo. Returns (items to do, records kept by key, every
    previous record by key)."""
    path = Path(job.output)
    state = JournalState([], 0, False, 0) if job.overwrite else read_journal(path)
    last: dict[str, dict] = {}
    for rec in state.records:
        last[rec["key"]] = rec
    todo, drop = [], set()
    stale_prompt = False
    for it in job.items:
        rec = last.get(it.key)
        verdict = judge_record(rec, fingerprint, job.retry_failed, summary)
        if verdict != "keep":
            todo.append(it)
        if verdict == "drop":
            drop.add(it.key)
            stale_prompt |= rec.get("prompt") != job.worker.prompt
    warn_replaced(path, summary, stale_prompt)
    duplicates = len(state.records) != len(last)
    if job.overwrite and path.exists():
        write_whole(path, b"")
    elif drop or state.bad_lines or duplicates:
        # rewrite without the dropped, unparsable and superseded records: every key at most once
        if state.bad_lines:
            log.warning("%s: %d unparsable lines dropped", path, state.bad_lines)
        rewrite_journal(path, [r for r in last.values() if r["key"] not in drop])
    elif state.torn_tail:
        log.warning("%s: the last line was cut off (the job was killed mid-write); dropping it", path)
        try:
            os.truncate(path, state.good_bytes)
        except OSError as exc:
            raise CaptionOutputError(f"{path}: cannot repair the output ({exc.strerror or exc})") from None
    return todo, {k: r for k, r in last.items() if k not in drop}, last


class _JobLock:
    """One job per output file: a second `caption -o same.jsonl` would redo the first one's work.
    flock on a hidden file next to the output (the output itself may be replaced by _plan); the
    kernel releases it when the process dies, however it dies."""

    def __init__(self, output: Path):
        self.path = output.with_name(f".{output.name}.lock")
        self.fd = None
        try:
            if not os.path.lexists(output.parent):
                output.parent.mkdir(parents=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CaptionOutputError(f"{output}: cannot open the output for writing ({exc.strerror or exc})") from None
        try:
            import fcntl
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:      # no flock (Windows): one job per output is then the user's to ensure
            pass
        except OSError as exc:
            os.close(self.fd)
            self.fd = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CaptionOutputError(f"{output}: another caption job is writing it (lock {self.path})") from None
            log.debug("no lock on %s (%s)", self.path, exc)   # e.g. a filesystem without flock

    def release(self) -> None:
        if self.fd is not None:
            try:
                self.path.unlink()
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def run_job(job: CaptionJob, *, on_plan: Callable[[JobSummary, int], None] | None = None,
            on_ready: Callable[[dict], None] | None = None,
            on_record: Callable[[dict], None] | None = None) -> JobSummary:
    """Caption every item not done yet and return the summary. Errors that stop the job raise
    LlavaLocalError; KeyboardInterrupt propagates; either way the journal is synced and closed and
    every record written so far stays (run the job again to resume)."""
    t0 = time.perf_counter()
    pair = job.pair
    if pair is None:
        from llava_local.runtime.model_pair import resolve_pair
        pair = resolve_pair(job.worker.llm_path, job.worker.mmproj_path)
    # "auto" decided once, before the fingerprint; the pair goes to every worker as it is (one resolution)
    job = dataclasses.replace(job, worker=resolve_worker(job.worker, pair), pair=pair)
    config = job.config or caption_config(job.worker)
    fp = config.fingerprint()
    items = [it for it in job.items if in_shard(it.key, job.shard)]
    job = dataclasses.replace(job, items=items)
    summary = JobSummary(total=len(items), fingerprint=fp)
    if job.sidecar_ext:
        check_sidecar_names(items, job.sidecar_ext)
    lock = _JobLock(Path(job.output))
    try:
        return _run_locked(job, fp, summary, t0, on_plan, on_ready, on_record)
    finally:
        lock.release()


def _run_locked(job, fp, summary, t0, on_plan, on_ready, on_record) -> JobSummary:
    items = job.items
    todo, kept, previous = _plan(job, fp, summary)
    # opened after _plan (which may replace the file); an unwritable output fails before any work
    writer = JournalWriter(Path(job.output), fsync_interval=job.fsync_interval)
    try:
        sidecars = None
        if job.sidecar_ext:
            sidecars = Sidecars(job.sidecar_ext, overwrite=job.overwrite, previous=previous)
            sidecars.restore(kept[it.key] for it in items if it.key in kept)
        if on_plan:
            on_plan(summary, len(todo))
        results: dict[str, dict] = dict(kept)
        if todo:
            _caption(job, todo, fp, writer, sidecars, summary, results, t0, on_ready, on_record)
        writer.close()
        if job.csv_path:
            export_csv(job.csv_path, (results[it.key] for it in items if it.key in results))
    finally:
        writer.close()
        summary.elapsed_s = time.perf_counter() - t0
    return summary


def _caption(job, todo, fp, writer, sidecars, summary, results, t0, on_ready, on_record) -> None:
    """Run the worker over `todo`, journalling each record as it comes."""
    stamp = record_stamp(job.worker, fp)
    sup = WorkerSupervisor(job.worker, job.pair, on_ready=on_ready,
                           **({"stall_timeout": job.stall_timeout} if job.stall_timeout else {}))
    try:
        for rec in sup.run(todo):
            rec = {**rec, **stamp, "time": record_time()}
            writer.write(rec)
            results[rec["key"]] = rec
            if rec["status"] == "ok":
                summary.captioned += 1
                if sidecars is not None:
                    sidecars.write(rec)
            else:
                summary.failed += 1
                summary.failures.append((rec["path"], rec["error"]))
            if on_record:
                on_record(rec)
    finally:
        summary.restarts = sup.stats.restarts
        summary.load_s = sup.stats.load_s
        summary.worker_cpu_s = sup.stats.worker_cpu_s
        summary.info = sup.stats.info
        summary.elapsed_s = time.perf_counter() - t0
