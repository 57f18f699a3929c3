"""Read a LLaVA checkpoint directory, in either layout, into one normalised description.

Layouts:
- "llava-hf": transformers `LlavaForConditionalGeneration` (public llava-hf/* checkpoints and what
  train/ writes) and, for LLaVA-1.6, `LlavaNextForConditionalGeneration` (model_type llava_next).
  Tensor prefixes differ by transformers version; both are accepted.
- "llava-original": liuhaotian/llava-v1.5-* and llava-v1.6-* (`LlavaLlamaForCausalLM`): the LLM and
  `model.mm_projector.*` in the checkpoint, the CLIP config (and, for 1.5, its weights) in a separate
  directory given by `vision_tower=` or found from `mm_vision_tower` in config.json when that is a
  local path. LLaVA-1.6 fine-tuned CLIP: its tower is inside the checkpoint
  (`model.vision_tower.vision_tower.vision_model.*`) and, as in the LLaVA repo, overrides the CLIP dir's.

LLaVA-1.6 ("anyres": image_grid_pinpoints, `image_newline`, spatial_unpad merging) is recorded in
`LlavaCheckpoint.anyres`; every setting we cannot run exactly as transformers' LlavaNext does is
refused with a ConversionError naming the field, what is supported and what was found.

Only JSON configs and tensors are read: no remote code, no pickles beyond `weights_only=True`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from llava_local.errors import ConversionError, ModelFilesError
from llava_local.formats.gguf_names import MERGE_FLAT, MERGE_SPATIAL_UNPAD

from .tensor_store import TensorStore

log = logging.getLogger(__name__)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# where each part lives, per llava-hf tensor-prefix generation
_HF_PREFIXES = (
    # the public llava-hf checkpoints, and what transformers 5 saves (it maps names back on save)
    dict(llm="language_model.model.", llm_as="model.", lm_head="language_model.lm_head.weight",
         projector="multi_modal_projector."),
    # transformers 4.52-4.x saved LlavaModel's own nesting
    dict(llm="model.language_model.", llm_as="model.", lm_head="lm_head.weight",
         projector="model.multi_modal_projector."),
)
# CLIP vision tensors sit under one of these ("vision_model." in CLIPModel / older CLIPVisionModel
# files; transformers 5 saves CLIPVisionModel flat)
_VISION_PREFIXES = ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.",
                    "model.vision_tower.", "vision_model.", "")
# the CLIP tower inside an original-layout checkpoint (LLaVA-1.6 unfroze it: llava_surgery_v2.py's llava.clip)
_ORIGINAL_TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
# llava-hf config model_type -> what it is; anything else (llava_onevision, llava_next_video, vipllava, ...) is refused
_HF_MODEL_TYPES = {"llava": "LLaVA-1.5 (LlavaForConditionalGeneration)",
                   "llava_next": "LLaVA-1.6 (LlavaNextForConditionalGeneration)"}
# image_newline's name: transformers 5 and < 4.52 save it at the top level, 4.52-4.x under LlavaModel
_HF_NEWLINE_NAMES = ("image_newline", "model.image_newline")
_ORIGINAL_NEWLINE_NAME = "model.image_newline"
ANYRES, PAD = "anyres", "pad"                        # LLaVA repo image_aspect_ratio values we run


def _find_vision_prefix(store: "TensorStore", where: Path) -> str:
    for p in _VISION_PREFIXES:
        if p + "embeddings.class_embedding" in store:
            return p
    raise ModelFilesError(f"{where}: no CLIP vision tower tensors (embeddings.class_embedding) found")


@dataclass
class VisionSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int           # layers in the checkpoint
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str           # CLIP: "quick_gelu"
    feature_layer: int        # index into CLIP hidden_states (0 = embeddings); LLaVA-1.5: num_layers - 1
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class AnyresFacts:
    """LLaVA-1.6 tiling, as transformers' LlavaNext runs it."""
    grid_pinpoints: tuple[tuple[int, int], ...]   # (height, width) pixels, transformers' order, config order kept
    newline_tensor: str                           # source name of the (n_embd,) image_newline in the LLM store
    merge_type: str = MERGE_SPATIAL_UNPAD         # the only one we run: unpad + a newline after each row

    def to_json(self) -> dict:
        return anyres_json(self.grid_pinpoints, self.merge_type)


