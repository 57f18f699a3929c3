"""Offline batch captioning as a library: inputs, the job's fingerprint, a crash-safe JSONL journal,
resume, shards, and CSV / sidecar exports. `llava-local caption` (caption_cli.py) is a thin layer.

    items = discover_inputs(["photos/", "more/*.png", "list.txt", "meta.jsonl"])
    worker = WorkerConfig(llm_path="out/m-llm-F16.gguf", mmproj_path="out/m-mmproj-F16.gguf",
                          prompt=PROMPTS["short"], parallel=8)
    summary = run_job(CaptionJob(items, Path("captions.jsonl"), worker), on_record=print)
    print(summary.captioned, summary.n_failed, summary.images_per_s)

The output JSONL is the job's journal: one whole record per line (key, path, status, caption or
error, fingerprint, model, prompt, timings), written with a single `write` and flushed to the OS
at once (a killed job loses nothing it finished), fsynced every few seconds and at the end (a
power cut loses at most those seconds). On resume a torn last line is cut off, unparsable lines
are dropped, and keys already done with the same fingerprint are skipped; records made with
another fingerprint (model files, prompt, sampling, template, backend) are never reused: they are
recomputed and replaced. `--retry-failed` redoes error records; `--overwrite` starts afresh.
"""
from __future__ import annotations

import csv
import dataclasses
import errno
import glob
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from llava_local import fileio
from llava_local.caption.worker import CaptionItem, WorkerConfig, WorkerSupervisor, resolve_worker
from llava_local.errors import LlavaLocalError

log = logging.getLogger(__name__)

PROMPTS = {   # LLaVA-1.5's response-format prompts (paper, Table 7) for its caption benchmarks
    "short": "Provide a one-sentence caption for the provided image.",
    "detailed": "Describe this image in detail.",
}
# Images by extension when walking directories. The allow-list of images.py refuses the second
# line, but such files are listed so that each gets an error record instead of silently vanishing.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".heic", ".heif",
                    ".tif", ".tiff", ".psd", ".eps", ".fits", ".fit", ".fpx", ".ico", ".jp2", ".avif")
LIST_SUFFIXES = (".txt", ".lst")            # a text file of paths, one per line
JSONL_SUFFIXES = (".jsonl", ".ndjson")      # a JSONL with a path field
FSYNC_INTERVAL_S = 5.0                      # at most this much finished work lost to a power cut
QUICK_HASH_BYTES = 1 << 20                  # model identity: size + hash of the first and last MiB


class CaptionOutputError(LlavaLocalError):
    """The output file cannot be read, written or repaired."""


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------

