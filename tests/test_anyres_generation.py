"""LLaVA-1.6 end to end: greedy answers through our F32 GGUF equal transformers'
`LlavaNextForConditionalGeneration.generate`, for images of five aspects and two LLM templates.

transformers gets what a transformers user gives it: pixels and `image_sizes` from the checkpoint's
own `LlavaNextImageProcessor`, and input ids in which the image token is repeated as many times as
that image takes (so the count our runtime reports is checked too: transformers refuses a mismatch).
The text ids around the image are our prompt builder's (test_templates_family.py checks those
against the LLaVA repo's layouts). We run the whole path: load, anyres tiling, the torch vision
backend, packing, prefill and greedy decoding on llama.cpp.
"""
from __future__ import annotations

import pytest
import torch

from conftest import random_image
from llava_local.prompts.templates import Message
from llava_local.prompts.turns import user_content
from llava_local.runtime.engine import Engine
from llava_local.runtime.model_pair import resolve_pair
from llava_local.runtime.sampling import SamplingParams

PROMPT = "Describe the image."
N_TOKENS = 16
# (width, height): 1:1, 2:1, 1:3, 5:4 and a 20 x 300 strip (unpadding leaves it no tile columns)
SIZES = {"1:1": (90, 90), "2:1": (160, 80), "1:3": (50, 150), "5:4": (100, 80), "strip": (20, 300)}


@pytest.fixture(scope="module")
def mistral_next(tmp_path_factory):
    """A tiny LLaVA-1.6 whose LLM is a MistralForCausalLM, converted with the mistral_instruct template."""
    from convert import convert
    from train.tiny_models import TinyNextSpec, build_tiny_llava_next
    root = tmp_path_factory.mktemp("next-mistral")
    model, hf_dir = build_tiny_llava_next(root / "hf", TinyNextSpec(text_model_type="mistral", seed=5))
    return model, hf_dir, convert(hf_dir, root / "out", outtype="f32", template="mistral_instruct")


@pytest.fixture(scope="module")
def cases(tiny_next_ckpt, converted_next_f32, mistral_next):
    return {"vicuna_v1": (tiny_next_ckpt[0], tiny_next_ckpt[1], converted_next_f32),
            "mistral_instruct": mistral_next}


def _reference_tokens(model, processor, ids_before, n_image, ids_after, img) -> list[int]:
    px = processor(images=[img], return_tensors="pt")
    image_id = model.config.image_token_index
    input_ids = torch.tensor([ids_before + [image_id] * n_image + ids_after])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             pixel_values=px["pixel_values"], image_sizes=px["image_sizes"],
                             max_new_tokens=N_TOKENS, do_sample=False, eos_token_id=model.config.text_config.eos_token_id,
                             pad_token_id=model.config.text_config.eos_token_id)
    return out[0, input_ids.shape[1]:].tolist()


@pytest.mark.parametrize("template", ["vicuna_v1", "mistral_instruct"])
def test_greedy_answers_equal_transformers_generate(cases, template):
    from transformers import LlavaNextImageProcessor
    model, hf_dir, converted = cases[template]
    pair = resolve_pair(converted.llm_path.parent)
    assert pair.anyres
    processor = LlavaNextImageProcessor.from_pretrained(hf_dir)
    eng = Engine(pair, vision_backend="torch", threads=2, n_ctx=512, precise=True)
    try:
        assert eng.format.name == template
        before, after = eng.prompt.parts([Message("user", user_content(PROMPT, 1))], n_images=1)
        results = {}
        for i, (aspect, (w, h)) in enumerate(SIZES.items()):
            img = random_image(w, h, seed=10 + i)
            n_image = eng.image_tokens([img])[0]
            ans = eng.ask(PROMPT, [img], max_tokens=N_TOKENS, sampling=SamplingParams(temperature=0.0))
            ref = _reference_tokens(model, processor, before, n_image, after, img)
            if ref and ref[-1] == eng.llm.eos:
                ref = ref[:-1]
            results[aspect] = (n_image, ans.tokens, ref)
    finally:
        eng.close()
    for aspect, (n_image, ours, ref) in results.items():
        print(f"{template} {aspect}: {n_image} image tokens; ours {ours}; transformers {ref}")
    assert {a: r[1] for a, r in results.items()} == {a: r[2] for a, r in results.items()}
    assert all(len(r[1]) == N_TOKENS for r in results.values())    # tiny random LLMs never stop early
    assert len({r[0] for r in results.values()}) >= 4               # the aspects really tile differently