def anyres_json(grid_pinpoints, merge_type: str = MERGE_SPATIAL_UNPAD) -> dict:
    """The manifest's and the ONNX sidecar's "anyres" entry (the newline vector stays in the mmproj)."""
    return {"grid_pinpoints": [[int(h), int(w)] for h, w in grid_pinpoints], "pinpoint_order": "height,width",
            "merge_type": merge_type}


@dataclass
class LlavaCheckpoint:
    layout: str                        # "llava-hf" | "llava-original"
    source: Path
    name: str
    vision: VisionSpec
    text: dict                         # Llama config fields (hidden_size, num_hidden_layers, ...)
    store: TensorStore                 # LLM + projector
    vision_store: TensorStore
    vision_prefix: str                 # prefix of CLIP's "vision_model." tensors in vision_store
    llm_prefix: str                    # prefix of LLM tensors ("model.layers..." after llm_as)
    llm_as: str
    lm_head: str | None                # None: tied to the token embeddings
    projector_prefix: str
    projector_layers: tuple[str, str]  # (first linear, second linear) names under projector_prefix
    projector_act: str
    tokenizer_dir: Path
    anyres: AnyresFacts | None = None  # LLaVA-1.6; None: LLaVA-1.5 (one fixed-size image)

    def llm_tensors(self) -> list[tuple[str, str]]:
        """(source name, HF-Llama-style name) for every LLM tensor."""
        # the original layout keeps these under "model."
        skip = (self.projector_prefix, "model.vision_tower.", _ORIGINAL_NEWLINE_NAME)
        out = [(n, self.llm_as + rel) for n, rel in self.store.with_prefix(self.llm_prefix)
               if not n.startswith(skip)]
        if self.lm_head:
            out.append((self.lm_head, "lm_head.weight"))
        return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFilesError(f"{path}: not found") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFilesError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelFilesError(f"{path}: expected a JSON object")
    return data


def _feature_index(layer: object, num_layers: int, what: str) -> int:
    """LLaVA's negative layer index (-2 = second to last) -> index into hidden_states."""
    if isinstance(layer, list):
        raise ConversionError(f"{what}: multiple feature layers {layer} are not supported (LLaVA-1.5 uses -2)")
    if not isinstance(layer, int):
        raise ConversionError(f"{what}: feature layer {layer!r} is not an integer")
    idx = layer if layer >= 0 else num_layers + 1 + layer
    if not 1 <= idx <= num_layers:
        raise ConversionError(f"{what}: feature layer {layer} out of range for {num_layers} CLIP layers")
    return idx


def _vision_spec(vcfg: dict, feature_layer: object, preproc: dict | None, what: str) -> VisionSpec:
    try:
        spec = VisionSpec(
            hidden_size=int(vcfg.get("hidden_size", 768)),
            intermediate_size=int(vcfg.get("intermediate_size", 3072)),
            num_layers=int(vcfg.get("num_hidden_layers", 12)),
            num_heads=int(vcfg.get("num_attention_heads", 12)),
            image_size=int(vcfg.get("image_size", 224)),
            patch_size=int(vcfg.get("patch_size", 32)),
            layer_norm_eps=float(vcfg.get("layer_norm_eps", 1e-5)),
            hidden_act=str(vcfg.get("hidden_act", "quick_gelu")),
            feature_layer=0,
        )
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{what}: bad vision config ({exc})") from None
    if spec.hidden_act != "quick_gelu":
        raise ConversionError(f"{what}: CLIP hidden_act {spec.hidden_act!r} unsupported (expected quick_gelu)")
    spec.feature_layer = _feature_index(feature_layer, spec.num_layers, what)
    if preproc:
        spec.image_mean = [float(x) for x in preproc.get("image_mean", CLIP_MEAN)]
        spec.image_std = [float(x) for x in preproc.get("image_std", CLIP_STD)]
    return spec


