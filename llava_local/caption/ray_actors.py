"""The cluster side of a Ray caption job (ray_job.py): what every node is checked for before the job
starts, the actor that hosts one engine, and the lazy map of a Dataset's rows to records.

    prep = prepare(worker, pair, RayOptions())            # placement, fingerprint, resources; nodes checked
    records = records_dataset(ds, prep, Columns("key", "path", None), RayOptions(actors=2))   # lazy

`CaptionActor` runs the same supervised worker process (supervisor.py, worker.py) as single-machine
`caption`, loaded once per actor and kept between blocks: an image that crashes llama.cpp is an
error record, and an actor never decodes an image itself, so no image can kill it into a retry loop.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import ray
import ray.data
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from llava_local.caption.blocks import records_table
from llava_local.caption.job import CaptionConfig, caption_config, file_identity, record_stamp, record_time
from llava_local.caption.ray_plan import Columns, RayOptions
from llava_local.caption.supervisor import STALL_TIMEOUT_S, WorkerSupervisor
from llava_local.caption.worker import CaptionItem, WorkerConfig, resolve_worker
from llava_local.errors import LlavaLocalError, ModelFilesError

if TYPE_CHECKING:
    from llava_local.runtime.model_pair import ModelPair

CPU_ACTOR_THREADS = 4         # an actor's llama.cpp threads (and Ray CPUs) when --threads is not given
PREFLIGHT_TIMEOUT_S = 300.0   # every node answers the model-file check within this (a worker process start)
META_COLUMNS = ("_actor", "_ready", "_restarts", "_info")   # per block, from the actor; not in the output


# --------------------------------------------------------------------------------------------------
# What every node must have
# --------------------------------------------------------------------------------------------------

def check_node(identity: dict[str, str], base_dir: str | None) -> str | None:
    """What this node lacks to run the job (None: nothing): the model files, the same as the
    driver's (`identity`: path -> file_identity), and the folder relative input paths are read from."""
    for path, ident in identity.items():
        if not os.path.isfile(path):
            return f"{path}: no such model file"
        try:
            here = file_identity(path)
        except OSError as exc:
            return f"{path}: cannot read ({exc.strerror or exc})"
        if here != ident:
            return f"{path}: not the driver's file (here {here}, driver {ident})"
    if base_dir is not None and not os.path.isdir(base_dir):
        return f"{base_dir}: no such folder (relative input paths are read from the driver's working directory)"
    return None


@ray.remote(num_cpus=0)
def _check_node_task(identity: dict[str, str], base_dir: str | None) -> str | None:
    return check_node(identity, base_dir)


@ray.remote(num_cpus=0)
def _resolve_on_gpu(worker: WorkerConfig, pair: ModelPair) -> WorkerConfig:
    return resolve_worker(worker, pair)


def preflight(identity: dict[str, str], base_dir: str | None) -> None:
    """Every alive node checked before any actor starts: one error naming each node that fails."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [_check_node_task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(identity, base_dir) for n in nodes]
    deadline = time.monotonic() + PREFLIGHT_TIMEOUT_S
    answers = []
    for ref in refs:
        try:
            answers.append(ray.get(ref, timeout=max(1.0, deadline - time.monotonic())))
        except ray.exceptions.GetTimeoutError:
            answers.append(f"no answer within {PREFLIGHT_TIMEOUT_S:g} s")
        except ray.exceptions.RayError as exc:   # e.g. llava_local not installed there
            answers.append(f"cannot run llava-local there ({str(exc).strip().splitlines()[-1]})")
    bad = [f"node {n['NodeManagerAddress']} ({n['NodeID'][:8]}): {msg}" for n, msg in zip(nodes, answers) if msg]
    if bad:
        raise ModelFilesError(f"{len(bad)} of {len(nodes)} Ray nodes cannot run the job (every node needs llava-local "
                              "and the same model files at the same path): " + "; ".join(bad))


def domain_error(exc: BaseException) -> LlavaLocalError | None:
    """Our error inside a Ray error (a RayTaskError's cause, an actor's failed __init__), if any."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, LlavaLocalError) and not isinstance(e, ray.exceptions.RayError):
            return e
        stack += [e.__context__, e.__cause__, getattr(e, "cause", None)]
    text = str(exc)
    for name in ("ModelFilesError", "WorkerStartError", "LlavaLocalError", "CaptionOutputError"):
        at = text.rfind(f"{name}: ")
        if at >= 0:      # an actor's failed __init__ reaches the driver as text
            return LlavaLocalError(text[at + len(name) + 2:].splitlines()[0])
    return None


# --------------------------------------------------------------------------------------------------
# The actors
# --------------------------------------------------------------------------------------------------