def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _walk(root: str, extensions: tuple[str, ...]) -> list[str]:
    """Entries under `root` named like images, sorted; hidden entries (".x", macOS "._x.jpg") skipped.
    An entry with an image name is an item whatever it is (a directory named x.jpg, a broken link):
    it then gets an error record rather than being ignored."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in list(dirnames):
            if d.lower().endswith(extensions):
                out.append(os.path.join(dirpath, d))
                dirnames.remove(d)
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                   if not f.startswith(".") and f.lower().endswith(extensions))
    return sorted(out)


def _read_list(path: Path) -> list[CaptionItem]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LlavaLocalError(f"{path}: cannot read the list of images ({exc})") from None
    out = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(CaptionItem(line, str(path.parent / line) if not os.path.isabs(line) else line))
    return out


def _read_jsonl(path: Path, path_field: str, key_field: str | None) -> list[CaptionItem]:
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise LlavaLocalError(f"{path}:{n}: not JSON ({exc})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(path_field), str):
                    raise LlavaLocalError(f"{path}:{n}: no string field {path_field!r} (set --path-field)")
                p = obj[path_field]
                key = obj.get(key_field) if key_field else p
                if key_field and not isinstance(key, (str, int)):
                    raise LlavaLocalError(f"{path}:{n}: no field {key_field!r} (set --key-field)")
                out.append(CaptionItem(str(key), p if os.path.isabs(p) else str(path.parent / p)))
    except OSError as exc:
        raise LlavaLocalError(f"{path}: cannot read ({exc})") from None
    except UnicodeDecodeError as exc:
        raise LlavaLocalError(f"{path}: not UTF-8 text ({exc})") from None
    return out


def discover_inputs(inputs: Sequence[str], *, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                    path_field: str = "path", key_field: str | None = None) -> list[CaptionItem]:
    """Image files, directories (recursive, by extension), globs, text files of paths (.txt/.lst)
    and JSONL files (.jsonl, `path_field`; key from `key_field`, else the path as written).

    Keys are paths as given or found (relative to the current directory) or as written in the
    list; paths in a list file are relative to that file. The first item of a key wins."""
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    items: list[CaptionItem] = []
    for inp in inputs:
        if os.path.isdir(inp) and not inp.lower().endswith(exts):
            items += [CaptionItem(p, p) for p in _walk(inp, exts)]
        elif os.path.isfile(inp) and inp.lower().endswith(LIST_SUFFIXES):
            items += _read_list(Path(inp))
        elif os.path.isfile(inp) and inp.lower().endswith(JSONL_SUFFIXES):
            items += _read_jsonl(Path(inp), path_field, key_field)
        elif not os.path.lexists(inp) and _has_glob(inp):
            matches = sorted(glob.glob(inp, recursive=True))
            if not matches:
                log.warning("%s: matches no file", inp)
            for m in matches:
                if os.path.isdir(m) and not m.lower().endswith(exts):
                    items += [CaptionItem(p, p) for p in _walk(m, exts)]
                elif m.lower().endswith(exts) or os.path.isfile(m):
                    items.append(CaptionItem(m, m))
        else:   # an image (a missing or unreadable one gets its error record)
            items.append(CaptionItem(inp, inp))
    seen, out = set(), []
    for it in items:
        if it.key not in seen:
            seen.add(it.key)
            out.append(it)
    if len(out) < len(items):
        log.info("%d duplicate keys ignored", len(items) - len(out))
    return out


def parse_shard(spec: str) -> tuple[int, int]:
    """"i/n" with 0 <= i < n."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise LlavaLocalError(f"--shard {spec!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise LlavaLocalError(f"--shard {spec!r}: need 0 <= i < n")
    return i, n


def in_shard(key: str, shard: tuple[int, int] | None) -> bool:
    """Stable across machines and Python versions (not `hash()`, which is salted per process)."""
    if shard is None:
        return True
    i, n = shard
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % n == i


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
    mmproj: str                # file_identity of the mmproj GGUF
    prompt: str
    system: str | None
    template: str | None       # --template override (else the GGUF's, covered by `llm`)
    vision_backend: str        # as resolved (never "auto"): backends differ (mtmd has upstream #25814)
    vision_device: str         # "cpu" or "gpu", as resolved: kernels differ in rounding
    llm_device: str            # "cpu" or "gpu" (any layer offloaded), as resolved
    sampling: dict             # SamplingParams fields + max_tokens

    def fingerprint(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def llm_device(worker: WorkerConfig) -> str:
    """"gpu" when any LLM layer is offloaded (after resolve_worker), else "cpu"."""
    return "gpu" if isinstance(worker.gpu_layers, int) and worker.gpu_layers > 0 else "cpu"


def caption_config(worker: WorkerConfig) -> CaptionConfig:
    return CaptionConfig(llm=file_identity(worker.llm_path), mmproj=file_identity(worker.mmproj_path),
                         prompt=worker.prompt, system=worker.system, template=worker.template,
                         vision_backend=worker.vision_backend, vision_device=worker.vision_device,
                         llm_device=llm_device(worker),
                         sampling={**dataclasses.asdict(worker.sampling), "max_tokens": worker.max_tokens,
                                   **({"ignore_eos": True} if worker.ignore_eos else {})})


# --------------------------------------------------------------------------------------------------
# The journal
# --------------------------------------------------------------------------------------------------

@dataclass
class JournalState:
    records: list[dict]        # parsed records, in file order
    good_bytes: int            # length of the whole, parsable prefix
    torn_tail: bool            # the file ends in a partial line
    bad_lines: int             # complete lines that did not parse (dropped on repair)


def read_journal(path: Path) -> JournalState:
    if not path.exists():
        return JournalState([], 0, False, 0)
    if not path.is_file():
        raise CaptionOutputError(f"{path}: the output is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CaptionOutputError(f"{path}: cannot read the output to resume ({exc.strerror or exc})") from None
    records, bad, pos, good = [], 0, 0, 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break                            # torn last line: cut off on repair
        line = data[pos:nl]
        pos = nl + 1
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
                raise ValueError("not a record")
        except (ValueError, UnicodeDecodeError):
            if line.strip():
                bad += 1
            continue
        records.append(rec)
        if bad == 0:
            good = pos
    return JournalState(records, good, pos < len(data), bad)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write a whole file or nothing (fileio.atomic_write), then sync its folder; errors are the job's."""
    try:
        fileio.atomic_write(path, data)
    except OSError as exc:
        raise CaptionOutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    _fsync_dir(path)


def _encode(rec: dict) -> bytes:
    # json escapes "\n" inside strings, so one record is exactly one line
    return (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")


class JournalWriter:
    """Appends whole records: one os.write per record (a killed process cannot tear it), fsync at
    intervals and on close. A failed write (disk full) is cut back to the last whole record."""

    def __init__(self, path: Path, *, fsync_interval: float = FSYNC_INTERVAL_S):
        self.path = Path(path)
        self.fsync_interval = fsync_interval
        try:
            if not os.path.lexists(self.path.parent):
                self.path.parent.mkdir(parents=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CaptionOutputError(f"{self.path}: cannot open the output for writing "
                                     f"({exc.strerror or exc})") from None
        self.n_written = 0
        self._last_sync = time.monotonic()

    def write(self, rec: dict) -> None:
        data = _encode(rec)
        start = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                if n <= 0:
                    raise OSError(errno.EIO, "write returned 0")
                view = view[n:]
        except OSError as exc:
            try:
                os.ftruncate(self.fd, start)   # never leave half a record behind
            except OSError:
                pass
            raise CaptionOutputError(f"{self.path}: cannot write ({exc.strerror or exc}); it holds whole records "
                                     "only: free space and run the same command to resume") from None
        self.n_written += 1
        if time.monotonic() - self._last_sync >= self.fsync_interval:
            self.sync()

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise CaptionOutputError(f"{self.path}: fsync failed ({exc.strerror or exc})") from None
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self.fd is None:
            return
        try:
            self.sync()
        finally:
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------------------------------
# Plan, run, export
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


def sidecar_path(image_path: str, ext: str) -> Path:
    return Path(image_path).with_suffix(ext)


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
        if rec is None:
            todo.append(it)
        elif rec.get("fingerprint") != fingerprint:
            summary.replaced += 1
            stale_prompt |= rec.get("prompt") != job.worker.prompt
            todo.append(it)
            drop.add(it.key)
        elif rec.get("status") == "ok":
            summary.done_before += 1
        elif job.retry_failed:
            todo.append(it)
            drop.add(it.key)
        else:
            summary.failed_before += 1
            summary.failures.append((rec.get("path", it.key), rec.get("error") or "failed"))
    if summary.replaced:
        log.warning("%s: %d records were made with another %s; they are recomputed and replaced",
                    path, summary.replaced, "prompt" if stale_prompt else "model, sampling, template or backend")
    duplicates = len(state.records) != len(last)
    if job.overwrite and path.exists():
        atomic_write(path, b"")
    elif drop or state.bad_lines or duplicates:
        # rewrite without the dropped, unparsable and superseded records: every key at most once
        kept = [r for r in last.values() if r["key"] not in drop]
        if state.bad_lines:
            log.warning("%s: %d unparsable lines dropped", path, state.bad_lines)
        atomic_write(path, b"".join(_encode(r) for r in kept))
    elif state.torn_tail:
        log.warning("%s: the last line was cut off (the job was killed mid-write); dropping it", path)
        try:
            os.truncate(path, state.good_bytes)
        except OSError as exc:
            raise CaptionOutputError(f"{path}: cannot repair the output ({exc.strerror or exc})") from None
    return todo, {k: r for k, r in last.items() if k not in drop}, last


def _write_sidecar(rec: dict, ext: str, overwrite: bool, ours: dict[str, str]) -> None:
    dst = sidecar_path(rec["path"], ext)
    if dst.exists() and not overwrite and ours.get(str(dst)) is None:
        log.warning("%s exists and was not written by this job: kept (use --overwrite)", dst)
        return
    atomic_write(dst, (rec["caption"] + "\n").encode("utf-8"))


def export_csv(path: Path, records: Iterable[dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["key", "path", "status", "caption", "error"])
    for r in records:
        w.writerow([r["key"], r.get("path", ""), r.get("status", ""), r.get("caption") or "", r.get("error") or ""])
    atomic_write(Path(path), buf.getvalue().encode("utf-8"))


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
    job = dataclasses.replace(job, worker=resolve_worker(job.worker))   # "auto" decided once, before the fingerprint
    config = job.config or caption_config(job.worker)
    fp = config.fingerprint()
    items = [it for it in job.items if in_shard(it.key, job.shard)]
    job = dataclasses.replace(job, items=items)
    summary = JobSummary(total=len(items), fingerprint=fp)
    if job.sidecar_ext:
        _check_sidecar_names(items, job.sidecar_ext)
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
        ours = {}     # sidecars written by earlier runs of this job: replaceable
        if job.sidecar_ext:
            for r in previous.values():
                if r.get("status") == "ok" and r.get("path"):
                    ours[str(sidecar_path(r["path"], job.sidecar_ext))] = r.get("caption")
            for it in items:   # killed between a record and its sidecar: write the sidecar now
                r = kept.get(it.key)
                if r and r.get("status") == "ok" and not sidecar_path(r["path"], job.sidecar_ext).exists():
                    _write_sidecar(r, job.sidecar_ext, True, ours)
        if on_plan:
            on_plan(summary, len(todo))
        model_name = Path(job.worker.llm_path).name
        results: dict[str, dict] = dict(kept)
        if todo:
            sup = WorkerSupervisor(job.worker, on_ready=on_ready,
                                   **({"stall_timeout": job.stall_timeout} if job.stall_timeout else {}))
            try:
                for rec in sup.run(todo):
                    rec = {**rec, "fingerprint": fp, "model": model_name, "prompt": job.worker.prompt,
                           "vision_backend": job.worker.vision_backend, "vision_device": job.worker.vision_device,
                           "llm_device": llm_device(job.worker), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                    writer.write(rec)
                    results[rec["key"]] = rec
                    if rec["status"] == "ok":
                        summary.captioned += 1
                        if job.sidecar_ext:
                            _write_sidecar(rec, job.sidecar_ext, job.overwrite, ours)
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
        writer.close()
        if job.csv_path:
            export_csv(job.csv_path, (results[it.key] for it in items if it.key in results))
    finally:
        writer.close()
        summary.elapsed_s = time.perf_counter() - t0
    return summary


def _check_sidecar_names(items: Sequence[CaptionItem], ext: str) -> None:
    seen: dict[Path, str] = {}
    for it in items:
        dst = sidecar_path(it.path, ext)
        if dst in seen:
            raise LlavaLocalError(f"{seen[dst]} and {it.path} would both write {dst}: rename one, or use the JSONL")
        seen[dst] = it.path