def _pinpoints(value: object, tile: int, where: str, *, width_first: bool) -> tuple[tuple[int, int], ...]:
    """A config's image_grid_pinpoints -> ((height, width), ...). transformers reads each pair as
    (height, width); the LLaVA repo (mm_utils.select_best_resolution) as (width, height)."""
    pair = "[width, height]" if width_first else "[height, width]"
    ok = isinstance(value, list) and value and all(
        isinstance(p, list) and len(p) == 2 and all(type(v) is int and v > 0 for v in p) for p in value)
    if not ok:
        raise ConversionError(f"{where}: image_grid_pinpoints must be a non-empty list of {pair} pixel pairs, "
                              f"found {value!r}")
    hw = tuple((b, a) if width_first else (a, b) for a, b in value)
    for h, w in hw:
        if h % tile or w % tile:
            raise ConversionError(f"{where}: image_grid_pinpoints entry {h}x{w} (height x width) is not a whole "
                                  f"number of {tile}-px tiles (the CLIP image_size)")
    return hw


# LLM model_type -> its family ("model_type" in LlavaCheckpoint.text). Both are written as llama.cpp's
# "llama" architecture: Mistral-7B is a Llama with GQA, which that graph runs as it is.
_LLM_FAMILIES = {
    "llama": "llama", "llava_llama": "llama", "llava": "llama",   # Vicuna, LLaMA-2, Llama-3, Yi (llava-v1.6-34b)
    "mistral": "mistral", "llava_mistral": "mistral",            # Mistral-7B (llava-v1.6-mistral-7b, BakLLaVA)
}


MISTRAL_DEFAULT_WINDOW = 4096   # transformers' MistralConfig.sliding_window default


def _text_fields(cfg: dict) -> dict:
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings",
            "vocab_size", "tie_word_embeddings", "head_dim", "rope_parameters", "rope_scaling")
    out = {k: cfg[k] for k in keys if k in cfg and cfg[k] is not None}
    mt = cfg.get("model_type", "llama")
    if mt not in _LLM_FAMILIES:
        raise ConversionError(f"LLM model_type {mt!r} unsupported (expected a Llama-architecture LLM: "
                              f"{', '.join(_LLM_FAMILIES)})")
    out["model_type"] = _LLM_FAMILIES[mt]
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"LLM hidden_act {act!r} unsupported (Llama and Mistral: 'silu')")
    # a Mistral config without the key gets transformers' MistralConfig default (4096): configs are saved
    # as differences from the defaults, so a model without a window says "sliding_window": null
    window, n_ctx = cfg.get("sliding_window", MISTRAL_DEFAULT_WINDOW), cfg.get("max_position_embeddings")
    if out["model_type"] == "mistral" and window is not None and (n_ctx is None or window < n_ctx):
        # Mistral-7B-v0.1 attends to the last 4096 positions only; llama.cpp's llama graph always
        # attends to the whole context, so past the window every answer would differ from the model's
        raise ConversionError(
            f"LLM sliding_window {window} < max_position_embeddings {n_ctx}: sliding-window attention is not "
            "supported (llama.cpp's llama architecture attends to the whole context); Mistral-7B-Instruct-v0.2 "
            "and later, as in llava-v1.6-mistral-7b, have none")
    return out


def read_checkpoint(src: Path, *, vision_tower: Path | None = None, name: str | None = None) -> LlavaCheckpoint:
    src = Path(src)
    if not src.is_dir():
        raise ModelFilesError(f"{src}: not a checkpoint directory")
    cfg = _read_json(src / "config.json")
    archs = cfg.get("architectures") or []
    store = TensorStore.from_dir(src)
    name = name or src.resolve().name
    if "LlavaForConditionalGeneration" in archs or "vision_config" in cfg:
        return _read_hf(src, cfg, store, name)
    if any("mm_projector" in n for n in store.names()):
        return _read_original(src, cfg, store, name, vision_tower)
    raise ConversionError(f"{src}: not a LLaVA checkpoint (architectures {archs}, no vision config or mm_projector)")


