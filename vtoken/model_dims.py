"""The dimensions vtoken's FLOPs model reads from a transformers config (``vtoken.accounting``), and
where configs come from: a config, a model, a dict, a JSON file, a shipped config
(``vtoken/configs/<name>.json``: the real 7B / 8B models' configs, for counting offline) or a hub id.

``model_dims(config)`` gives a :class:`ModelDims`: the LLM (:class:`DecoderDims`), the vision tower
(:class:`VisionDims`) and the projector (:class:`ProjectorDims`) of a LLaVA-1.5, LLaVA-NeXT,
LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL or Qwen3-VL config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class ExpertsDims:
    """A mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, Qwen3-VL-MoE): a linear router scores
    ``experts`` experts per token, each token runs through its ``top_k`` gated experts of width
    ``intermediate``, and, where the LLM has one (Qwen2-MoE), through a shared gated expert of width
    ``shared_intermediate`` scaled by a sigmoid of one more linear output (0: none)."""

    experts: int
    top_k: int
    intermediate: int
    shared_intermediate: int = 0

    def flops_per_token(self, hidden: int) -> int:
        """Router 2·d·E, the top-k experts k · 6·d·m_e, the shared expert 6·d·m_s and its gate 2·d.
        Every token runs through exactly k experts whatever the routing, so the count is exact."""
        router = 2 * hidden * self.experts
        routed = self.top_k * 6 * hidden * self.intermediate
        shared = 6 * hidden * self.shared_intermediate + 2 * hidden if self.shared_intermediate else 0
        return router + routed + shared


@dataclass(frozen=True)
class DecoderDims:
    """The LLM: ``layers`` decoder layers of hidden size ``hidden``, gated FFN ``intermediate``;
    ``fused_qkv``: its attention projects q, k and v in one ``qkv_proj`` (Phi-3), so a layer cannot be
    handed the keys scoring projected (it projects them again with its queries and values).
    ``experts``: a mixture-of-experts LLM's sparse MLP, run in the layers ``expert_layers`` (the others
    run the dense FFN of width ``intermediate``). ``mlp_matrices``: the dense FFN's d×m matrices, 3 for
    a gated one (Llama's gate, up and down), 2 for an ungated one (:data:`TWO_MATRIX_MLP_MODEL_TYPES`).
    ``cache_windows``: per layer, the sliding window of its KV cache (Mistral's, Gemma2's every other
    layer: it keeps the last ``window - 1`` tokens and a decoding step attends to at most ``window``),
    None for a layer that keeps every token (:func:`vtoken.compat.dynamic_cache_windows`)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    fused_qkv: bool = False
    experts: ExpertsDims | None = None
    expert_layers: frozenset[int] = frozenset()
    mlp_matrices: int = 3
    cache_windows: tuple[int | None, ...] = ()

    def cache_window(self, layer: int) -> int | None:
        """The window of ``layer``'s cache (:attr:`cache_windows`), None where it keeps every token."""
        return self.cache_windows[layer] if layer < len(self.cache_windows) else None

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def mlp_flops_per_token(self, layer: int) -> int:
        """The MLP of decoder layer ``layer`` on one token: a gated FFN's three d×m matrices 6·d·m (an
        ungated one's two, 4·d·m), or a sparse layer's router and active experts
        (:meth:`ExpertsDims.flops_per_token`)."""
        if self.experts is not None and layer in self.expert_layers:
            return self.experts.flops_per_token(self.hidden)
        return 2 * self.mlp_matrices * self.hidden * self.intermediate


@dataclass(frozen=True)
class VisionDims:
    """A ViT encoder: CLIP-like (``window == 0``) or Qwen2.5-VL's windowed tower."""

    layers: int
    hidden: int
    intermediate: int
    patch: int
    channels: int
    image_size: int = 0  # CLIP input resolution (square); 0 when the tower takes any size
    cls_tokens: int = 0
    mlp_matrices: int = 2
    temporal_patch: int = 1
    merge: int = 1  # spatial merge of the projector (Qwen: 2, i.e. 2×2 patches per LLM token)
    window: int = 0  # attention window, in merged units per side (Qwen2.5-VL: 112 px → 4)
    full_attention_layers: tuple[int, ...] = ()
    pooling_head: bool = False  # SigLIP's attention-pooling head runs after the last layer
    heads: int = 0  # attention heads (the width of ToMe's matching metric, keys averaged over heads)
    deepstack_layers: tuple[int, ...] = ()  # Qwen3-VL: blocks whose output feeds a DeepStack merger

    @property
    def patch_inputs(self) -> int:
        """Input values per patch of the patch-embedding convolution."""
        return self.channels * self.temporal_patch * self.patch * self.patch


@dataclass(frozen=True)
class ProjectorDims:
    """A two-layer MLP applied to each of the projector's input tokens; ``norm_groups``: how many rows
    (encoder tokens) of each input token a LayerNorm / RMSNorm before its first layer normalises
    separately (Qwen-VL's mergers: merge²), 0 with no norm. ZOO-Prune pays for them per (token, direction) pair."""

    in_dim: int
    hidden: int
    out_dim: int
    norm_groups: int = 0


@dataclass(frozen=True)
class ModelDims:
    family: str  # "llava" | "llava_next" | "llava_onevision" | "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl"
    name: str
    decoder: DecoderDims
    vision: VisionDims
    projector: ProjectorDims
    keep_cls: bool = False  # vision_feature_select_strategy == "full"
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    anyres_max: int = 0  # LLaVA-OneVision's vision_aspect_ratio "anyres_max_N": N


# --------------------------------------------------------------------------------------------------
# Config loading


def shipped_configs() -> dict[str, str]:
    """The config JSONs shipped with vtoken: file stem -> the hub id it was taken from."""
    found = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        found[path.stem] = json.loads(path.read_text()).get("_source", "").split(" ")[0]
    return found


def load_config(source: Any):
    """A transformers config from a config, a model, a dict, a JSON path or a hub name.

    Hub names are looked up first among the shipped configs (``vtoken/configs/<name>.json``, matched
    on the part after the last ``/``), then with ``AutoConfig.from_pretrained``.
    """
    from transformers import PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if hasattr(source, "config") and isinstance(source.config, PretrainedConfig):
        return source.config
    if isinstance(source, Mapping):
        return _config_from_dict(dict(source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir() and (path / "config.json").is_file():
            path = path / "config.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as error:
                raise ValueError(f"{path}: not a model config (not valid JSON: {error})") from None
            if not isinstance(data, dict):
                raise ValueError(f"{path}: not a model config (a JSON object of a transformers config is needed, "
                                 f"got a {type(data).__name__})")
            return _config_from_dict(data)
        shipped = _shipped_config_path(str(source))
        if shipped is not None:
            data = json.loads(shipped.read_text())
            config = _config_from_dict(data)
            config._name_or_path = data.get("_source", str(source)).split(" ")[0]
            return config
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(source))
    raise TypeError(f"cannot read a model config from {type(source).__name__}")


def _shipped_config_path(name: str) -> Path | None:
    stem = name.rstrip("/").split("/")[-1].lower()
    for path in CONFIG_DIR.glob("*.json"):
        if path.stem.lower() == stem:
            return path
    return None


def _config_from_dict(data: dict):
    from transformers import AutoConfig

    data = {k: v for k, v in data.items() if not k.startswith("_")}
    if "model_type" not in data:
        raise ValueError("a config dict needs a 'model_type'")
    return AutoConfig.for_model(**data)


#: The vision towers (``vision_config.model_type``) of LLaVA's classes whose FLOPs and token grid
#: vtoken models (and whose layers the LLaVA adapters read): CLIP's (with a CLS token) and SigLIP's.
LLAVA_VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")


def model_dims(config) -> ModelDims:
    """Read the dimensions the FLOPs model needs from a transformers config."""
    family = getattr(config, "model_type", None)
    if family in ("llava", "llava_next", "llava_onevision"):
        return _llava_dims(config, family)
    if family == "qwen2_5_vl":
        return _qwen2_5_vl_dims(config)
    if family == "qwen2_vl":
        return _qwen2_vl_dims(config)
    if family in ("qwen3_vl", "qwen3_vl_moe"):  # the MoE model differs in its LLM's MLPs only
        return _qwen3_vl_dims(config)
    raise NotImplementedError(
        f"FLOPs model for model_type {family!r} is not implemented (supported: llava, llava_next, "
        "llava_onevision, qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe)"
    )


def _decoder_dims(text) -> DecoderDims:
    from vtoken import compat  # torch and transformers: only once a model's dimensions are read

    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    experts, expert_layers = _experts_dims(text)
    return DecoderDims(
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=text.vocab_size,
        fused_qkv=getattr(text, "model_type", None) in compat.FUSED_QKV_MODEL_TYPES,
        experts=experts,
        expert_layers=expert_layers,
        mlp_matrices=2 if getattr(text, "model_type", None) in TWO_MATRIX_MLP_MODEL_TYPES else 3,
        cache_windows=compat.dynamic_cache_windows(text),
    )


#: LLMs whose dense FFN is two d×m matrices (up, then down, no gate), by ``model_type``, each checked
#: against ``FlopCounterMode`` (``tests/test_flops_llms.py``); every other LLM is counted gated, as Llama.
TWO_MATRIX_MLP_MODEL_TYPES = ("phi", "starcoder2", "nemotron", "arcee", "apertus", "gpt_neox", "persimmon")


#: Mixture-of-experts LLMs whose sparse MLP ``_experts_dims`` reads, by ``model_type``: Mixtral's
#: layout (Mixtral, OLMoE, PhiMoE, GraniteMoE: every layer sparse, experts of ``intermediate_size``)
#: and Qwen's (experts of ``moe_intermediate_size`` in the layers ``decoder_sparse_step`` and
#: ``mlp_only_layers`` pick, as each modeling file's decoder layer does; Qwen2-MoE adds a gated
#: shared expert).
MIXTRAL_LAYOUT_MOE = ("mixtral", "olmoe", "phimoe", "granitemoe")
QWEN_LAYOUT_MOE = ("qwen2_moe", "qwen3_moe", "qwen3_vl_moe_text")
#: The config fields that mark an LLM as a mixture of experts (DBRX keeps its experts in ``ffn_config``).
#: The config fields of an LLM with state-space (Mamba) layers (FalconH1, Jamba, Bamba, Zamba, NemotronH).
_STATE_SPACE_FIELDS = ("mamba_d_state", "mamba_d_ssm", "mamba_n_heads", "ssm_state_size", "mamba_expand")
_EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size",
                        "num_experts_per_tok", "ffn_config")


def _experts_dims(text) -> tuple[ExpertsDims | None, frozenset[int]]:
    """A mixture-of-experts LLM's sparse MLP and the layers that run it; (None, {}) for a dense LLM.

    An MoE LLM of another layout (DeepSeek's shared experts and dense first layers, GPT-OSS, Jamba,
    ...) is refused: counting it as dense would be silently wrong."""
    model_type = getattr(text, "model_type", None)
    if any(hasattr(text, field) for field in _STATE_SPACE_FIELDS):
        # FalconH1, Jamba, Bamba, Zamba, NemotronH, ...: their Mamba mixers are not attention and MLP
        # (seen 20% under FlopCounterMode on FalconH1 counted as a dense LLM, eval/fuzz_flops.py).
        raise NotImplementedError(
            f"FLOPs model for an LLM with state-space (Mamba) layers, model_type {model_type!r}, is not "
            "implemented: only attention-and-MLP LLMs are counted")
    layers = range(text.num_hidden_layers)
    if model_type in MIXTRAL_LAYOUT_MOE:
        experts = ExpertsDims(experts=text.num_local_experts, top_k=text.num_experts_per_tok,
                              intermediate=text.intermediate_size)
        return experts, frozenset(layers)
    if model_type in QWEN_LAYOUT_MOE:
        experts = ExpertsDims(experts=text.num_experts, top_k=text.num_experts_per_tok,
                              intermediate=text.moe_intermediate_size,
                              shared_intermediate=getattr(text, "shared_expert_intermediate_size", 0) or 0)
        if not experts.experts:
            return None, frozenset()
        dense = set(getattr(text, "mlp_only_layers", None) or ())
        step = getattr(text, "decoder_sparse_step", 1) or 1
        return experts, frozenset(i for i in layers if i not in dense and (i + 1) % step == 0)
    if any(getattr(text, field, None) for field in _EXPERT_COUNT_FIELDS):
        raise NotImplementedError(
            f"FLOPs model for a mixture-of-experts LLM of model_type {model_type!r} is not implemented "
            f"(supported: {', '.join(MIXTRAL_LAYOUT_MOE + QWEN_LAYOUT_MOE)}, and dense LLMs)")
    return None, frozenset()


def _llava_dims(config, family: str) -> ModelDims:
    text, vision = config.text_config, config.vision_config
    feature_layers = config.vision_feature_layer
    n_feature_layers = 1 if isinstance(feature_layers, int) else len(feature_layers)
    vision_type = getattr(vision, "model_type", None)
    if vision_type not in LLAVA_VISION_TOWERS:
        # Other towers in LLaVA's classes (Pixtral's: gated MLP, packed images of any size, row-break
        # tokens; SigLIP2's patches of any aspect ratio) have other per-layer FLOPs and token counts.
        raise NotImplementedError(
            f"FLOPs model for a {family} vision tower of model_type {vision_type!r} is not implemented "
            f"(supported: {', '.join(LLAVA_VISION_TOWERS)})"
        )
    cls_tokens = 1 if vision_type == "clip_vision_model" else 0
    pinpoints = tuple(tuple(p) for p in getattr(config, "image_grid_pinpoints", None) or ())
    anyres_max = 0
    if family == "llava_onevision":
        # parsed exactly as LlavaOnevisionModel.pack_image_features does ("anyres_max_9" -> 9)
        anyres_max = int(getattr(config, "vision_aspect_ratio", "anyres_max_9").strip("anyres_max_"))
    return ModelDims(
        family=family,
        name=_model_name(config),
        decoder=_decoder_dims(text),
        vision=VisionDims(
            layers=vision.num_hidden_layers,
            hidden=vision.hidden_size,
            intermediate=vision.intermediate_size,
            patch=vision.patch_size,
            channels=getattr(vision, "num_channels", 3),
            image_size=vision.image_size,
            cls_tokens=cls_tokens,
            mlp_matrices=2,
            pooling_head=vision_type == "siglip_vision_model" and bool(getattr(vision, "vision_use_head", False)),
            heads=vision.num_attention_heads,
        ),
        projector=ProjectorDims(
            in_dim=vision.hidden_size * n_feature_layers, hidden=text.hidden_size, out_dim=text.hidden_size
        ),
        keep_cls=config.vision_feature_select_strategy == "full",
        grid_pinpoints=pinpoints if family in ("llava_next", "llava_onevision") else (),
        anyres_max=anyres_max,
    )


def _qwen_dims(config, family: str, width: int, intermediate: int, out_dim: int, mlp_matrices: int,
               **vision_extra) -> ModelDims:
    """A Qwen-VL family: its ViT of ``depth`` blocks, then the 2x2 merger MLP (4·D → 4·D → d)."""
    text, vision = config.text_config, config.vision_config
    merge = vision.spatial_merge_size
    merged_dim = width * merge * merge
    return ModelDims(
        family=family,
        name=_model_name(config),
        decoder=_decoder_dims(text),
        vision=VisionDims(
            layers=vision.depth,
            hidden=width,
            intermediate=intermediate,
            patch=vision.patch_size,
            channels=vision.in_channels,
            mlp_matrices=mlp_matrices,
            temporal_patch=vision.temporal_patch_size,
            merge=merge,
            heads=vision.num_heads,
            **vision_extra,
        ),
        projector=ProjectorDims(in_dim=merged_dim, hidden=merged_dim, out_dim=out_dim, norm_groups=merge * merge),
    )


def _qwen2_vl_dims(config) -> ModelDims:
    """Qwen2-VL: full attention in every block (no windows) and a two-matrix MLP (``embed_dim *
    mlp_ratio``); the merger maps to the LLM's width (``vision_config.hidden_size``)."""
    vision = config.vision_config
    return _qwen_dims(config, "qwen2_vl", vision.embed_dim, int(vision.embed_dim * vision.mlp_ratio),
                      vision.hidden_size, mlp_matrices=2)


def _qwen2_5_vl_dims(config) -> ModelDims:
    """Qwen2.5-VL: window attention (``window_size`` pixels) except in ``fullatt_block_indexes``, a
    gated three-matrix MLP."""
    vision = config.vision_config
    return _qwen_dims(config, "qwen2_5_vl", vision.hidden_size, vision.intermediate_size, vision.out_hidden_size,
                      mlp_matrices=3, window=vision.window_size // vision.spatial_merge_size // vision.patch_size,
                      full_attention_layers=tuple(vision.fullatt_block_indexes))


def _qwen3_vl_dims(config) -> ModelDims:
    """Qwen3-VL: ``depth`` full-attention blocks (one fused qkv projection, a two-matrix MLP of
    ``intermediate_size``), the 2x2 merger and, per entry of ``deepstack_visual_indexes``, a DeepStack
    merger of the same shape on the output of that block.

    Its LLM is Qwen3 (``head_dim`` given apart from ``hidden / heads``; the per-head q/k RMSNorms are
    not matrix products); its M-RoPE is interleaved (``mrope_interleaved``), which moves no FLOP."""
    vision = config.vision_config
    return _qwen_dims(config, "qwen3_vl", vision.hidden_size, vision.intermediate_size, vision.out_hidden_size,
                      mlp_matrices=2, deepstack_layers=tuple(vision.deepstack_visual_indexes or ()))


def _model_name(config) -> str:
    name = getattr(config, "_name_or_path", "") or ""
    return name or config.model_type
