"""The speed bench's hand-written oracle (``eval/bench_speed.py``): the unwrapped model run on a
recorded schedule of vision-encoder drops and projector / LLM stages (the tower's blocks on the
patches still kept, dropping the rest after each pruning block; project; the LLM on the text and the
kept visual tokens, gathering the kept rows before each pruning layer), the fastest any
implementation of that schedule can be, with no vtoken code on the path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vtoken import compat
from vtoken.request import renumbers

import replay_strategy as replay  # eval/replay_strategy.py
from speed_shapes import IMAGE_TOKEN  # eval/speed_shapes.py


@dataclass
class OraclePlan:
    """What the hand-written oracle runs, prepared once from a recording (batch 1): the sequence rows
    that enter the LLM (``enter``) with their positions, replacement vectors for merged tokens, and
    before each pruning layer which of the current rows stay (and their positions)."""

    enter: torch.Tensor
    positions: torch.Tensor
    replace_slots: torch.Tensor | None
    replace_features: torch.Tensor | None
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    #: After each pruning block of the vision tower, which of its current patch tokens stay (the CLS
    #: token always does); empty when no stage prunes inside the tower.
    vision: dict[int, torch.Tensor] = field(default_factory=dict)
    #: The image's visual tokens that reach the projector (all of them when ``vision`` is empty).
    visual_kept: torch.Tensor | None = None


def oracle_supported(recording: replay.Recording) -> bool:
    """A hand-written oracle exists for schedules of projector and LLM stages and of vision stages
    that drop tokens after a block (Representation Shift's prune mode, random at the vision site): not
    for merges inside the tower, whose merged tokens the blocks after them attend to with a size
    bias (ToMe), nor for mask stages (AIF)."""
    source = recording.source
    stages = source.stages()
    if not stages or source.mask_stage() is not None:
        return False
    vision = [s for s in stages if s.site == "vision"]
    if vision and (source.inside_block() is not None
                   or any(recording.reductions[s.name].features is not None for s in vision)):
        return False
    return all(s.site in ("vision", "projector", "llm") for s in stages)


def oracle_plan(recording: replay.Recording, x: dict) -> OraclePlan:
    source = recording.source
    mode = source.config.positions
    ids = x["input_ids"][0]
    device = ids.device
    slots = torch.nonzero(ids == IMAGE_TOKEN).squeeze(-1)
    visual_of = torch.full(ids.shape, -1, dtype=torch.long, device=device)
    visual_of[slots] = torch.arange(len(slots), device=device)
    selection = recording.selection[0]
    rows = torch.arange(len(ids), device=device)
    positions = rows.clone()
    enter, enter_positions = rows, positions
    replace_slots = replace_features = visual_kept = None
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    vision: dict[int, torch.Tensor] = {}
    current = torch.arange(len(slots), device=device)  # the image's tokens still in the tower
    for stage in source.stages():
        kept = selection[stage.name].to(device)
        if stage.site == "vision":  # after block ``stage.layer``: the patches kept, in order
            vision[stage.layer] = torch.searchsorted(current, kept)
            current = visual_kept = kept
            keep = ids != IMAGE_TOKEN
            keep[slots[kept]] = True
            rows = torch.nonzero(keep).squeeze(-1)
            positions = torch.arange(len(rows), device=device) if renumbers(mode, "vision") else rows.clone()
            enter, enter_positions = rows, positions
        elif stage.site == "projector":
            keep = ids != IMAGE_TOKEN
            keep[slots[kept]] = True
            rows = torch.nonzero(keep).squeeze(-1)
            positions = torch.arange(len(rows), device=device) if renumbers(mode, "projector") else rows.clone()
            enter, enter_positions = rows, positions
            reduction = recording.reductions[stage.name]
            if reduction.features is not None:  # merged vectors (VisionZip, pool, VFlowOpt's recycling), as recorded
                columns = reduction.keep[0] >= 0
                replace_slots = slots[reduction.keep[0][columns].to(device)]
                replace_features = reduction.features[0][columns]
        else:  # before LLM layer ``stage.layer``: the text rows and the kept visual rows stay
            vis = visual_of[rows]
            stay = torch.nonzero((vis < 0) | torch.isin(vis, kept)).squeeze(-1)
            rows = rows[stay]
            positions = torch.arange(len(rows), device=device) if renumbers(mode, "llm") else positions[stay]
            layers[stage.layer] = (stay, positions[None].clone())
    return OraclePlan(enter, enter_positions[None], replace_slots, replace_features, layers, vision, visual_kept)


def oracle_call(model, x: dict, plan: OraclePlan) -> torch.Tensor:
    """The unwrapped model's work for the schedule alone: encode, project, embed the text and the
    visual tokens (merged ones as recorded), then every LLM layer on the rows still kept, gathering
    before each pruning layer, with a KV cache; the first token's logits."""
    core = model.model
    ids = x["input_ids"][0]
    embeds = core.get_input_embeddings()(ids[None])
    slots = torch.nonzero(ids == IMAGE_TOKEN).squeeze(-1)
    if plan.vision:
        visual = core.multi_modal_projector(_pruned_tower_features(core.vision_tower, x["pixel_values"], plan.vision))
        slots = slots[plan.visual_kept]
    else:
        features = core.get_image_features(pixel_values=x["pixel_values"], vision_feature_layer=-2,
                                           vision_feature_select_strategy="default")
        features = features.pooler_output if hasattr(features, "pooler_output") else features
        visual = torch.cat(list(features) if isinstance(features, (tuple, list)) else [features])
    embeds[0, slots] = visual.reshape(-1, visual.shape[-1]).to(embeds.dtype)
    if plan.replace_slots is not None:
        embeds[0, plan.replace_slots] = plan.replace_features.to(embeds.dtype)
    lm = core.language_model
    hidden, positions = embeds[:, plan.enter], plan.positions
    cache = compat.new_dynamic_cache(lm.config)
    eager = getattr(lm.config, "_attn_implementation", "sdpa") == "eager"
    rotary = mask = None
    for index, layer in enumerate(lm.layers):
        if index in plan.layers:
            stay, positions = plan.layers[index]
            hidden, rotary, mask = hidden[:, stay], None, None
        if rotary is None:  # once per sequence length, as the model does once per forward
            rotary = lm.rotary_emb(hidden, positions)
            if eager:  # SDPA / FlashAttention are causal without a mask (one unpadded sample)
                n = hidden.shape[1]
                mask = torch.full((n, n), torch.finfo(hidden.dtype).min, device=hidden.device).triu(1)[None, None]
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, use_cache=True,
                       position_embeddings=rotary, **compat.cache_kwargs(cache))
    return model.lm_head(lm.norm(hidden[:, -1:]))


def _pruned_tower_features(vision_tower, pixel_values: torch.Tensor, drops: dict[int, torch.Tensor]) -> torch.Tensor:
    """The CLIP tower as LLaVA-1.5 runs it (``vision_feature_layer=-2``, ``"default"``: the patches of
    the second-to-last block's output), every block on the tokens still kept: after block ``l`` in
    ``drops`` only the CLS token and the patches ``drops[l]`` (indices among the current ones) go on.
    The last block and the pooled CLS norm run as the model runs them, though LLaVA reads neither."""
    tower = compat.clip_vision_tower(vision_tower)
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    blocks = tower.encoder.layers
    read = len(blocks) - 2
    features = None
    for index, block in enumerate(blocks):
        hidden = block(hidden, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        if index in drops:
            hidden = torch.cat([hidden[:, :1], hidden[:, 1:][:, drops[index]]], dim=1)
        if index == read:
            features = hidden[:, 1:]
    tower.post_layernorm(hidden[:, 0])
    return features
