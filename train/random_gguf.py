"""LLaVA GGUF pairs with random weights, written directly (no transformers model, no checkpoint on
disk), for benchmarks and hardware checks at the real LLaVA-1.5 sizes.

    from train.random_gguf import LLAVA15_7B_WIDE, TINY, build_pair
    files = build_pair(".cache/gpu-check", LLAVA15_7B_WIDE, outtypes=("f16",), quantize=("Q4_K_M",))
    files.llm["F16"], files.llm["Q4_K_M"], files.mmproj["F16"]

The tensors come from a seeded random store that looks like a checkpoint to convert/'s own writers
(`write_llm`, `write_mmproj`), so the files carry exactly the keys, names and tensor types that
`llava-local convert` writes: the LLM as llama.cpp's llama architecture with SmolLM2's vocabulary
(the tokenizer `make deps` unpacks) and our Vicuna chat template; the mmproj in llama.cpp's clip
format with an explicit feature layer and only the CLIP layers that run (LLaVA's layer -2).
Quantized LLMs go through convert/quantize.py (llama.cpp's own quantizer).

Weights are uniform with the spec's standard deviation (0.02, as Llama and CLIP initialise), norms
are 1 and biases small, so activations stay in range through every layer and the LLM's logits have
clear maxima (logit std 1.28 and a median top-1 margin of 0.22 at width 4096, measured): top-1
comparisons are not decided by ties. Every tensor is generated in chunks on all cores (numpy fills
without the GIL), each chunk from its own seed, so the bytes depend on the spec, the seed and the
writing code only; the F16 conversion in the writers and the quantizer take most of the time for
the 7B-wide, 8-layer LLM (2.0 B parameters).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import TrainConfigError

log = logging.getLogger(__name__)

SMOLLM2_VOCAB = 49152        # tokens in SmolLM2's tokenizer: the LLM's vocabulary size
CHUNK = 1 << 22              # elements per generator call: ~16 MB of float32, one task per core
PROJECTOR_PREFIX = "multi_modal_projector."   # llava-hf's projector names


@dataclass(frozen=True)
class LlmSpec:
    n_embd: int = 4096         # Vicuna-7B / LLaVA-1.5-7B
    n_ff: int = 11008
    n_head: int = 32
    n_head_kv: int = 32
    n_layer: int = 8           # Vicuna-7B has 32; 8 keep a check fast and still stress the kernels
    n_ctx: int = 4096          # LLaVA-1.5 trains at 4096
    init_std: float = 0.02
    seed: int = 0


@dataclass(frozen=True)
class ClipSpec:
    image_size: int = 336      # CLIP ViT-L/14-336: 24 x 24 = 576 image tokens
    patch_size: int = 14
    hidden: int = 1024
    n_ff: int = 4096
    n_head: int = 16
    n_layer: int = 24          # CLIP's depth; LLaVA's feature layer -2 runs (and the mmproj stores) 23
    proj_hidden: int = 4096    # mlp2x_gelu: 1024 -> 4096 -> 4096 (= the LLM's width)
    proj_out: int = 4096
    init_std: float = 0.02
    seed: int = 1


@dataclass(frozen=True)
class PairSpec:
    name: str
    llm: LlmSpec = field(default_factory=LlmSpec)
    clip: ClipSpec = field(default_factory=ClipSpec)

    def fingerprint(self) -> str:
        """Names the files: a changed spec, or changed code that writes them, never reuses old files."""
        blob = json.dumps(asdict(self), sort_keys=True) + _code_version()
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


# The code that decides the files' bytes besides the spec (read as files: importing convert/ would
# import torch, which a check that only needs the built files can do without)
_BYTES_FROM = ("convert/writers.py", "convert/tokenizer_gguf.py", "convert/quantize.py",
               "llava_local/formats/gguf_names.py", "llava_local/prompts/templates.py", "train/random_gguf.py")


def _code_version() -> str:
    """Our writers, names, template and quantizer, and the versions of gguf-py and llama.cpp."""
    from importlib.metadata import version
    root = Path(__file__).resolve().parents[1]      # the packages sit side by side (repo or site-packages)
    h = hashlib.sha256(f"{version('gguf')} {version('llama-cpp-python')}".encode())
    for rel in _BYTES_FROM:
        h.update((root / rel).read_bytes())
    return h.hexdigest()


LLAVA15_7B_WIDE = PairSpec("llava15-7b-wide")
# std 0.15 ~ 1/sqrt(64) keeps the 64-wide LLM's logits as peaked as the 7B's
TINY = PairSpec("tiny",
                LlmSpec(n_embd=64, n_ff=192, n_head=4, n_head_kv=2, n_layer=2, n_ctx=2048, init_std=0.15),
                ClipSpec(image_size=56, hidden=32, n_ff=128, n_head=4, n_layer=3, proj_hidden=64, proj_out=64,
                         init_std=0.1))


# --- the random store: what convert/writers.py reads from a checkpoint ---

def _seed_of(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def random_array(shape: tuple[int, ...], std: float, seed: int, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """Uniform float32 with mean 0 and this std; chunk i always comes from generator (seed, i)."""
    out = np.empty(int(np.prod(shape)), np.float32)
    half_width = std * 3 ** 0.5

    def fill(i: int) -> None:
        part = out[i * CHUNK:(i + 1) * CHUNK]
        np.random.default_rng([seed, i]).random(out=part, dtype=np.float32)
        part -= 0.5
        part *= 2 * half_width
    n_chunks = -(-out.size // CHUNK)
    if pool is None or n_chunks == 1:
        for i in range(n_chunks):
            fill(i)
    else:
        list(pool.map(fill, range(n_chunks)))   # numpy fills without the GIL: all cores work
    return out.reshape(shape)


class RandomTensorStore:
    """name -> (shape, kind); a tensor is generated when asked for, the same each time.
    kinds: "w" weights (std), "norm" (1.0), "bias" (std / 2)."""

    def __init__(self, tensors: dict[str, tuple[tuple[int, ...], str]], std: float, seed: int,
                 pool: ThreadPoolExecutor | None = None):
        self.tensors, self.std, self.seed, self.pool = tensors, std, seed, pool

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def with_prefix(self, prefix: str) -> Iterator[tuple[str, str]]:
        for n in self.tensors:
            if n.startswith(prefix):
                yield n, n[len(prefix):]

    def get(self, name: str):
        import torch
        shape, kind = self.tensors[name]
        if kind == "norm":
            return torch.ones(shape)
        std = self.std if kind == "w" else self.std / 2
        return torch.from_numpy(random_array(shape, std, _seed_of(self.seed, name), self.pool))


def _llm_tensors(s: LlmSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF Llama names, as `LlavaCheckpoint.llm_tensors()` yields them (prefix "model.")."""
    kv = s.n_embd // s.n_head * s.n_head_kv
    t = {"model.embed_tokens.weight": ((SMOLLM2_VOCAB, s.n_embd), "w"),
         "model.norm.weight": ((s.n_embd,), "norm"),
         "lm_head.weight": ((SMOLLM2_VOCAB, s.n_embd), "w")}
    for i in range(s.n_layer):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": ((s.n_embd,), "norm"),
                  p + "self_attn.q_proj.weight": ((s.n_embd, s.n_embd), "w"),
                  p + "self_attn.k_proj.weight": ((kv, s.n_embd), "w"),
                  p + "self_attn.v_proj.weight": ((kv, s.n_embd), "w"),
                  p + "self_attn.o_proj.weight": ((s.n_embd, s.n_embd), "w"),
                  p + "post_attention_layernorm.weight": ((s.n_embd,), "norm"),
                  p + "mlp.gate_proj.weight": ((s.n_ff, s.n_embd), "w"),
                  p + "mlp.up_proj.weight": ((s.n_ff, s.n_embd), "w"),
                  p + "mlp.down_proj.weight": ((s.n_embd, s.n_ff), "w")})
    return t


