"""The `llava-local` command line: parses options, calls the library, prints.

Results go to stdout, status and progress to stderr. Library errors (`LlavaLocalError`) become one
`Error: ...` line and exit code 1; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import functools
import json
import logging
import sys

import click

from .errors import LlavaLocalError

log = logging.getLogger("llava_local")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def domain_errors(fn):
    """Turn library errors into one clean line (traceback only with --debug)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except LlavaLocalError as exc:
            if (ctx.find_root().params or {}).get("debug"):
                raise
            raise click.ClickException(str(exc)) from None
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="llava-local")
def main(debug: bool) -> None:
    """llava-local: train, convert and run LLaVA vision-language models on llama.cpp.

    \b
    Examples:
      llava-local convert ./llava-1.5-7b-hf -o out/ --outtype f16
      llava-local run --model out/ -p "What is in this picture?" photo.jpg
    """


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory for the GGUF files and manifest.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16"]), default="f16", show_default=True,
              help="Weight type of the matrices (norms and biases stay f32).")
@click.option("--vision-tower", type=click.Path(exists=True, file_okay=False), default=None,
              help="CLIP directory, for the original LLaVA layout (else taken from mm_vision_tower in config.json).")
@click.option("--name", default=None, help="Base name of the output files (default: the checkpoint dir name).")
@click.option("--tokenizer-pre", default=None,
              help="llama.cpp pre-tokenizer name for a BPE tokenizer the converter does not recognise.")
@click.option("-v", "--verbose", is_flag=True, help="Log each step.")
@domain_errors
def convert(checkpoint, out_dir, outtype, vision_tower, name, tokenizer_pre, verbose):
    """Convert a LLaVA checkpoint into an LLM GGUF, an mmproj GGUF and a manifest.

    Reads the llava-hf layout (LlavaForConditionalGeneration, also what `llava-local train`
    writes) and the original LLaVA layout (LlavaLlamaForCausalLM + a CLIP directory).

    \b
    Examples:
      llava-local convert ./llava-1.5-7b-hf -o out/
      llava-local convert ./llava-v1.5-7b --vision-tower ./clip-vit-large-patch14-336 -o out/ --outtype f32
    """
    _setup_logging(verbose)
    from convert import convert as do_convert
    from tqdm import tqdm

    bar = tqdm(desc="writing tensors", unit="tensor", file=sys.stderr, disable=None)
    try:
        result = do_convert(checkpoint, out_dir, outtype=outtype, vision_tower=vision_tower, name=name,
                            tokenizer_pre=tokenizer_pre, progress=lambda _name: bar.update(1))
    finally:
        bar.close()
    for p in (result.llm_path, result.mmproj_path, result.manifest_path):
        click.echo(str(p))


def _read_prompt(prompt: str) -> str:
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise LlavaLocalError("empty prompt")
    return prompt


@main.command()
@click.argument("images", nargs=-1, type=str)
@click.option("-m", "--model", required=True, envvar="LLAVA_LOCAL_MODEL", type=click.Path(exists=True),
              help="Model directory (pair + manifest) or LLM .gguf file.  [env: LLAVA_LOCAL_MODEL]")
@click.option("--mmproj", envvar="LLAVA_LOCAL_MMPROJ", type=click.Path(exists=True, dir_okay=False), default=None,
              help="mmproj .gguf (needed when --model is a file without a manifest).  [env: LLAVA_LOCAL_MMPROJ]")
@click.option("-p", "--prompt", required=True, help="The question; '-' reads it from stdin.")
@click.option("--vision-backend", type=click.Choice(["auto", "torch", "mtmd"]), default="auto", show_default=True,
              help="auto = the most faithful backend available (torch), else llama.cpp's mtmd.")
@click.option("--vision-device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("-ngl", "--gpu-layers", type=click.IntRange(0), default=0, show_default=True,
              help="LLM layers to offload to the GPU (needs a CUDA/Metal build of llama-cpp-python).")
@click.option("--ctx", type=click.IntRange(16), default=None,
              help="Context size in tokens (default: 4096, or the LLM's training context if smaller).")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads (default: all cores).")
@click.option("--temp", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(0), default=40, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--system", default=None, help="Override the template's system prompt.")
@click.option("--template", default=None, help="Chat template name (default: from the model).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON record with timings instead of the text.")
@click.option("-v", "--verbose", is_flag=True, help="Log steps, llama.cpp output and timings to stderr.")
@domain_errors
def run(images, model, mmproj, prompt, vision_backend, vision_device, gpu_layers, ctx, threads, temp, top_k, top_p,
        seed, max_tokens, system, template, as_json, verbose):
    """Answer one question about one or more images (one-shot).

    \b
    Examples:
      llava-local run --model out/ -p "Describe the image." photo.jpg
      llava-local run --model llm.gguf --mmproj mmproj.gguf -p "What colour is the car?" --temp 0 car.png
      echo "How many people?" | llava-local run --model out/ -p - group.jpg > answer.txt
    """
    _setup_logging(verbose)
    from .engine import Engine
    from .images import load_image
    from .model_pair import resolve_pair
    from .sampling import SamplingParams

    prompt = _read_prompt(prompt)
    sampling = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, seed=seed).validate()
    pair = resolve_pair(model, mmproj)
    loaded = [load_image(p) for p in images]  # every image fully checked (images.py) before the model loads
    engine = Engine(pair, vision_backend=vision_backend, n_ctx=ctx, n_gpu_layers=gpu_layers,
                    vision_device=vision_device, threads=threads, template=template, verbose=verbose)
    try:
        if as_json:
            ans = engine.ask(prompt, loaded, system=system, max_tokens=max_tokens, sampling=sampling)
            click.echo(json.dumps({"text": ans.text, "n_prompt_tokens": ans.n_prompt_tokens,
                                   "n_tokens": len(ans.tokens), "finish_reason": ans.finish_reason,
                                   "timings": ans.timings}))
            return
        for item in engine.stream(prompt, loaded, system=system, max_tokens=max_tokens, sampling=sampling):
            if isinstance(item, str):
                click.echo(item, nl=False)
                sys.stdout.flush()
            else:
                click.echo("")
                if verbose:
                    click.echo(json.dumps(item.timings), err=True)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
