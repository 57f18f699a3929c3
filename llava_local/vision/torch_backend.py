"""`torch` vision backend: the reference CLIP + projector in PyTorch, built from the mmproj GGUF.

It rebuilds a transformers `CLIPVisionModel` with the stored layers (the converter writes exactly
the layers up to LLaVA's feature layer) and LLaVA-1.5's projector (Linear, exact erf GELU, Linear),
and runs them in float32. Exact, slower than the others: the tests' reference and a CPU fallback.
"""
from __future__ import annotations

import logging
from typing import Sequence

import gguf
import numpy as np
from PIL import Image

from ..errors import BackendUnavailableError, ModelFilesError
from ..gguf_names import CLIP_BLOCK_TENSORS, CLIP_TENSORS, PROJECTOR_TENSORS
from ..preprocess import preprocess_batch
from .base import VisionBackend, register_backend

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


@register_backend("torch")
class TorchBackend(VisionBackend):
    exact = True

    def __init__(self, mmproj, *, vision_device: str = "cpu", threads: int | None = None, **_):
        super().__init__(mmproj)
        try:
            import torch
            from transformers import CLIPVisionConfig, CLIPVisionModel
        except ImportError as exc:
            raise BackendUnavailableError(f"the torch vision backend needs torch and transformers ({exc})") from None
        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        m = mmproj
        tensors = _read_tensors(m.path)
        ffn = tensors["v.blk.0.ffn_up.weight"].shape[0]
        cfg = CLIPVisionConfig(hidden_size=m.hidden_size, intermediate_size=ffn, num_hidden_layers=m.feature_layer,
                               num_attention_heads=m.n_heads, image_size=m.image_size, patch_size=m.patch_size,
                               layer_norm_eps=m.layer_norm_eps, hidden_act="quick_gelu")
        self.device = torch.device("cuda" if vision_device == "gpu" and torch.cuda.is_available() else "cpu")
        clip = CLIPVisionModel(cfg).eval()
        state = {}
        for rel, gname in CLIP_TENSORS.items():
            state[rel] = tensors[gname]
        for bid in range(m.feature_layer):
            for rel, gname in CLIP_BLOCK_TENSORS.items():
                for sfx in (".weight", ".bias"):
                    state[rel.format(bid=bid) + sfx] = tensors[gname.format(bid=bid) + sfx]
        sd = clip.state_dict()
        missing = [k for k in sd if k not in state and not k.startswith("post_layernorm")]
        if missing:
            raise ModelFilesError(f"{m.path}: cannot rebuild CLIP, missing {missing[:3]}")
        with torch.no_grad():
            for k, v in sd.items():
                if k in state:
                    if tuple(v.shape) != state[k].shape:
                        raise ModelFilesError(f"{m.path}: tensor for {k} has shape {state[k].shape}, expected {tuple(v.shape)}")
                    v.copy_(torch.from_numpy(state[k]))
        self.clip = clip.to(self.device)
        p = {}
        for key in ("linear_1", "linear_2"):
            g = PROJECTOR_TENSORS[key]
            p[key] = (torch.from_numpy(tensors[g + ".weight"]).to(self.device),
                      torch.from_numpy(tensors[g + ".bias"]).to(self.device))
        self.proj = p

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) normalised pixels -> (B, n_tokens, n_embd)."""
        torch = self._torch
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)
            out = self.clip(pixel_values=x, output_hidden_states=True)
            h = out.hidden_states[self.mmproj.feature_layer][:, 1:]       # (B, 576, 1024): CLS dropped
            w1, b1 = self.proj["linear_1"]
            w2, b2 = self.proj["linear_2"]
            h = torch.nn.functional.gelu(h @ w1.T + b1)                      # (B, 576, 4096), exact erf GELU
            h = h @ w2.T + b2                                                # (B, 576, n_embd)
            return h.float().cpu().numpy()

    def _encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.encode_pixels(preprocess_batch(images, self.preprocess_config))
