"""Find and validate an (LLM, mmproj) GGUF pair before llama.cpp loads anything.

    pair = resolve_pair("out/")                       # a directory with a manifest (or one pair)
    pair = resolve_pair("llm.gguf", "mmproj.gguf")
    check_context(pair, n_ctx=2048, n_images=1)       # ContextOverflowError if the largest image cannot fit

Every check names the file it is about, so a user who swapped --model and --mmproj, or mixed a 7B
LLM with a 13B mmproj, reads which file is wrong and why.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import gguf

from llava_local.errors import ModelFilesError
from llava_local.formats.gguf_check import GGUFInfo, read_gguf_info
from llava_local.formats.gguf_names import KEY_LLAVA_LOCAL_TEMPLATE
from llava_local.formats.manifest import find_manifests, read_manifest
from llava_local.formats.mmproj import MmprojInfo, mmproj_from_info
from llava_local.runtime.context_fit import check_fit

log = logging.getLogger(__name__)

DEFAULT_CTX = 4096      # LLaVA-1.5 and 1.6 train at 4096
ANSWER_ROOM = 1024      # the default context holds the largest image and at least this much text + answer


@dataclass(frozen=True)
class ModelPair:
    llm_path: Path
    mmproj_path: Path
    llm: GGUFInfo
    mmproj: MmprojInfo
    manifest: dict | None

    @property
    def n_embd(self) -> int:
        return int(self.llm.require(f"{self.llm.architecture}.embedding_length"))

    @property
    def n_ctx_train(self) -> int | None:
        v = self.llm.get(f"{self.llm.architecture}.context_length")
        return int(v) if v else None

    @property
    def image_tokens(self) -> int:
        """Tokens of one LLaVA-1.5 image, or of one tile of a LLaVA-1.6 ("anyres") one."""
        return self.mmproj.image_tokens

    @property
    def anyres(self) -> bool:
        """LLaVA-1.6: an image's token count depends on its size (image/anyres.py)."""
        return self.mmproj.anyres is not None

    def max_image_tokens(self, max_tiles: int | None = None) -> int:
        """The most tokens one image can take (1.5: `image_tokens`; 1.6: base + most tiles + newlines)."""
        return self.mmproj.max_image_tokens(max_tiles)

    @property
    def chat_template(self) -> str | None:
        return self.llm.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)

    @property
    def template_name(self) -> str | None:
        """The named template, from the GGUF (written by our converter), else the manifest."""
        return self.llm.get(KEY_LLAVA_LOCAL_TEMPLATE) or (self.manifest or {}).get("template")


def _inside(directory: Path, name: str, manifest: Path) -> Path:
    p = (directory / name).resolve()
    if p.parent != directory.resolve():
        raise ModelFilesError(f"{manifest}: file {name!r} is outside the model directory")
    return p


def _from_dir(directory: Path) -> tuple[Path, Path, dict | None]:
    manifests = find_manifests(directory)
    if len(manifests) == 1:
        m = read_manifest(manifests[0])
        return _inside(directory, m["llm"], manifests[0]), _inside(directory, m["mmproj"], manifests[0]), m
    ggufs = sorted(directory.glob("*.gguf"))
    mm = [p for p in ggufs if "mmproj" in p.name.lower()]
    llm = [p for p in ggufs if p not in mm]
    if len(mm) == 1 and len(llm) == 1:
        return llm[0], mm[0], None
    raise ModelFilesError(f"{directory}: expected one *.manifest.json or exactly one LLM and one mmproj .gguf "
                          f"(found {len(manifests)} manifests, {len(llm)} LLM and {len(mm)} mmproj files)")


def resolve_pair(model: str | Path, mmproj: str | Path | None = None) -> ModelPair:
    model = Path(model)
    manifest = None
    if model.is_dir():
        if mmproj is not None:
            llm_path, mmproj_path = _from_dir(model)[0], Path(mmproj)
        else:
            llm_path, mmproj_path, manifest = _from_dir(model)
    else:
        if not model.exists():
            raise ModelFilesError(f"{model}: no such model file or directory")
        llm_path = model
        if mmproj is None:
            sibling = find_manifests(model.parent)
            if len(sibling) == 1 and read_manifest(sibling[0]).get("llm") == model.name:
                manifest = read_manifest(sibling[0])
                mmproj_path = _inside(model.parent, manifest["mmproj"], sibling[0])
            else:
                raise ModelFilesError(f"{model}: no --mmproj given and no manifest next to it names one")
        else:
            mmproj_path = Path(mmproj)
    if not mmproj_path.exists():
        raise ModelFilesError(f"{mmproj_path}: mmproj file not found")
    llm_info = read_gguf_info(llm_path)
    mm_info = read_gguf_info(mmproj_path)
    if llm_info.architecture == "clip":
        raise ModelFilesError(f"{llm_path}: this is an mmproj (vision) file, not an LLM — pass it as --mmproj")
    mm = mmproj_from_info(mm_info)
    arch = llm_info.architecture
    if not arch:
        raise ModelFilesError(f"{llm_path}: no general.architecture: not an LLM GGUF")
    n_embd = int(llm_info.require(f"{arch}.embedding_length"))
    if mm.projection_dim != n_embd:
        raise ModelFilesError(
            f"mmproj width {mm.projection_dim} ({mmproj_path.name}) does not match LLM width {n_embd} "
            f"({llm_path.name}): wrong --mmproj?")
    return ModelPair(llm_path, mmproj_path, llm_info, mm, manifest)


def check_context(pair: ModelPair, n_ctx: int, n_images: int = 1, n_text: int = 0, *,
                  max_tiles: int | None = None) -> None:
    """Refuse a context that cannot hold `n_images` of the largest images this pair makes (with
    `max_tiles`, for LLaVA-1.6) and `n_text` tokens, rather than silently dropping an image
    (llama-cpp-python #935)."""
    hint = "raise --ctx or lower --image-max-tiles" if pair.anyres else "raise --ctx"
    check_fit(n_ctx=n_ctx, images=[pair.max_image_tokens(max_tiles)] * n_images, n_text=n_text, reserve=1,
              hint=hint)


def default_context(pair: ModelPair, max_tiles: int | None = None) -> int:
    """n_ctx when none is given: DEFAULT_CTX, more if the largest image (with `max_tiles`) and
    ANSWER_ROOM need it, never past what the LLM was trained for (check_context then says what is
    missing). LLaVA-1.6's largest image, 2928 tokens, leaves 4096 as it is."""
    want = max(DEFAULT_CTX, pair.max_image_tokens(max_tiles) + ANSWER_ROOM)
    return min(want, pair.n_ctx_train or want)