def _read_hf(src: Path, cfg: dict, store: TensorStore, name: str) -> LlavaCheckpoint:
    model_type = cfg.get("model_type", "llava")
    if model_type not in _HF_MODEL_TYPES:
        raise ConversionError(f"{src}: model_type {model_type!r} unsupported (expected one of: "
                              + ", ".join(f"{k!r} {v}" for k, v in _HF_MODEL_TYPES.items()) + ")")
    for p in _HF_PREFIXES:
        if p["llm"] + "embed_tokens.weight" in store:
            break
    else:
        raise ConversionError(f"{src}: llava-hf config but no language model embeddings found in the weights")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ConversionError(f"{src}: vision_feature_select_strategy {strategy!r} unsupported "
                              "(LLaVA-1.5/1.6: 'default')")
    act = cfg.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ConversionError(f"{src}: projector_hidden_act {act!r} unsupported (LLaVA-1.5/1.6: 'gelu')")
    preproc_path = src / "preprocessor_config.json"
    preproc = _read_json(preproc_path) if preproc_path.is_file() else None
    vision = _vision_spec(cfg.get("vision_config") or {}, cfg.get("vision_feature_layer", -2), preproc, str(src))
    text = _text_fields(cfg.get("text_config") or {})
    anyres = _hf_anyres(src, cfg, preproc, store, vision.image_size) if model_type == "llava_next" else None
    return LlavaCheckpoint(
        layout="llava-hf", source=src, name=name, vision=vision, text=text, store=store, vision_store=store,
        vision_prefix=_find_vision_prefix(store, src), llm_prefix=p["llm"], llm_as=p["llm_as"],
        lm_head=p["lm_head"] if p["lm_head"] in store else None,
        projector_prefix=p["projector"], projector_layers=("linear_1", "linear_2"), projector_act=act,
        tokenizer_dir=src, anyres=anyres)


def _hf_anyres(src: Path, cfg: dict, preproc: dict | None, store: TensorStore, tile: int) -> AnyresFacts:
    """LlavaNextForConditionalGeneration: pinpoints from config.json (the model's grid shapes) and the
    image processor's (its resize targets) must agree; the newline vector must be in the weights."""
    pinpoints = _pinpoints(cfg.get("image_grid_pinpoints"), tile, f"{src}/config.json", width_first=False)
    if preproc and preproc.get("image_grid_pinpoints") is not None:
        pre = _pinpoints(preproc["image_grid_pinpoints"], tile, f"{src}/preprocessor_config.json", width_first=False)
        if pre != pinpoints:
            raise ConversionError(f"{src}: preprocessor_config.json image_grid_pinpoints {[list(x) for x in pre]} "
                                  f"differ from config.json's {[list(x) for x in pinpoints]}")
    newline = next((n for n in _HF_NEWLINE_NAMES if n in store), None)
    if newline is None:
        raise ConversionError(f"{src}: LlavaNext checkpoint without image_newline (expected one of "
                              f"{', '.join(_HF_NEWLINE_NAMES)} in the weights, found none)")
    return AnyresFacts(pinpoints, newline)


