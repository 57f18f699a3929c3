"""Stage 1 trains only the projector; stage 2 with LoRA saves a merged checkpoint equal to the
unmerged model; the closed-vocabulary loss equals the full-softmax loss.

    .venv/bin/python -m pytest -q tests/test_train_stages.py
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from train.data import IGNORE_INDEX, IMAGE_PLACEHOLDER
from train.lora import add_lora
from train.loop import train
from train.forward import LlavaForTraining
from train.model import load_llava, zero_rows_outside

from train_helpers import max_abs_diff, shapes_split, stage1_config, stage2_config, weights


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return shapes_split(tmp_path_factory.mktemp("shapes"))


def test_stage1_changes_only_projector_parameters(tiny_ckpt, split, tmp_path):
    hf = tiny_ckpt[1]
    res = train(stage1_config(split, hf, tmp_path / "s1"))
    before, after = weights(hf), weights(tmp_path / "s1")
    assert before.keys() == after.keys()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    projector = sorted(k for k in before if "multi_modal_projector" in k)
    assert changed == projector, changed                      # all four projector tensors, nothing else
    assert len(res.losses) == 3 and res.losses[-1] < res.losses[0]
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (tmp_path / "s1" / f).is_file()
    pp = json.loads((tmp_path / "s1" / "preprocessor_config.json").read_text())
    assert pp["crop_size"] == {"height": 56, "width": 56}
    log = [json.loads(line) for line in (tmp_path / "s1" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and log[0]["lr"] > 0


def _logits(model, pixel_values: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    ids = torch.tensor([[1, 5, 9, 200] + [cfg.image_token_index] * n_img + [300, 301, 17, 2]])
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixel_values).logits


def test_stage2_lora_merged_checkpoint_equals_unmerged_model(tiny_ckpt, split, tmp_path):
    hf = tiny_ckpt[1]
    cfg = stage2_config(split, hf, tmp_path / "lora", lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                        lr=5e-3, max_steps=2, save_every=1)
    train(cfg)
    ckpt = tmp_path / "lora" / "checkpoints" / "step-000001"
    adapters = load_file(str(ckpt / "trainer_state" / "trainable.safetensors"))
    assert any("lora_B" in k and float(v.abs().max()) > 0 for k, v in adapters.items())   # adapters moved
    assert not any("lora_" in k for k in weights(ckpt))                                     # merged: plain names
    assert max_abs_diff(weights(ckpt), weights(hf)) > 1e-4                                  # and not the base
    # the unmerged model: base weights + the saved adapters and projector
    unmerged = add_lora(load_llava(hf), r=4, alpha=8, dropout=0.0)
    params = dict(unmerged.named_parameters())
    with torch.no_grad():
        for k, v in adapters.items():
            params[k].copy_(v)
    merged = load_llava(ckpt)
    pix = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    # float64 compute: what remains is the merge itself (W + scale * B @ A, stored as float32)
    a, b = _logits(unmerged.double().eval(), pix.double()), _logits(merged.double(), pix.double())
    delta = float((a - b).abs().max())
    a32, b32 = _logits(unmerged.float(), pix), _logits(merged.float(), pix)
    print(f"LoRA merge: max |Δlogit| = {delta:.3g} in float64, {float((a32 - b32).abs().max()):.3g} in float32 "
          f"(logits up to {float(a.abs().max()):.3g})")
    assert delta <= 1e-5


def test_closed_vocabulary_loss_equals_full_softmax(tiny_ckpt):
    """output_vocab.json: the loss over kept ids + the zero logits of the rest is the full softmax's,
    and the compact trainable rows write back into the full embedding."""
    model = load_llava(tiny_ckpt[1])
    keep = list(range(0, 400)) + [2]
    zero_rows_outside(model, keep)
    ids = torch.tensor([[1, 5, 9] + [IMAGE_PLACEHOLDER] * 16 + [300, 301, 17, 2], [7, 8, 9] + [IMAGE_PLACEHOLDER] * 16
                        + [30, 31, 2, 2]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -3:] = ids[:, -3:]
    mask = torch.ones_like(ids)
    pix = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    full = LlavaForTraining(model)(ids, labels, mask, pix)
    core = LlavaForTraining(model, keep)
    closed = core(ids, labels, mask, pix)
    assert abs(float(full) - float(closed)) <= 1e-5 * abs(float(full))
    with torch.no_grad():
        core.embed_rows[5] += 1.0
        core.head_rows[5] += 2.0
    core.sync_vocab()
    assert torch.equal(model.get_input_embeddings().weight[5], core.embed_rows[5])
    assert torch.equal(model.get_output_embeddings().weight[5], core.head_rows[5])   # train.tiny_models: untied
    bad = ids.clone()
    bad[0, 0] = 1000                                    # a token whose row is zero
    with pytest.raises(ValueError, match="outside output_vocab"):
        core(bad, labels, mask, pix)


def test_closed_vocabulary_training_keeps_other_rows_zero(tiny_ckpt, split, tmp_path):
    from train.demo_model import language_vocab
    from train.model import write_output_vocab
    vocab = language_vocab([split.captions, split.instruct, split.text], tiny_ckpt[1])
    model = load_llava(tiny_ckpt[1])
    zero_rows_outside(model, vocab)
    init = tmp_path / "closed"
    model.save_pretrained(init)
    for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (init / f).write_bytes((tiny_ckpt[1] / f).read_bytes())
    write_output_vocab(init, vocab)
    res = train(stage2_config(split, init, tmp_path / "out", max_steps=2))
    before, after = weights(init), weights(tmp_path / "out")
    emb = "language_model.model.embed_tokens.weight"
    outside = torch.ones(after[emb].shape[0], dtype=torch.bool)
    outside[vocab] = False
    assert not after[emb][outside].any() and not after["language_model.lm_head.weight"][outside].any()
    assert not torch.equal(before[emb][~outside], after[emb][~outside])      # the kept rows trained
    assert (tmp_path / "out" / "output_vocab.json").is_file() and res.losses[-1] < res.losses[0]


def test_gradient_checkpointing_gives_the_same_steps(tiny_ckpt, split, tmp_path):
    plain = train(stage2_config(split, tiny_ckpt[1], tmp_path / "a", max_steps=2))
    ckpt = train(stage2_config(split, tiny_ckpt[1], tmp_path / "b", max_steps=2, gradient_checkpointing=True))
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-5)
    assert max_abs_diff(weights(tmp_path / "a"), weights(tmp_path / "b")) <= 1e-6


def test_build_from_parts_with_a_gguf_llm(tiny_ckpt, converted_f32, split, tmp_path):
    """Stage 1 from a CLIP directory and an LLM GGUF (dequantized by transformers), tokenizer unpacked
    from the GGUF: the LLM and CLIP weights are the original ones, the projector is new."""
    model, _, _, clip_dir = tiny_ckpt
    cfg = stage1_config(split, "", tmp_path / "s1", vision_tower=str(clip_dir),
                        llm=str(converted_f32.llm_path), max_steps=1)
    train(cfg)
    built = load_llava(tmp_path / "s1")
    ref = model.state_dict()
    for name, t in built.state_dict().items():
        if "multi_modal_projector" in name:
            assert not torch.allclose(t, ref[name])
        else:
            assert torch.allclose(t, ref[name], atol=1e-6), name
    assert (tmp_path / "s1" / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "s1" / "tokenizer.json").read_text())["model"]["type"] == "BPE"
