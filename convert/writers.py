"""The two GGUF writers: the LLM (llama architecture) and the mmproj (llama.cpp clip format).

Both stream tensors one at a time into a temporary file that is renamed into place only when
complete (gguf_output.py), so a failed or interrupted conversion leaves no partial .gguf behind.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from llava_local.errors import ConversionError
from llava_local.formats import gguf_names as names

from .checkpoint import LlavaCheckpoint
from .gguf_output import gguf_writer, write_data
from .tokenizer_gguf import add_tokenizer

log = logging.getLogger(__name__)

OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}

Loader = Callable[[], torch.Tensor]


def _as_numpy(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Tensor -> (array to write, its GGML type). 1-D tensors (norms, biases) always stay F32."""
    t = t.detach()
    if t.ndim <= 1 or qtype == gguf.GGMLQuantizationType.F32:
        return t.to(torch.float32).contiguous().numpy(), gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16:
        return t.to(torch.float16).contiguous().numpy(), qtype
    # bf16: numpy has no bfloat16, write the raw 2-byte words
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8), qtype


def _permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF Llama stores q/k rows for rotate-half RoPE; llama.cpp's llama graph expects the original
    interleaved (GPT-J style) pair order, so rows are regrouped per head."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _write_streaming(writer: gguf.GGUFWriter, tensors: list[tuple[str, Loader, gguf.GGMLQuantizationType]],
                     progress: Callable[[str], None] | None = None) -> None:
    """Two passes: tensor infos first (shapes from a load), then the data, one tensor in memory at a time."""
    for gname, load, qtype in tensors:
        arr, ttype = _as_numpy(load(), qtype)
        writer.add_tensor_info(gname, arr.shape, arr.dtype, arr.nbytes,
                               raw_dtype=ttype if arr.dtype == np.uint8 else None)
        del arr
    write_data(writer, [(gname, lambda load=load, qtype=qtype: _as_numpy(load(), qtype)[0])
                        for gname, load, qtype in tensors], progress)


