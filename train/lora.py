"""LoRA for stage 2 (peft): adapters on the LLM's linear layers, projector fully trained, CLIP
frozen; merged into plain weights on save, so the checkpoint is an ordinary llava-hf checkpoint
that the converter and llama.cpp read like any other.

    model = add_lora(llava, r=128, alpha=256, dropout=0.05)     # LLaVA-1.5's LoRA settings
    merged = merged_state_dict(model)                           # W + scale * B @ A, names as without LoRA

Merging builds new tensors from the adapters and leaves the training model untouched, so
training (and a resumed run) continues on exactly the same weights.
"""
from __future__ import annotations

import logging

import torch

from .model import parts

log = logging.getLogger(__name__)

# the LLM's linear layers (Llama names); CLIP's and the projector's never get adapters
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


def add_lora(llava, *, r: int, alpha: int, dropout: float):
    """Inject LoRA layers into `llava` in place (peft's inject_adapter_in_model) and set what trains:
    the adapters and the projector. Returns `llava`."""
    from peft import LoraConfig, inject_adapter_in_model
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none")
    for p in llava.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(cfg, llava)
    for n, p in llava.named_parameters():
        p.requires_grad_("lora_" in n)
    for p in parts(llava)[1].parameters():
        p.requires_grad_(True)
    n_lora = sum(p.numel() for n, p in llava.named_parameters() if "lora_" in n)
    log.info("LoRA r=%d alpha=%d: %d adapter parameters", r, alpha, n_lora)
    return llava


def has_lora(model) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict of the model as if the adapters were merged: LoRA-wrapped linears give
    `base_layer.weight + delta`, adapter tensors are dropped, and the names are the plain model's."""
    from peft.tuners.lora import LoraLayer
    merged: dict[str, torch.Tensor] = {}
    wrapped = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for name, m in wrapped.items():
        w = m.get_base_layer().weight.detach()
        delta = sum(m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A)
        merged[name + ".weight"] = (w + delta.to(w.dtype)).contiguous()
        bias = m.get_base_layer().bias
        if bias is not None:
            merged[name + ".bias"] = bias.detach()
    for k, v in model.state_dict().items():
        if "lora_" in k:
            continue
        plain = k.replace(".base_layer.", ".")
        if plain not in merged:
            merged[plain] = v
    return merged


def trainable_state(model) -> dict[str, torch.Tensor]:
    """What a resumable checkpoint must keep of a LoRA model beyond its init: adapters and projector."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
