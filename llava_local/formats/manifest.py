"""The model manifest (`NAME.manifest.json`, written next to a converted pair): which files form the
pair, how they were made, and what the runtime needs before opening them. One reader, one writer.

    write_manifest(out / "demo.manifest.json", {"name": "demo", "llm": "demo-llm-F16.gguf",
                                               "mmproj": "demo-mmproj-F16.gguf", ...})
    m = read_manifest(out / "demo.manifest.json")      # ModelFilesError when unusable
"""
from __future__ import annotations

import os
from pathlib import Path

from llava_local.errors import ModelFilesError
from llava_local.fileio import read_json, write_json

FORMAT = "llava-local-manifest"
VERSION = 1
SUFFIX = ".manifest.json"


def manifest_path(directory: str | os.PathLike, name: str) -> Path:
    return Path(directory) / f"{name}{SUFFIX}"


def find_manifests(directory: str | os.PathLike) -> list[Path]:
    """The manifests in a folder, sorted by name."""
    return sorted(Path(directory).glob(f"*{SUFFIX}"))


def manifest_for(directory: str | os.PathLike, **match: str) -> tuple[Path, dict] | None:
    """The first readable manifest in `directory` whose fields equal `match` (e.g. mmproj="x.gguf");
    unreadable manifests are skipped (the one a model was loaded with was validated then)."""
    for path in find_manifests(directory):
        try:
            m = read_manifest(path)
        except ModelFilesError:
            continue
        if all(m.get(k) == v for k, v in match.items()):
            return path, m
    return None


def write_manifest(path: str | os.PathLike, manifest: dict) -> Path:
    """Write atomically; "format"/"version" are set here, "llm" and "mmproj" must name the pair's files."""
    if not isinstance(manifest.get("llm"), str) or not isinstance(manifest.get("mmproj"), str):
        raise ValueError("a manifest names its 'llm' and 'mmproj' files")
    data = {"format": FORMAT, "version": VERSION, **{k: v for k, v in manifest.items() if k not in ("format", "version")}}
    write_json(path, data)
    return Path(path)


def read_manifest(path: str | os.PathLike) -> dict:
    data = read_json(path, what="manifest", error=ModelFilesError)
    if not isinstance(data, dict) or not isinstance(data.get("llm"), str) or not isinstance(data.get("mmproj"), str):
        raise ModelFilesError(f"{path}: manifest must name 'llm' and 'mmproj' files")
    return data
