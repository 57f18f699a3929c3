"""`llava-local serve`: the OpenAI-compatible server (llava_local/server/)."""
from __future__ import annotations

import click

from llava_local.cli.errors import domain_errors
from llava_local.cli.options import engine_options, model_options, pair_from, status
from llava_local.logs import setup_logging


@click.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, envvar="LLAVA_LOCAL_HOST",
              help="Address to bind. Anything but loopback needs --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, envvar="LLAVA_LOCAL_PORT")
@click.option("--api-key", envvar="LLAVA_LOCAL_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on the API.  [env: LLAVA_LOCAL_API_KEY]")
@click.option("--parallel", "-np", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Requests decoded together in one llama.cpp batch; more wait in a queue.")
@click.option("--max-queue", type=click.IntRange(0), default=64, show_default=True,
              help="Requests waiting beyond --parallel; more get 503 with Retry-After.")
@click.option("--cors-origin", multiple=True,
              help="A browser origin allowed to call the API (repeatable), e.g. http://localhost:3000. Others get 403.")
@click.option("--allow-image-host", multiple=True,
              help="Let image_url fetch http(s) images from this host (repeatable). Default: data: URIs only.")
@click.option("--allow-private-image-hosts", is_flag=True,
              help="Those hosts may resolve to loopback, private or link-local addresses (a LAN image server).")
@click.option("--media-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Allow file:// image_urls inside this directory (and nowhere else).")
@click.option("--max-tokens", type=click.IntRange(1), default=512, show_default=True,
              help="An answer's length when the request sets no max_tokens.")
@click.option("--max-prompt-tokens", type=click.IntRange(1), default=None,
              help="A request's prompt (text + image tokens) at most. Default: the context size.")
@click.option("--max-images", type=click.IntRange(0), default=8, show_default=True, help="Images per request.")
@click.option("--max-body-mb", type=click.FloatRange(0.01), default=32.0, show_default=True,
              help="Request body size limit.")
@click.option("--max-image-mb", type=click.FloatRange(0.01), default=10.0, show_default=True,
              help="One image's size limit (data: payload, download or file).")
@click.option("--model-alias", default=None, help="The model id clients use (default: the model's name).")
@domain_errors
def serve(**kw):
    """Serve the model over an OpenAI-compatible HTTP API, with a chat page at /.

    Binds 127.0.0.1 by default; other web sites' pages get 403 (see --cors-origin), image_url
    accepts data: URIs only unless --allow-image-host / --media-dir say otherwise. POST
    /v1/chat/completions (stream, response_format json_schema), GET /v1/models, /health, /metrics.

    \b
    Examples:
      llava-local serve                                  # the demo model on http://127.0.0.1:8080
      llava-local serve --model out/ -ngl all --parallel 8
      llava-local serve --model out/ --host 0.0.0.0 --api-key "$KEY"
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hello"}]}'
    """
    from llava_local.server.launch import ServeOptions, Server
    setup_logging(kw["verbose"])
    pair = pair_from(kw)
    opts = ServeOptions(host=kw["host"], port=kw["port"], api_key=kw["api_key"], parallel=kw["parallel"],
                        max_queue=kw["max_queue"], cors_origins=tuple(kw["cors_origin"]),
                        allow_image_hosts=tuple(kw["allow_image_host"]),
                        allow_private_image_hosts=kw["allow_private_image_hosts"], media_dir=kw["media_dir"],
                        max_body_mb=kw["max_body_mb"], max_image_mb=kw["max_image_mb"], max_images=kw["max_images"],
                        max_tokens=kw["max_tokens"], max_prompt_tokens=kw["max_prompt_tokens"],
                        model_alias=kw["model_alias"])
    server = Server(pair, engine_options(kw), opts, on_status=lambda m: status(f"llava-local: {m}"))
    try:
        server.run()
    except KeyboardInterrupt:      # uvicorn stopped on Ctrl-C and passed the signal on
        pass
    status("llava-local: stopped")