def write_llm(ck: LlavaCheckpoint, path: Path, outtype: str, *, chat_template: str, template_name: str,
              tokenizer_pre: str | None = None, progress=None) -> dict:
    qtype, ftype = OUTTYPES[outtype]
    t = ck.text
    n_layer = int(t["num_hidden_layers"])
    n_head = int(t["num_attention_heads"])
    n_head_kv = int(t.get("num_key_value_heads", n_head))
    n_embd = int(t["hidden_size"])
    head_dim = int(t.get("head_dim") or n_embd // n_head)
    rope = t.get("rope_parameters") or {}
    rope_scaling = t.get("rope_scaling") or {}
    if (rope.get("rope_type") not in (None, "default")) or (rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default")):
        raise ConversionError(f"{ck.source}: RoPE scaling {rope or rope_scaling} is not supported by this converter")
    rope_theta = float(rope.get("rope_theta", t.get("rope_theta", 10000.0)))

    tmap = names.llm_tensor_map(n_layer)
    tensors = []
    for src, hf_name in ck.llm_tensors():
        gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue  # recomputed by llama.cpp
            raise ConversionError(f"{ck.source}: LLM tensor {src!r} has no llama.cpp name")
        load: Loader = (lambda s=src: ck.store.get(s))
        if hf_name.endswith("self_attn.q_proj.weight"):
            load = (lambda s=src: _permute_qk(ck.store.get(s), n_head))
        elif hf_name.endswith("self_attn.k_proj.weight"):
            load = (lambda s=src: _permute_qk(ck.store.get(s), n_head_kv))
        tensors.append((gname, load, qtype))
    n_vocab = int(ck.store.get(ck.llm_prefix + "embed_tokens.weight").shape[0])

    with gguf_writer(path, "llama") as w:
        w.add_name(ck.name)
        w.add_file_type(ftype)
        w.add_context_length(int(t.get("max_position_embeddings", 4096)))
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(int(t["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(rope_theta)
        w.add_layer_norm_rms_eps(float(t.get("rms_norm_eps", 1e-6)))
        w.add_vocab_size(n_vocab)
        tok = add_tokenizer(w, ck.tokenizer_dir, n_vocab=n_vocab, tokenizer_pre=tokenizer_pre)
        w.add_chat_template(chat_template)
        w.add_string(names.KEY_LLAVA_LOCAL_TEMPLATE, template_name)
        _write_streaming(w, tensors, progress)
    return {"n_embd": n_embd, "n_vocab": n_vocab, "tokenizer": tok}


def write_mmproj(ck: LlavaCheckpoint, path: Path, outtype: str, *, progress=None) -> dict:
    qtype, ftype = OUTTYPES[outtype]
    v = ck.vision
    vs, vp = ck.vision_store, ck.vision_prefix
    tensors: list[tuple[str, Loader, gguf.GGMLQuantizationType]] = []

    def add(src: str, gname: str, q: gguf.GGMLQuantizationType = qtype) -> None:
        if src not in vs:
            raise ConversionError(f"{ck.source}: missing vision tensor {src!r}")
        tensors.append((gname, lambda s=src: vs.get(s), q))

    F32 = gguf.GGMLQuantizationType.F32
    for rel, gname in names.CLIP_TENSORS.items():
        # position embeddings are added to activations: kept in F32 like the norms and biases
        add(vp + rel, gname, F32 if "position_embedding" in rel else qtype)
    # only the layers up to LLaVA's feature layer are ever run: the rest are not written
    for bid in range(v.feature_layer):
        for rel, gname in names.CLIP_BLOCK_TENSORS.items():
            for suffix in (".weight", ".bias"):
                add(vp + rel.format(bid=bid) + suffix, gname.format(bid=bid) + suffix)
    proj_dims = []
    for layer, gname in zip(ck.projector_layers, (names.PROJECTOR_TENSORS["linear_1"], names.PROJECTOR_TENSORS["linear_2"])):
        for suffix in (".weight", ".bias"):
            src = ck.projector_prefix + layer + suffix
            if src not in ck.store:
                raise ConversionError(f"{ck.source}: missing projector tensor {src!r}")
            tensors.append((gname + suffix, lambda s=src: ck.store.get(s), qtype))
        proj_dims.append(tuple(ck.store.get(ck.projector_prefix + layer + ".weight").shape))
    (h1, d_in), (d_out, h2) = proj_dims
    if d_in != v.hidden_size or h1 != h2:
        raise ConversionError(f"{ck.source}: projector shapes {proj_dims} do not fit CLIP width {v.hidden_size}")
    if ck.anyres is not None:  # LLaVA-1.6: the vector appended after each row of tile features, kept F32
        nl = ck.anyres.newline_tensor
        if tuple(ck.store.get(nl).shape) != (d_out,):
            raise ConversionError(f"{ck.source}: {nl} has shape {list(ck.store.get(nl).shape)}, expected [{d_out}] "
                                  "(the projector's output width)")
        tensors.append((names.TN_IMAGE_NEWLINE, lambda s=nl: ck.store.get(s), F32))

    K = names.K
    with gguf_writer(path, "clip") as w:
        w.add_type(gguf.GGUFType.MMPROJ)
        w.add_name(ck.name + " mmproj")
        w.add_file_type(ftype)
        w.add_string(K.Clip.PROJECTOR_TYPE, gguf.VISION_PROJECTOR_TYPE_NAMES[gguf.VISION_PROJECTOR_TYPE.MLP])
        w.add_bool(K.Clip.HAS_VISION_ENCODER, True)
        w.add_bool(K.Clip.HAS_LLAVA_PROJECTOR, True)
        w.add_uint32(K.ClipVision.IMAGE_SIZE, v.image_size)
        w.add_uint32(K.ClipVision.PATCH_SIZE, v.patch_size)
        w.add_uint32(K.ClipVision.EMBEDDING_LENGTH, v.hidden_size)
        w.add_uint32(K.ClipVision.FEED_FORWARD_LENGTH, v.intermediate_size)
        w.add_uint32(K.ClipVision.PROJECTION_DIM, d_out)
        w.add_uint32(K.ClipVision.Attention.HEAD_COUNT, v.num_heads)
        w.add_float32(K.ClipVision.Attention.LAYERNORM_EPS, v.layer_norm_eps)
        w.add_uint32(K.ClipVision.BLOCK_COUNT, v.feature_layer)
        w.add_array(K.ClipVision.IMAGE_MEAN, v.image_mean)
        w.add_array(K.ClipVision.IMAGE_STD, v.image_std)
        # explicit: without it llama.cpp runs one layer fewer than LLaVA's "layer -2" (upstream #25817)
        w.add_array(names.KEY_FEATURE_LAYER, [v.feature_layer])
        w.add_bool(K.ClipVision.USE_GELU, False)  # CLIP's MLP uses quick-GELU; projector GELU is fixed
        w.add_uint32(names.KEY_LLAVA_LOCAL_IMAGE_TOKENS, v.n_patches)   # per tile for LLaVA-1.6
        if ck.anyres is not None:
            # what clip.cpp reads for LLaVA-1.6 (it selects its llava_uhd tiling on the pinpoints alone);
            # image_crop_resolution / image_split_resolution / image_aspect_ratio, which the legacy
            # converter also copies, are read by nothing
            w.add_array(names.KEY_IMAGE_GRID_PINPOINTS, names.pinpoints_to_gguf(ck.anyres.grid_pinpoints))
            w.add_string(names.KEY_MM_PATCH_MERGE_TYPE, ck.anyres.merge_type)
        _write_streaming(w, tensors, progress)
    out = {"projection_dim": d_out, "image_tokens": v.n_patches}
    if ck.anyres is not None:
        out["grid_pinpoints"] = [list(p) for p in ck.anyres.grid_pinpoints]
    return out
