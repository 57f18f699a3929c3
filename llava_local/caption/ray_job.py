"""Captioning on a Ray cluster: Ray Data feeds the images to a pool of actors (ray_actors.py), each
hosting the same supervised caption worker as `llava-local caption` (one engine per actor); the
driver commits every block of records atomically (blocks.py), so a job is exactly-once and resumable.

    ray start --head                                              # or an existing cluster
    llava-local caption photos/ --ray auto -o captions.parquet/   # Parquet blocks; any other name: JSONL blocks

    import ray
    from llava_local.caption.ray_job import caption_dataset, run_captions
    ray.init()                                                    # or ray.init(address="auto")
    ds = ray.data.read_binary_files("/shared/photos", include_paths=True)
    captions = caption_dataset(ds, model="out/", prompt="Describe the image.")  # lazy: a Dataset of records
    summary = run_captions(ds, "captions.parquet", model="out/", prompt="Describe the image.")  # runs + commits

Inputs are rows of paths or bytes (`read_binary_files`, `read_parquet`, `read_webdataset(decoder=None)`;
Columns names the key, path and bytes columns); every image is decoded by image/load.py in the
worker process, never by `read_images`. An image that crashes the engine is an error record (the
supervisor restarts the worker); an actor that dies (OOM kill, a lost node) loses its in-flight
block, which Ray Data retries on the restarted actor (its default: actors restart, their tasks are
retried). An image cannot make that a loop: actors never decode, the worker process does. The
driver commits a block when it receives it, once, whatever was retried; block names derive from
the job's fingerprint and their keys (ray_plan.py: a rerun skips keys committed with the same
fingerprint). The single-machine path never imports this module, nor Ray.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from llava_local.errors import LlavaLocalError

try:   # first: without the [ray] extra this module is one clear error, whatever imports it
    import pyarrow as pa
    import ray
    import ray.data
except ImportError as _exc:
    raise LlavaLocalError(f"captioning on Ray needs Ray Data: pip install 'llava-local[ray]' ({_exc})") from None

# pylint: disable=wrong-import-position
from llava_local.caption.blocks import BlockStore, table_records  # noqa: E402
from llava_local.caption.job import CaptionConfig, JobSummary, _JobLock  # noqa: E402
from llava_local.caption.ray_actors import META_COLUMNS, domain_error, prepare, records_dataset  # noqa: E402
from llava_local.caption.ray_plan import (Columns, Plan, RayOptions, plan_job, resolve_columns,  # noqa: E402
                                          skip_done)
from llava_local.caption.worker import CaptionItem, WorkerConfig  # noqa: E402

if TYPE_CHECKING:
    from llava_local.runtime.model_pair import ModelPair

log = logging.getLogger(__name__)


@dataclass
class RayCaptionJob:
    inputs: list[CaptionItem] | ray.data.Dataset   # items (paths as given) or a Dataset of paths / bytes
    output: Path                    # a folder of blocks: "x.parquet" -> Parquet, any other name -> JSONL
    worker: WorkerConfig
    options: RayOptions = RayOptions()
    columns: Columns = Columns()    # Dataset inputs: which columns hold the key, path and bytes
    retry_failed: bool = False
    overwrite: bool = False
    csv_path: Path | None = None
    stall_timeout: float | None = None
    pair: ModelPair | None = None   # `worker`'s files, resolved by the caller; None: here
    config: CaptionConfig | None = None


# --------------------------------------------------------------------------------------------------
# Connecting
# --------------------------------------------------------------------------------------------------

def connect(address: str | None = None, *, quiet: bool = False) -> bool:
    """ray.init for `address` ("local": a new one-machine cluster here; "auto": the running cluster;
    "host:port", "ray://host:10001"). True when this call connected (the caller then shuts down)."""
    if ray.is_initialized():
        return False
    kw = {"logging_level": logging.WARNING, "log_to_driver": False} if quiet else {}
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False, **kw)
        else:       # None: RAY_ADDRESS or a cluster running here, else a new one
            ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise LlavaLocalError(f"--ray {address}: cannot connect to a Ray cluster ({exc})") from None
    return True


def disconnect() -> None:
    ray.shutdown()


def _items_dataset(items: list[CaptionItem], block_size: int) -> ray.data.Dataset:
    """One input block per `block_size` items: each becomes one task, one output block, one commit."""
    chunks = [items[i:i + block_size] for i in range(0, len(items), block_size)]
    return ray.data.from_arrow([pa.table({"key": [it.key for it in c], "path": [it.path for it in c]})
                                for c in chunks])


def _quiet_ray_data() -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)   # "progress bars disabled": ours
    logging.getLogger("ray").setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------

def run_ray_job(job: RayCaptionJob, *, on_plan: Callable[[JobSummary, int | None], None] | None = None,
                on_ready: Callable[[dict], None] | None = None,
                on_record: Callable[[dict], None] | None = None) -> JobSummary:
    """Caption every input not committed yet, committing each block as it comes; return the summary.
    `on_plan` gets the number of images to caption (None for a Dataset: unknown before it runs)."""
    t0, start = time.perf_counter(), time.time()
    connect(job.options.address, quiet=job.options.quiet)
    if job.options.quiet:
        _quiet_ray_data()
    items = job.inputs if isinstance(job.inputs, list) else None
    base_dir = os.getcwd() if items and any(not os.path.isabs(it.path) for it in items) else None
    try:
        prep = prepare(job.worker, job.pair, job.options, job.config, base_dir)
    except ray.exceptions.RayError as exc:
        raise _job_failed(exc) from None
    store = BlockStore(Path(job.output))
    summary = JobSummary(total=len(items) if items is not None else 0, fingerprint=prep.fingerprint)
    lock = _JobLock(Path(job.output))
    try:
        plan = plan_job(store, items, prep.fingerprint, job.worker.prompt, summary,
                        retry_failed=job.retry_failed, overwrite=job.overwrite)
        if on_plan:
            on_plan(summary, len(plan.todo) if plan.todo is not None else None)
        n_blocks = None
        if plan.todo is None:
            columns = resolve_columns(job.inputs, job.columns)
            ds = skip_done(job.inputs, columns.key, plan.skip)
        elif plan.todo:
            columns = Columns("key", "path", None)
            ds = _items_dataset(plan.todo, job.options.block_size)
            n_blocks = ds.num_blocks()
        else:
            ds = None
        if ds is not None:
            records = records_dataset(ds, prep, columns, job.options, base_dir, job.stall_timeout, n_blocks)
            _commit_all(records, store, plan, prep.fingerprint, summary, start, on_ready, on_record)
        if items is None:
            summary.total = summary.done_before + summary.failed_before + summary.captioned + summary.failed
        if job.csv_path:
            from llava_local.caption.export import export_csv
            wanted = None if items is None else {it.key for it in items}
            export_csv(job.csv_path, (r for name in store.names() for r in store.read(name)
                                      if wanted is None or r["key"] in wanted))
    finally:
        lock.release()
        summary.elapsed_s = time.perf_counter() - t0
    return summary


def _commit_all(records: ray.data.Dataset, store: BlockStore, plan: Plan, fp: str, summary: JobSummary,
                start: float, on_ready, on_record) -> None:
    """Commit each block of records as the driver receives it (a block reaches it once, retries or not)."""
    committed = set(plan.committed)     # keys in the folder: a key repeated in the input is committed once
    actors: set[str] = set()
    first_ready = None
    try:
        for table in records.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            if table.num_rows == 0:
                continue
            actors.update(table.column("_actor").to_pylist())
            ready = min(table.column("_ready").to_pylist())
            if first_ready is None:
                summary.info = {**json.loads(table.column("_info")[0].as_py()), "actors": 1}
                if on_ready:      # with when the first engine was ready (time.time()): the rate counts from then
                    on_ready({**summary.info, "ready_time": ready})
            first_ready = ready if first_ready is None else min(first_ready, ready)
            summary.restarts += table.column("_restarts")[0].as_py()
            table = table.drop_columns(list(META_COLUMNS))
            keys = table.column("key").to_pylist()
            fresh = [i for i, k in enumerate(keys) if k not in committed]
            if len(fresh) < len(keys):
                log.warning("%d keys of a block were committed already (repeated in the input): dropped",
                            len(keys) - len(fresh))
                table = table.take(fresh)
                if table.num_rows == 0:
                    continue
            store.commit(table, fp)
            committed.update(table.column("key").to_pylist())
            summary.blocks += 1
            for rec in table_records(table):
                if rec["status"] == "ok":
                    summary.captioned += 1
                else:
                    summary.failed += 1
                    summary.failures.append((rec["path"], rec["error"]))
                if on_record:
                    on_record(rec)
    except ray.exceptions.RayError as exc:
        raise _job_failed(exc) from None
    finally:
        if actors:
            summary.info["actors"] = len(actors)
        if first_ready is not None:
            summary.load_s = max(0.0, first_ready - start)


def _job_failed(exc: BaseException) -> LlavaLocalError:
    """One line for a Ray error: ours inside it when there is one."""
    err = domain_error(exc)
    if err is not None:
        return err
    return LlavaLocalError(f"the Ray job failed: {str(exc).strip().splitlines()[-1]} (committed blocks are kept: "
                           "run the same command to resume; --verbose shows the workers' logs)")


# --------------------------------------------------------------------------------------------------
# The Python API
# --------------------------------------------------------------------------------------------------

def worker_config(model=None, mmproj=None, prompt: str | None = None, preset: str = "short", **fields):
    """(WorkerConfig, ModelPair) from a model directory or files (None: the demo model) and
    WorkerConfig's other fields (system, sampling, max_tokens, parallel, io_threads, engine, json_schema)."""
    from llava_local.prompts.presets import PROMPTS
    from llava_local.runtime.model_source import find_model
    pair = find_model(model, mmproj)
    worker = WorkerConfig(llm_path=str(pair.llm_path), mmproj_path=str(pair.mmproj_path),
                          prompt=prompt or PROMPTS[preset], **fields)
    return worker, pair


