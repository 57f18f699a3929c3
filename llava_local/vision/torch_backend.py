"""`torch` vision backend: the reference CLIP + projector in PyTorch, built from the mmproj GGUF.

It rebuilds a transformers `CLIPVisionModel` with the stored layers (the converter writes exactly
the layers up to LLaVA's feature layer) and LLaVA-1.5's projector (Linear, exact erf GELU, Linear),
and runs them in float32. Exact, slower than the others: the tests' reference and a CPU fallback.
Either FFN naming is read (`MmprojInfo.ffn_swapped`: upstream's legacy converter swaps fc1/fc2).

`build_modules(mmproj)` is the same rebuild for other users: convert/onnx_export.py exports it.
"""
from __future__ import annotations

import importlib
import logging

import gguf
import numpy as np

from llava_local.errors import BackendUnavailableError, ModelFilesError
from llava_local.formats.gguf_names import CLIP_TENSORS, PROJECTOR_TENSORS
from llava_local.vision.base import PixelBackend, VisionOptions, register_backend

log = logging.getLogger(__name__)


def _read_tensors(path) -> dict[str, np.ndarray]:
    """GGUF tensors as float32 numpy arrays in PyTorch (row-major) shape."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        out[t.name] = np.array(data, dtype=np.float32).reshape(shape)  # a writable copy of the memmap
    return out


def build_modules(m, *, attn_implementation: str | None = None):
    """(CLIPVisionModel with `m.feature_layer` layers, linear_1, linear_2), float32 on the CPU, with
    the mmproj's weights. `attn_implementation="eager"` for tracing (plain MatMul/Softmax)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel
    tensors = _read_tensors(m.path)
    cfg = CLIPVisionConfig(hidden_size=m.hidden_size, intermediate_size=m.n_ff, num_hidden_layers=m.feature_layer,
                           num_attention_heads=m.n_heads, image_size=m.image_size, patch_size=m.patch_size,
                           layer_norm_eps=m.layer_norm_eps, hidden_act=m.ffn_act)
    if attn_implementation:
        cfg._attn_implementation = attn_implementation
    clip = CLIPVisionModel(cfg).eval()
    state = {}
    for rel, gname in CLIP_TENSORS.items():
        state[rel] = tensors.get(gname)
    for bid in range(m.feature_layer):
        for rel, gname in m.block_tensor_names(bid).items():
            for sfx in (".weight", ".bias"):
                state[rel + sfx] = tensors.get(gname + sfx)
    sd = clip.state_dict()
    missing = [k for k in sd if state.get(k) is None and not k.startswith("post_layernorm")]
    if missing:
        raise ModelFilesError(f"{m.path}: cannot rebuild CLIP, missing {missing[:3]}")
    with torch.no_grad():
        for k, v in sd.items():
            if state.get(k) is not None:
                if tuple(v.shape) != state[k].shape:
                    raise ModelFilesError(f"{m.path}: tensor for {k} has shape {state[k].shape}, "
                                          f"expected {tuple(v.shape)}")
                v.copy_(torch.from_numpy(state[k]))
    linears = []
    for key in ("linear_1", "linear_2"):
        g = PROJECTOR_TENSORS[key]
        w, b = tensors.get(g + ".weight"), tensors.get(g + ".bias")
        if w is None or b is None or w.ndim != 2 or b.shape != w.shape[:1]:
            raise ModelFilesError(f"{m.path}: projector tensors {g}.weight/.bias missing or misshapen")
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(b))
        linears.append(lin)
    if linears[0].in_features != m.hidden_size or linears[1].in_features != linears[0].out_features:
        raise ModelFilesError(f"{m.path}: projector shapes {tuple(linears[0].weight.shape)}, "
                              f"{tuple(linears[1].weight.shape)} do not chain from CLIP width {m.hidden_size}")
    return clip, linears[0], linears[1]


@register_backend("torch")
class TorchBackend(PixelBackend):
    exact = True

    def __init__(self, mmproj, options: VisionOptions, llm=None):
        del llm  # PyTorch runs the rebuilt modules on its own
        super().__init__(mmproj, options)
        try:
            import torch
            importlib.import_module("transformers")   # build_modules needs it: fail here, as unavailable
        except ImportError as exc:
            raise BackendUnavailableError(f"the torch vision backend needs torch and transformers ({exc})") from None
        self._torch = torch
        if options.threads:
            torch.set_num_threads(options.threads)
        self.device = torch.device("cuda" if options.device == "gpu" and torch.cuda.is_available() else "cpu")
        clip, linear_1, linear_2 = build_modules(mmproj)
        self.clip = clip.to(self.device)
        self.proj = {"linear_1": linear_1.to(self.device), "linear_2": linear_2.to(self.device)}

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) normalised pixels -> (B, n_tokens, n_embd)."""
        torch = self._torch
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)
            out = self.clip(pixel_values=x, output_hidden_states=True)
            h = out.hidden_states[self.mmproj.feature_layer][:, 1:]       # (B, 576, 1024): CLS dropped
            h = torch.nn.functional.gelu(self.proj["linear_1"](h))       # (B, 576, 4096), exact erf GELU
            h = self.proj["linear_2"](h)                                  # (B, 576, n_embd)
            return h.float().cpu().numpy()
