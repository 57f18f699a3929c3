"""`llava-local chat`: the interactive REPL, and one-shot answers (`-p`, or a prompt on stdin).

The REPL keeps the conversation in llama.cpp's KV cache (each turn evaluates only its new text) and
images in an embedding cache; Ctrl-C stops an answer and keeps the session, Ctrl-D leaves.
With --json-schema every answer is JSON valid against the schema (one-shot: printed compact).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

import click

from llava_local.cli.errors import domain_errors
from llava_local.cli.options import (engine_from, model_options, output_from, pair_from, sampling_from,
                                     sampling_options, status)
from llava_local.errors import LlavaLocalError, StructuredOutputError
from llava_local.logs import setup_logging

log = logging.getLogger(__name__)

HELP = """Commands:
  /image PATH   attach an image to your next message (repeatable)
  /clear        start a new conversation (cached image embeddings are kept)
  /save FILE    save the conversation as JSON      /load FILE   load one
  /stats        timings of the last answer and session totals
  /set KEY VAL  change a setting: max-tokens, temp, top-k, top-p, seed, repeat-penalty
  /help         this text                         /exit or Ctrl-D   quit
Ctrl-C stops the current answer; the conversation goes on."""


def _history_file() -> Path | None:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "llava-local" / "chat_history"


def _enable_line_editing() -> None:
    try:
        import readline
    except ImportError:   # no GNU readline (e.g. some Windows Pythons): plain input() still works
        return
    hist = _history_file()
    try:
        hist.parent.mkdir(parents=True, exist_ok=True)
        if hist.exists():
            readline.read_history_file(str(hist))
        readline.set_history_length(1000)
        import atexit
        atexit.register(lambda: _save_history(readline, hist))
    except OSError:
        pass


def _save_history(readline, hist: Path) -> None:
    try:
        readline.write_history_file(str(hist))
    except OSError:
        pass


def _format_stats(session) -> str:
    lines = []
    if session.last is not None:
        t = session.last.timings
        lines.append(f"last answer: {len(session.last.tokens)} tokens ({session.last.finish_reason}); "
                     f"prompt {session.last.n_prompt_tokens} new + {session.last.n_reused} reused positions")
        lines.append(f"  image decode {t['image_load_s']*1000:.1f} ms · encode {t['encode_s']*1000:.1f} ms "
                     f"({t['images_encoded']} encoded, {t['image_cache_hits']} cached, {t['vision_backend']}) · "
                     f"prefill {t['prefill_s']*1000:.1f} ms ({t['prefill_tok_per_s']:.0f} tok/s) · "
                     f"decode {t['decode_s']*1000:.1f} ms ({t['decode_tok_per_s']:.1f} tok/s)")
    tot = session.totals
    lines.append("placement: " + session.engine.placement.describe())
    lines.append(f"session: {tot['turns']} turns, {tot['prompt_tokens']} prompt positions evaluated, "
                 f"{tot['reused_tokens']} reused from the KV cache, {tot['generated_tokens']} generated")
    return "\n".join(lines)


def stream_answer(session, text: str, images, *, verbose: bool, output=None) -> None:
    """Print the answer as it comes; Ctrl-C stops it (the session stays usable). `output`: a
    JsonOutput the answer keeps to (an answer cut or invalid ends with its error)."""
    previous = signal.getsignal(signal.SIGINT)
    interrupted = []

    def on_sigint(*_):
        interrupted.append(True)
        session.stop()
    in_main = hasattr(signal, "SIGINT") and _is_main_thread()
    if in_main:
        signal.signal(signal.SIGINT, on_sigint)
    printed = False
    try:
        for piece in session.send(text, images, output=output):
            click.echo(piece, nl=False)
            sys.stdout.flush()
            printed = True
    except LlavaLocalError as exc:
        if printed:              # end the answer's line before the error
            click.echo("")
        if interrupted and isinstance(exc, StructuredOutputError):   # Ctrl-C cut the JSON: that was asked for
            status("[answer stopped]")
            return
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    click.echo("")
    if interrupted:
        status("[answer stopped]")
    if verbose:
        status(_format_stats(session))


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


_SETTABLE = {"max-tokens": ("max_tokens", int), "temp": ("temperature", float), "top-k": ("top_k", int),
             "top-p": ("top_p", float), "seed": ("seed", int), "repeat-penalty": ("repeat_penalty", float)}


def _set_option(session, arg: str) -> None:
    import dataclasses
    key, _, value = arg.partition(" ")
    if key not in _SETTABLE or not value.strip():
        raise LlavaLocalError(f"usage: /set KEY VALUE with KEY one of {', '.join(_SETTABLE)}")
    field, kind = _SETTABLE[key]
    try:
        v = kind(value.strip())
    except ValueError:
        raise LlavaLocalError(f"/set {key}: {value.strip()!r} is not a valid {kind.__name__}") from None
    if field == "max_tokens":
        if v < 1:
            raise LlavaLocalError("/set max-tokens: must be >= 1")
        session.max_tokens = v
    else:
        session.sampling = dataclasses.replace(session.sampling, **{field: v}).validate()
    status(f"[{key} = {v}]")


def _ctrl_c_interrupts() -> None:
    """Ctrl-C at the prompt must reach us even when the parent process ignored or blocked SIGINT
    (both are inherited across exec: nohup-style launchers, some test runners)."""
    if not (hasattr(signal, "SIGINT") and _is_main_thread()):
        return
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def repl(session, first_images: list, *, verbose: bool, output=None) -> None:
    interactive = sys.stdin.isatty()
    if interactive:
        _enable_line_editing()
        _ctrl_c_interrupts()
    pending = list(first_images)
    prompt = "> " if interactive else ""
    while True:
        try:
            line = input(prompt)
        except EOFError:
            if interactive:
                click.echo("")
            return
        except KeyboardInterrupt:          # Ctrl-C at the prompt: a fresh line, like a shell
            click.echo("")
            continue
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                cmd, _, arg = line.partition(" ")
                arg = arg.strip()
                if cmd in ("/exit", "/quit"):
                    return
                if cmd == "/help":
                    status(HELP)
                elif cmd == "/image":
                    if not arg:
                        raise LlavaLocalError("usage: /image PATH")
                    pending += session.engine.load_images([os.path.expanduser(arg)])
                    status(f"[image {Path(arg).name} attached to your next message]")
                elif cmd == "/clear":
                    session.clear()
                    pending = []
                    status("[conversation cleared]")
                elif cmd == "/save":
                    if not arg:
                        raise LlavaLocalError("usage: /save FILE")
                    session.save(arg)
                    status(f"[saved {len(session.messages)} messages to {arg}]")
                elif cmd == "/load":
                    if not arg:
                        raise LlavaLocalError("usage: /load FILE")
                    session.load(arg)
                    pending = []
                    status(f"[loaded {len(session.messages)} messages from {arg}]")
                elif cmd == "/stats":
                    status(_format_stats(session))
                elif cmd == "/set":
                    _set_option(session, arg)
                else:
                    raise LlavaLocalError(f"unknown command {cmd} (try /help)")
                continue
            stream_answer(session, line, pending, verbose=verbose, output=output)
            pending = []
        except LlavaLocalError as exc:
            status(f"Error: {exc}")


@click.command()
@click.argument("images", nargs=-1, type=str)
@click.option("-p", "--prompt", default=None,
              help="Answer this one question and exit (no REPL). Use '-' (or a '-' argument) to read it from stdin.")
@click.option("--json", "as_json", is_flag=True,
              help="One-shot: print a JSON record with timings and token counts (and the --json-schema answer "
                   "parsed, under \"json\").")
@model_options
@sampling_options
def chat(images, prompt, as_json, **kw):
    """Chat about images with a LLaVA model (REPL), or answer one question (-p).

    Without --model it uses the demo model embedded in the package.

    \b
    Examples:
      llava-local chat photo.jpg                       # REPL about photo.jpg
      llava-local chat -p "What is in the picture?" photo.jpg > answer.txt
      echo "How many people?" | llava-local chat - group.jpg
      llava-local chat --model out/ --json -p "Describe it." photo.jpg
      llava-local chat --json-schema shape.schema.json -p "Describe it." photo.jpg   # one JSON line
      llava-local chat --hf-repo owner/llava-1.5-7b-gguf --hf-quant Q4_K_M photo.jpg
    """
    domain_errors(_chat)(images, prompt, as_json, kw)


def _chat(images, prompt, as_json, kw):
    setup_logging(kw["verbose"])
    paths = [p for p in images if p != "-"]
    if "-" in images or prompt == "-":
        prompt = sys.stdin.read()
    if prompt is not None and not prompt.strip():
        raise LlavaLocalError("empty prompt")
    from llava_local.image.load import load_image
    sampling = sampling_from(kw)
    output = output_from(kw)                         # the schema checked before anything loads
    pair = pair_from(kw)                             # model files checked first (RELIABILITY.md)
    loaded = [load_image(p) for p in paths]          # then every image, before the model loads
    # one question: start-up dominates, so the resolver picks the backend that loads fastest
    engine = engine_from(kw, pair, workload="oneshot" if prompt is not None else "session")
    try:
        session = engine.chat_session(system=kw["system"], sampling=sampling, max_tokens=kw["max_tokens"])
        if prompt is not None:
            if as_json:
                ans = session.ask(prompt, loaded, output=output)
                click.echo(json.dumps({"text": ans.text, **({"json": ans.json} if output is not None else {}),
                                       "n_prompt_tokens": ans.n_prompt_tokens, "n_tokens": len(ans.tokens),
                                       "finish_reason": ans.finish_reason, "timings": ans.timings}))
            elif output is not None:
                ans = session.ask(prompt, loaded, output=output)
                click.echo(json.dumps(ans.json, ensure_ascii=False, separators=(",", ":")))
                if kw["verbose"]:
                    status(_format_stats(session))
            else:
                stream_answer(session, prompt, loaded, verbose=kw["verbose"])
            return
        if sys.stdin.isatty():
            status(f"llava-local chat · {engine.pair.llm_path.name} · vision {engine.vision.name} · "
                   f"n_ctx {engine.llm.n_ctx}" + (f" · {len(loaded)} image(s) attached" if loaded else ""))
            status("Type a message, /help for commands, Ctrl-D to quit.")
        repl(session, loaded, verbose=kw["verbose"], output=output)
    finally:
        engine.close()
