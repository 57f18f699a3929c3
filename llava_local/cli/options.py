"""Options shared by the commands that load a model (chat, run, caption): one definition each,
with env vars, and the functions that turn them into EngineOptions and an Engine."""
from __future__ import annotations

import functools
import sys

import click

from llava_local.runtime.options import EngineOptions
from llava_local.runtime.sampling import SamplingParams


class GpuLayers(click.ParamType):
    """auto | all | an integer >= 0."""
    name = "auto|all|N"

    def convert(self, value, param, ctx):
        from llava_local.errors import LlavaLocalError
        from llava_local.runtime.placement import parse_gpu_layers
        try:
            return parse_gpu_layers(value)
        except LlavaLocalError as exc:
            self.fail(str(exc), param, ctx)


def model_options(fn):
    opts = [
        click.option("-m", "--model", envvar="LLAVA_LOCAL_MODEL", type=click.Path(exists=True), default=None,
                     help="Model directory (pair + manifest) or LLM .gguf. Default: the embedded demo model. "
                          "[env: LLAVA_LOCAL_MODEL]"),
        click.option("--mmproj", envvar="LLAVA_LOCAL_MMPROJ", type=click.Path(exists=True, dir_okay=False),
                     default=None, help="mmproj .gguf, with --model FILE.  [env: LLAVA_LOCAL_MMPROJ]"),
        click.option("--hf-repo", envvar="LLAVA_LOCAL_HF_REPO", default=None,
                     help="owner/name on the Hugging Face hub: downloads an LLM + mmproj GGUF pair into the "
                          "hub cache (then works offline).  [env: LLAVA_LOCAL_HF_REPO]"),
        click.option("--hf-quant", envvar="LLAVA_LOCAL_HF_QUANT", default=None,
                     help="Which LLM file of --hf-repo, e.g. Q4_K_M (default: the smallest good quant)."),
        click.option("--vision-backend", envvar="LLAVA_LOCAL_VISION_BACKEND", default="auto", show_default=True,
                     help="auto (the fastest exact backend here: native, torch or onnx), native, torch, onnx, "
                          "or mtmd (llama.cpp's own clip graph, not exact: only when asked)."),
        click.option("--vision-device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
                     envvar="LLAVA_LOCAL_VISION_DEVICE",
                     help="auto: the GPU when the build and the vision backend can use it."),
        click.option("-ngl", "--gpu-layers", type=GpuLayers(), default="auto", show_default=True,
                     envvar="LLAVA_LOCAL_GPU_LAYERS",
                     help="LLM layers offloaded to the GPU: auto (all that fit the GPU's free memory; 0 on a "
                          "CPU build of llama-cpp-python), all, or a number."),
        click.option("--ctx", type=click.IntRange(16), default=None, envvar="LLAVA_LOCAL_CTX",
                     help="Context size in tokens (default: 4096, or the LLM's training context if smaller)."),
        click.option("--threads", type=click.IntRange(1), default=None, envvar="LLAVA_LOCAL_THREADS",
                     help="CPU threads (default: all cores)."),
        click.option("--image-max-tiles", type=click.IntRange(1), default=None, envvar="LLAVA_LOCAL_IMAGE_MAX_TILES",
                     help="LLaVA-1.6 models: cut each image into at most N tiles (of the model's grids): fewer "
                          "image tokens, trading detail for speed (default: all the model's grids, up to 2928 "
                          "tokens an image). LLaVA-1.5 models ignore it."),
        click.option("--template", default=None, envvar="LLAVA_LOCAL_TEMPLATE",
                     help="Chat template name (default: the GGUF's, else the manifest's, else vicuna_v1)."),
        click.option("-v", "--verbose", is_flag=True, help="Log steps, llama.cpp's output and timings to stderr."),
    ]
    return functools.reduce(lambda f, o: o(f), reversed(opts), fn)


def sampling_options(fn):
    opts = [
        click.option("--temp", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-k", type=click.IntRange(0), default=40, show_default=True),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True),
        click.option("--repeat-penalty", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True),
        click.option("--seed", type=int, default=None, help="Sampling seed (same seed, same answer)."),
        click.option("--max-tokens", type=click.IntRange(1), default=512, show_default=True),
        click.option("--system", default=None, help="Replace the template's system prompt."),
        click.option("--json-schema", metavar="FILE", default=None,
                     help="Answer in JSON valid against this JSON schema (a llama.cpp grammar constrains "
                          "decoding); an answer cut by --max-tokens is an error, never half a JSON."),
    ]
    return functools.reduce(lambda f, o: o(f), reversed(opts), fn)


def sampling_from(kw: dict) -> SamplingParams:
    return SamplingParams(temperature=kw["temp"], top_k=kw["top_k"], top_p=kw["top_p"],
                          repeat_penalty=kw["repeat_penalty"], seed=kw["seed"]).validate()


def output_from(kw: dict):
    """--json-schema as a JsonOutput (the schema checked and converted now, before any model loads), or None."""
    if kw["json_schema"] is None:
        return None
    from llava_local.runtime.grammar import JsonOutput
    return JsonOutput.from_file(kw["json_schema"])


def pair_from(kw: dict):
    """Find and preflight the (LLM, mmproj) pair: file errors surface before any image is read."""
    from llava_local.runtime.model_source import find_model
    return find_model(kw["model"], kw["mmproj"], hf_repo=kw["hf_repo"], hf_quant=kw["hf_quant"])


def engine_options(kw: dict, **overrides) -> EngineOptions:
    """The model options' flags as EngineOptions (flag names: --ctx is n_ctx, -ngl is gpu_layers)."""
    return EngineOptions(n_ctx=kw["ctx"], gpu_layers=kw["gpu_layers"], vision_backend=kw["vision_backend"],
                         vision_device=kw["vision_device"], threads=kw["threads"], template=kw["template"],
                         image_max_tiles=kw["image_max_tiles"], verbose=kw["verbose"], **overrides)


def engine_from(kw: dict, pair, *, workload: str = "session"):
    from llava_local.runtime.engine import Engine
    return Engine(pair, engine_options(kw, workload=workload))


def status(msg: str) -> None:
    click.echo(msg, err=True)
    sys.stderr.flush()