def _read_original(src: Path, cfg: dict, store: TensorStore, name: str, vision_tower: Path | None) -> LlavaCheckpoint:
    ptype = cfg.get("mm_projector_type", "linear")
    if ptype != "mlp2x_gelu":
        raise ConversionError(
            f"{src}: mm_projector_type {ptype!r} unsupported: llama.cpp's LLaVA loader needs the 2-layer "
            "'mlp2x_gelu' projector of LLaVA-1.5 (a linear-only projector has no mm.2 and crashes it)")
    if cfg.get("mm_vision_select_feature", "patch") != "patch":
        raise ConversionError(f"{src}: mm_vision_select_feature {cfg.get('mm_vision_select_feature')!r} "
                              "unsupported (LLaVA-1.5: 'patch')")
    if vision_tower is None:
        tower = cfg.get("mm_vision_tower")
        cand = (src / tower) if tower and not Path(tower).is_absolute() else Path(tower or "")
        if tower and cand.is_dir():
            vision_tower = cand
        else:
            raise ConversionError(
                f"{src}: original LLaVA layout needs the CLIP vision tower: config names {tower!r}, which is not a "
                "local directory; pass --vision-tower DIR (a CLIPVisionModel or CLIPModel checkpoint)")
    vision_tower = Path(vision_tower)
    vcfg_all = _read_json(vision_tower / "config.json")
    vcfg = vcfg_all.get("vision_config", vcfg_all) if vcfg_all.get("model_type") == "clip" else vcfg_all
    preproc_path = vision_tower / "preprocessor_config.json"
    preproc = _read_json(preproc_path) if preproc_path.is_file() else None
    vision = _vision_spec(vcfg, cfg.get("mm_vision_select_layer", -2), preproc, str(vision_tower))
    anyres = _original_anyres(src, cfg, store, vision.image_size)
    if _ORIGINAL_TOWER_PREFIX + "embeddings.class_embedding" in store:
        # a fine-tuned tower in the checkpoint: the LLaVA repo loads the CLIP dir, then these over it
        log.info("%s: CLIP weights from the checkpoint (%s*), config from %s", src, _ORIGINAL_TOWER_PREFIX,
                 vision_tower)
        vstore, vprefix = store, _ORIGINAL_TOWER_PREFIX
    else:
        vstore = TensorStore.from_dir(vision_tower)
        vprefix = _find_vision_prefix(vstore, vision_tower)
    text = _text_fields(cfg)
    return LlavaCheckpoint(
        layout="llava-original", source=src, name=name, vision=vision, text=text, store=store,
        vision_store=vstore, vision_prefix=vprefix, llm_prefix="model.", llm_as="model.",
        lm_head="lm_head.weight" if "lm_head.weight" in store else None,
        projector_prefix="model.mm_projector.", projector_layers=("0", "2"), projector_act="gelu",
        tokenizer_dir=src, anyres=anyres)


def _original_anyres(src: Path, cfg: dict, store: TensorStore, tile: int) -> AnyresFacts | None:
    """The LLaVA repo's image_aspect_ratio / mm_patch_merge_type pairs we run exactly: "pad" (LLaVA-1.5;
    merging plays no part for one fixed-size image) and "anyres" + "spatial_unpad" (LLaVA-1.6)."""
    where = f"{src}/config.json"
    aspect = cfg.get("image_aspect_ratio", PAD)
    merge = cfg.get("mm_patch_merge_type", MERGE_FLAT)
    if aspect not in (PAD, ANYRES):
        raise ConversionError(f"{where}: image_aspect_ratio {aspect!r} unsupported (expected {PAD!r} for "
                              f"LLaVA-1.5 or {ANYRES!r} for LLaVA-1.6)")
    if merge not in (MERGE_FLAT, MERGE_SPATIAL_UNPAD):
        raise ConversionError(f"{where}: mm_patch_merge_type {merge!r} unsupported (expected "
                              f"{MERGE_SPATIAL_UNPAD!r} for LLaVA-1.6 or {MERGE_FLAT!r})")
    if aspect == PAD:
        return None
    if merge != MERGE_SPATIAL_UNPAD:
        raise ConversionError(f"{where}: image_aspect_ratio {ANYRES!r} needs mm_patch_merge_type "
                              f"{MERGE_SPATIAL_UNPAD!r} (LLaVA-1.6), found {merge!r}")
    pinpoints = _pinpoints(cfg.get("image_grid_pinpoints"), tile, where, width_first=True)
    if _ORIGINAL_NEWLINE_NAME not in store:
        raise ConversionError(f"{src}: LLaVA-1.6 checkpoint ({ANYRES}, {MERGE_SPATIAL_UNPAD}) without "
                              f"{_ORIGINAL_NEWLINE_NAME!r} in the weights")
    return AnyresFacts(pinpoints, _ORIGINAL_NEWLINE_NAME)
