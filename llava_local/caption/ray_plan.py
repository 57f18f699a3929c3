"""What a Ray caption job (ray_job.py) does before it runs: its options, which inputs are committed
already in its folder of blocks (blocks.py), which records are dropped, and which columns of a
Dataset are the key, the path and the bytes. No Ray import: it works on the folder, the items and the Dataset's methods.

    plan = plan_job(BlockStore(out), items, fingerprint, prompt, summary, retry_failed=False, overwrite=False)
    plan.todo          # the items to caption (None when the inputs are a Dataset: then `plan.skip`)

Resume follows `caption` (job.judge_record): a key committed with the job's fingerprint is skipped
(a failed one too, unless retry_failed); a record of another fingerprint, or a failed one being
retried, is removed from its block, which is rewritten whole (or deleted when emptied), before any
work, so that the folder never holds a key twice. With a Dataset the job's keys are not known
before it runs: every record of another fingerprint is then dropped (the folder holds one job).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from llava_local.caption.blocks import RESUME_COLUMNS, BlockStore
from llava_local.caption.job import JobSummary, judge_record, warn_replaced
from llava_local.caption.worker import CaptionItem
from llava_local.errors import LlavaLocalError

log = logging.getLogger(__name__)

BLOCK_SIZE = 256                           # images per block: the unit of commit, retry and resume
KEY_COLUMNS = ("key", "__key__", "path")   # the key, by default: ours, read_webdataset's, read_binary_files' path
DATA_COLUMNS = ("bytes",)                  # the image bytes, by default: read_binary_files'


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None      # "auto", "local", "ray://head:10001"; None: the running ray.init, else local
    actors: int | None = None       # a fixed pool; None: 1 up to as many as the cluster's CPUs / GPUs fit
    num_gpus: float | None = None   # per actor; None: 1 when the cluster has GPUs, else 0 (CPU threads)
    num_cpus: float | None = None   # per actor; None: --threads (else CPU_ACTOR_THREADS), 1 with a GPU
    block_size: int = BLOCK_SIZE
    quiet: bool = False             # no Ray Data progress bars or INFO logs (the CLI prints its own line)


@dataclass(frozen=True)
class Columns:
    key: str | None = None      # None: the first of KEY_COLUMNS the Dataset has
    path: str | None = None     # None: "path" when present, else the key (records name the image by it)
    data: str | None = None     # None: "bytes" when present; without bytes the image is read from `path`


@dataclass
class Plan:
    todo: list[CaptionItem] | None     # items to caption; None for a Dataset (use `skip`)
    skip: frozenset[str]               # keys committed with this fingerprint: not captioned again
    committed: frozenset[str]          # every key left in the folder after planning


def resolve_columns(ds, columns: Columns) -> Columns:
    names = list(ds.schema().names)
    key = columns.key or next((c for c in KEY_COLUMNS if c in names), None)
    path = columns.path or ("path" if "path" in names else key)
    data = columns.data or next((c for c in DATA_COLUMNS if c in names), None)
    if key is None:
        raise LlavaLocalError(f"the Dataset has columns {names}, none of {', '.join(KEY_COLUMNS)}: "
                              "set Columns(key=...)")
    for what, col in (("key", key), ("path", path), ("data", data)):
        if col is not None and col not in names:
            raise LlavaLocalError(f"the Dataset has no column {col!r} (it has {names}): set Columns({what}=...)")
    return Columns(key, path, data)


def _drop_keys(batch: pa.Table, key: str, skip: pa.Array) -> pa.Table:
    keys = pc.cast(batch.column(key), pa.string())
    return batch.filter(pc.invert(pc.is_in(keys, value_set=skip)))


def skip_done(ds, key: str, skip: frozenset[str]):
    """`ds` without the rows whose key is in `skip`."""
    if not skip:
        return ds
    return ds.map_batches(_drop_keys, batch_format="pyarrow", zero_copy_batch=True,
                          fn_kwargs={"key": key, "skip": pa.array(sorted(skip), pa.string())})


def plan_job(store: BlockStore, items: list[CaptionItem] | None, fingerprint: str, prompt: str,
             summary: JobSummary, *, retry_failed: bool, overwrite: bool) -> Plan:
    """Clean the folder (cut-short commits, dropped records, a key in two blocks) and decide the work."""
    if store.remove_temporaries():
        log.info("%s: removed the temporaries of blocks whose commit was cut short", store.root)
    names = store.names()
    if overwrite:
        for name in names:
            store.replace(name, [])
        names = []
    first: dict[str, dict] = {}            # key -> its record (the first block's, in name order)
    where: dict[str, list[str]] = {}       # key -> blocks holding it
    for name in names:
        for rec in store.read(name, RESUME_COLUMNS):
            first.setdefault(rec["key"], rec)
            where.setdefault(rec["key"], []).append(name)
    drop: set[str] = set()
    stale_prompt = False
    todo = None if items is None else []
    judged = first.items() if items is None else ((it.key, first.get(it.key)) for it in items)
    for i, (key, rec) in enumerate(judged):
        verdict = judge_record(rec, fingerprint, retry_failed, summary)
        if todo is not None and verdict != "keep":
            todo.append(items[i])
        if verdict == "drop":
            drop.add(key)
            stale_prompt |= rec.get("prompt") != prompt
    warn_replaced(store.root, summary, stale_prompt)
    # blocks to rewrite: those holding a dropped record or a second copy of a key
    rewrite: dict[str, set[str]] = {}
    for key, blocks in where.items():
        for n, name in enumerate(blocks):
            if key in drop or n > 0:
                rewrite.setdefault(name, set()).add(key)
    for name, keys in sorted(rewrite.items()):
        store.replace(name, [r for r in store.read(name) if r["key"] not in keys])
    if rewrite:
        log.info("%s: %d blocks rewritten without %d dropped or repeated records", store.root, len(rewrite),
                 sum(map(len, rewrite.values())))
    committed = frozenset(k for k in where if k not in drop)
    skip = frozenset(k for k in committed if judge_record(first[k], fingerprint, retry_failed, JobSummary()) == "keep")
    return Plan(todo, skip, committed)