def _clip_tensors(c: ClipSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF CLIPVisionModel names under "vision_model.", only the layers LLaVA runs, and the projector."""
    n_pos = (c.image_size // c.patch_size) ** 2 + 1
    v = "vision_model."
    t = {v + "embeddings.class_embedding": ((c.hidden,), "w"),
         v + "embeddings.patch_embedding.weight": ((c.hidden, 3, c.patch_size, c.patch_size), "w"),
         v + "embeddings.position_embedding.weight": ((n_pos, c.hidden), "w"),
         v + "pre_layrnorm.weight": ((c.hidden,), "norm"),
         v + "pre_layrnorm.bias": ((c.hidden,), "bias")}
    for i in range(c.n_layer - 1):
        p = f"{v}encoder.layers.{i}."
        for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{m}.weight"] = ((c.hidden, c.hidden), "w")
            t[p + f"self_attn.{m}.bias"] = ((c.hidden,), "bias")
        for ln in ("layer_norm1", "layer_norm2"):
            t[p + f"{ln}.weight"] = ((c.hidden,), "norm")
            t[p + f"{ln}.bias"] = ((c.hidden,), "bias")
        t[p + "mlp.fc1.weight"] = ((c.n_ff, c.hidden), "w")
        t[p + "mlp.fc1.bias"] = ((c.n_ff,), "bias")
        t[p + "mlp.fc2.weight"] = ((c.hidden, c.n_ff), "w")
        t[p + "mlp.fc2.bias"] = ((c.hidden,), "bias")
    t[PROJECTOR_PREFIX + "linear_1.weight"] = ((c.proj_hidden, c.hidden), "w")
    t[PROJECTOR_PREFIX + "linear_1.bias"] = ((c.proj_hidden,), "bias")
    t[PROJECTOR_PREFIX + "linear_2.weight"] = ((c.proj_out, c.proj_hidden), "w")
    t[PROJECTOR_PREFIX + "linear_2.bias"] = ((c.proj_out,), "bias")
    return t


def random_checkpoint(spec: PairSpec, pool: ThreadPoolExecutor | None = None):
    """A `LlavaCheckpoint` in the llava-hf layout whose tensors are generated on demand."""
    from convert.checkpoint import LlavaCheckpoint, VisionSpec

    from .tiny_models import smollm2_tokenizer_dir
    s, c = spec.llm, spec.clip
    if c.proj_out != s.n_embd:
        raise TrainConfigError(f"projector width {c.proj_out} != LLM width {s.n_embd}")
    vstore = RandomTensorStore(_clip_tensors(c), c.init_std, c.seed, pool)
    store = _WithProjector(RandomTensorStore(_llm_tensors(s), s.init_std, s.seed, pool), vstore)
    vision = VisionSpec(hidden_size=c.hidden, intermediate_size=c.n_ff, num_layers=c.n_layer, num_heads=c.n_head,
                        image_size=c.image_size, patch_size=c.patch_size, layer_norm_eps=1e-5,
                        hidden_act="quick_gelu", feature_layer=c.n_layer - 1)   # LLaVA: layer -2
    text = {"hidden_size": s.n_embd, "intermediate_size": s.n_ff, "num_hidden_layers": s.n_layer,
            "num_attention_heads": s.n_head, "num_key_value_heads": s.n_head_kv, "rms_norm_eps": 1e-5,
            "max_position_embeddings": s.n_ctx, "rope_theta": 10000.0, "vocab_size": SMOLLM2_VOCAB}
    return LlavaCheckpoint(
        layout="llava-hf", source=Path(spec.name), name=spec.name, vision=vision, text=text,
        store=store, vision_store=vstore, vision_prefix="vision_model.",
        llm_prefix="model.", llm_as="model.", lm_head="lm_head.weight",
        projector_prefix=PROJECTOR_PREFIX, projector_layers=("linear_1", "linear_2"), projector_act="gelu",
        tokenizer_dir=smollm2_tokenizer_dir())


class _WithProjector(RandomTensorStore):
    """The LLM's store that also answers the projector's names from the vision store (in a llava-hf
    checkpoint both sit in one file): the mmproj does not change with the LLM's spec or seed."""

    def __init__(self, llm: RandomTensorStore, vision: RandomTensorStore):
        routed = {k: v for k, v in vision.tensors.items() if k.startswith(PROJECTOR_PREFIX)}
        super().__init__({**llm.tensors, **routed}, llm.std, llm.seed, llm.pool)
        self._vision = vision

    def get(self, name: str):
        return self._vision.get(name) if name.startswith(PROJECTOR_PREFIX) else super().get(name)


# --- files ---

@dataclass
class PairFiles:
    spec: PairSpec
    llm: dict[str, Path]       # "F16" / "F32" / "Q4_K_M" -> LLM GGUF
    mmproj: dict[str, Path]    # "F16" / "F32" -> mmproj GGUF
    seconds: float             # spent building (0 when every file was there already)


def build_pair(out_dir: str | os.PathLike, spec: PairSpec = LLAVA15_7B_WIDE, *, outtypes=("f16",),
               quantize=(), mmproj_outtypes=None) -> PairFiles:
    """The LLM at each of `outtypes` (f32, f16) and quantized from the first of them to each of
    `quantize` (convert/quantize.py types, e.g. "Q4_K_M"); the mmproj at `mmproj_outtypes` (default:
    `outtypes`). The first LLM is written by convert/'s writer, the others made from it by llama.cpp's
    quantizer (an F16 from the F32 holds the same numbers, without writing the vocabulary again). Files already there (same spec and code) are reused, files of this spec's
    name built by other code are deleted; one process builds at a time (a lock file in `out_dir`)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    stem = f"{spec.name}-{spec.fingerprint()}"
    files = PairFiles(spec, {ot.upper(): out / f"{stem}-llm-{ot.upper()}.gguf" for ot in (*outtypes, *quantize)},
                      {ot.upper(): out / f"{stem}-mmproj-{ot.upper()}.gguf" for ot in (mmproj_outtypes or outtypes)},
                      0.0)
    if all(p.is_file() for p in [*files.llm.values(), *files.mmproj.values()]):
        return files
    from convert.quantize import quantize as quantize_llm
    from convert.writers import write_llm, write_mmproj
    from llava_local.prompts.templates import DEFAULT_TEMPLATE, get_template
    tmpl = get_template(DEFAULT_TEMPLATE)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out / ".build.lock"), ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for old in out.glob(f"{spec.name}-*.gguf"):
            if not old.name.startswith(stem + "-"):
                old.unlink()
        ck = random_checkpoint(spec, pool)
        for ot in (mmproj_outtypes or outtypes):
            if not files.mmproj[ot.upper()].is_file():      # another process may have built it meanwhile
                write_mmproj(ck, files.mmproj[ot.upper()], ot)
        first = files.llm[outtypes[0].upper()]
        if not first.is_file():
            write_llm(ck, first, outtypes[0], chat_template=tmpl.jinja, template_name=tmpl.name)
        for ot in (*outtypes[1:], *quantize):
            if not files.llm[ot.upper()].is_file():
                quantize_llm(first, files.llm[ot.upper()], ot.upper())
    files.seconds = time.perf_counter() - t0
    log.info("%s: %s in %.1fs", spec.name, ", ".join(p.name for p in [*files.llm.values(), *files.mmproj.values()]),
             files.seconds)
    return files


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` (POSIX): two builds into one directory would both write the same
    GGUFs (gigabytes each), one replacing the other's file."""
    try:
        import fcntl
    except ImportError:          # no fcntl (Windows): unlocked
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
