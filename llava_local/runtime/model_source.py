"""Where the model comes from: the embedded demo model, a local directory or file pair, or a
Hugging Face repository (downloaded into the standard hub cache, usable offline afterwards).

    pair = find_model()                                   # the demo model shipped with the package
    pair = find_model("out/")                             # a converted directory (manifest)
    pair = find_model(hf_repo="owner/llava-1.5-7b-gguf", hf_quant="Q4_K_M")
"""
from __future__ import annotations

import fnmatch
import logging
import os
from pathlib import Path

from llava_local.errors import ModelFilesError
from llava_local.runtime.model_pair import ModelPair, resolve_pair

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"
SAMPLES_DIR = Path(__file__).resolve().parents[1] / "data" / "samples"
QUANT_PREFERENCE = ("Q4_K_M", "Q5_K_M", "Q8_0", "Q6_K", "Q4_0", "F16", "BF16", "F32")  # laptop-first


def demo_model_dir() -> Path:
    if not any(DEMO_DIR.glob("*.gguf")):
        raise ModelFilesError(f"{DEMO_DIR}: the embedded demo model is missing (build it with `make demo-model`, "
                              "or pass --model / --hf-repo)")
    return DEMO_DIR


def _pick(files: list[str], quant: str | None) -> tuple[str, str]:
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    mm = [f for f in ggufs if "mmproj" in Path(f).name.lower()]
    llm = [f for f in ggufs if f not in mm]
    if not mm or not llm:
        raise ModelFilesError(f"repository has {len(llm)} LLM and {len(mm)} mmproj .gguf files; need both")
    order = ([quant.upper()] if quant else []) + list(QUANT_PREFERENCE)

    def rank(name: str) -> int:
        up = Path(name).name.upper()
        return next((i for i, q in enumerate(order) if q in up), len(order))
    if quant and not any(quant.upper() in Path(f).name.upper() for f in llm):
        raise ModelFilesError(f"no LLM file matching {quant!r} in the repository (have: {', '.join(llm)})")
    return sorted(llm, key=rank)[0], sorted(mm, key=lambda n: (rank(n) if "F16" in n.upper() else 99, n))[0]


def download_from_hub(repo: str, *, quant: str | None = None, revision: str | None = None) -> ModelPair:
    """Download (or find in the hub cache, offline) an LLM + mmproj GGUF pair."""
    try:
        from huggingface_hub import hf_hub_download, list_repo_files, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:
        raise ModelFilesError(f"--hf-repo needs huggingface_hub ({exc})") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    cache_dir = os.environ.get("HF_HUB_CACHE") or None   # read now: huggingface_hub reads it once, at import
    files = None
    if not offline:
        try:
            files = list_repo_files(repo, revision=revision)
        except (HfHubHTTPError, OSError, ValueError) as exc:
            log.info("hub not reachable (%s); trying the local cache", exc)
    if files is None:   # offline: whatever the cache holds for this repo
        try:
            snap = Path(snapshot_download(repo, revision=revision, local_files_only=True, cache_dir=cache_dir,
                                          allow_patterns=["*.gguf", "*.json"]))
        except (LocalEntryNotFoundError, OSError, ValueError) as exc:
            raise ModelFilesError(f"{repo}: not in the local hub cache and the hub is not reachable ({exc})") from None
        files = [str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file()]
        llm, mm = _pick(files, quant)
        return resolve_pair(snap / llm, snap / mm)
    llm, mm = _pick(files, quant)
    paths = []
    for f in (llm, mm):
        try:
            paths.append(Path(hf_hub_download(repo, f, revision=revision, cache_dir=cache_dir)))
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise ModelFilesError(f"{repo}/{f}: download failed ({exc})") from None
    return resolve_pair(paths[0], paths[1])


def find_model(model: str | os.PathLike | None = None, mmproj: str | os.PathLike | None = None, *,
               hf_repo: str | None = None, hf_quant: str | None = None) -> ModelPair:
    if hf_repo and model:
        raise ModelFilesError("give either --model or --hf-repo, not both")
    if hf_repo:
        if not fnmatch.fnmatch(hf_repo, "?*/?*") or hf_repo.count("/") != 1:
            raise ModelFilesError(f"--hf-repo {hf_repo!r}: expected owner/name")
        return download_from_hub(hf_repo, quant=hf_quant)
    return resolve_pair(model if model is not None else demo_model_dir(), mmproj)
