"""Prefill FLOPs, per-token decode FLOPs and KV-cache size of a VLM under a pruning schedule.

Everything is computed from the model *config* (no weights, no forward pass), so the real 7B configs
work offline; the configs of ``llava-hf/llava-1.5-7b-hf``, ``llava-hf/llava-v1.6-vicuna-7b-hf``,
``llava-hf/llava-onevision-qwen2-7b-ov-hf``, ``Qwen/Qwen2-VL-7B-Instruct``,
``Qwen/Qwen2.5-VL-7B-Instruct`` and ``Qwen/Qwen3-VL-8B-Instruct`` ship in ``vtoken/configs/`` (each
file's ``_source`` / ``_provenance`` say where its values were read). Supported families: LLaVA-1.5
(``llava``), LLaVA-NeXT (``llava_next``), LLaVA-OneVision (``llava_onevision``), Qwen2-VL
(``qwen2_vl``: full-attention vision blocks, a two-matrix MLP), Qwen2.5-VL (``qwen2_5_vl``: window
attention, SwiGLU MLP) and Qwen3-VL (``qwen3_vl``: full-attention blocks, a two-matrix MLP, 16-px
patches, the DeepStack mergers; ``qwen3_vl_moe`` alike). The LLM may be a mixture of experts of
Mixtral's layout (Mixtral, OLMoE, PhiMoE, GraniteMoE) or Qwen's (Qwen2-MoE, Qwen3-MoE,
Qwen3-VL-MoE); another MoE layout is refused (``model_dims.ExpertsDims``). All counts are per sample. Standalone vision
encoders (CLIP / SigLIP configs and models, timm and open_clip ViTs) are counted by
``vtoken.accounting_vit``, which ``flops`` dispatches to; they return an ``EncoderFlopsReport``.

Notation: an LLM layer with hidden size d, FFN size m, H query heads and H_kv key/value heads of size
h_d; n tokens in the layer; v of them visual. FLOPs below are for one layer unless stated.

Conventions
-----------
``convention="true"`` (default): what the hardware multiplies, 2 FLOPs per multiply-add, every token
(system prompt, visual, text), every matrix product of the forward pass:

- LLM layer: q and o projections 2·n·d·H·h_d each, k and v projections 2·n·d·H_kv·h_d each
  (grouped-query aware), scores QKᵀ and values AV 2·n²·H·h_d each, gated MLP with three d×m
  matrices 6·n·d·m (a mixture-of-experts layer: the router 2·n·d·E, the k experts each token runs
  through k·6·n·d·m_e, a shared expert and its gate 6·n·d·m_s + 2·n·d). Scores are counted over the **full n × n square**: causal masking is not
  subtracted (half of it is masked, but SDPA, FlashAttention and the eager path all compute or are
  counted on the full block; ``torch.utils.flop_counter.FlopCounterMode`` counts the same).
- Vision tower: the patch-embedding convolution, then every encoder layer the implementation runs,
  including the CLS token (CLIP) and the last layer whose output LLaVA discards
  (``vision_feature_layer=-2``: transformers still runs it). SigLIP towers (LLaVA-OneVision) have no
  CLS token; their attention-pooling head, where the config enables it (``vision_use_head``; the
  shipped OneVision config does not), is counted too. CLIP and SigLIP layers use a two-matrix MLP;
  Qwen2.5-VL blocks a SwiGLU MLP, window attention (``window_size`` 112 px = 8×8 patches) except in
  ``fullatt_block_indexes``; the window sizes follow transformers' partition exactly, so an unpruned
  Qwen2.5-VL tower is exact as well. Qwen2-VL and Qwen3-VL blocks attend over the whole image (one
  ``cu_seqlens`` segment per image) with a two-matrix MLP (Qwen2-VL: ``embed_dim · mlp_ratio``;
  Qwen3-VL: ``intermediate_size``). Qwen3-VL's learned position embeddings, bilinearly interpolated
  to each grid (a gather and a weighted sum), cost no matrix product and are not counted.
- Projector: LLaVA's two-layer MLP on every patch feature (for LLaVA-NeXT and LLaVA-OneVision on
  all crops, before unpadding, interpolation or pooling); the Qwen families' 2×2 merger MLP
  (4·D → 4·D → d). Qwen3-VL's ``projector`` line also holds its DeepStack mergers: one more merger
  of the same shape per ``deepstack_visual_indexes`` entry, run inside the tower on the tokens that
  leave that vision block (after a ``"vision"`` stage at or before it; every token for a
  ``"projector"`` or ``"llm"`` stage, which act after the tower). Their outputs are *added* to the
  hidden states of the first ``len(deepstack_visual_indexes)`` LLM layers at the visual positions:
  an elementwise add, not counted, and a pruned token's DeepStack features leave with it.
- LM head: 2·d·V per position that gets logits; by default only the last one (``lm_head_tokens=1``,
  as ``generate`` does). A plain ``model(...)`` call computes all positions.
- Ignored: norms, activations, softmax, RoPE, residual adds, biases, and LLaVA-OneVision's bilinear
  resizing of its crop grid and video frames (the counter ignores them too).

Verified against ``FlopCounterMode`` on tiny LLaVA / LLaVA-NeXT / LLaVA-OneVision / Qwen2-VL /
Qwen2.5-VL / Qwen3-VL models and on the real 7B / 8B configs on the meta device
(``tests/test_flops.py``, ``tests/test_flops_onevision.py``, ``tests/test_flops_qwen.py``). Counter
caveats: on CPU, SDPA dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``, which the
counter does **not** register, so attention counts as 0 there; compare with
``attn_implementation="eager"`` (``bmm`` is counted) or on the meta device (SDPA decomposes to
``bmm``). On CUDA the flash / efficient / cuDNN SDPA ops are registered, counted as the full n²
square (torch's ``sdpa_flop``: "we aren't accounting for causal attention"; read from the torch 2.14
source, not run here).

``convention="paper"``: the convention behind the token-pruning literature's TFLOPs tables (FastV
§4.2 with a three-matrix FFN as in TransPrune Eq. 7 and PyramidDrop): multiply-adds of the LLM layers
over the **visual tokens only**, per layer

    F(v) = 4·v·d² + 2·v²·d + 3·v·d·m

with no GQA, no text tokens, no vision tower, projector or LM head. For LLaVA-1.5-7B (d=4096,
m=11008, 32 layers) it gives 3.82 TFLOPs at 576 tokens, FastV (K=2) keeping 288 / 144 tokens
2.01 / 1.12, PyramidDrop (layers 8/16/24, ratio 0.5) 1.78, pre-LLM pruning to 192 tokens 1.25, and
LLaVA-NeXT-7B at 2880 tokens 20.83. LLaVA-NeXT counts there are 5 crops × 576 = 2880 (no newline
tokens), which is the default visual count of this convention; ``"true"`` uses the count the model
actually builds (576 base + unpadded grid + one newline per row: 2928 for the default 672×672 image).
LLaVA-OneVision follows the same rule: ``"paper"`` counts crops × 729 (3645 for the default 672×672
image: base view + 2×2 crops), ``"true"`` the tokens the model packs (729 base + unpadded grid + one
newline per row: 3699 at 672×672). Where the unpadded grid holds more than 1.1² × 9 crops' worth of
patches, the model shrinks it by bilinear interpolation to about 9 crops' worth, and the paper count
becomes larger than what the LLM sees (1080×1920: 16 crops × 729 = 11664 against 7269); pass
``visual_tokens=`` to override it. Decode under ``"paper"`` follows DyCoke's form with a three-matrix
FFN: 4d² + 3dm + 2·d·(v_l + i) per layer for the i-th generated token. Scoring costs are reported
as multiply-adds (half the true count) under ``"paper"``.

Schedules and scoring
---------------------
The pruning schedule (``vtoken.schedule.Schedule``) decides how many visual tokens each part sees:
``"vision"`` stages shrink the encoder layers after ``layer`` (per crop; with ``inside=True`` the
MLP of layer ``layer`` too, ToMe's place between attention and MLP), ``"projector"`` stages the
whole LLM, ``"llm"`` stages the decoder layers from ``layer`` on (FastV's K: layers < K keep all).
Prefill, decode and the KV cache all follow it: a layer before the pruning layer caches every token,
a later one only the kept ones. The work a method does to *decide* what to prune
(``Schedule.scoring``: extra attention rows, projector perturbation passes, explicit counts) is its
own line, ``scoring``, so that net savings stay honest.

Layout: this module holds the conventions, the per-part formulas, the report and ``flops`` /
``kv_cache_bytes``; what it reads from a config (``model_dims``, ``load_config``, the shipped
configs) is in ``vtoken.model_dims``, and how many tokens each part sees before pruning
(``geometry``) in ``vtoken.token_geometry``. Their public names are importable from here too.

Text tokens: ``text_tokens`` counts every non-visual token of the prompt (system prompt, question,
chat template, Qwen's vision start/end markers); default 64.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from vtoken import accounting_vit as _vit
# The config side (dimensions, config loading) and the token geometry live in their own modules;
# they are imported here under their old names, which callers of vtoken.accounting keep using.
from vtoken.model_dims import (  # noqa: F401  (re-exported)
    CONFIG_DIR, DecoderDims, ModelDims, ProjectorDims, VisionDims, load_config, model_dims, shipped_configs,
)
from vtoken.schedule import ScoringCost, Schedule, Stage, is_integer
from vtoken.token_geometry import Geometry, geometry, patchless_tokens  # noqa: F401  (re-exported)

CONVENTIONS: tuple[str, ...] = ("true", "paper")
DEFAULT_TEXT_TOKENS = 64


# --------------------------------------------------------------------------------------------------
# Per-module counts (true FLOPs, 2 per multiply-add)


def decoder_layer_flops(d: DecoderDims, queries: int, keys: int, layer: int) -> int:
    """Decoder layer ``layer``: ``queries`` new tokens attending to ``keys`` tokens (prefill: equal).

    q, o: 2·n·d·H·h_d each; k, v: 2·n·d·H_kv·h_d each; QKᵀ and AV: 2·n_q·n_k·H·h_d each (full block);
    gated MLP: 3 · 2·n·d·m, or a mixture-of-experts layer's router and active experts
    (``DecoderDims.mlp_flops_per_token``: which is why the layer is named).
    """
    projections = 2 * queries * d.hidden * (2 * d.q_dim + 2 * d.kv_dim)
    attention = 4 * queries * keys * d.q_dim
    mlp = queries * d.mlp_flops_per_token(layer)
    return projections + attention + mlp


def paper_layer_macs(d: DecoderDims, visual: int, layer: int) -> int:
    """FastV §4.2 / TransPrune Eq. 7 per-layer count over ``visual`` tokens: 4nd² + 2n²d + 3ndm. A
    mixture-of-experts layer's 3ndm becomes n times half its MLP FLOPs per token (router and the
    experts a token runs through: the MACs its MLP does)."""
    mlp_macs = visual * d.mlp_flops_per_token(layer) // 2
    return 4 * visual * d.hidden**2 + 2 * visual**2 * d.hidden + mlp_macs


def encoder_layer_flops(v: VisionDims, tokens: int, attention_pairs: int, mlp_tokens: int | None = None) -> int:
    """One ViT layer on ``tokens`` tokens with ``attention_pairs`` (query, key) pairs in total
    (n² for global attention, Σ window² for window attention): q, k, v, o projections 8·n·D², QKᵀ and
    AV 4·pairs·D, MLP 2·n_m·D·I per matrix, where n_m = ``mlp_tokens`` (a stage inside the layer,
    between attention and MLP, ToMe's place) or n."""
    projections = 8 * tokens * v.hidden**2
    attention = 4 * attention_pairs * v.hidden
    n_mlp = tokens if mlp_tokens is None else mlp_tokens
    mlp = 2 * v.mlp_matrices * n_mlp * v.hidden * v.intermediate
    return projections + attention + mlp


def pooling_head_flops(v: VisionDims, tokens: int) -> int:
    """SigLIP's attention-pooling head on one crop of ``tokens`` tokens: one probe query
    (``nn.MultiheadAttention``: q and out projections 2·D² each, k and v 2·n·D² each, scores and
    values 2·n·D each), then the MLP on the probe alone 2·D·I per matrix."""
    attention = 4 * v.hidden**2 + 4 * tokens * v.hidden**2 + 4 * tokens * v.hidden
    return attention + 2 * v.mlp_matrices * v.hidden * v.intermediate


def projector_flops(p: ProjectorDims, tokens: int) -> int:
    """The two-layer projector MLP on ``tokens`` tokens: 2·n·(in·hidden + hidden·out)."""
    return 2 * tokens * (p.in_dim * p.hidden + p.hidden * p.out_dim)


def projector_sensitivity_flops(p: ProjectorDims, tokens: int, directions: int, rank: int = 0) -> int:
    """ZOO-Prune's sensitivity of ``tokens`` tokens along ``directions`` directions, computed from the
    projector's structure (``zo_sensitivity_two_layer``): the first layer once per token
    (2·n·in·hidden) and once per direction (2·m·in·hidden), and per (token, direction) pair one
    second-layer pass on the activation difference (2·hidden·out, ``out`` = ``rank`` for a rank-r
    proxy). With a norm over G = ``norm_groups`` rows of each token first (Qwen's merger) each pair
    also pays the norm's G cross terms (2·in) and, per sign, a (G + 1)-term sum (the first layer's
    shift is one more term) and a G-term sum of hidden-wide rows (8·G·hidden + 4·hidden;
    ``_normed_pre_activations``)."""
    second = rank if rank else p.out_dim
    per_pair = 2 * p.hidden * second + (2 * p.in_dim + (8 * p.norm_groups + 4) * p.hidden if p.norm_groups else 0)
    return 2 * (tokens + directions) * p.in_dim * p.hidden + directions * tokens * per_pair


def deepstack_flops(dims: ModelDims, schedule: Schedule, geo: Geometry) -> int:
    """Qwen3-VL's DeepStack mergers: for each vision block k in ``deepstack_layers``, one merger
    (``projector_flops``) on the merged tokens that leave block k in every image: all of them, or the
    kept ones after a ``"vision"`` stage at a layer <= k (its hook has shrunk block k's output before
    the merger reads it). 0 for the families without DeepStack."""
    v = dims.vision
    return sum(geo.crops * projector_flops(dims.projector, _patches_at(schedule, geo, k + 1) // v.merge**2)
               for k in v.deepstack_layers)


# --------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class FlopsReport:
    """FLOPs of one sample's prefill, split by part, plus decode cost and KV-cache size.

    FLOPs are in the report's ``convention`` (``"paper"``: multiply-adds of visual tokens in the LLM).
    ``decode_per_token`` is the mean over ``decode_tokens`` decoding steps after prefill (the LLM and
    LM head for one new token attending to the cache). ``kv_cache_bytes`` is the cache of every
    token after prefill; ``kv_cache_visual_bytes`` the visual tokens' share (what SparseVLM reports).
    ``layer_visual_tokens`` lists the visual tokens each LLM layer processes.
    """

    model: str
    convention: str
    text_tokens: int
    visual_tokens: int
    layer_visual_tokens: tuple[int, ...]
    vision: float
    projector: float
    llm: float
    lm_head: float
    scoring: float
    decode_per_token: float
    decode_tokens: int
    kv_cache_bytes: int
    kv_cache_visual_bytes: int
    dtype: str
    schedule: str = "unpruned"
    notes: tuple[str, ...] = ()
    prefill: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefill", self.prefill_without_scoring + self.scoring)

    @property
    def prefill_without_scoring(self) -> float:
        return self.vision + self.projector + self.llm + self.lm_head

    @property
    def decode_total(self) -> float:
        return self.decode_per_token * self.decode_tokens

    @property
    def mean_visual_tokens(self) -> float:
        """Visual tokens averaged over LLM layers (the literature's "equivalent tokens")."""
        return sum(self.layer_visual_tokens) / len(self.layer_visual_tokens)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layer_visual_tokens"] = list(self.layer_visual_tokens)
        out["notes"] = list(self.notes)
        return out

    def table(self) -> str:
        """A plain-text table: FLOPs per part, decode cost and KV cache."""
        unit = "MACs" if self.convention == "paper" else "FLOPs"
        scale, prefix = _scale(self.prefill)
        rows = [
            ("vision encoder", self.vision),
            ("projector", self.projector),
            ("LLM", self.llm),
            ("LM head", self.lm_head),
            ("scoring", self.scoring),
            ("prefill total", self.prefill),
        ]
        note = " (multiply-adds, what the papers print as FLOPs)" if self.convention == "paper" else ""
        lines = [
            f"{self.model} | convention={self.convention}{note} | schedule: {self.schedule}",
            f"tokens: {self.visual_tokens} visual (layer mean {self.mean_visual_tokens:.1f}) "
            f"+ {self.text_tokens} text",
        ]
        lines += [f"  {name:<16}{value / scale:>12.4f} {prefix}{unit}" for name, value in rows]
        d_scale, d_prefix = _scale(self.decode_per_token)
        lines.append(f"  {'decode / token':<16}{self.decode_per_token / d_scale:>12.4f} {d_prefix}{unit} "
                     f"(mean of {self.decode_tokens} steps)")
        lines.append(f"  {'KV cache':<16}{_bytes(self.kv_cache_bytes):>16} ({self.dtype}); "
                     f"visual tokens {_bytes(self.kv_cache_visual_bytes)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _bytes(n: int) -> str:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _scale(value: float) -> tuple[float, str]:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return scale, prefix
    return 1.0, ""


# --------------------------------------------------------------------------------------------------
# Public entry points


def flops(
    model_or_config: Any,
    schedule: Schedule | Any | None = None,
    *,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    decode_tokens: int = 1,
    convention: str = "true",
    image_size: tuple[int, int] | None = None,
    visual_tokens: int | None = None,
    images: int | None = None,
    dtype: Any = "float16",
    lm_head_tokens: int = 1,
    frames: int | None = None,
    instruction_tokens: int | None = None,
) -> FlopsReport | _vit.EncoderFlopsReport:
    """FLOPs of one sample under a pruning ``schedule`` (see the module docstring for conventions).

    A standalone vision encoder (a CLIP / SigLIP config or model, a timm or open_clip ViT module)
    returns an ``accounting_vit.EncoderFlopsReport`` per image instead (``vtoken.accounting_vit``:
    only ``schedule``, ``convention``, ``image_size`` and ``images`` apply; ``frames`` and
    ``visual_tokens`` are refused, the LLM arguments ignored).

    Args:
        model_or_config: a transformers config, a model (its ``.config``), a dict, a config-JSON
            path or a hub name (shipped configs first: ``"llava-hf/llava-1.5-7b-hf"``,
            ``"llava-hf/llava-v1.6-vicuna-7b-hf"``, ``"llava-hf/llava-onevision-qwen2-7b-ov-hf"``,
            ``"Qwen/Qwen2-VL-7B-Instruct"``, ``"Qwen/Qwen2.5-VL-7B-Instruct"``,
            ``"Qwen/Qwen3-VL-8B-Instruct"``), or a timm / open_clip vision transformer.
        schedule: a ``Schedule``, a model wrapped by vtoken (its current schedule), or ``None``:
            the schedule of ``model_or_config`` if that is a wrapped model, else unpruned.
        text_tokens: non-visual prompt tokens (system prompt, question, template); default 64.
        decode_tokens: decoding steps (>= 1) averaged into ``decode_per_token`` (step i attends
            to the cache plus i tokens); default 1.
        convention: ``"true"`` (all FLOPs) or ``"paper"`` (visual-token LLM multiply-adds).
        image_size: (h, w) of the image; sizes LLaVA-NeXT and LLaVA-OneVision crops (default
            672×672) and the Qwen families' patches (default 672×672). LLaVA-1.5 always sees 336×336.
            A vision encoder runs on its patch grid (default: the model's own input size).
        visual_tokens: override the visual tokens reaching the LLM before pruning (the vision tower
            keeps its ``image_size`` geometry); else ``schedule.visual_tokens``, else the geometry.
        images: images per sample; default ``schedule.images``.
        dtype: KV-cache dtype (torch dtype or name) for ``kv_cache_bytes``.
        lm_head_tokens: positions that get logits at prefill (``"true"`` only); default 1.
        frames: LLaVA-OneVision only: the sample is one video of this many frames instead of
            images (196 pooled tokens per frame + one newline).
        instruction_tokens: a wrapped model only: the prompt's text tokens after the image, whose
            attention rows TransPrune's and AIF's scoring read (default: an assumed 32; a
            ``Schedule`` passed in lists its scoring rows itself).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    for name, value, least in (("text_tokens", text_tokens, 0), ("decode_tokens", decode_tokens, 1),
                               ("lm_head_tokens", lm_head_tokens, 0)):
        if not is_integer(value) or value < least:
            raise ValueError(f"{name} must be a count of tokens >= {least}, got {value!r}")
    if image_size is not None and not (isinstance(image_size, (tuple, list)) and len(image_size) == 2
                                       and all(is_integer(v) and v > 0 for v in image_size)):
        raise ValueError(f"image_size must be (height, width) in pixels, got {image_size!r}")
    # images=0 would otherwise read as "not given" (``images or schedule.images``) and count one image.
    if images is not None and (not is_integer(images) or images < 1):
        raise ValueError(f"images must be a positive number of images per sample, got {images!r}; omit it for the default")
    if visual_tokens is not None and (not is_integer(visual_tokens) or visual_tokens < 1):
        raise ValueError(f"visual_tokens must be a count of visual tokens >= 1, got {visual_tokens!r}; omit it for "
                         "the model's own count")
    _dtype_name_and_size(dtype)  # an unknown KV-cache dtype is named before anything is counted
    config, encoder = _config_or_encoder(model_or_config)
    if encoder is not None:
        if frames is not None or visual_tokens is not None:
            raise ValueError(f"{encoder.name} is a vision encoder: frames= and visual_tokens= do not apply")
        schedule = _resolve_schedule(model_or_config, schedule, lambda: (_vit.patches_of(encoder, image_size), 0),
                                     instruction_tokens)
        return _vit.encoder_flops(encoder, schedule, convention=convention, image_size=image_size, images=images)
    dims = model_dims(config)

    def one_image() -> tuple[int, int]:
        """What a wrapped model's schedule is asked for: ONE image's visual tokens and, of them, those
        with no patch (``token_geometry.patchless_tokens``)."""
        sample = geometry(dims, image_size=image_size, images=images or 1, convention=convention,
                          visual_tokens=visual_tokens, frames=frames)
        return max(1, sample.visual_tokens // (images or 1)), patchless_tokens(dims, sample) // (images or 1)

    schedule = _resolve_schedule(model_or_config, schedule, one_image, instruction_tokens, images or 1)
    geo = geometry(
        dims,
        image_size=image_size,
        images=images or schedule.images,
        convention=convention,
        vision_tokens=schedule.vision_tokens,
        visual_tokens=visual_tokens if visual_tokens is not None else schedule.visual_tokens,
        frames=frames,
    )
    if frames is not None and _vision_stages(schedule):
        raise ValueError("a 'vision' stage on a video is not modelled: the 2×2 pooling of each frame "
                         "needs its whole patch grid")
    return _report(dims, geo, schedule, text_tokens, decode_tokens, convention, dtype, lm_head_tokens)


def kv_cache_bytes(
    model_or_config: Any,
    schedule: Schedule | None = None,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    dtype: Any = "float16",
    *,
    image_size: tuple[int, int] | None = None,
    visual_tokens: int | None = None,
    frames: int | None = None,
    images: int | None = None,
) -> int:
    """KV-cache bytes of one sample after prefill: Σ_layers 2 · H_kv · h_d · n_l · bytes(dtype).

    n_l is text + visual tokens at layer l: layers before an ``"llm"`` pruning stage hold every
    token, later layers only the kept ones; a sliding-window layer at most ``window - 1`` of them
    (``DecoderDims.cache_windows``). ``images``: images per sample, as :func:`flops` takes it.
    """
    report = flops(model_or_config, schedule, text_tokens=text_tokens, image_size=image_size,
                   visual_tokens=visual_tokens, dtype=dtype, frames=frames, images=images)
    if isinstance(report, _vit.EncoderFlopsReport):
        raise ValueError(f"{report.model} is a vision encoder: it keeps no KV cache")
    return report.kv_cache_bytes


def describe(schedule: Schedule | None) -> str:
    """A short text form of a schedule, e.g. ``"llm@2→288, llm@16→144"``."""
    if schedule is None or not schedule.stages:
        text = "unpruned"
    else:
        text = ", ".join(
            f"{s.site}{'' if s.layer is None else '@' + str(s.layer)}{'(in)' if s.inside else ''}→{s.keep_tokens}"
            for s in schedule.stages
        )
    if schedule is not None and schedule.scoring:
        text += " + scoring(" + ", ".join(_describe_cost(c) for c in schedule.scoring) + ")"
    return text


def _describe_cost(cost: ScoringCost) -> str:
    if cost.kind.endswith("attention_rows"):
        return f"{cost.kind.split('_')[0]} L{cost.layer} {cost.rows} rows"
    if cost.kind == "projector_passes":
        return f"projector ×{cost.passes}"
    if cost.kind == "projector_rows":
        return f"projector over {cost.rows} more tokens"
    if cost.kind == "projector_sensitivity":
        return f"projector sensitivity ×{cost.passes}" + (f" (rank {cost.rows})" if cost.rows else "")
    if cost.kind == "vision_attention_map":
        return f"vision L{cost.layer} attention map"
    if cost.kind.endswith("token_matching"):
        return f"{cost.kind.split('_')[0]} L{cost.layer} matching"
    if cost.kind == "llm_rerun_rows":
        return f"llm {cost.rows} rows rerun from L{cost.layer}"
    if cost.kind == "lm_head_rows":
        return f"lm head over {cost.rows} rows"
    return f"{cost.flops:.3g} FLOPs"


# --------------------------------------------------------------------------------------------------
# Internals


def _config_or_encoder(source: Any):
    """(transformers config, None) for a VLM; (None or its config, ``EncoderDims``) for a standalone
    vision encoder (``vtoken.accounting_vit``: timm / open_clip modules, CLIP / SigLIP configs)."""
    encoder = _vit.module_dims(source)
    if encoder is not None:
        return None, encoder
    config = load_config(source)
    return config, _vit.config_dims(config, source)


def per_sample(schedule: Schedule, images: int) -> Schedule:
    """A wrapped model's schedule for one image (``schedule_of``) as the schedule of a sample of
    ``images`` such images: a budget counts per image (README Budgets), so the projector and LLM
    stages keep ``images`` times their count, as does an evicting mask stage's cache, a per-image
    scoring count (``"flops"``) is paid per image, and rows rerun from the first image's end
    (``later_images``) take in every later image's visual tokens; vision stages count per crop already."""
    if images == 1:
        return schedule
    stages = tuple(stage if stage.site == "vision" else dataclasses.replace(stage, keep_tokens=stage.keep_tokens * images)
                   for stage in schedule.stages)
    def scaled(cost: ScoringCost) -> ScoringCost:
        if cost.kind == "flops":
            return dataclasses.replace(cost, flops=cost.flops * images)
        if cost.kind == "projector_rows":
            return dataclasses.replace(cost, rows=cost.rows * images)
        if cost.later_images and schedule.visual_tokens is not None:  # every image after the first, rerun
            return dataclasses.replace(cost, rows=cost.rows + (images - 1) * schedule.visual_tokens)
        return cost

    scoring = tuple(scaled(cost) for cost in schedule.scoring)
    notes = schedule.notes
    if any(cost.later_images for cost in schedule.scoring):
        notes += ("the rerun from the first image's end (AIF) takes in every later image and the instruction; the "
                  "text between the images (a template's few tokens) is not known here and not counted",)
    evicted = schedule.cache_evicted
    return dataclasses.replace(
        schedule, stages=stages, scoring=scoring, images=images, notes=notes,
        visual_tokens=None if schedule.visual_tokens is None else schedule.visual_tokens * images,
        cache_evicted=None if evicted is None else (evicted[0], evicted[1] * images))


def _resolve_schedule(model_or_config: Any, schedule: Any, one_image: Callable[[], tuple[int, int]],
                      instruction_tokens: int | None = None, images: int = 1) -> Schedule:
    """The schedule to count: ``schedule`` itself, or a wrapped model's for a sample of ``images``
    images, each of ``one_image()``'s (visual tokens, of them with no patch)."""
    wrapped = schedule if schedule is not None else model_or_config
    if instruction_tokens is not None and not hasattr(wrapped, "_vtoken_state"):
        raise ValueError("instruction_tokens= applies to a model wrapped by vtoken (its method's scoring rows); "
                         "a Schedule lists its scoring rows itself: drop instruction_tokens or pass the wrapped model")
    if isinstance(schedule, Schedule):
        return schedule
    if hasattr(wrapped, "_vtoken_state"):
        try:
            from vtoken.api import schedule_of
        except ImportError as error:
            raise RuntimeError(
                "this model is wrapped by vtoken but vtoken.api.schedule_of is not available; "
                "pass schedule=Schedule(...) explicitly"
            ) from error
        tokens, patchless = one_image()
        return per_sample(schedule_of(wrapped, visual_tokens=tokens, instruction_tokens=instruction_tokens,
                                      patchless_tokens=patchless), images)
    if schedule is None:
        return Schedule()
    raise TypeError(f"schedule must be a Schedule, a vtoken-wrapped model or None, got {type(schedule).__name__}")


def _dtype_name_and_size(dtype: Any) -> tuple[str, int]:
    import torch

    named = getattr(torch, dtype.replace("torch.", ""), None) if isinstance(dtype, str) else dtype
    if not isinstance(named, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype or its name (torch.float16, 'bfloat16', 'float32', ...), got "
                         f"{dtype!r}")
    return str(named).replace("torch.", ""), named.itemsize


def _check_schedule(schedule: Schedule, dims: ModelDims, geo: Geometry) -> None:
    for stage in schedule.stages:
        limit = {"vision": geo.patches, "projector": geo.visual_tokens, "llm": geo.visual_tokens}[stage.site]
        if stage.keep_tokens > limit:
            raise ValueError(f"{stage} keeps more than the {limit} tokens available at that site")
        _check_layer(stage, stage.site == "vision", stage.layer, dims)
    for cost in schedule.scoring:
        if cost.kind.endswith(("attention_rows", "token_matching", "attention_map", "rerun_rows")):
            _check_layer(cost, cost.kind.startswith("vision"), cost.layer, dims)


def _check_layer(item: Any, vision: bool, layer: int | None, dims: ModelDims) -> None:
    layers = dims.vision.layers if vision else dims.decoder.layers
    if layer is not None and not 0 <= layer < layers:
        raise ValueError(f"{item}: layer must be in [0, {layers})")
    if layer is None and isinstance(item, ScoringCost):
        raise ValueError(f"{item}: attention rows need a layer")


def _vision_stages(schedule: Schedule) -> list[Stage]:
    return [s for s in schedule.stages if s.site == "vision"]


def _patches_at(schedule: Schedule, geo: Geometry, layer: int) -> int:
    """Patch tokens per crop that vision layer ``layer`` processes (a stage acts *after* its layer)."""
    count = geo.patches
    for stage in _vision_stages(schedule):
        if stage.layer < layer:
            count = stage.keep_tokens
    return count


def _mlp_patches_at(schedule: Schedule, geo: Geometry, layer: int) -> int:
    """Patch tokens per crop that the MLP of vision layer ``layer`` processes: an inside stage at that
    layer (``Stage.inside``) has already reduced them."""
    inside = [s for s in _vision_stages(schedule) if s.inside and s.layer == layer]
    return inside[0].keep_tokens if inside else _patches_at(schedule, geo, layer)


def _kept_patches(schedule: Schedule, geo: Geometry) -> int:
    stages = _vision_stages(schedule)
    return stages[-1].keep_tokens if stages else geo.patches


def _projector_tokens(dims: ModelDims, schedule: Schedule, geo: Geometry) -> int:
    """Projector input tokens: all patch features, or the kept ones after a vision-site stage."""
    if not _vision_stages(schedule):
        return geo.projector_tokens
    cls = dims.vision.cls_tokens if dims.keep_cls else 0
    return geo.crops * (_kept_patches(schedule, geo) // dims.vision.merge**2 + cls)


def _sensitivity_tokens(dims: ModelDims, schedule: Schedule, geo: Geometry) -> int:
    """The tokens ZOO-Prune's sensitivity is taken of: the candidates of its projector stage, each
    from its projector input. A family that packs its crops (LLaVA-NeXT, OneVision) scores the packed
    tokens, newlines out: what unpadding, OneVision's resize and a video's 2x2 pooling leave, not
    every crop's patches (a 32-frame OneVision video: 6272 of 23328), also where an extreme aspect
    ratio leaves no row of the crop grid and so no newline (only the base view reaches the LLM).
    Otherwise every projector input."""
    packs_crops = geo.anyres is not None or geo.newlines > 0
    if packs_crops and not _vision_stages(schedule):
        return geo.visual_tokens - geo.newlines
    return _projector_tokens(dims, schedule, geo)


def _pre_llm_visual(dims: ModelDims, schedule: Schedule, geo: Geometry) -> int:
    """Visual tokens entering the LLM: after a projector stage its count, after a vision stage the
    kept patches of every crop (an AnyRes image: what unpadding leaves of them, and its newlines:
    :class:`vtoken.token_geometry.AnyresLayout`), else the geometry."""
    count = geo.visual_tokens
    if _vision_stages(schedule) and geo.anyres is not None:
        images = geo.crops // len(geo.anyres.crop_patches)
        count = images * geo.anyres.visual_tokens(_kept_patches(schedule, geo))
    elif _vision_stages(schedule):
        count = _projector_tokens(dims, schedule, geo)
    for stage in schedule.stages:
        if stage.site == "projector":
            count = stage.keep_tokens
    return count


def _layer_visual_tokens(dims: ModelDims, schedule: Schedule, geo: Geometry) -> tuple[int, ...]:
    """Visual tokens of each LLM layer: an ``llm`` stage at K applies to layers >= K."""
    start = _pre_llm_visual(dims, schedule, geo)
    llm_stages = [s for s in schedule.stages if s.site == "llm"]
    counts = []
    for layer in range(dims.decoder.layers):
        count = start
        for stage in llm_stages:
            if stage.layer <= layer:
                count = stage.keep_tokens
        counts.append(count)
    return tuple(counts)


def _vision_flops(dims: ModelDims, schedule: Schedule, geo: Geometry) -> int:
    v = dims.vision
    total = 2 * geo.crops * geo.patches * v.patch_inputs * v.hidden  # patch-embedding convolution
    for layer in range(v.layers):
        patches = _patches_at(schedule, geo, layer)
        tokens = patches + v.cls_tokens
        if v.window and layer not in v.full_attention_layers:
            scale = (patches / geo.patches) ** 2  # exact unpruned; shrunk windows are approximate (_window_notes)
            pairs = round(sum(w * w for w in geo.windows) * scale)
        else:
            pairs = tokens * tokens
        mlp_tokens = _mlp_patches_at(schedule, geo, layer) + v.cls_tokens
        total += geo.crops * encoder_layer_flops(v, tokens, pairs, mlp_tokens)
    if v.pooling_head:
        total += geo.crops * pooling_head_flops(v, _patches_at(schedule, geo, v.layers) + v.cls_tokens)
    return total


def _scoring_flops(dims: ModelDims, schedule: Schedule, geo: Geometry, text_tokens: int,
                   layer_visual: tuple[int, ...]) -> int:
    return sum(_scoring_cost_flops(c, dims, schedule, geo, text_tokens, layer_visual) for c in schedule.scoring)


def _scoring_cost_flops(cost: ScoringCost, dims: ModelDims, schedule: Schedule, geo: Geometry,
                        text_tokens: int, layer_visual: tuple[int, ...]) -> int:
    """True FLOPs of one scoring item.

    - ``llm_attention_rows`` at layer l: q projection of the rows 2·r·d·H·h_d, k projection of the
      n tokens entering layer l (before any stage at l) 2·n·d·H_kv·h_d, scores 2·r·n·H·h_d; with
      ``keys_reused`` the k projection of the tokens the stage at l keeps is the layer's own (it is
      handed over, and counted in the layer): only the dropped ones' keys are scoring, unless the
      LLM fuses q, k and v into one projection (``DecoderDims.fused_qkv``: every key is scoring); with
      ``keys_cached`` none (read from the layer's KV cache); with ``queries_cached`` no q projection
      either (the rows of the layer's own, kept as it ran), unless the projection is fused.
    - ``vision_attention_rows`` at vision layer l, per crop: 2·r·D² + 2·n·D² + 2·r·n·D over the
      n tokens (CLS included) of that layer.
    - ``projector_passes``: passes × the projector over its input tokens (all patch features, or
      those kept by a vision-site stage; a projector-site stage comes after it).
    - ``projector_rows``: the projector over ``rows`` tokens (``per_sample`` has made it per sample).
    - ``projector_sensitivity``: ZOO-Prune's ``passes`` directions over the same tokens
      (``projector_sensitivity_flops``, rank ``rows``).
    - ``vision_token_matching`` / ``llm_token_matching`` at layer l: the similarities of ToMe
      bipartite matching repeated from the tokens entering the stage at (site, l) down to its count
      (``bipartite_matching_flops``), per crop (width D; for a stage inside its block, ToMe's, the
      head size D/H, its metric being the block's keys averaged over heads, over the whole sequence
      with the CLS token protected; a packed Qwen-VL tower matches its merge units) or per sample (width d).
    - ``vision_attention_map`` at vision layer l, per crop (VFlowOpt's map; ``vision_map_flops``): q
      and k projections of the n tokens (CLS included) 4·n·D², the scores of every patch query 2·s·D
      and their column sums 2·H·s (a matrix product per head), s the query-key pairs (P·n for global
      attention over P patches, Σ window² in a Qwen2.5-VL window layer), and ``rows`` context rows'
      scores 2·r·n·D.
    - ``llm_rerun_rows`` from layer l: ``decoder_layer_flops`` of r queries over the n tokens of
      each layer >= l (prompt text and that layer's visual tokens).
    - ``lm_head_rows``: r rows through the LM head, 2·r·d·V.
    - ``own_keys`` (attention rows, rerun rows): that many more keys n, the rows' own (a decoding step's),
      projected unless ``keys_cached``.
    - ``flops``: the given count.
    """
    if cost.kind == "llm_attention_rows":
        d = dims.decoder
        visual = layer_visual[cost.layer - 1] if cost.layer > 0 else _pre_llm_visual(dims, schedule, geo)
        keys = text_tokens + visual + cost.own_keys
        # A fused qkv projection (Phi-3) cannot take the kept tokens' keys: layer l projects them again.
        # (The rows' own keys are never the layer's to be handed: they are projected for the scoring.)
        reused = cost.keys_reused and not d.fused_qkv
        projected = keys - (text_tokens + layer_visual[cost.layer]) if reused else keys
        if cost.keys_cached:
            projected = 0
        # (A fused qkv projection has no output of its own to keep: the rows are projected again.)
        queried = 0 if cost.queries_cached and not d.fused_qkv else cost.rows
        return 2 * queried * d.hidden * d.q_dim + 2 * projected * d.hidden * d.kv_dim + 2 * cost.rows * keys * d.q_dim
    if cost.kind == "vision_attention_rows":
        v = dims.vision
        keys = _patches_at(schedule, geo, cost.layer) + v.cls_tokens
        per_crop = 2 * cost.rows * v.hidden**2 + 2 * keys * v.hidden**2 + 2 * cost.rows * keys * v.hidden
        return geo.crops * per_crop
    if cost.kind == "vision_attention_map":
        v = dims.vision
        patches = _patches_at(schedule, geo, cost.layer)
        pairs = None
        if v.window and cost.layer not in v.full_attention_layers:  # (the map needs every patch: geo's windows)
            pairs = sum(w * w for w in geo.windows)
        return geo.crops * vision_map_flops(patches, v.cls_tokens, v.hidden, v.hidden, v.heads, cost.rows, pairs)
    if cost.kind == "projector_passes":
        return cost.passes * projector_flops(dims.projector, _projector_tokens(dims, schedule, geo))
    if cost.kind == "projector_rows":
        return projector_flops(dims.projector, cost.rows)
    if cost.kind == "projector_sensitivity":
        # ... and the diverse selection after it (ZOO-Prune's Eq. 9, greedy_diverse_selection): each of
        # an image's k picks takes the cosine of its projected token with all N of the image's
        # candidates, 2·k·N·d.
        stage = next((s for s in schedule.stages if s.site == "projector"), None)
        per_image = geo.visual_tokens // max(schedule.images, 1)  # the candidates of each image's row
        selection = 0 if stage is None else 2 * stage.keep_tokens * per_image * dims.projector.out_dim
        return selection + projector_sensitivity_flops(dims.projector, _sensitivity_tokens(dims, schedule, geo),
                                                       cost.passes, cost.rows)
    if cost.kind in ("vision_token_matching", "llm_token_matching"):
        site = cost.kind.split("_")[0]
        stage = next((s for s in schedule.stages if s.site == site and s.layer == cost.layer), None)
        if stage is None:
            raise ValueError(f"{cost}: the schedule has no {site} stage at layer {cost.layer} to match tokens for")
        if site == "vision":
            tokens, v = _patches_at(schedule, geo, cost.layer), dims.vision
            if stage.inside:  # ToMe: whole sequence (CLS protected), keys averaged over heads
                cls, width = v.cls_tokens, v.hidden // v.heads if v.heads else v.hidden
                return geo.crops * bipartite_matching_flops(tokens + cls, stage.keep_tokens + cls, width, cls)
            # Representation Shift's merge: the block output's whole sequence, CLS first in A (ToMe's split);
            # a packed tower (Qwen-VL) matches its merge units (each the mean of its patches), not patches.
            cls, unit = v.cls_tokens, v.merge * v.merge
            return geo.crops * bipartite_matching_flops(tokens // unit + cls, stage.keep_tokens // unit + cls, v.hidden,
                                                        cls)
        tokens = layer_visual[cost.layer - 1] if cost.layer > 0 else _pre_llm_visual(dims, schedule, geo)
        return bipartite_matching_flops(tokens, stage.keep_tokens, dims.decoder.hidden)
    if cost.kind == "llm_rerun_rows":
        d = dims.decoder
        return sum(decoder_layer_flops(d, cost.rows, text_tokens + layer_visual[layer] + cost.own_keys, layer)
                   for layer in range(cost.layer, d.layers))
    if cost.kind == "lm_head_rows":
        return 2 * cost.rows * dims.decoder.hidden * dims.decoder.vocab
    if cost.kind == "flops":
        return int(cost.flops)
    raise ValueError(f"unknown scoring kind {cost.kind!r}")


def _report(dims: ModelDims, geo: Geometry, schedule: Schedule, text_tokens: int, decode_tokens: int,
            convention: str, dtype: Any, lm_head_tokens: int) -> FlopsReport:
    _check_schedule(schedule, dims, geo)
    if decode_tokens < 1:
        raise ValueError(f"decode_tokens must be >= 1, got {decode_tokens}")
    d = dims.decoder
    layer_visual = _layer_visual_tokens(dims, schedule, geo)
    cached_visual = _cached_visual_tokens(schedule, layer_visual)  # what decoding reads and the cache holds
    steps = decode_tokens
    mean_step = (steps + 1) / 2  # step i (1..R) attends to the cache plus i tokens
    scoring = _scoring_flops(dims, schedule, geo, text_tokens, layer_visual)
    if convention == "paper":
        parts = dict(vision=0, projector=0, lm_head=0, scoring=scoring / 2,
                     llm=sum(paper_layer_macs(d, v, layer) for layer, v in enumerate(layer_visual)))
        decode = sum(4 * d.hidden**2 + d.mlp_flops_per_token(layer) // 2 + 2 * d.hidden * (v + mean_step)
                     for layer, v in enumerate(layer_visual))
    else:
        parts = dict(
            vision=_vision_flops(dims, schedule, geo),
            projector=projector_flops(dims.projector, _projector_tokens(dims, schedule, geo))
            + deepstack_flops(dims, schedule, geo),
            llm=sum(decoder_layer_flops(d, text_tokens + v, text_tokens + v, layer)
                    for layer, v in enumerate(layer_visual)),
            lm_head=2 * lm_head_tokens * d.hidden * d.vocab,
            scoring=scoring,
        )
        decode = sum(
            _mean_decode_layer(d, text_tokens + v, steps, layer) for layer, v in enumerate(cached_visual)
        ) + 2 * d.hidden * d.vocab
    dtype_name, itemsize = _dtype_name_and_size(dtype)
    per_token = 2 * d.kv_dim * itemsize  # K and V of one token in one layer
    held = [_held_tokens(d, layer, text_tokens + v) for layer, v in enumerate(cached_visual)]
    return FlopsReport(
        model=dims.name,
        convention=convention,
        text_tokens=text_tokens,
        visual_tokens=geo.visual_tokens,
        layer_visual_tokens=layer_visual,
        decode_per_token=decode,
        decode_tokens=steps,
        kv_cache_bytes=per_token * sum(held),
        kv_cache_visual_bytes=per_token * sum(min(v, h) for v, h in zip(cached_visual, held)),
        dtype=dtype_name,
        schedule=describe(schedule),
        notes=tuple(schedule.notes) + _anyres_notes(schedule, geo) + _window_notes(dims, schedule, geo)
        + _sliding_cache_notes(held, text_tokens, cached_visual),
        **parts,
    )


def _held_tokens(d: DecoderDims, layer: int, tokens: int) -> int:
    """Tokens ``layer``'s cache holds after a prefill of ``tokens``: all of them, or the last
    ``window - 1`` in a sliding-window layer (transformers' ``DynamicSlidingWindowLayer``)."""
    window = d.cache_window(layer)
    return tokens if window is None else min(tokens, window - 1)


def _sliding_cache_notes(held: list[int], text_tokens: int, cached_visual: list[int]) -> tuple[str, ...]:
    """Where a sliding-window layer's cache has cut the prompt's oldest tokens, which of them were
    visual depends on where the image sits in the prompt: the visual share is then an upper bound."""
    if all(h == text_tokens + v for h, v in zip(held, cached_visual)):
        return ()
    return ("sliding-window layers keep the prompt's last tokens only: the visual tokens' share of the KV cache "
            "is an upper bound (the total is exact)",)


def _window_notes(dims: ModelDims, schedule: Schedule, geo: Geometry) -> tuple[str, ...]:
    """A vision stage in a windowed tower (Qwen2.5-VL) leaves each window the kept patches that fell in
    it, which the schedule does not say: the window layers after it are counted as if every window
    kept the same share (``_vision_flops``), neither a bound nor exact (more pairs when the kept
    patches cluster, fewer when they spread more evenly than the windows' sizes)."""
    v = dims.vision
    windowed = [layer for layer in range(v.layers) if layer not in v.full_attention_layers] if v.window else []
    notes = []
    if any(_patches_at(schedule, geo, layer) < geo.patches for layer in windowed):
        notes.append("a vision-site stage before window-attention blocks (Qwen2.5-VL): their attention scores are "
                     "counted as if every window kept the same share of its patches (sum of window sizes squared, "
                     "times the kept share squared); the real count depends on which patches each window keeps")
    if len(set(geo.windows)) > 1 and any(cost.kind == "vision_attention_map" and cost.rows and cost.layer in windowed
                                         for cost in schedule.scoring):
        # (vision_map_flops takes a context row's keys as the mean window: exact for equal windows)
        notes.append("context rows read at a window-attention block (VFlowOpt on Qwen2.5-VL) are counted over the "
                     "mean window's keys; each row's own window is larger or smaller where the windows differ")
    return tuple(notes)


def _anyres_notes(schedule: Schedule, geo: Geometry) -> tuple[str, ...]:
    if geo.anyres is None or not _vision_stages(schedule):
        return ()
    return ("a vision-site stage on an AnyRes image: the LLM's visual tokens are an upper bound (every crop's kept "
            "patches that unpadding leaves, every row's newline" + (", the resized grid's tokens they can reach"
                                                                    if geo.anyres.resized else "")
            + "); exact for a pruning method that leaves a token in every row"
            + (" of a grid that is not resized" if geo.anyres.resized else ""),)


def vision_map_flops(patches: int, prefix: int, width: int, attn_width: int, heads: int, rows: int = 0,
                     pairs: int | None = None) -> int:
    """True FLOPs of one crop's whole vision attention map as VFlowOpt reads it (``VisionSource.attention``
    and ``kernels.received_attention``): the queries and keys of the ``n = patches + prefix`` tokens
    (``4·n·D·A``; a fused qkv projection computes only those columns), the score of every patch query
    against its keys (``2·s·A``) and the column sums of their probabilities, one matrix product per
    head (``2·H·s``), with ``s = pairs`` (default ``patches·n``: global attention; a window layer
    passes Σ window²), and ``rows`` context rows against their keys (``2·r·n·A``; in a window layer
    a row's window, taken as ``s / patches`` keys: exact when the windows are equal). The CLS row,
    which only VisionZip reads, is computed on first use and not part of the map."""
    n = patches + prefix
    row_keys = n if pairs is None else pairs // max(patches, 1)
    pairs = patches * n if pairs is None else pairs
    return 4 * n * width * attn_width + 2 * pairs * attn_width + 2 * heads * pairs + 2 * rows * row_keys * attn_width


def bipartite_matching_flops(tokens: int, target: int, dim: int, prefix: int = 0) -> int:
    """FLOPs of ToMe bipartite soft matching repeated from ``tokens`` down to ``target`` tokens of
    width ``dim``, both counting the ``prefix`` protected tokens (CLS, registers) that lead the
    sequence: a round on m tokens compares its ceil(m/2) A tokens with its floor(m/2) B tokens
    (2·a·b·dim) and merges min(m - target, (m - prefix) // 2) of them, at most half the candidates
    (ToMe's ``r = min(r, (t - protected) // 2)``; Representation Shift's rounds,
    :func:`vtoken.strategies.repshift.bipartite_merge`)."""
    total, count = 0, tokens
    while count > target:
        merge = min(count - target, (count - prefix) // 2)
        if merge <= 0:
            raise ValueError(f"bipartite matching cannot merge {tokens} tokens ({prefix} protected) down to {target}")
        a, b = (count + 1) // 2, count // 2
        total += 2 * a * b * dim
        count -= merge
    return total


def _cached_visual_tokens(schedule: Schedule, layer_visual: list[int]) -> list[int]:
    """Visual tokens per layer in the KV cache after the prefill: what each layer ran on, less what a
    mask stage that evicts (``schedule.cache_evicted``) dropped from the layers it covers."""
    if schedule.cache_evicted is None:
        return list(layer_visual)
    first, kept = schedule.cache_evicted  # counted as an llm stage's keep_tokens is
    return [min(v, kept) if layer >= first else v for layer, v in enumerate(layer_visual)]


def _mean_decode_layer(d: DecoderDims, cached: int, steps: int, layer: int) -> float:
    """Mean FLOPs of one layer over ``steps`` decode steps; step i attends to cached + i keys, at most
    the layer's sliding window (:attr:`DecoderDims.cache_windows`). A step's FLOPs are affine in its
    keys (:func:`decoder_layer_flops`), so the steps under the window average to the mean of their
    first and last (a sum over every step took seconds for a million decoded tokens), and every later
    step attends to the whole window."""
    window = d.cache_window(layer)
    growing = steps if window is None else max(0, min(steps, window - cached))  # steps under the window
    first, last = decoder_layer_flops(d, 1, cached + 1, layer), decoder_layer_flops(d, 1, cached + growing, layer)
    total = growing * (first + last) / 2
    if growing < steps:
        total += (steps - growing) * decoder_layer_flops(d, 1, window, layer)
    return total / steps


__all__ = [
    "CONVENTIONS",
    "DecoderDims",
    "FlopsReport",
    "Geometry",
    "ModelDims",
    "ProjectorDims",
    "VisionDims",
    "decoder_layer_flops",
    "deepstack_flops",
    "describe",
    "encoder_layer_flops",
    "flops",
    "geometry",
    "kv_cache_bytes",
    "load_config",
    "model_dims",
    "paper_layer_macs",
    "pooling_head_flops",
    "projector_flops",
    "shipped_configs",
]
