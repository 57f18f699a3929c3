"""Does it fit the context? The one check (and the one message) for every path that puts images,
text and answers into llama.cpp's KV cache: refused before any work, never cut silently (an image
dropped from a too-small context is how other tools answer about a picture they never saw).

    check_fit(n_ctx=4096, n_images=1, image_tokens=576, n_text=40, in_use=1200, reserve=1)
    # ContextOverflowError: image needs 576 tokens (+40 text), n_ctx is 4096 with 1200 in use: raise --ctx
"""
from __future__ import annotations

from llava_local.errors import ContextOverflowError


def describe_need(*, n_images: int = 0, image_tokens: int = 0, n_text: int = 0, n_answer: int = 0) -> str:
    """"image needs 576 tokens (+12 text)", "2 images need ...", "the prompt needs 40 tokens"."""
    if n_images:
        what = ("image needs" if n_images == 1 else f"{n_images} images need") + f" {n_images * image_tokens} tokens"
        extra = [f"+{n_text} text"] if n_text else []
    else:
        what = f"the prompt needs {n_text} tokens"
        extra = []
    if n_answer:
        extra.append(f"+{n_answer} answer")
    return what + (f" ({', '.join(extra)})" if extra else "")


def check_fit(*, n_ctx: int, n_images: int = 0, image_tokens: int = 0, n_text: int = 0, n_answer: int = 0,
              in_use: int = 0, reserve: int = 0, hint: str = "raise --ctx", what: str = "") -> None:
    """Raise ContextOverflowError unless `in_use` cells plus what is asked for, plus `reserve` cells
    (1 where a token must still be generated), fit `n_ctx`. `what` prefixes the message (an item's key)."""
    need = n_images * image_tokens + n_text + n_answer
    if in_use + need + reserve <= n_ctx:
        return
    msg = describe_need(n_images=n_images, image_tokens=image_tokens, n_text=n_text, n_answer=n_answer)
    msg += f", n_ctx is {n_ctx}" + (f" with {in_use} in use" if in_use else "") + f": {hint}"
    raise ContextOverflowError(f"{what}: {msg}" if what else msg)