def caption_dataset(ds: ray.data.Dataset, *, model=None, mmproj=None, prompt: str | None = None,
                    preset: str = "short", options: RayOptions = RayOptions(), columns: Columns = Columns(),
                    stall_timeout: float | None = None, **fields) -> ray.data.Dataset:
    """The lazy Dataset of records (RECORD_SCHEMA) of `ds`'s images: nothing is captioned until it
    is consumed, and nothing is committed (run_captions does both, resumably)."""
    connect(options.address, quiet=options.quiet)
    worker, pair = worker_config(model, mmproj, prompt, preset, **fields)
    prep = prepare(worker, pair, options)
    return records_dataset(ds, prep, resolve_columns(ds, columns), options,
                           stall_timeout=stall_timeout).drop_columns(list(META_COLUMNS))


def run_captions(ds: ray.data.Dataset | list[CaptionItem], output: str | os.PathLike, *, model=None, mmproj=None,
                 prompt: str | None = None, preset: str = "short", options: RayOptions = RayOptions(),
                 columns: Columns = Columns(), retry_failed: bool = False, overwrite: bool = False,
                 stall_timeout: float | None = None, **fields) -> JobSummary:
    """Run the job and commit its blocks into the folder `output`; run it again to resume."""
    worker, pair = worker_config(model, mmproj, prompt, preset, **fields)
    return run_ray_job(RayCaptionJob(ds, Path(output), worker, options=options, columns=columns,
                                     retry_failed=retry_failed, overwrite=overwrite, stall_timeout=stall_timeout,
                                     pair=pair))
