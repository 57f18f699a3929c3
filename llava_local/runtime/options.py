"""How an engine runs a model: the one options object of the Python API, every CLI command and the
caption worker (CLI flags and env vars map onto these fields in cli/options.py).

    opts = EngineOptions(n_ctx=2048, gpu_layers="auto", vision_backend="auto", threads=8)
    engine = Engine(pair, opts)                       # or Engine(pair, n_ctx=2048, ...) for the same
    engine = Engine(pair, opts, workload="oneshot")   # fields given as keywords override `opts`
"""
from __future__ import annotations

from dataclasses import dataclass

from llava_local.errors import LlavaLocalError

WORKLOADS = ("oneshot", "session", "batch")


@dataclass(frozen=True)
class EngineOptions:
    n_ctx: int | None = None            # None: 4096, or the LLM's training context if smaller (--ctx)
    gpu_layers: int | str = "auto"      # auto | all | N: LLM layers on the GPU (-ngl); auto = all that fit
    vision_backend: str = "auto"        # auto = the fastest exact backend here (placement.backend_order)
    vision_device: str = "auto"         # auto | cpu | gpu
    threads: int | None = None          # CPU threads; None = all cores (llama.cpp's default is 4)
    template: str | None = None         # a named template instead of the GGUF's / manifest's
    image_max_tiles: int | None = None  # LLaVA-1.6: grids of at most this many tiles (fewer tokens, less
                                        # detail); None: all the model's pinpoints. LLaVA-1.5 ignores it
    workload: str = "session"           # oneshot | session | batch: which backend starts or runs fastest
    n_seq_max: int = 1                  # >1: sequences decoded together (the caption worker, the server)
    precise: bool = False               # F32 KV cache, no flash attention: tests compare with transformers
    all_logits: bool = False            # keep every position's logits (teacher forcing, fidelity tests)
    extra_bufts: bool | None = None     # llama.cpp's weight repacking; None = the once-per-CPU probe decides
    verbose: bool = False               # llama.cpp's own log on stderr

    def validate(self) -> "EngineOptions":
        if self.n_ctx is not None and self.n_ctx < 16:
            raise LlavaLocalError(f"n_ctx must be >= 16, got {self.n_ctx}")
        if self.threads is not None and self.threads < 1:
            raise LlavaLocalError(f"threads must be >= 1, got {self.threads}")
        if self.vision_device not in ("auto", "cpu", "gpu"):
            raise LlavaLocalError(f"vision_device must be auto, cpu or gpu, got {self.vision_device!r}")
        if self.workload not in WORKLOADS:
            raise LlavaLocalError(f"workload must be one of {', '.join(WORKLOADS)}, got {self.workload!r}")
        if self.image_max_tiles is not None and self.image_max_tiles < 1:
            raise LlavaLocalError(f"image_max_tiles must be >= 1, got {self.image_max_tiles}")
        if self.n_seq_max < 1:
            raise LlavaLocalError(f"n_seq_max must be >= 1, got {self.n_seq_max}")
        return self
