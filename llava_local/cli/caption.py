"""`llava-local caption`: offline batch captioning (the library is llava_local/caption/; this parses and prints).

Progress (images/s, ETA, failures) and the summary go to stderr; the captions go to the JSONL, or with
`--ray` to a folder of blocks (caption/ray_job.py, imported only then: the single-machine path runs
without Ray installed).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from llava_local.caption.inputs import discover_inputs, parse_shard
from llava_local.caption.job import CaptionJob, run_job
from llava_local.caption.supervisor import STALL_TIMEOUT_S
from llava_local.caption.worker import WorkerConfig
from llava_local.cli.errors import domain_errors
from llava_local.cli.options import (engine_options, model_options, output_from, pair_from, sampling_from,
                                     sampling_options, status)
from llava_local.errors import LlavaLocalError
from llava_local.logs import setup_logging
from llava_local.prompts.presets import PROMPTS

EXIT_CAP = 100               # exit status = failed images, capped (exit statuses stop at 255)
EXIT_INTERRUPTED = 130       # Ctrl-C, like a shell
MAX_FAILURES_SHOWN = 10
PROGRESS_INTERVAL_S = 5.0    # --ray without a terminal: a progress line this often


@click.command(context_settings={"default_map": {"max_tokens": 128}})
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", default="captions.jsonl", show_default=True, type=click.Path(),
              help="The JSONL of records (also the job's journal: run the same command again to resume); "
                   "with --ray a folder of blocks.")
@click.option("-p", "--prompt", default=None, help="The question asked about every image (default: --preset).")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Read the prompt from a file.")
@click.option("--preset", type=click.Choice(sorted(PROMPTS)), default="short", show_default=True,
              help=f"short: \"{PROMPTS['short']}\"  detailed: \"{PROMPTS['detailed']}\"")
@click.option("--parallel", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Images decoded together in one llama.cpp batch (KV cache grows with it).")
@click.option("--io-threads", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Threads decoding and resizing images.")
@click.option("--ext", "extensions", default=None,
              help="Comma-separated extensions to pick up in directories (default: common image types).")
@click.option("--path-field", default="path", show_default=True, help="JSONL input: the field with the image path.")
@click.option("--key-field", default=None, help="JSONL input: the field used as the record key (default: the path).")
@click.option("--shard", default=None, metavar="I/N",
              help="Caption only shard I of N (0 <= I < N), split by a stable hash of the key.")
@click.option("--retry-failed", is_flag=True, help="Redo images whose earlier record is an error.")
@click.option("--overwrite", is_flag=True, help="Start afresh: discard the output's records (and replace sidecars).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the job's records as CSV (key,path,status,caption,error) at the end.")
@click.option("--sidecar", is_flag=True, help="Also write each caption next to its image (a.jpg -> a.txt).")
@click.option("--sidecar-ext", default=".txt", show_default=True, help="Extension of the --sidecar files.")
@click.option("--timeout", "stall_timeout", type=click.FloatRange(1), default=STALL_TIMEOUT_S, show_default=True,
              help="Restart the worker when it finishes nothing for this many seconds.")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Caption on a Ray cluster: auto (the running one: `ray start --head`), local (start one here), "
                   "host:port or ray://host:10001. -o is then a folder of blocks (a name ending in .parquet: "
                   "Parquet, else JSONL). Needs `pip install 'llava-local[ray]'`.")
@click.option("--ray-actors", type=click.IntRange(1), default=None,
              help="--ray: actors, one engine each  [default: as many as the cluster's CPUs or GPUs fit]")
@click.option("--ray-gpus", type=click.FloatRange(0), default=None,
              help="--ray: GPUs per actor  [default: 1 when the cluster has GPUs, else 0 (--threads CPUs each)]")
@click.option("--block-size", type=click.IntRange(1), default=256, show_default=True,
              help="--ray: images per block, the unit committed, retried and resumed.")
@model_options
@sampling_options
def caption(inputs, output, prompt, prompt_file, preset, parallel, io_threads, extensions, path_field, key_field,
            shard, retry_failed, overwrite, csv_path, sidecar, sidecar_ext, stall_timeout, ray_address, ray_actors,
            ray_gpus, block_size, **kw):
    """Caption many images into a JSONL, resumably: run the same command again after a crash.

    INPUTS are image files, directories (searched recursively), globs, text files of paths (.txt,
    .lst) or JSONL files with a path field. Each image gets one record: key, path, status ("ok" or
    "error"), caption or error, the job's fingerprint, model, prompt and timings. A bad image gets an
    error record and the job goes on; so does an image that crashes llama.cpp (the engine runs in a
    worker process that is restarted). Records made with another model, prompt or sampling setting
    are never reused.

    Exit status: 0 when every image has a caption; otherwise the number of failed images of the
    job (this run and earlier ones), capped at 100; 130 when interrupted. An error that stops the
    whole job (model files, unwritable output) prints one "Error:" line and exits 1.

    With --json-schema every caption is JSON valid against the schema: the record keeps the text as
    "caption" and the parsed object as "json"; an answer cut by --max-tokens is an error record.

    \b
    Examples:
      llava-local caption photos/ -o captions.jsonl
      llava-local caption photos/ --preset detailed --max-tokens 256 --parallel 8
      llava-local caption "shots/**/*.png" list.txt --sidecar          # kohya-style a.png -> a.txt
      llava-local caption meta.jsonl --path-field image --key-field id --csv captions.csv
      llava-local caption photos/ --shard 0/4 -o part0.jsonl           # machine 1 of 4
      llava-local caption photos/ --retry-failed                       # resume, redoing errors
      llava-local caption photos/ --json-schema shape.schema.json      # records carry "json"
      llava-local caption /shared/photos --ray auto -o captions.parquet/   # on a Ray cluster, Parquet blocks
    """
    ray_opts = {"address": ray_address, "actors": ray_actors, "num_gpus": ray_gpus, "block_size": block_size}
    code = domain_errors(_caption)(inputs, output, prompt, prompt_file, preset, parallel, io_threads, extensions,
                                   path_field, key_field, shard, retry_failed, overwrite, csv_path, sidecar,
                                   sidecar_ext, stall_timeout, kw, ray_opts)
    sys.exit(code)


def _caption(inputs, output, prompt, prompt_file, preset, parallel, io_threads, extensions, path_field, key_field,
             shard, retry_failed, overwrite, csv_path, sidecar, sidecar_ext, stall_timeout, kw, ray_opts) -> int:
    setup_logging(kw["verbose"])
    if prompt is not None and prompt_file is not None:
        raise LlavaLocalError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        try:
            prompt = Path(prompt_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise LlavaLocalError(f"{prompt_file}: cannot read the prompt ({exc})") from None
    if prompt is None:
        prompt = PROMPTS[preset]
    if not prompt.strip():
        raise LlavaLocalError("empty prompt")
    if overwrite and retry_failed:
        raise LlavaLocalError("--overwrite redoes everything; --retry-failed is then redundant")
    if sidecar and not sidecar_ext.startswith("."):
        raise LlavaLocalError(f"--sidecar-ext {sidecar_ext!r}: expected an extension such as .txt")
    if ray_opts["address"] and shard:
        raise LlavaLocalError("--shard splits a job between machines by hand; --ray does it: drop --shard")
    if ray_opts["address"] and sidecar:
        raise LlavaLocalError("--sidecar writes next to each image, which the driver of a Ray job may not reach: "
                              "use the blocks of -o")
    shard_spec = parse_shard(shard) if shard else None
    sampling = sampling_from(kw)
    json_output = output_from(kw)                     # the schema checked before the model loads
    pair = pair_from(kw)                              # model files checked before any image is read
    exts = {"extensions": [e.strip() for e in extensions.split(",") if e.strip()]} if extensions else {}
    items = discover_inputs(inputs, path_field=path_field, key_field=key_field, **exts)
    if not items:
        raise LlavaLocalError(f"no images found in {', '.join(inputs)}")
    worker = WorkerConfig(llm_path=str(pair.llm_path), mmproj_path=str(pair.mmproj_path), prompt=prompt,
                          system=kw["system"], sampling=sampling, max_tokens=kw["max_tokens"], parallel=parallel,
                          io_threads=io_threads, engine=engine_options(kw),
                          json_schema=json_output.schema if json_output is not None else None)
    progress = _Progress(lines=bool(ray_opts["address"]) and not sys.stderr.isatty())
    try:
        if ray_opts["address"]:
            summary = _run_on_ray(items, output, worker, pair, ray_opts, retry_failed, overwrite, csv_path,
                                  stall_timeout, kw["verbose"], progress)
        else:
            job = CaptionJob(items, Path(output), worker, retry_failed=retry_failed, overwrite=overwrite,
                             shard=shard_spec, csv_path=Path(csv_path) if csv_path else None,
                             sidecar_ext=sidecar_ext if sidecar else None, stall_timeout=stall_timeout, pair=pair)
            summary = run_job(job, on_plan=progress.plan, on_ready=progress.ready, on_record=progress.record)
    except KeyboardInterrupt:
        progress.close()
        status(f"interrupted after {progress.done} images this run; {output} holds every finished one: "
               "run the same command to resume")
        return EXIT_INTERRUPTED
    finally:
        progress.close()
    _print_summary(summary, output)
    return min(summary.n_failed, EXIT_CAP)


def _run_on_ray(items, output, worker, pair, ray_opts, retry_failed, overwrite, csv_path, stall_timeout, verbose,
                progress):
    from llava_local.caption import ray_job    # Ray itself: only here (LlavaLocalError when not installed)
    options = ray_job.RayOptions(**ray_opts, quiet=not verbose)
    started = ray_job.connect(options.address, quiet=options.quiet)
    try:
        job = ray_job.RayCaptionJob(items, Path(output), worker, options=options, retry_failed=retry_failed,
                                    overwrite=overwrite, csv_path=Path(csv_path) if csv_path else None,
                                    stall_timeout=stall_timeout, pair=pair)
        return ray_job.run_ray_job(job, on_plan=progress.plan, on_ready=progress.ready, on_record=progress.record)
    finally:
        if started:
            ray_job.disconnect()


class _Progress:
    """A tqdm bar on stderr (images/s, ETA, failures), started once the model is loaded; with
    `lines` (a Ray job without a terminal) a line every PROGRESS_INTERVAL_S and at the end."""

    def __init__(self, lines: bool = False):
        self.bar = None
        self.lines = lines
        self.t_ready = None        # lines: when the first engine was ready (time.monotonic())
        self.last_line = 0.0
        self.todo = 0
        self.done = 0
        self.failed = 0

    def plan(self, summary, todo: int) -> None:
        self.todo = todo
        before = summary.done_before + summary.failed_before
        if before:
            status(f"resuming: {before} of {summary.total} images done before, {todo} to caption")
        if todo:
            status(f"loading the model for {todo} images ...")

    def ready(self, info: dict) -> None:
        from tqdm import tqdm
        if self.lines:
            self.last_line = time.monotonic()
            self.t_ready = self.last_line - max(0.0, time.time() - info.get("ready_time", time.time()))
            return
        if self.bar is None:
            self.bar = tqdm(total=self.todo, initial=self.done, unit="img", desc="caption", file=sys.stderr,
                            disable=None, dynamic_ncols=True, smoothing=0.05)
            self.bar.set_postfix(failed=self.failed, refresh=False)

    def record(self, rec: dict) -> None:
        self.done += 1
        if rec["status"] != "ok":
            self.failed += 1
        if self.bar is not None:
            if rec["status"] != "ok":
                self.bar.set_postfix(failed=self.failed, refresh=False)
            self.bar.update(1)
        elif self.t_ready is not None and time.monotonic() - self.last_line >= PROGRESS_INTERVAL_S:
            self._line()

    def _line(self) -> None:
        from tqdm import tqdm
        self.last_line = now = time.monotonic()
        rate = self.done / (now - self.t_ready) if now > self.t_ready else 0.0
        eta = tqdm.format_interval((self.todo - self.done) / rate) if rate > 0 else "?"
        status(f"caption: {self.done}/{self.todo} images, {rate:.1f} images/s, ETA {eta}, {self.failed} failed")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.t_ready is not None:
            self._line()
        self.t_ready = None


def _print_summary(s, output) -> None:
    info = s.info
    where = f"vision {info['vision_backend']}, parallel {info['parallel']}" if info else "nothing to do"
    if info.get("actors"):
        n = info["actors"]
        where += f" per actor; {n} actor{'s' * (n != 1)}, {s.blocks} block{'s' * (s.blocks != 1)}"
    status(f"{s.total} images: {s.captioned} captioned, {s.failed} failed this run; "
           f"{s.done_before} done and {s.failed_before} failed before"
           + (f"; {s.replaced} recomputed (other fingerprint)" if s.replaced else "")
           + (f"; worker restarted {s.restarts}x" if s.restarts else ""))
    if s.captioned + s.failed:
        status(f"{s.images_per_s:.2f} images/s ({where}); {s.elapsed_s:.1f} s total, model load {s.load_s:.1f} s "
               f"-> {output}")
    for path, err in s.failures[:MAX_FAILURES_SHOWN]:
        status(f"  failed: {err if path in err else f'{path}: {err}'}")
    if len(s.failures) > MAX_FAILURES_SHOWN:
        more = len(s.failures) - MAX_FAILURES_SHOWN
        status(f"  ... and {more} more (records with \"status\": \"error\" in {output})")