class CaptionActor:
    """One engine per actor: the supervised worker process of `caption`, loaded once, kept between
    blocks. Each call captions one block and returns its records (RECORD_SCHEMA, input order) with
    META_COLUMNS."""

    def __init__(self, worker: WorkerConfig, identity: dict[str, str], stamp: dict, columns: Columns,
                 base_dir: str | None, stall_timeout: float | None):
        node = ray.util.get_node_ip_address()
        problem = check_node(identity, base_dir)
        if problem:
            raise ModelFilesError(f"Ray node {node}: {problem}")
        if base_dir is not None:
            os.chdir(base_dir)       # relative paths mean what they mean to the driver (the worker inherits it)
        self.columns, self.stamp = columns, stamp
        # the pair (GGUF headers, the vocabulary) is read here from the files just checked, not shipped
        self.sup = WorkerSupervisor(worker, None, stall_timeout=stall_timeout or STALL_TIMEOUT_S)
        self.sup.start()
        self.name = f"{node}:{os.getpid()}"
        self.ready = time.time()

    def __call__(self, batch: pa.Table) -> pa.Table:
        c = self.columns
        keys = batch.column(c.key).to_pylist()
        paths = batch.column(c.path).to_pylist() if c.path else keys
        datas = batch.column(c.data).to_pylist() if c.data else [None] * len(keys)
        items, seen = [], set()
        for k, p, d in zip(keys, paths, datas):
            if str(k) not in seen:          # a key twice in one block: the first row wins, as in discover_inputs
                seen.add(str(k))
                items.append(CaptionItem(str(k), str(p if p is not None else k), None if d is None else bytes(d)))
        restarts = self.sup.stats.restarts
        got = {r["key"]: r for r in self.sup.run(items, keep_alive=True)}
        now = record_time()
        table = records_table([{**got[it.key], **self.stamp, "time": now} for it in items])
        n = table.num_rows
        meta = {"_actor": pa.array([self.name] * n), "_ready": pa.array([self.ready] * n, pa.float64()),
                "_restarts": pa.array([self.sup.stats.restarts - restarts] * n, pa.int64()),
                "_info": pa.array([json.dumps(self.sup.stats.info)] * n)}
        for name, col in meta.items():
            table = table.append_column(name, col)
        return table


@dataclass(frozen=True)
class Prepared:
    worker: WorkerConfig            # resolved placement, absolute model paths
    pair: ModelPair
    fingerprint: str
    stamp: dict
    identity: dict                  # model path -> file_identity, as every node must have it
    num_cpus: float
    num_gpus: float
    fit: int                        # actors the cluster holds


def prepare(worker: WorkerConfig, pair: ModelPair | None, options: RayOptions, config: CaptionConfig | None = None,
            base_dir: str | None = None) -> Prepared:
    """Placement decided as the actors will run (CPU actors see no GPU), the fingerprint, the
    actors' resources; every node checked for the model files."""
    if pair is None:
        from llava_local.runtime.model_pair import resolve_pair
        pair = resolve_pair(worker.llm_path, worker.mmproj_path)
    pair = dataclasses.replace(pair, llm_path=Path(pair.llm_path).resolve(),
                               mmproj_path=Path(pair.mmproj_path).resolve())   # the actors' cwd is not ours
    worker = dataclasses.replace(worker, llm_path=str(pair.llm_path), mmproj_path=str(pair.mmproj_path))
    have = ray.cluster_resources()
    gpus = options.num_gpus if options.num_gpus is not None else (1.0 if have.get("GPU", 0) > 0 else 0.0)
    eng = worker.engine
    if gpus > 0:
        cpus = options.num_cpus or 1.0
        worker = ray.get(_resolve_on_gpu.options(num_gpus=gpus).remote(worker, pair))   # where the actors run
        fit = int(have.get("GPU", 0) // gpus)
    else:   # Ray hides the GPUs from an actor without num_gpus: "auto" is then the CPU
        cpus = options.num_cpus or eng.threads or CPU_ACTOR_THREADS
        eng = dataclasses.replace(eng, threads=eng.threads or max(1, int(cpus)),
                                  gpu_layers=0 if eng.gpu_layers == "auto" else eng.gpu_layers,
                                  vision_device="cpu" if eng.vision_device == "auto" else eng.vision_device)
        worker = resolve_worker(dataclasses.replace(worker, engine=eng), pair)
        fit = int(have.get("CPU", 0) // cpus)
    fp = (config or caption_config(worker)).fingerprint()
    identity = {worker.llm_path: file_identity(worker.llm_path), worker.mmproj_path: file_identity(worker.mmproj_path)}
    preflight(identity, base_dir)
    return Prepared(worker, pair, fp, record_stamp(worker, fp), identity, cpus, gpus, max(1, fit))


def records_dataset(ds: ray.data.Dataset, prep: Prepared, columns: Columns, options: RayOptions,
                    base_dir: str | None = None, stall_timeout: float | None = None,
                    n_blocks: int | None = None) -> ray.data.Dataset:
    """The lazy map: rows of (key, path | bytes) -> records, one block per `block_size` rows (`n_blocks`,
    when known, caps the pool: an actor without a block would load the model for nothing)."""
    most = min(prep.fit, n_blocks or prep.fit)
    n = min(options.actors, n_blocks or options.actors) if options.actors else None
    pool = ray.data.ActorPoolStrategy(size=n) if n else ray.data.ActorPoolStrategy(min_size=1, max_size=most)
    return ds.map_batches(
        CaptionActor, batch_size=options.block_size, batch_format="pyarrow", zero_copy_batch=True, compute=pool,
        fn_constructor_kwargs={"worker": prep.worker, "identity": prep.identity,
                               "stamp": prep.stamp, "columns": columns, "base_dir": base_dir,
                               "stall_timeout": stall_timeout},
        num_cpus=prep.num_cpus, num_gpus=prep.num_gpus or None)
