"""Does it fit the context? The one check (and the one message) for every path that puts images,
text and answers into llama.cpp's KV cache: refused before any work, never cut silently (an image
dropped from a too-small context is how other tools answer about a picture they never saw).

Images are counted one by one: a LLaVA-1.5 image is always 576 tokens, a LLaVA-1.6 ("anyres") one
between the base tile's 576 and 2928, by its aspect and size (image/anyres.py).

    check_fit(n_ctx=4096, images=[2928], n_text=40, in_use=1200, reserve=1)
    # ContextOverflowError: image needs 2928 tokens (+40 text), n_ctx is 4096 with 1200 in use: raise --ctx
"""
from __future__ import annotations

from typing import Sequence

from llava_local.errors import ContextOverflowError


def describe_need(*, images: Sequence[int] = (), n_text: int = 0, n_answer: int = 0) -> str:
    """"image needs 576 tokens (+12 text)", "2 images need 3504 tokens (576 + 2928, +12 text)",
    "the prompt needs 40 tokens". `images`: each image's token count."""
    images = [int(n) for n in images]
    extra = []
    if images:
        what = ("image needs" if len(images) == 1 else f"{len(images)} images need") + f" {sum(images)} tokens"
        if len(set(images)) > 1:
            extra.append(" + ".join(map(str, images)))
        if n_text:
            extra.append(f"+{n_text} text")
    else:
        what = f"the prompt needs {n_text} tokens"
    if n_answer:
        extra.append(f"+{n_answer} answer")
    return what + (f" ({', '.join(extra)})" if extra else "")


def check_fit(*, n_ctx: int, images: Sequence[int] = (), n_text: int = 0, n_answer: int = 0, in_use: int = 0,
              reserve: int = 0, hint: str = "raise --ctx", what: str = "") -> None:
    """Raise ContextOverflowError unless `in_use` cells plus what is asked for (`images`: each image's
    token count; text; answer), plus `reserve` cells (1 where a token must still be generated), fit
    `n_ctx`. `what` prefixes the message (an item's key)."""
    need = sum(images) + n_text + n_answer
    if in_use + need + reserve <= n_ctx:
        return
    msg = describe_need(images=images, n_text=n_text, n_answer=n_answer)
    msg += f", n_ctx is {n_ctx}" + (f" with {in_use} in use" if in_use else "") + f": {hint}"
    raise ContextOverflowError(f"{what}: {msg}" if what else msg)
