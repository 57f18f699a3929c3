"""Fidelity of the converted files against transformers (the PyTorch reference).

- vision: the `torch` backend (built from the mmproj GGUF) equals `get_image_features` within 1e-5;
  the `mtmd` backend's per-token cosine is measured against the README's figures (upstream's graph, #25814).
- LLM: with the same image embeddings injected, the F32 GGUF's logits match transformers' on
  teacher-forced answer positions (top-1 100 %, max |Δlogit| <= 1e-3) and greedy decoding agrees.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import IMAGES, assert_embeddings_close, cosine_per_token, random_image, reference_image_features
from llava_local.runtime.engine import Engine
from llava_local.image.preprocess import preprocess_batch
from llava_local.prompts.templates import Message
from llava_local.vision import create_backend



@pytest.fixture(scope="module")
def engine(pair_f32):
    eng = Engine(pair_f32, vision_backend="torch", n_ctx=512, all_logits=True, precise=True)
    yield eng
    eng.close()


def test_torch_backend_equals_transformers(engine, tiny_model):
    pixels = preprocess_batch(IMAGES, engine.vision.preprocess_config)
    ref = reference_image_features(tiny_model, pixels)
    for batch in ([0], [0, 1, 2, 3]):
        ours = engine.vision.encode([IMAGES[i] for i in batch])
        d = assert_embeddings_close(ours, ref[batch], max_abs=1e-5)
        print(f"torch backend vs transformers, batch {len(batch)}: max |Δ| = {d:.2e}")


def test_mtmd_backend_cosine_is_measured(engine, tiny_model):
    """Upstream's LLaVA graph appends CLS after the patches (#25814): report how far it is."""
    mt = create_backend("mtmd", engine.pair.mmproj, llm=engine.llm)
    try:
        pixels = preprocess_batch(IMAGES, engine.vision.preprocess_config)
        ref = reference_image_features(tiny_model, pixels)
        ours = mt.encode(IMAGES)
    finally:
        mt.close()
    assert ours.shape == ref.shape and np.isfinite(ours).all()
    cos = cosine_per_token(ours, ref)
    print(f"mtmd vs PyTorch reference, per-token cosine: min {cos.min():.4f} mean {cos.mean():.4f} "
          f"max {cos.max():.4f} over {cos.size} tokens")
    assert np.isfinite(cos).all()
    # the README's figures (min 0.31, mean 0.75): the defect is real, and it is what the README says
    assert cos.mean() < 0.99 and abs(cos.mean() - 0.75) < 0.03 and abs(cos.min() - 0.31) < 0.03


def _hf_logits(model, embeds: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(inputs_embeds=embeds[None]).logits[0].numpy()


def _sequence_embeds(model, items, image_embeds: np.ndarray) -> torch.Tensor:
    table = model.get_input_embeddings()
    parts = []
    for it in items:
        if isinstance(it, list):
            if it:
                parts.append(table(torch.tensor(it)).detach())
        else:
            parts.append(torch.from_numpy(image_embeds[-1 - it]))
    return torch.cat(parts)


def test_llm_logits_match_transformers(engine, tiny_model):
    img = IMAGES[0]
    emb = engine.encode_images([img])
    items = engine.prompt_items([Message("user", "<image>\nWhat is shown in this image?")])
    answer = engine.llm.tokenize(" A tiny random model answers with whatever tokens it likes, and that is "
                                 "fine for a fidelity test of forty tokens or so, really: the logits are what we compare, "
                                 "position by position, against the PyTorch reference model.")
    assert len(answer) >= 32
    engine.llm.reset()
    n_prompt = engine.prefill(items, emb)
    engine.llm.eval_tokens(answer)
    ours = engine.llm.all_position_logits()
    ref = _hf_logits(tiny_model, torch.cat([_sequence_embeds(tiny_model, items, emb),
                                            tiny_model.get_input_embeddings()(torch.tensor(answer)).detach()]))
    assert ours.shape == ref.shape
    # positions whose next token is an answer token (teacher forcing)
    pos = np.arange(n_prompt - 1, n_prompt - 1 + len(answer))
    d = np.abs(ours[pos] - ref[pos])
    top1 = (ours[pos].argmax(-1) == ref[pos].argmax(-1)).mean()
    print(f"LLM F32 GGUF vs transformers over {len(pos)} answer positions: top-1 agreement {top1:.1%}, "
          f"max |Δlogit| {d.max():.2e}")
    assert top1 == 1.0
    assert d.max() <= 1e-3


def test_greedy_generation_matches_transformers(engine, tiny_model):
    img = IMAGES[1]
    prompt = "Describe the image."
    from llava_local.runtime.sampling import SamplingParams
    ans = engine.ask(prompt, [img], max_tokens=16, sampling=SamplingParams(temperature=0.0))
    emb = engine.encode_images([img])
    items = engine.prompt_items([Message("user", "<image>\n" + prompt)])
    seq = _sequence_embeds(tiny_model, items, emb)
    table = tiny_model.get_input_embeddings()
    ref_tokens = []
    for _ in range(16):
        nxt = int(_hf_logits(tiny_model, seq)[-1].argmax())
        if nxt == engine.llm.eos:
            break
        ref_tokens.append(nxt)
        seq = torch.cat([seq, table(torch.tensor([nxt])).detach()])
    print(f"greedy: llama.cpp {ans.tokens}\n        transformers {ref_tokens}")
    assert ans.tokens == ref_tokens
    assert len(ans.tokens) == 16
