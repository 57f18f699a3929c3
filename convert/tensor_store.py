"""Lazy, safe access to the tensors of a checkpoint directory.

safetensors files are validated (bounded header, offsets) before they are opened; PyTorch `.bin`
files are read only with `torch.load(weights_only=True)`, so a pickle payload never runs.
Tensors are loaded one at a time, so converting a 7B model does not hold it all in memory twice.
"""
from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Iterator

import torch

from llava_local.errors import ModelFilesError
from llava_local.formats.safetensors_check import check_safetensors

log = logging.getLogger(__name__)


class TensorStore:
    """name -> tensor, across the shards of one checkpoint directory."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, Path] = {}
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        for f in files:
            for name in self._names_in(f):
                self._where[name] = f

    @classmethod
    def from_dir(cls, directory: Path) -> "TensorStore":
        files = model_files(directory)
        if not files:
            raise ModelFilesError(f"{directory}: no model weights (*.safetensors or pytorch_model*.bin) found")
        return cls(files)

    def _names_in(self, f: Path) -> list[str]:
        if f.suffix == ".safetensors":
            return list(check_safetensors(f))
        return list(self._load_bin(f))

    def _load_bin(self, f: Path) -> dict[str, torch.Tensor]:
        if f not in self._bin_cache:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ModelFilesError(f"{f}: refused to load PyTorch checkpoint (weights only): {first}") from None
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise ModelFilesError(f"{f}: not a state dict of tensors")
            self._bin_cache[f] = sd
        return self._bin_cache[f]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        f = self._where.get(name)
        if f is None:
            raise ModelFilesError(f"missing tensor {name!r} in checkpoint")
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(f), framework="pt") as sf:
                return sf.get_tensor(name)
        return self._load_bin(f)[name]

    def with_prefix(self, prefix: str) -> Iterator[tuple[str, str]]:
        """(full name, name without prefix) for every tensor under `prefix`."""
        for n in self._where:
            if n.startswith(prefix):
                yield n, n[len(prefix):]


def model_files(directory: Path) -> list[Path]:
    """The weight files of an HF-style directory: the index's shards, else model*.safetensors,
    else pytorch_model*.bin."""
    for index_name, suffix in (("model.safetensors.index.json", ".safetensors"),
                               ("pytorch_model.bin.index.json", ".bin")):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelFilesError(f"{index}: malformed shard index ({exc})") from None
            shards = []
            for shard in sorted(set(weight_map.values())):
                p = (directory / shard).resolve()
                if p.parent != directory.resolve() or not p.is_file():
                    raise ModelFilesError(f"{index}: shard {shard!r} is missing or outside the checkpoint dir")
                shards.append(p)
            return shards
    st = sorted(directory.glob("model*.safetensors"))
    if st:
        return st
    return sorted(directory.glob("pytorch_model*.bin"))
