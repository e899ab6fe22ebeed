"""The speed bench's hand-written oracle (``eval/bench_speed.py``): the unwrapped model run on a
recorded schedule of vision, projector and LLM stages (the tower's blocks on the patches still there,
dropping or merging at each pruning block, ToMe's between the attention and the MLP with its size
bias; project; the LLM on the text and the kept visual tokens, gathering the kept rows before each
pruning layer) or of a mask stage (AIF: one pass in which, from the stage's layer on, no text query
attends to a hidden visual token; the replay, which reads no signal, decides it at the stage's layer and
runs that one masked pass too, so AIF's probe and its rerun of the text count in its scoring),
the fastest any implementation of that schedule can be, with no vtoken code on the path.

Every site is covered on every family. A vision-site schedule on the LLaVA families runs the CLIP /
SigLIP tower by hand on each view's kept patches, and the projected patches go straight to the
sequence slots the model's own packing gives them (LLaVA-NeXT / OneVision: crops unpadded, a newline
per row, located once on patch ids), the kept newlines getting the model's newline embedding. On
Qwen-VL it runs the packed tower as its forward does (its own helpers give the rotary positions,
segments and Qwen2.5-VL's windows), each block on the patches still there with their own rotary
positions and the kept patches' segments (per window in a windowed block), then the merger on the
kept units and Qwen3-VL's DeepStack mergers on the units present at their blocks (batch 1, one
image, drops only). Otherwise the model computes its image features itself
(``get_image_features``). Then the model's M-RoPE ids (``get_rope_index``) on Qwen-VL, and the kept
tokens enter the LLM run by hand, Qwen3-VL's DeepStack features added to the visual rows still there.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from vtoken import compat
from vtoken.request import renumbers

import replay_strategy as replay  # eval/replay_strategy.py
from speed_shapes import EVERY_SITE, IMAGE_TOKEN, pack_views  # eval/speed_shapes.py


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
    #: What each pruning block of the vision tower does to the image's patch tokens (the CLS token
    #: always stays); empty when no stage prunes inside the tower.
    vision: dict[int, "VisionStep"] = field(default_factory=dict)
    #: With ``vision``: the sequence slot of each patch the tower keeps, in the order of its features
    #: (views first, then kept patches: the model's own packing of the views, e.g. LLaVA-NeXT's
    #: unpadded crop grid, located once), and the slots of the kept newline tokens (AnyRes).
    feature_slots: torch.Tensor | None = None
    newline_slots: torch.Tensor | None = None
    #: Whether the vision stages run between their block's attention and MLP (ToMe's placement) ...
    inside_block: bool = False
    #: ... and every block from the first stage on adds ``log(size)`` of each key to its attention
    #: logits (ToMe's proportional attention).
    proportional: bool = False
    #: A mask stage (AIF): from LLM layer ``mask_layer`` on, no text query attends to the visual
    #: tokens at ``hidden_slots`` (sequence slots); None: no mask stage.
    mask_layer: int | None = None
    hidden_slots: torch.Tensor | None = None
    #: M-RoPE (Qwen-VL): the model's own ids of the entering rows less the ones they take (``[3, 1, n]``,
    #: zero unless renumbered); the ids themselves are computed in every call, as the model does.
    mrope_shift: torch.Tensor | None = None
    #: Each entering row's visual token (-1: text): where Qwen3-VL's DeepStack features go (with
    #: ``packed``: its row among the tower's kept tokens).
    enter_visual: torch.Tensor | None = None
    #: A Qwen-VL schedule with stages inside the packed vision tower: what the tower runs.
    packed: "PackedTowerPlan | None" = None


@dataclass(frozen=True)
class VisionStep:
    """One vision stage on the current patch tokens of each of the image's C views (crops): ``keep``
    ``[C, K]`` (ascending indices among them) stay; with ``merged_into`` ``[C, N]`` (the column of
    ``keep`` holding each token, -1 if dropped) the kept tokens become the size-weighted means of the
    tokens they hold (ToMe's ``merge_wavg``), or the recorded ``features`` ``[C, K, d]`` where the
    recording replays them verbatim (a merge weighted otherwise)."""

    keep: torch.Tensor
    merged_into: torch.Tensor | None = None
    features: torch.Tensor | None = None


@dataclass(frozen=True)
class PackedStep:
    """One vision stage in Qwen-VL's packed tower (one image, one frame): after its block, the
    current sequence keeps the patches at ``keep`` (ascending places among the current ones), every
    later block attends within ``cu_seqlens`` (the kept patches of the frame) or, in a windowed
    block (Qwen2.5-VL), within ``cu_window_seqlens`` (each window's kept patches, empty windows gone)."""

    keep: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_window_seqlens: torch.Tensor | None


@dataclass(frozen=True)
class PackedTowerPlan:
    """Qwen-VL's packed tower on a schedule of drops: each pruning block's :class:`PackedStep`; the
    order that puts the merger's output (kept units in sequence order: Qwen2.5-VL's window order)
    back in row-major order; and, per DeepStack block (Qwen3-VL), which of the units present there
    are the ones kept at the end (same order)."""

    steps: dict[int, PackedStep]
    row_major: torch.Tensor
    deepstack_keep: dict[int, torch.Tensor]


def oracle_supported(recording: replay.Recording, sites: tuple[str, ...] = EVERY_SITE, packed_tower: bool = False) -> bool:
    """A hand-written oracle exists for schedules of stages at ``sites`` (the family's
    ``hand_oracle``) among vision, projector and LLM (drops, and merges whose members are known:
    ToMe's inside its blocks with proportional attention, Representation Shift's after a block) and
    for a mask stage alone (AIF's, in the LLM). In a ``packed_tower`` (Qwen-VL) the vision stages must
    be drops."""
    source = recording.source
    stages = source.stages()
    mask = source.mask_stage()
    if mask is not None:
        return not stages and mask.stage.site == "llm" and "llm" in sites
    if not stages or any(s.site not in sites for s in stages):
        return False
    for stage in stages:
        reduction = recording.reductions[stage.name]
        if stage.site == "vision" and reduction.features is not None and reduction.merged_into is None:
            return False  # replaced vectors whose members are not known: no sizes to carry
        if stage.site == "vision" and packed_tower and (reduction.features is not None or reduction.merged_into is not None):
            return False  # the packed tower's oracle drops units; it merges none
    return True


def oracle_plan(recording: replay.Recording, x: dict, model=None) -> OraclePlan:
    """The plan of ``recording``'s schedule on the batch-1 prompt ``x``. A Qwen-VL prompt (M-RoPE:
    ``image_grid_thw``) needs the ``model``, whose own 3-D position ids the kept rows start from, and
    so does a vision stage on an AnyRes prompt (``image_sizes``: its packing of the views)."""
    source = recording.source
    mode = source.config.positions
    ids = x["input_ids"][0]
    device = ids.device
    slots = torch.nonzero(ids == IMAGE_TOKEN).squeeze(-1)
    visual_of = torch.full(ids.shape, -1, dtype=torch.long, device=device)
    visual_of[slots] = torch.arange(len(slots), device=device)
    selection = recording.selection[0]
    rows = torch.arange(len(ids), device=device)
    mrope = "image_grid_thw" in x
    if mrope and model is None:
        raise ValueError("oracle_plan needs the model for an M-RoPE prompt (its own 3-D position ids)")
    model_ids = _rope_ids(model.model, x)[:, 0] if mrope else rows  # [3, L] or [L]
    positions = model_ids.clone()  # of the current rows, [..., n]
    enter, enter_positions = rows, positions
    replace_slots = replace_features = feature_slots = newline_slots = tower_kept = None
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    vision: dict[int, VisionStep] = {}
    patch_of = None  # [C, K]: each view's kept tokens in the tower, by their patch index in the view
    packed_stages: list[tuple[int, torch.Tensor]] = []  # Qwen-VL: (block, visual tokens kept after it)
    for stage in source.stages():
        kept = selection[stage.name].to(device)
        reduction = recording.reductions[stage.name]
        if stage.site in ("vision", "projector"):  # in front of the LLM: the text and the kept visual tokens enter it
            keep = ids != IMAGE_TOKEN
            keep[slots[kept]] = True
            rows = torch.nonzero(keep).squeeze(-1)
            positions = model_ids[..., rows]
            if renumbers(mode, stage.site):
                positions = _renumbered(positions, visual_of[rows] >= 0)
            enter, enter_positions = rows, positions
        if stage.site == "vision" and mrope:  # Qwen-VL's packed tower: the units kept after the block
            packed_stages.append((stage.layer, kept))
        elif stage.site == "vision":  # at block ``stage.layer``: each view's patches kept (or merged into), in order
            verbatim = reduction.features is not None and stage.name not in recording.recompute
            step = VisionStep(reduction.keep.to(device),
                              reduction.merged_into.to(device) if reduction.merged_into is not None else None,
                              reduction.features.to(device) if verbatim else None)
            vision[stage.layer] = step
            if patch_of is None:
                patch_of = torch.arange(_patches_per_view(model, x, len(slots)), device=device).expand(len(step.keep), -1)
            patch_of = patch_of.gather(1, step.keep)
            tower_kept = kept  # the last vision stage's visual tokens: what leaves the tower
        elif stage.site == "projector":
            if reduction.features is not None:  # merged vectors (VisionZip, pool, VFlowOpt's recycling), as recorded
                columns = reduction.keep[0] >= 0
                replace_slots = slots[reduction.keep[0][columns].to(device)]
                replace_features = reduction.features[0][columns]
        else:  # before LLM layer ``stage.layer``: the text rows and the kept visual rows stay
            vis = visual_of[rows]
            stay = torch.nonzero((vis < 0) | torch.isin(vis, kept)).squeeze(-1)
            rows = rows[stay]
            positions = positions[..., stay]
            if renumbers(mode, "llm"):
                positions = _renumbered(positions, visual_of[rows] >= 0)
            layers[stage.layer] = (stay, positions.unsqueeze(-2).clone())
    if patch_of is not None:
        feature_slots, newline_slots = _tower_slots(model, x, patch_of, slots, tower_kept)
    packed = None
    enter_visual = visual_of[enter]
    if packed_stages:
        packed = _packed_tower_plan(model, x, packed_stages)
        final = torch.sort(packed_stages[-1][1]).values
        feature_slots = slots[final]  # the merger's kept tokens, row-major: visual token = unit
        rank = torch.full((len(slots),), -1, dtype=torch.long, device=device)
        rank[final] = torch.arange(len(final), device=device)
        enter_visual = torch.where(enter_visual >= 0, rank[enter_visual.clamp(min=0)], -1)
    inside = source.inside_block()
    mask = source.mask_stage()
    mask_layer = hidden_slots = None
    if mask is not None:  # the visual tokens the mask stage hides from the text, by their slots
        visible = torch.zeros(len(slots), dtype=torch.bool, device=device)
        visible[selection[mask.stage.name].to(device)] = True
        mask_layer, hidden_slots = mask.stage.layer, slots[~visible]
    # M-RoPE: the entering rows' ids are the model's own (computed in every call, as the model does)
    # less this shift (zero unless renumbered).
    shift = (model_ids[..., enter] - enter_positions).unsqueeze(-2) if mrope else None
    return OraclePlan(enter, enter_positions.unsqueeze(-2), replace_slots, replace_features, layers, vision,
                      feature_slots, newline_slots, inside is not None,
                      inside is not None and inside.proportional_attention, mask_layer, hidden_slots, shift,
                      enter_visual, packed)


def _tower_module(tower):
    """The modeling module of a Qwen-VL tower: its own helpers (sequence lengths, rotary positions,
    windows) are called as its forward calls them."""
    return sys.modules[type(tower).__module__]


def _window_index(tower, grid: torch.Tensor):
    """Qwen2.5-VL's ``(window_index, cu_window_seqlens)`` of one image, as its forward computes them."""
    return _tower_module(tower).get_vision_window_index(
        grid, spatial_merge_size=tower.spatial_merge_size, window_size=tower.window_size, patch_size=tower.patch_size,
        kwargs={})


def _packed_tower_plan(model, x: dict, stages: list[tuple[int, torch.Tensor]]) -> PackedTowerPlan:
    """The plan of drops at ``stages`` (block, the visual tokens kept after it; a visual token is
    one merge unit, row-major) in the packed tower of a batch-1 Qwen-VL prompt. The units sit in the
    sequence in row-major order, or in Qwen2.5-VL's window order; each unit is ``merge**2``
    consecutive patches."""
    tower = model.model.visual
    unit = tower.spatial_merge_size ** 2
    grid = x["image_grid_thw"][:1]
    units = int(grid.prod()) // unit
    unit_at = torch.arange(units)  # the unit at each place of the sequence
    window_of = None  # the attention window of each place (Qwen2.5-VL)
    if hasattr(tower, "fullatt_block_indexes"):
        unit_at, cu_window = (t.cpu().long() for t in _window_index(tower, grid))
        bounds = torch.unique_consecutive(cu_window) // unit
        window_of = torch.searchsorted(bounds, torch.arange(units), right=True) - 1
    place_of = torch.argsort(unit_at)
    present = torch.arange(units)  # places of the current units, ascending
    after: list[tuple[int, torch.Tensor]] = []  # (block, places present after it), per stage
    steps = {}
    for layer, kept in sorted(stages, key=lambda s: s[0]):
        places = torch.sort(place_of[kept.cpu()]).values
        keep_units = torch.searchsorted(present, places)
        keep = (keep_units[:, None] * unit + torch.arange(unit)).reshape(-1)
        cu = torch.tensor([0, len(places) * unit], dtype=torch.int32)
        cu_window = None
        if window_of is not None:
            counts = torch.bincount(window_of[places], minlength=int(window_of.max()) + 1)
            cu_window = torch.cat([torch.zeros(1, dtype=torch.long), (counts[counts > 0] * unit).cumsum(0)]).int()
        steps[layer] = PackedStep(keep, cu, cu_window)
        present = places
        after.append((layer, places))
    final = present
    deepstack_keep = {}
    for layer in getattr(tower, "deepstack_visual_indexes", []):  # the tap reads the block's pruned output
        there = torch.arange(units)
        for stage_layer, places in after:
            if stage_layer <= layer:
                there = places
        deepstack_keep[layer] = torch.searchsorted(there, final)
    return PackedTowerPlan(steps, torch.argsort(unit_at[final]), deepstack_keep)


def _packed_tower_features(tower, pixel_values: torch.Tensor, grid: torch.Tensor, plan: PackedTowerPlan):
    """Qwen-VL's packed tower on one image as its forward runs it (patch embedding, Qwen3-VL's learned
    positions, rotary positions, Qwen2.5-VL's window order and windowed blocks), every block on the
    patches still there: after each pruning block only the kept patches go on, with their own rotary
    positions and the kept patches' segments. The merger's output ``[K, d]`` and Qwen3-VL's DeepStack
    features of the kept units (None elsewhere), row-major."""
    module = _tower_module(tower)
    position_ids = module.get_vision_position_ids(grid, tower.spatial_merge_size, kwargs={})
    cu_seqlens, max_seqlen = module.get_vision_attention_seqlens(grid, tower.config, kwargs={})
    hidden = tower.patch_embed(pixel_values)
    if hasattr(tower, "pos_embed"):  # Qwen3-VL: learned positions, interpolated to the grid
        index, weight = module.get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=tower.num_grid_per_side, mode=tower.interpolation_mode,
            align_corners=tower.interpolation_align_corners, spatial_merge_size=tower.config.spatial_merge_size, kwargs={})
        hidden = hidden + (tower.pos_embed(index) * weight[:, :, None]).sum(1).to(hidden.dtype)
    windowed = hasattr(tower, "fullatt_block_indexes")
    cu_window = None
    if windowed:
        window_index, cu_window = _window_index(tower, grid)
        hidden = tower.permute_input_for_window_attn(hidden, window_index, seq_len=hidden.shape[0])
    rotary = tower.rotary_pos_emb(hidden, position_ids)
    if windowed:
        rotary = tuple(tower.permute_input_for_window_attn(t, window_index, seq_len=hidden.shape[0]) for t in rotary)
    hidden = hidden.reshape(hidden.shape[0], -1)
    taps = getattr(tower, "deepstack_visual_indexes", [])
    deepstack = []
    for layer, block in enumerate(tower.blocks):
        whole = not windowed or layer in tower.fullatt_block_indexes
        segments = cu_seqlens if whole else cu_window
        longest = None if max_seqlen is None else int((segments[1:] - segments[:-1]).max())
        hidden = block(hidden, cu_seqlens=segments, max_seqlen=longest, position_embeddings=rotary)
        step = plan.steps.get(layer)
        if step is not None:
            hidden = hidden[step.keep]
            rotary = tuple(t[step.keep] for t in rotary)
            cu_seqlens, cu_window = step.cu_seqlens, step.cu_window_seqlens
        if layer in taps:
            merged = tower.deepstack_merger_list[taps.index(layer)](hidden)
            deepstack.append(merged[plan.deepstack_keep[layer]][plan.row_major])
    return tower.merger(hidden)[plan.row_major], (deepstack or None)


def _patches_per_view(model, x: dict, visual: int) -> int:
    """Patch tokens of one view in the tower: the image's visual tokens on LLaVA-1.5 (one view), a
    view's grid on the AnyRes families."""
    if "image_sizes" not in x:
        return visual
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def _tower_slots(model, x: dict, patch_of: torch.Tensor, slots: torch.Tensor, kept: torch.Tensor):
    """The sequence slot of each patch the tower keeps (``patch_of`` ``[C, K]``, in the order of its
    features) and the slots of the kept newline tokens (None without AnyRes), located by the model's
    own packing of the views run once on patch ids (LLaVA-NeXT / OneVision: unpadding, a newline per
    row; LLaVA-1.5: patch j is visual token j). ``kept``: the stage's visual tokens, which they must
    make up."""
    views, per_view = patch_of.shape[0], _patches_per_view(model, x, len(slots))
    source = torch.arange(per_view, device=slots.device)  # visual token of each (view, patch) id, -1: none
    newline = None
    if "image_sizes" in x:
        ids = [torch.arange(views * per_view, dtype=torch.float64).view(views, per_view, 1)]
        packed = pack_views(model, ids, x["image_sizes"][:1], torch.tensor([-1.0], dtype=torch.float64))[0].view(-1)
        if not torch.equal(packed, packed.round()):
            raise ValueError("the views' features are interpolated when packed: no patch has a token of its own")
        packed = packed.long().to(slots.device)
        source = torch.full((views * per_view,), -1, dtype=torch.long, device=slots.device)
        placed = packed >= 0
        source[packed[placed]] = torch.nonzero(placed).squeeze(-1)
        newline = torch.nonzero(~placed).squeeze(-1)
    visual = source[(torch.arange(views, device=slots.device)[:, None] * per_view + patch_of).reshape(-1)]
    newlines = newline[torch.isin(newline, kept)] if newline is not None else None
    expected = torch.sort(kept).values
    got = torch.sort(torch.cat([visual, newlines]) if newlines is not None else visual).values
    if not torch.equal(got, expected):
        raise ValueError("the tower's kept patches and newlines are not the stage's kept visual tokens")
    return slots[visual], (slots[newlines] if newlines is not None and len(newlines) else None)


def oracle_call(model, x: dict, plan: OraclePlan) -> torch.Tensor:
    """The unwrapped model's work for the schedule alone: encode, project, embed the text and the
    visual tokens (merged ones as recorded), then every LLM layer on the rows still kept, gathering
    before each pruning layer, with a KV cache; the first token's logits. On Qwen-VL the model's own
    3-D position ids are computed as its forward does, and Qwen3-VL's DeepStack features of the
    visual rows still there are added after its first layers."""
    core = model.model
    ids = x["input_ids"][0]
    embeds = core.get_input_embeddings()(ids[None])
    slots = torch.nonzero(ids == IMAGE_TOKEN).squeeze(-1)
    deepstack = None
    if plan.packed is not None:
        visual, deepstack = _packed_tower_features(core.visual, x["pixel_values"], x["image_grid_thw"][:1], plan.packed)
        slots = plan.feature_slots
    elif plan.vision:
        views = next(iter(plan.vision.values())).keep.shape[0]
        pixels = x["pixel_values"][0, :views] if x["pixel_values"].dim() == 5 else x["pixel_values"]
        visual = core.multi_modal_projector(_pruned_tower_features(core.vision_tower, pixels, plan, model.config))
        slots = plan.feature_slots
        if plan.newline_slots is not None:
            embeds[0, plan.newline_slots] = core.image_newline.to(embeds.dtype)
    else:
        visual, deepstack = _image_features(core, model.config, x)
    embeds[0, slots] = visual.reshape(-1, visual.shape[-1]).to(embeds.dtype)
    if plan.replace_slots is not None:
        embeds[0, plan.replace_slots] = plan.replace_features.to(embeds.dtype)
    lm = core.language_model
    hidden, positions = embeds[:, plan.enter], plan.positions
    if plan.mrope_shift is not None:
        positions = _rope_ids(core, x)[..., plan.enter] - plan.mrope_shift
    visual_rows = plan.enter_visual  # each current row's visual token (-1: text), for DeepStack
    cache = compat.new_dynamic_cache(lm.config)
    eager = getattr(lm.config, "_attn_implementation", "sdpa") == "eager"
    rotary = mask = None
    for index, layer in enumerate(lm.layers):
        if index in plan.layers:
            stay, positions = plan.layers[index]
            hidden, rotary, mask = hidden[:, stay], None, None
            if deepstack is not None:
                visual_rows = visual_rows[stay]
        if rotary is None:  # once per sequence length, as the model does once per forward
            rotary = lm.rotary_emb(hidden, positions)
            if eager:  # SDPA / FlashAttention are causal without a mask (one unpadded sample)
                mask = _causal(hidden)
        if index == plan.mask_layer:  # from here on no text query sees a hidden visual token
            mask = _causal(hidden)
            text = ids[plan.enter] != IMAGE_TOKEN
            mask[0, 0, text[:, None] & torch.isin(plan.enter, plan.hidden_slots)[None, :]] = torch.finfo(hidden.dtype).min
        hidden = layer(hidden, attention_mask=mask, position_ids=None if plan.mrope_shift is not None else positions,
                       use_cache=True, position_embeddings=rotary, **compat.cache_kwargs(cache))
        if deepstack is not None and index < len(deepstack):  # Qwen3-VL: after the first layers, as the model adds them
            there = visual_rows >= 0
            hidden[0, there] = hidden[0, there] + deepstack[index][visual_rows[there]].to(hidden.dtype)
    return model.lm_head(lm.norm(hidden[:, -1:]))


def _rope_ids(core, x: dict) -> torch.Tensor:
    """The model's own M-RoPE ids of the prompt, ``[3, 1, L]`` (``get_rope_index``, as its forward
    computes them before the LLM runs)."""
    return core.get_rope_index(x["input_ids"], mm_token_type_ids=x["mm_token_type_ids"],
                               image_grid_thw=x["image_grid_thw"], attention_mask=x.get("attention_mask"))[0]


def _renumbered(positions: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Consecutive ids for the rows of ``positions`` (``[n]``, or M-RoPE's ``[3, n]``) that a stage
    keeps: ``0 .. n-1``; under M-RoPE (vtoken's contiguous rule, ``SequenceLayout.renumbered``) an
    image's kept rows keep their (t, h, w) offsets from where its text left off, and a text row takes
    the largest id so far plus one (all three), never more than its own id less the shift before it."""
    if positions.dim() == 1:
        return torch.arange(len(positions), device=positions.device)
    new = positions.clone()
    change = torch.ones_like(visual)
    change[1:] = visual[1:] != visual[:-1]
    bounds = torch.nonzero(change).squeeze(-1).tolist() + [len(visual)]
    shift, largest = 0, None  # the old id less the new one of the last text row; the largest new id so far
    for start, end in zip(bounds, bounds[1:]):
        if bool(visual[start]):
            new[:, start:end] = positions[:, start:end] - shift
        else:
            own = int(positions[0, start]) - shift
            first = own if largest is None else min(largest + 1, own)
            new[:, start:end] = first + torch.arange(end - start, device=positions.device)
            shift = int(positions[0, end - 1]) - int(new[0, end - 1])
        largest = int(new[:, start:end].max()) if largest is None else max(largest, int(new[:, start:end].max()))
    return new


def _image_features(core, config, x: dict) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Every visual token of the prompt's image as the unwrapped model places them, ``[N, d]``:
    LLaVA-1.5's projected patches, LLaVA-NeXT's / OneVision's views packed by the model itself (crops
    unpadded, a newline per row, the base view first) with the feature layer and selection its config
    names, or Qwen-VL's merged patches; and Qwen3-VL's DeepStack features (one ``[N, d]`` per level;
    None on the other families)."""
    if "image_grid_thw" in x:  # Qwen-VL
        features = core.get_image_features(pixel_values=x["pixel_values"], image_grid_thw=x["image_grid_thw"])
        levels = getattr(features, "deepstack_features", None)
        deepstack = [torch.cat(list(level)) for level in levels] if levels else None
        return torch.cat(list(features.pooler_output)), deepstack
    options = {"vision_feature_layer": config.vision_feature_layer,
               "vision_feature_select_strategy": config.vision_feature_select_strategy}
    if "image_sizes" in x:
        options["image_sizes"] = x["image_sizes"]
    if getattr(config, "vision_aspect_ratio", None) is not None:  # OneVision's anyres_max_N
        options["vision_aspect_ratio"] = config.vision_aspect_ratio
    features = core.get_image_features(pixel_values=x["pixel_values"], **options)
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    return torch.cat(list(features) if isinstance(features, (tuple, list)) else [features]), None


def _causal(hidden: torch.Tensor) -> torch.Tensor:
    """``[1, 1, n, n]`` additive causal mask of ``hidden``'s ``n`` rows (the dtype's minimum above the
    diagonal)."""
    n = hidden.shape[1]
    return torch.full((n, n), torch.finfo(hidden.dtype).min, device=hidden.device).triu(1)[None, None]


def _pruned_tower_features(vision_tower, pixel_values: torch.Tensor, plan: OraclePlan, config) -> torch.Tensor:
    """The CLIP / SigLIP tower on the image's views as the model runs it, every block on the tokens
    still there: each pruning block's :class:`VisionStep` applied after it, or between its attention
    and its MLP (``inside_block``), with ``log(size)`` of each key added to the attention logits of
    every block from the first stage on (``proportional``). Its features are the patch tokens of the
    block the config's ``vision_feature_layer`` names (``-2`` on LLaVA-1.5 / NeXT, ``-1`` on
    OneVision), without CLIP's CLS token; the blocks after it, the final norm and SigLIP's pooling
    head run as the model runs them, though LLaVA reads none of them. ``[C, K, d]``."""
    tower = compat.clip_vision_tower(vision_tower)
    layer, select = config.vision_feature_layer, config.vision_feature_select_strategy
    hidden = tower.embeddings(pixel_values)
    cls = 1 if hasattr(tower.embeddings, "class_embedding") else 0
    if not isinstance(layer, int) or layer >= 0 or (cls and select != "default"):
        raise ValueError(f"the oracle reads one block counted from the end, without CLS (got {layer!r}, {select!r})")
    if hasattr(tower, "pre_layrnorm"):  # CLIP
        hidden = tower.pre_layrnorm(hidden)
    blocks = tower.encoder.layers
    read = len(blocks) + layer
    first = min(plan.vision)
    sizes = None  # [C, N] patches each token holds, None while every token holds one
    features = None
    for index, block in enumerate(blocks):
        step = plan.vision.get(index)
        if plan.inside_block and (index in plan.vision or (plan.proportional and index > first)):
            bias = None
            if plan.proportional and sizes is not None:  # 0 for CLS, log(size) for every patch
                bias = torch.cat([sizes.new_ones(len(sizes), cls), sizes], dim=1).log().to(hidden.dtype)[:, None, None, :]
            attended, _ = block.self_attn(hidden_states=block.layer_norm1(hidden), attention_mask=bias)
            hidden = hidden + attended
            if step is not None:
                hidden, sizes = _vision_step(hidden, sizes, step, cls)
            hidden = hidden + block.mlp(block.layer_norm2(hidden))
        else:
            hidden = block(hidden, None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            if step is not None:
                hidden, sizes = _vision_step(hidden, sizes, step, cls)
        if index == read:
            features = hidden[:, cls:]
    if cls:  # CLIP pools its CLS token
        tower.post_layernorm(hidden[:, 0])
    else:
        hidden = tower.post_layernorm(hidden)
        if getattr(tower, "use_head", False):  # SigLIP's attention-pooling head
            tower.head(hidden)
    return features


def _vision_step(hidden: torch.Tensor, sizes: torch.Tensor | None, step: VisionStep, cls: int):
    """``hidden`` ``[C, cls + N, d]`` (CLIP's CLS, then each view's patch tokens) after ``step``, and
    the kept tokens' sizes (None while every token holds one patch)."""
    patches = hidden[:, cls:]
    if step.merged_into is None:  # plain drop
        kept = patches.gather(1, step.keep[..., None].expand(-1, -1, patches.shape[-1]))
        sizes = sizes.gather(1, step.keep) if sizes is not None else None
    else:
        weight = sizes if sizes is not None else patches.new_ones(patches.shape[:2], dtype=torch.float32)
        means, sizes = replay.held_means(patches, weight, step.merged_into, step.keep.shape[1])
        kept = step.features if step.features is not None else means
    return torch.cat([hidden[:, :cls], kept.to(hidden.dtype)], dim=1), sizes
