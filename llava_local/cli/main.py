"""The `llava-local` command line: parses options, calls the library, prints.

Results go to stdout, status and progress to stderr. Library errors (`LlavaLocalError`) become one
`Error: ...` line and exit code 1; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from llava_local.cli.chat import chat
from llava_local.cli.errors import domain_errors
from llava_local.cli.options import model_options, sampling_options
from llava_local.logs import setup_logging


class _LazyCommand(click.Command):
    """A subcommand whose module is imported only when it runs or its help is shown: `chat -p` races
    llama-mtmd-cli from process start (bench/startup.py), and these modules cost it ~80 ms."""

    def __init__(self, name: str, target: str):
        super().__init__(name)
        self._target, self._real = target, None

    def real(self) -> click.Command:
        if self._real is None:
            module, attr = self._target.split(":")
            self._real = getattr(importlib.import_module(module), attr)
        return self._real

    def make_context(self, info_name, args, parent=None, **extra):   # the context is the real command's
        return self.real().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        return self.real().invoke(ctx)

    def get_short_help_str(self, limit: int = 45) -> str:
        return self.real().get_short_help_str(limit)


caption = _LazyCommand("caption", "llava_local.cli.caption:caption")
datagen = _LazyCommand("datagen", "llava_local.cli.eval:datagen")
eval_cmd = _LazyCommand("eval", "llava_local.cli.eval:eval_cmd")
eval_quant = _LazyCommand("eval-quant", "llava_local.cli.quantize:eval_quant")
quantize = _LazyCommand("quantize", "llava_local.cli.quantize:quantize")
serve = _LazyCommand("serve", "llava_local.cli.serve:serve")
train_group = _LazyCommand("train", "train.cli:train")   # train/ installs with the package; torch loads lazily

log = logging.getLogger("llava_local")


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
@click.argument("checkpoint", type=click.Path(exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory for the GGUF files and manifest.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16"]), default="f16", show_default=True,
              help="Weight type of the matrices (norms and biases stay f32).")
@click.option("--vision-tower", type=click.Path(exists=True, file_okay=False), default=None,
              help="CLIP directory, for the original LLaVA layout (else taken from mm_vision_tower in config.json).")
@click.option("--name", default=None, help="Base name of the output files (default: the checkpoint dir name).")
@click.option("--tokenizer-pre", default=None,
              help="llama.cpp pre-tokenizer name for a BPE tokenizer the converter does not recognise.")
@click.option("--template", default=None, metavar="NAME",
              help="Chat template the model was trained with (vicuna_v1, mistral_instruct, llama_3, chatml_direct, "
                   "plain); default: chosen from the checkpoint (convert/template_choice.py).")
@click.option("--onnx", is_flag=True,
              help="Also export the exact vision encoder (CLIP + projector) as <name>-vision.onnx + sidecar.")
@click.option("--quantize", "qtype", default=None, metavar="TYPE",
              help="Then quantize the LLM (Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q8_0, F16); the manifest names it.")
@click.option("--keep-unquantized/--no-keep-unquantized", default=True, show_default=True,
              help="With --quantize: keep the --outtype LLM file too.")
@click.option("-v", "--verbose", is_flag=True, help="Log each step.")
@domain_errors
def convert(checkpoint, out_dir, outtype, vision_tower, name, tokenizer_pre, template, onnx, qtype, keep_unquantized,
            verbose):
    """Convert a LLaVA checkpoint into an LLM GGUF, an mmproj GGUF and a manifest.

    Reads the llava-hf layout (LlavaForConditionalGeneration, also what `llava-local train`
    writes) and the original LLaVA layout (LlavaLlamaForCausalLM + a CLIP directory).
    Given an mmproj .gguf instead (ours, or a downloaded one), `--onnx` exports its exact
    vision encoder only (float32); put it next to the mmproj for `--vision-backend onnx` to find it.

    \b
    Examples:
      llava-local convert ./llava-1.5-7b-hf -o out/
      llava-local convert ./llava-v1.5-7b --vision-tower ./clip-vit-large-patch14-336 -o out/ --outtype f32
      llava-local convert ./llava-1.5-7b-hf -o out/ --onnx
      llava-local convert ./llava-1.5-7b-hf -o out/ --quantize Q4_K_M
      llava-local convert models/mmproj-model-f16.gguf -o models/ --onnx
    """
    setup_logging(verbose)
    if os.path.isfile(checkpoint):
        _export_mmproj_onnx(checkpoint, out_dir, name, onnx)
        return
    from tqdm import tqdm

    from convert import convert as do_convert

    bar = tqdm(desc="writing tensors", unit="tensor", file=sys.stderr, disable=None)
    try:
        result = do_convert(checkpoint, out_dir, outtype=outtype, vision_tower=vision_tower, name=name,
                            tokenizer_pre=tokenizer_pre, template=template, progress=lambda _name: bar.update(1),
                            onnx=onnx, quantize=qtype, keep_unquantized=keep_unquantized)
    finally:
        bar.close()
    for p in (result.llm_path, result.mmproj_path, result.manifest_path):
        click.echo(str(p))
    if result.manifest.get("llm_unquantized"):
        click.echo(str(result.manifest_path.parent / result.manifest["llm_unquantized"]))
    for key in ("model", "sidecar"):
        if "onnx" in result.manifest:
            click.echo(str(result.manifest_path.parent / result.manifest["onnx"][key]))


def _export_mmproj_onnx(mmproj: str, out_dir: str, name: str | None, onnx: bool) -> None:
    """`convert MMPROJ.gguf --onnx`: only the ONNX encoder; checkpoint-only options are refused."""
    ctx = click.get_current_context()
    flags = {"outtype": "--outtype", "vision_tower": "--vision-tower", "tokenizer_pre": "--tokenizer-pre",
             "template": "--template", "qtype": "--quantize", "keep_unquantized": "--keep-unquantized"}
    given = [f for p, f in flags.items() if ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE]
    if not onnx:
        raise click.UsageError(f"{mmproj} is a file: an mmproj GGUF converts only with --onnx (its vision encoder)")
    if given:
        raise click.UsageError(f"{', '.join(given)}: for checkpoint directories, not an mmproj GGUF")
    from convert.onnx_export import export_onnx_from_mmproj
    from llava_local.vision.onnx_backend import sidecar_path
    model = export_onnx_from_mmproj(mmproj, out_dir, name=name)
    click.echo(str(model))
    click.echo(str(sidecar_path(model)))


@main.command()
@click.argument("images", nargs=-1, type=str)
@click.option("-p", "--prompt", required=True, help="The question; '-' reads it from stdin.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON record with timings instead of the text.")
@model_options
@sampling_options
def run(images, prompt, as_json, **kw):
    """Answer one question about one or more images (one-shot; same as `chat -p`).

    \b
    Examples:
      llava-local run --model out/ -p "Describe the image." photo.jpg
      llava-local run --model llm.gguf --mmproj mmproj.gguf -p "What colour is the car?" --temp 0 car.png
      echo "How many people?" | llava-local run --model out/ -p - group.jpg > answer.txt
    """
    from llava_local.cli.chat import _chat
    domain_errors(_chat)(images, prompt, as_json, kw)


main.add_command(chat)
main.add_command(caption)
main.add_command(quantize)
main.add_command(eval_quant)
main.add_command(eval_cmd)
main.add_command(datagen)
main.add_command(serve)
main.add_command(train_group, name="train")


if __name__ == "__main__":
    main()
