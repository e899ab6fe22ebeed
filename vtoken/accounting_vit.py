"""FLOPs of a standalone vision encoder (no LLM) under a schedule of vision stages.

``vtoken.flops(x, schedule)`` lands here when ``x`` is one of:

- a transformers ``CLIPVisionConfig`` / ``CLIPVisionModel`` (no projection; a
  ``CLIPVisionModelWithProjection`` adds its ``visual_projection``), or a ``CLIPConfig`` / ``CLIPModel``:
  the vision tower plus ``visual_projection`` on the pooled CLS token (``get_image_features``);
- a ``SiglipVisionConfig`` / ``SiglipVisionModel`` or ``SiglipConfig`` / ``SiglipModel``: the tower plus
  its attention-pooling head where ``vision_use_head`` (default True); SigLIP has no projection;
- a timm ``VisionTransformer`` (also ``VisionTransformerDistilled``), passed as the model object: width,
  depth, heads and MLP are read from its blocks' linear layers, the patch size and grid from
  ``patch_embed``, ``num_prefix_tokens`` (CLS, registers, distillation token), ``global_pool``
  (``token``/``avg``/``max``/``''``/``map``) and ``head`` (plus ``head_dist``);
- an open_clip ``VisionTransformer`` (``model.visual``) or an open_clip ``CLIP`` model: ``conv1``,
  ``class_embedding``, ``transformer.resblocks``, ``pool_type`` (``tok``/``avg``/``none``) and ``proj``.

For the CLIP/SigLIP pairs and open_clip's CLIP only the image side is counted: the text tower encodes
the prompt, not the image, and is no part of an image's cost (the report's notes say so).

Tokens. An encoder runs on ``P`` patch tokens (the patch grid of the input, ``image_size`` or the
model's default; ``Schedule.vision_tokens`` overrides it) plus ``p`` prefix tokens (CLS, registers,
distillation token), which no stage removes. ``Stage("vision", K, layer=l)`` makes the blocks after
block ``l`` run on ``K + p`` tokens; with ``inside=True`` (ToMe) block ``l``'s attention runs on the
tokens it received and its MLP already on ``K + p``. Stages may sit at every layer
(:func:`tome_schedule`).

Per-term formulas (``"true"``: 2 FLOPs per multiply-accumulate, per image):

- patch embedding, a ``p_h × p_w`` convolution of stride ``p``: ``2 · P · C·p_h·p_w · D``;
- block, attention on ``n_a`` tokens: ``2 · n_a · M_attn`` for its linear maps (q, k, v, o:
  ``M_attn = 4·D·A`` with ``A`` = heads × head size) and ``4 · n_a² · A`` for ``QKᵀ`` and ``AV`` over the
  full square; MLP on ``n_m`` tokens: ``2 · n_m · M_mlp`` (``2·D·I`` for two matrices, ``3·D·I`` for
  SwiGLU); ``n_a = n_m`` unless an inside stage sits at that block;
- head on the ``n`` final tokens: token / average pooling (no products), then the final linear maps
  (CLIP's projection, timm's classifier, open_clip's ``proj``) on the one pooled vector,
  ``2 · M_out``; no pooling (timm ``global_pool=''``, open_clip ``pool_type='none'``): ``2 · n · M_out``;
  attention pooling (SigLIP's head, timm ``map``) with ``q`` latent queries over ``n`` tokens (the prefix
  included where the model includes it): ``2·q·M_q + 2·n·M_kv + 4·q·n·A + 2·q·M_post + 2·M_out``
  (``M_q = D·A``, ``M_kv = 2·D·A``, ``M_post`` the out projection plus the head's MLP);
- scoring (``Schedule.scoring``), per image: ``vision_token_matching`` at layer ``l``: ToMe bipartite
  matching, ``2·a·b·w`` per round (:func:`vtoken.accounting.bipartite_matching_flops`, ``a`` and ``b``
  the two alternating halves); for an inside stage over the whole sequence entering block ``l``, prefix
  included (``tome.merge.bipartite_soft_matching`` splits every token and masks the protected ones),
  ``w`` the head size (ToMe's metric: the block's keys averaged over heads); for a stage after block
  ``l`` over its candidate patches, ``w = D`` (matching on hidden states, Representation Shift's merge);
  ``vision_attention_rows``: ``2·r·D·A + 2·n·D·A + 2·r·n·A`` (q of ``r`` rows, k of the ``n`` tokens
  entering block ``l``, their scores); ``vision_attention_map``: ``4·n·D·A + 2·P·n·A + 2·H·P·n + 2·r·n·A``
  (q and k of the n tokens, the P patch queries' scores and their column sums per head, ``r`` context
  rows: :func:`vtoken.accounting.vision_map_flops`); ``flops``: as given.

Excluded, in both conventions: norms (LayerNorm / RMSNorm, QK-norm), softmax, activations (GELU,
SwiGLU's gate product), biases, residual adds, position embeddings and their interpolation, layer
scale, average / max pooling, the L2 normalisation of a matching metric, the weighted averages that
merge tokens and ToMe's proportional-attention bias (``log size`` added to logits). None of them is a
matrix product, so ``torch.utils.flop_counter.FlopCounterMode`` (which counts ``mm``/``addmm``/``bmm``/
convolutions and SDPA) ignores them as well: ``"true"`` equals its count, verified in
``tests/test_flops_vit.py`` (on CPU run attention eager, or the model on the meta device: CPU SDPA and
``nn.MultiheadAttention``'s fused path dispatch to ops the counter does not register).

``convention="paper"``: multiply-accumulates of the same terms, half of ``"true"``: what DeiT, ToMe
and Representation Shift print as "GFLOPs" (fvcore's count, which also adds its LayerNorm estimate of
5 per element, 0.2% of DeiT-S, below the papers' rounding). Reproduced in the tests and in
``eval/results/flops.md``: DeiT-S 4.6 GFLOPs unpruned and 3.0 under Representation Shift's
schedule; ToMe's DeiT-S r = 8 / 13 / 16 (3.4 / 2.7 / 2.3) and DeiT-T r = 8 / 12 / 16 (0.9 / 0.8 / 0.6).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

from vtoken.schedule import ScoringCost, Schedule, Stage, patches_along

HF_MODEL_TYPES: tuple[str, ...] = ("clip_vision_model", "clip", "siglip_vision_model", "siglip")
ENCODER_SCORING = ("vision_token_matching", "vision_attention_rows", "vision_attention_map", "flops")
TEXT_TOWER_NOTE = "text tower not counted: it encodes the prompt, not the image"


# --------------------------------------------------------------------------------------------------
# Dimensions


@dataclass(frozen=True)
class HeadDims:
    """What runs after the last block, as per-token multiply-accumulates.

    ``kind``: ``"token"`` or ``"avg"`` (one pooled vector), ``"none"`` (the final linear maps run on
    every token, prefix included), ``"map"`` (attention pooling with ``latents`` queries: ``q_macs`` per
    query, ``kv_macs`` per pooled token, scores and values at width ``width``, then ``post_macs`` per
    query for the out projection and the head's MLP; ``pool_prefix``: the prefix tokens are pooled too).
    ``out_macs``: the final linear maps (projection, classifier(s)) per output vector."""

    kind: str = "token"
    out_macs: int = 0
    latents: int = 0
    q_macs: int = 0
    kv_macs: int = 0
    width: int = 0
    post_macs: int = 0
    pool_prefix: bool = False


@dataclass(frozen=True)
class EncoderDims:
    """A ViT encoder: ``layers`` blocks of width ``hidden``, attention width ``attn_width`` over
    ``heads`` heads, per-token MACs of the attention's linear maps ``attn_macs`` and of the MLP
    ``mlp_macs``; ``patch`` (h, w) convolution over ``channels``; default ``grid`` of patches;
    ``prefix`` tokens that are never pruned."""

    family: str
    name: str
    layers: int
    hidden: int
    heads: int
    attn_width: int
    attn_macs: int
    mlp_macs: int
    patch: tuple[int, int]
    channels: int
    grid: tuple[int, int]
    prefix: int
    head: HeadDims
    notes: tuple[str, ...] = ()
    #: The patch embedding pads an image's sides up to whole patches (timm's ``dynamic_img_pad``).
    pads: bool = False

    @property
    def head_size(self) -> int:
        return self.attn_width // self.heads

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]


def module_dims(source: Any) -> EncoderDims | None:
    """Dimensions of a timm or open_clip ViT given as a module (an open_clip ``CLIP``: its ``visual``);
    None for anything else."""
    if _is_timm_vit(source):
        return _timm_dims(source)
    if _is_open_clip_vit(source):
        return _open_clip_dims(source, notes=())
    visual = getattr(source, "visual", None)
    if visual is not None and _is_open_clip_vit(visual):
        return _open_clip_dims(visual, notes=(TEXT_TOWER_NOTE,))
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and _is_timm_vit(trunk):
        # An open_clip TimmModel tower: a timm ViT trunk, then the tower's own head (its projection).
        dims = _timm_dims(trunk)
        extra = _linear_macs(visual.head) if getattr(visual, "head", None) is not None else 0
        head = replace(dims.head, out_macs=dims.head.out_macs + extra)
        return replace(dims, head=head, notes=(TEXT_TOWER_NOTE, *dims.notes))
    return None


def config_dims(config: Any, source: Any = None) -> EncoderDims | None:
    """Dimensions of a transformers CLIP / SigLIP config (``source``, the model it came from, tells
    whether a ``visual_projection`` runs); None for any other model type."""
    model_type = getattr(config, "model_type", None)
    if model_type not in HF_MODEL_TYPES:
        return None
    both = model_type in ("clip", "siglip")
    vision = config.vision_config if both else config
    width, heads = vision.hidden_size, vision.num_attention_heads
    mlp = 2 * width * vision.intermediate_size
    notes = (TEXT_TOWER_NOTE,) if both else ()
    if model_type.startswith("clip"):
        prefix = 1
        projection = getattr(source, "visual_projection", None)
        if projection is not None:
            out = projection.in_features * projection.out_features
        else:
            out = width * config.projection_dim if model_type == "clip" else 0
        head = HeadDims("token", out_macs=out)
    else:
        prefix = 0
        if getattr(vision, "vision_use_head", True):
            head = HeadDims("map", latents=1, q_macs=width * width, kv_macs=2 * width * width, width=width,
                            post_macs=width * width + mlp)
        else:
            head = HeadDims("token")
    side = vision.image_size // vision.patch_size
    name = getattr(config, "_name_or_path", "") or model_type
    return EncoderDims(
        family=model_type, name=name, layers=vision.num_hidden_layers, hidden=width, heads=heads,
        attn_width=width, attn_macs=4 * width * width, mlp_macs=mlp,
        patch=(vision.patch_size, vision.patch_size), channels=getattr(vision, "num_channels", 3),
        grid=(side, side), prefix=prefix, head=head, notes=notes,
    )


def _is_timm_vit(module: Any) -> bool:
    return all(hasattr(module, a) for a in ("blocks", "patch_embed", "num_prefix_tokens", "global_pool"))


def _is_open_clip_vit(module: Any) -> bool:
    return (all(hasattr(module, a) for a in ("conv1", "class_embedding", "positional_embedding", "proj"))
            and hasattr(getattr(module, "transformer", None), "resblocks"))


def _linear_macs(module: Any) -> int:
    """Multiply-accumulates per token of every linear map in ``module`` (``nn.Linear`` in·out;
    ``nn.MultiheadAttention``'s packed or separate input projections; its ``out_proj`` is a Linear)."""
    from torch import nn

    total = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            total += sub.in_features * sub.out_features
        elif isinstance(sub, nn.MultiheadAttention):
            if sub.in_proj_weight is not None:
                total += sub.in_proj_weight.numel()
            else:
                total += sum(w.numel() for w in (sub.q_proj_weight, sub.k_proj_weight, sub.v_proj_weight))
    return total


def _same_blocks(blocks: Sequence[Any], attn_of, mlp_of) -> tuple[int, int]:
    macs = {(_linear_macs(attn_of(b)), _linear_macs(mlp_of(b))) for b in blocks}
    if len(macs) != 1:
        raise NotImplementedError("blocks of different widths are not modelled")
    return macs.pop()


def _conv_patch(conv: Any) -> tuple[tuple[int, int], int, int]:
    if tuple(conv.kernel_size) != tuple(conv.stride):
        raise NotImplementedError("a patch embedding whose stride differs from its kernel is not modelled")
    return tuple(conv.kernel_size), conv.in_channels, conv.out_channels


def _timm_dims(model: Any) -> EncoderDims:
    blocks = list(model.blocks)
    if not blocks or not all(hasattr(b, "attn") and hasattr(b, "mlp") for b in blocks):
        raise NotImplementedError(f"{type(model).__name__}: only blocks with an `attn` and an `mlp` are modelled")
    attn = blocks[0].attn
    if not hasattr(attn, "num_heads") or not hasattr(attn, "qkv"):
        raise NotImplementedError(f"{type(attn).__name__}: only timm attention with a fused `qkv` is modelled")
    attn_macs, mlp_macs = _same_blocks(blocks, lambda b: b.attn, lambda b: b.mlp)
    patch, channels, width = _conv_patch(model.patch_embed.proj)
    out = _linear_macs(model.head) + (_linear_macs(model.head_dist) if getattr(model, "head_dist", None) else 0)
    pool = getattr(model, "attn_pool", None)
    if pool is not None:
        if not hasattr(pool, "kv") or not hasattr(pool, "latent"):
            raise NotImplementedError(f"{type(pool).__name__}: only timm's AttentionPoolLatent is modelled")
        mlp = _linear_macs(pool.mlp) if pool.mlp is not None else 0
        head = HeadDims("map", out_macs=out, latents=pool.latent_len, q_macs=_linear_macs(pool.q),
                        kv_macs=_linear_macs(pool.kv), width=pool.kv.out_features // 2,
                        post_macs=_linear_macs(pool.proj) + mlp, pool_prefix=bool(model.pool_include_prefix))
    else:
        head = HeadDims("none" if not model.global_pool else "token", out_macs=out)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return EncoderDims(
        family="timm_vit", name=cfg.get("architecture") or type(model).__name__, layers=len(blocks),
        hidden=width, heads=attn.num_heads, attn_width=getattr(attn, "attn_dim", None) or attn.qkv.out_features // 3,
        attn_macs=attn_macs, mlp_macs=mlp_macs, patch=patch, channels=channels,
        grid=tuple(model.patch_embed.grid_size), prefix=model.num_prefix_tokens, head=head,
        pads=bool(getattr(model.patch_embed, "dynamic_img_pad", False)),
    )


def _open_clip_dims(visual: Any, notes: tuple[str, ...]) -> EncoderDims:
    if getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError("open_clip attentional pooling (CoCa) is not modelled")
    blocks = list(visual.transformer.resblocks)
    attn = blocks[0].attn
    heads = getattr(attn, "num_heads", None)
    if heads is None or not hasattr(blocks[0], "mlp"):
        raise NotImplementedError(
            f"{type(blocks[0]).__name__}: only blocks with an attention and an `mlp` are modelled")
    attn_macs, mlp_macs = _same_blocks(blocks, lambda b: b.attn, lambda b: b.mlp)
    patch, channels, width = _conv_patch(visual.conv1)
    proj = 0 if visual.proj is None else visual.proj.shape[0] * visual.proj.shape[1]
    kind = {"tok": "token", "avg": "avg", "none": "none"}[visual.pool_type]
    return EncoderDims(
        family="open_clip_vit", name=f"open_clip {type(visual).__name__}", layers=len(blocks), hidden=width,
        heads=heads, attn_width=getattr(attn, "embed_dim", width), attn_macs=attn_macs, mlp_macs=mlp_macs,
        patch=patch, channels=channels, grid=tuple(visual.grid_size), prefix=1,
        head=HeadDims(kind, out_macs=proj), notes=notes,
    )


# --------------------------------------------------------------------------------------------------
# Per-term counts (true FLOPs, 2 per multiply-accumulate, one image)


def patch_embedding_flops(e: EncoderDims, patches: int) -> int:
    """The patch convolution: 2 · P · (C·p_h·p_w) · D."""
    return 2 * patches * e.channels * e.patch[0] * e.patch[1] * e.hidden


def attention_flops(e: EncoderDims, tokens: int) -> int:
    """A block's attention on n tokens: linear maps 2·n·M_attn (4·D·A for q, k, v, o), QKᵀ and AV
    4·n²·A (the full square)."""
    return 2 * tokens * e.attn_macs + 4 * tokens * tokens * e.attn_width


def mlp_flops(e: EncoderDims, tokens: int) -> int:
    """A block's MLP on n tokens: 2·n·M_mlp (2·D·I for two matrices, 3·D·I for SwiGLU)."""
    return 2 * tokens * e.mlp_macs


def head_flops(e: EncoderDims, patches: int) -> int:
    """What runs after the last block on ``patches`` patches plus the prefix (see ``HeadDims``):
    pooled: 2·M_out; no pooling: 2·n·M_out; attention pooling with q queries over n pooled tokens:
    2·q·M_q + 2·n·M_kv + 4·q·n·A + 2·q·M_post + 2·M_out."""
    h, tokens = e.head, patches + e.prefix
    if h.kind == "none":
        return 2 * tokens * h.out_macs
    if h.kind == "map":
        pooled = tokens if h.pool_prefix else patches
        return 2 * (h.latents * h.q_macs + pooled * h.kv_macs + 2 * h.latents * pooled * h.width
                    + h.latents * h.post_macs + h.out_macs)
    return 2 * h.out_macs


def block_tokens(e: EncoderDims, patches: int, stages: Sequence[Stage]) -> tuple[tuple[int, int], ...]:
    """Tokens (prefix included) that each block's attention and MLP run on under ``stages``."""
    _check_stages(e, patches, stages)
    inside = {s.layer: s.keep_tokens for s in stages if s.inside}
    after = {s.layer: s.keep_tokens for s in stages if not s.inside}
    counts, current = [], patches
    for layer in range(e.layers):
        mlp = inside.get(layer, current)
        counts.append((current + e.prefix, mlp + e.prefix))
        current = after.get(layer, mlp)
    return tuple(counts)


def final_patches(e: EncoderDims, patches: int, stages: Sequence[Stage]) -> int:
    """Patches left after the last block (the head's input, prefix excluded)."""
    counts = block_tokens(e, patches, stages)
    after = [s.keep_tokens for s in stages if not s.inside and s.layer == e.layers - 1]
    return after[0] if after else counts[-1][1] - e.prefix


def _check_stages(e: EncoderDims, patches: int, stages: Sequence[Stage]) -> None:
    seen, current = set(), patches
    for stage in stages:
        if stage.site != "vision":
            raise ValueError(f"{stage}: a vision encoder has only 'vision' stages (no projector, no LLM)")
        if not 0 <= stage.layer < e.layers:
            raise ValueError(f"{stage}: layer must be in [0, {e.layers})")
        if (stage.layer, stage.inside) in seen:
            raise ValueError(f"{stage}: two stages at the same place of block {stage.layer}")
        seen.add((stage.layer, stage.inside))
        if stage.keep_tokens > current:
            raise ValueError(f"{stage} keeps more than the {current} patch tokens that reach it")
        current = stage.keep_tokens


def scoring_cost_flops(cost: ScoringCost, e: EncoderDims, stages: Sequence[Stage],
                       counts: tuple[tuple[int, int], ...]) -> int:
    """True FLOPs of one scoring item on one image (formulas in the module docstring)."""
    from vtoken.accounting import bipartite_matching_flops, vision_map_flops

    if cost.kind not in ENCODER_SCORING:
        raise ValueError(f"{cost}: a vision encoder takes only {', '.join(ENCODER_SCORING)} scoring")
    if cost.kind == "flops":
        return int(cost.flops)
    if cost.layer is None or not 0 <= cost.layer < e.layers:
        raise ValueError(f"{cost}: layer must be in [0, {e.layers})")
    attn_tokens, mlp_tokens = counts[cost.layer]
    if cost.kind == "vision_token_matching":
        at = [s for s in stages if s.layer == cost.layer]
        if not at:
            raise ValueError(f"{cost}: the schedule has no vision stage at layer {cost.layer} to match tokens for")
        stage = next((s for s in at if s.inside), at[0])  # a block's inside stage comes before its output
        if stage.inside:  # ToMe: the whole sequence, prefix protected, keys averaged over heads
            return bipartite_matching_flops(attn_tokens, stage.keep_tokens + e.prefix, e.head_size, e.prefix)
        # Representation Shift's merge: the block output's whole sequence, the prefix first in A (ToMe's split)
        return bipartite_matching_flops(mlp_tokens, stage.keep_tokens + e.prefix, e.hidden, e.prefix)
    n, d, a = attn_tokens, e.hidden, e.attn_width
    if cost.kind == "vision_attention_rows":
        return 2 * cost.rows * d * a + 2 * n * d * a + 2 * cost.rows * n * a
    return vision_map_flops(n - e.prefix, e.prefix, d, a, e.heads, cost.rows)  # vision_attention_map


# --------------------------------------------------------------------------------------------------
# Schedules


def tome_schedule(patches: int, layers: int, r: int | Sequence[int], *, matching: bool = True) -> Schedule:
    """ToMe's schedule (Bolya et al., ICLR 2023, §3; ``tome.merge.bipartite_soft_matching``): block
    ``l`` merges ``r_l`` patch tokens between its attention and its MLP (``inside=True``), at most half
    of the candidates it has (ToMe's ``r = min(r, (t - protected) // 2)``, the prefix protected), so
    stage ``l`` keeps ``P - Σ_{j<=l} r_j``. ``r``: one value for every block (ToMe's constant
    schedule) or a list per block. ``matching``: list the bipartite matching of each stage as
    ``vision_token_matching`` scoring."""
    rs = [r] * layers if isinstance(r, int) else list(r) + [0] * (layers - len(r))
    stages, costs, count = [], [], patches
    for layer, merge in enumerate(rs[:layers]):
        merge = min(merge, count // 2)
        if merge <= 0:
            continue
        count -= merge
        stages.append(Stage("vision", count, layer, inside=True))
        if matching:
            costs.append(ScoringCost("vision_token_matching", layer=layer))
    return Schedule(tuple(stages), tuple(costs), vision_tokens=patches)


# --------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class EncoderFlopsReport:
    """FLOPs of a vision encoder on ``images`` images, split by part, in ``convention``.

    ``block_tokens``: per block, the tokens (prefix included) its attention and its MLP run on.
    ``vision`` = patch embedding + blocks; ``prefill`` = vision + head + scoring (the name the VLM
    report uses for a forward's total)."""

    model: str
    convention: str
    images: int
    patches: int
    prefix_tokens: int
    block_tokens: tuple[tuple[int, int], ...]
    patch_embedding: float
    blocks: float
    head: float
    scoring: float
    schedule: str = "unpruned"
    notes: tuple[str, ...] = ()

    @property
    def vision(self) -> float:
        return self.patch_embedding + self.blocks

    @property
    def prefill_without_scoring(self) -> float:
        return self.vision + self.head

    @property
    def prefill(self) -> float:
        return self.prefill_without_scoring + self.scoring

    @property
    def mean_tokens(self) -> float:
        """Tokens per block averaged over blocks (attention and MLP halves weighted alike)."""
        return sum(a + m for a, m in self.block_tokens) / (2 * len(self.block_tokens))

    @property
    def mean_visual_tokens(self) -> float:
        """Patch tokens per block averaged over blocks, prefix excluded (the VLM report's name for
        the layer-averaged visual tokens, so code written for it reads an encoder's too)."""
        return self.mean_tokens - self.prefix_tokens

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["block_tokens"] = [list(c) for c in self.block_tokens]
        out["notes"] = list(self.notes)
        out.update(vision=self.vision, prefill=self.prefill)
        return out

    def table(self) -> str:
        from vtoken.accounting import _scale

        unit = "MACs" if self.convention == "paper" else "FLOPs"
        scale, prefix = _scale(self.prefill)
        note = " (multiply-adds, what the papers print as FLOPs)" if self.convention == "paper" else ""
        lines = [f"{self.model} | convention={self.convention}{note} | schedule: {self.schedule}",
                 f"tokens: {self.patches} patches + {self.prefix_tokens} prefix per image, "
                 f"block mean {self.mean_tokens:.1f}; {self.images} image(s)"]
        for name, value in (("patch embedding", self.patch_embedding), ("blocks", self.blocks),
                            ("head", self.head), ("scoring", self.scoring), ("total", self.prefill)):
            lines.append(f"  {name:<16}{value / scale:>12.4f} {prefix}{unit}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def encoder_flops(e: EncoderDims, schedule: Schedule, *, convention: str = "true",
                  image_size: tuple[int, int] | None = None, images: int | None = None) -> EncoderFlopsReport:
    """FLOPs of encoder ``e`` under ``schedule`` (terms and conventions in the module docstring)."""
    from vtoken.accounting import CONVENTIONS, describe

    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    patches = patches_of(e, image_size, schedule)
    stages = schedule.stages
    counts = block_tokens(e, patches, stages)
    n_images = images or schedule.images
    parts = dict(
        patch_embedding=patch_embedding_flops(e, patches),
        blocks=sum(attention_flops(e, a) + mlp_flops(e, m) for a, m in counts),
        head=head_flops(e, final_patches(e, patches, stages)),
        scoring=sum(scoring_cost_flops(c, e, stages, counts) for c in schedule.scoring),
    )
    parts = {k: v * n_images if convention == "true" else v * n_images / 2 for k, v in parts.items()}
    return EncoderFlopsReport(
        model=e.name, convention=convention, images=n_images, patches=patches, prefix_tokens=e.prefix,
        block_tokens=counts, schedule=describe(schedule), notes=e.notes + tuple(schedule.notes), **parts,
    )


def patches_of(e: EncoderDims, image_size: tuple[int, int] | None, schedule: Schedule | None = None) -> int:
    """Patch tokens per image: ``schedule.vision_tokens`` if set, else the grid of ``image_size``
    (h, w), else the model's default grid."""
    if schedule is not None and schedule.vision_tokens is not None:
        return schedule.vision_tokens
    if image_size is not None:
        return patches_along(image_size[0], e.patch[0], e.pads) * patches_along(image_size[1], e.patch[1], e.pads)
    return e.patches


__all__ = [
    "EncoderDims", "EncoderFlopsReport", "HeadDims", "attention_flops", "block_tokens", "config_dims",
    "encoder_flops", "head_flops", "mlp_flops", "module_dims", "patch_embedding_flops", "patches_of",
    "scoring_cost_flops", "tome_schedule",
]
