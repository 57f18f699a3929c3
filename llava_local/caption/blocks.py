"""A caption job's output as a folder of blocks (ray_job.py): each block is one file of records,
committed whole or not at all, so a killed job leaves only whole blocks and a rerun skips their keys.

    store = BlockStore(Path("captions.parquet"))     # *.parquet: Parquet blocks; any other name: JSONL blocks
    name = store.commit(table, fingerprint)          # part-<fingerprint>-<hash of the block's keys>.parquet
    for name in store.names():
        records = store.read(name)                    # the records as `caption` writes them (dicts)

A block is written under a temporary name (".part-...tmp"), synced, then renamed (fileio.atomic_write):
readers and resume see the block or nothing. Its name is derived from the sorted keys it holds and
the job's fingerprint. A JSONL block holds exactly the lines `caption` journals; a Parquet block
holds the same records with the columns of RECORD_COLUMNS (the `json` object as its JSON text).
This module does not import Ray: only pyarrow, which Ray Data brings.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from llava_local import fileio
from llava_local.caption.journal import CaptionOutputError, encode_record, read_journal

BLOCK_PREFIX = "part-"
PARQUET_SUFFIX = ".parquet"
JSONL_SUFFIX = ".jsonl"
BLOCK_HASH_CHARS = 20               # of the sha256 of the block's sorted keys: collisions need ~2^40 blocks

_TIMINGS = pa.struct([("load_s", pa.float64()), ("encode_s", pa.float64()), ("generate_s", pa.float64())])

# A record's fields in the order `caption` writes them (worker.py's record, then job.record_stamp and
# "time"), with their Parquet types. Every record has the first five; the others are left out of a
# JSONL line when null (an image that failed before decoding has no token counts or timings).
RECORD_COLUMNS = (
    ("key", pa.string()),
    ("path", pa.string()),
    ("status", pa.string()),            # "ok" | "error"
    ("caption", pa.string()),
    ("error", pa.string()),
    ("json", pa.string()),              # --json-schema: the parsed answer; in Parquet its JSON text
    ("n_tokens", pa.int64()),
    ("finish_reason", pa.string()),
    ("n_prompt_tokens", pa.int64()),
    ("timings", _TIMINGS),
    ("fingerprint", pa.string()),
    ("model", pa.string()),
    ("prompt", pa.string()),
    ("vision_backend", pa.string()),
    ("vision_device", pa.string()),
    ("llm_device", pa.string()),
    ("time", pa.string()),
)
ALWAYS_PRESENT = ("key", "path", "status", "caption", "error")
RECORD_SCHEMA = pa.schema(RECORD_COLUMNS)
RESUME_COLUMNS = ["key", "path", "status", "error", "fingerprint", "prompt"]   # what planning a rerun reads


def records_table(records: list[dict]) -> pa.Table:
    """Records (dicts, as the worker and job make them) as a table of RECORD_SCHEMA."""
    known = set(RECORD_SCHEMA.names)
    cols: dict[str, list] = {name: [] for name in RECORD_SCHEMA.names}
    for rec in records:
        extra = set(rec) - known
        if extra:   # a new record field must get a column here, or Parquet would silently lose it
            raise ValueError(f"record fields {sorted(extra)} have no column in blocks.RECORD_COLUMNS")
        for name in cols:
            v = rec.get(name)
            cols[name].append(json.dumps(v, ensure_ascii=False) if name == "json" and v is not None else v)
    return pa.Table.from_pydict(cols, schema=RECORD_SCHEMA)


def table_records(table: pa.Table) -> list[dict]:
    """The inverse of records_table: the dicts `caption` writes (null optional fields left out)."""
    out = []
    for row in table.select(RECORD_SCHEMA.names).to_pylist():
        rec = {k: v for k, v in row.items() if v is not None or k in ALWAYS_PRESENT}
        if rec.get("json") is not None:
            rec["json"] = json.loads(rec["json"])
        out.append(rec)
    return out


def block_name(fingerprint: str, keys: Iterable[str], suffix: str) -> str:
    digest = hashlib.sha256("\n".join(sorted(keys)).encode("utf-8")).hexdigest()[:BLOCK_HASH_CHARS]
    return f"{BLOCK_PREFIX}{fingerprint}-{digest}{suffix}"


class BlockStore:
    """The blocks of one output folder; the format follows its name (".parquet": Parquet, else JSONL)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.suffix = PARQUET_SUFFIX if self.root.name.lower().endswith(PARQUET_SUFFIX) else JSONL_SUFFIX
        if self.root.exists() and not self.root.is_dir():
            raise CaptionOutputError(f"{self.root}: a Ray job writes a folder of blocks; this is a file "
                                     f"(give a folder, e.g. -o captions{self.suffix}/)")

    @property
    def format(self) -> str:
        return "parquet" if self.suffix == PARQUET_SUFFIX else "jsonl"

    def _path(self, name: str) -> Path:
        return self.root / name

    def names(self) -> list[str]:
        """Committed blocks, sorted (temporaries start with "." and are not blocks)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.name.startswith(BLOCK_PREFIX) and p.name.endswith(self.suffix) and p.is_file())

    def remove_temporaries(self) -> int:
        """Temporaries of blocks whose commit was cut short (a killed job). Call under the job's lock."""
        n = 0
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith("." + BLOCK_PREFIX) and p.name.endswith(".tmp"):
                    p.unlink(missing_ok=True)
                    n += 1
        return n

    def commit(self, table: pa.Table, fingerprint: str) -> str:
        """Write `table` (RECORD_SCHEMA) as one block, whole or not at all; return its name."""
        name = block_name(fingerprint, table.column("key").to_pylist(), self.suffix)
        self._write(name, table)
        return name

    def _write(self, name: str, table: pa.Table) -> None:
        if self.format == "parquet":
            buf = io.BytesIO()
            pq.write_table(table.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA), buf)
            data = buf.getvalue()
        else:
            data = b"".join(encode_record(r) for r in table_records(table))
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fileio.atomic_write(self._path(name), data)
        except OSError as exc:
            raise CaptionOutputError(f"{self._path(name)}: cannot write ({exc.strerror or exc}); the folder holds "
                                     "whole blocks only: fix it and run the same command to resume") from None

    def read(self, name: str, columns: list[str] | None = None) -> list[dict]:
        """The block's records (with `columns`: only those fields; Parquet then reads no more)."""
        path = self._path(name)
        if self.format == "jsonl":
            recs = read_journal(path).records
            return recs if columns is None else [{c: r.get(c) for c in columns} for r in recs]
        try:
            table = pq.read_table(path, columns=columns)
        except (OSError, pa.ArrowException) as exc:
            raise CaptionOutputError(f"{path}: not a readable Parquet block ({exc}); delete it to recompute "
                                     "its images") from None
        return table.to_pylist() if columns is not None else table_records(table)

    def replace(self, name: str, records: list[dict]) -> None:
        """The block rewritten to hold only `records` (removed when none): resume's drop, whole or not at all."""
        if not records:
            try:
                self._path(name).unlink()
            except OSError as exc:
                raise CaptionOutputError(f"{self._path(name)}: cannot remove ({exc.strerror or exc})") from None
            fileio.fsync_dir(self.root)
            return
        self._write(name, records_table(records))
