"""VFlowOpt parity: vtoken's ``vflowopt`` against an independent reference written in this file from
the official code, on a random model with LLaVA-1.5-7B's shape (``tests/llava15_shape.py``: 576
visual tokens from a 24-layer CLIP tower, 32-layer LLM).

Official code followed: github ``sihany077/VFlowOpt`` at commit
``129eeefb97d057c3507836d79e7e7bafd0bc6076``:

- ``src/LLaVA-OneVision/llava/model/multimodal_encoder/siglip_encoder.py``:
  ``SigLipVisionEmbeddings.forward`` (patch gray-level entropy: channels weighted 0.3333 each,
  rounded, 256-bin histogram, ``-sum p log2(p + 1e-10)``) and ``SigLipEncoderLayer.forward`` (the
  map: head-averaged attention, ``received = A.mean(0)``, context set ``received > t *
  received.mean()``, ``rel = A[K].mean(0)``, ``+ alpha * softmax(entropy)``);
- ``src/LLaVA-OneVision/llava/model/language_model/llava_qwen_training_free.py``
  (``prepare_inputs_labels_for_multimodal``, the anyres branch's "token merging"): sort the map
  ascending, drop the lowest tokens, group the dropped ones by ``floor((row, col) / a)``, write
  ``sum(w_i x_i) / sum(w_i)`` (``w`` = importance) into the group's highest-importance token, which
  is kept; the surviving tokens keep their importance (``VIT_ATTN_MAP``);
- ``src/transformers-4.46.0/src/transformers/models/qwen2/modeling_qwen2.py``
  (``Qwen2Model.forward_illava``): before each of ``illava_llm_k``, drop the lowest-importance
  remaining visual tokens of the same map; ``position_ids[:, del_musk]`` (kept positions kept);
- ``src/lmms_eval-0.2.4/lmms_eval/models/llava_ov_opt_all.py`` (line 647): ``R3`` from the budget,
  ``(L R-bar - R1 L1 - R1 R2 L2) / L3 / (R1 R2)``; the default setting is the released 25%
  configuration of ``llava_onevision_training_free.py`` (``R1 = 0.2651``, ``R2 = 0.9833``,
  ``t = 34.76``, ``m = a = 15.58``, ``alpha = 0``; map from the last layer the LLM reads).

Departures that vtoken documents, which the reference follows in the main checks: the CLIP CLS token
is neither query nor key of the map (sliced off the layer's own softmax); pixels are de-normalised
to the 0..255 image the processor normalised (the official code casts normalised values to uint8);
the single 24 x 24 grid replaces LLaVA-OV's 27 x 27 base grid; the number of tokens dropped at stage
1 is chosen so the stage keeps exactly its budget (official: ``round(N (1 - R1)) + int(N / a^2)``
dropped, so about ``R1 N`` kept), i.e. the largest count kept by importance ``k`` with ``k +
(non-empty cells among the dropped) = n1``; in-LLM stages at ``L // 3`` and ``2 (L // 3)``; kept
tokens keep their original position ids at every stage (the paper's text; the official code, which
builds the LLM input from the surviving tokens, renumbers after stage 1). The two that change
results here, the stage-1 count and the stage-1 positions, are also checked against the official
behaviour by strict xfails at the end of the file. (The official gray level, ``round(0.3333 (R + G +
B))``, equals vtoken's rounded channel mean on integer-valued images.)

The random tower's attention is nearly uniform (the most attended token receives 1.007 x the mean),
so no token would pass ``t = 34.76`` and the map would be vtoken's empty-set fallback, which the
official code does not have (a mean over no rows: NaN). A shared query bias at the map layer gives
the tower attention sinks, as trained CLIP towers have, so the default ``t`` picks a real context
set. Images are integer-valued (as a processor produces), with per-patch noise of varied amplitude
so the entropies spread.

Checked, at the default schedule and another (``keep=1/9``, ``t=2``, ``a=5``, ``alpha=0.5``,
``relevance="sum"``, ``stage1=1.3``, ``r2=0.7``, ``llm_layers=[8, 16]``): kept indices per stage,
the recycled features entering the LLM, their position ids, last-token logits (each sample alone),
and each sample's selection and features in a left-padded batch of 2 equal to its run alone.
"""

import pytest
import torch

import vtoken
from llava15_shape import GRID, IMAGE_TOKEN, VISUAL_TOKENS, alone, llava15_inputs, llava15_shaped, one_thread

OFFICIAL_COMMIT = "129eeefb97d057c3507836d79e7e7bafd0bc6076"
MAP_LAYER = 22  # the second-to-last of 24: the layer whose output LLaVA-1.5 reads (vision_feature_layer=-2)
SINK = 32.0
PATCH = 14
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The released 25% configuration (llava_onevision_training_free.py) as the reference reads it.
DEFAULT = dict(keep=0.25, R1=0.2651026358526424, R2=0.9833433139039235, t=34.759552803070484,
               a=15.580797034937687, alpha=0.0, relevance="mean", llm_layers=None)
OTHER = dict(keep=1 / 9, stage1=1.3, R2=0.7, t=2.0, a=5.0, alpha=0.5, relevance="sum", llm_layers=[8, 16])
SCHEDULES = {
    "default": ({}, DEFAULT),
    "other": (dict(keep=1 / 9, stage1=1.3, r2=0.7, t=2.0, a=5.0, alpha=0.5, relevance="sum", llm_layers=[8, 16]),
              OTHER),
}


# --- the model and inputs ------------------------------------------------------------------------
def _model(attn: str):
    model = llava15_shaped(attn)
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(model.config.vision_config.hidden_size, generator=g)
    with torch.no_grad():
        model.model.vision_tower.encoder.layers[MAP_LAYER].self_attn.q_proj.bias.copy_(SINK * direction)
    return model


def _inputs(batch: int = 2) -> dict:
    x = llava15_inputs(batch)
    g = torch.Generator().manual_seed(7)
    up = lambda t: t.repeat_interleave(PATCH, -1).repeat_interleave(PATCH, -2)
    base = torch.randint(0, 256, (batch, 3, GRID, GRID), generator=g).float()
    amplitude = torch.tensor([0.0, 3.0, 20.0, 128.0])[torch.randint(0, 4, (batch, 1, GRID, GRID), generator=g)]
    image = (up(base) + torch.randn(batch, 3, GRID * PATCH, GRID * PATCH, generator=g) * up(amplitude))
    image = image.round().clamp(0, 255)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    x["pixel_values"] = ((image / 255.0 - mean) / std).float()
    return x


# --- the reference (from the official code) -------------------------------------------------------
def ref_patch_entropy(pixel_values: torch.Tensor) -> torch.Tensor:
    """SigLipVisionEmbeddings.forward on the 0..255 image behind ``pixel_values`` ``[1, 3, H, W]``:
    ``[patches]`` entropy in bits."""
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    image = ((pixel_values.float() * std + mean) * 255.0).round().clamp(0, 255)
    patches = image.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH).permute(0, 2, 3, 1, 4, 5)
    patches = patches.contiguous().view(-1, 3, PATCH, PATCH)
    weights = torch.tensor([0.3333, 0.3333, 0.3333]).view(1, 3, 1, 1)
    gray = (patches * weights).sum(dim=1).view(patches.shape[0], -1)
    levels = torch.round(gray).to(torch.long)
    hist = torch.zeros(levels.shape[0], 256).scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float32))
    prob = hist / hist.sum(dim=1, keepdim=True)
    return -torch.sum(prob * torch.log2(prob + 1e-10), dim=1)


def ref_importance(attention: torch.Tensor, entropy: torch.Tensor, t: float, alpha: float, relevance: str):
    """SigLipEncoderLayer.forward's map for one image: ``attention`` ``[H, 1 + P, 1 + P]`` (the
    layer's own softmax), CLS row and column removed."""
    a = attention.float().mean(0)[1:, 1:]
    received = a.mean(0)
    context = torch.nonzero(received > t * received.mean(), as_tuple=True)[0]
    assert context.numel() > 0  # the official code has no fallback; the test model must not need one
    rows = a[context, :]
    combined = rows.mean(0) if relevance == "mean" else rows.sum(0)
    return combined + alpha * torch.softmax(entropy.view(-1), dim=0), context.numel()


def ref_merge(features, importance, a, dropped_count, side=GRID):
    """The official "token merging" with ``dropped_count`` lowest tokens dropped: returns the kept
    indices (ascending), their features and their importance."""
    image_feature = features.clone()
    low_k = torch.sort(importance, dim=-1).indices[:dropped_count]
    to_keep_mask = torch.ones(importance.shape[0], dtype=torch.bool)
    to_keep_mask[low_k] = False
    points = torch.stack([low_k // side, low_k % side], dim=1)
    grid_coords = (points.float() / a).floor().long()
    _, inverse = torch.unique(grid_coords, dim=0, return_inverse=True)
    groups = [low_k[inverse == i] for i in range(int(inverse.max()) + 1)] if inverse.numel() else []
    for group_indices in groups:
        values_to_merge = image_feature[group_indices]
        weights = importance[group_indices].float()
        weights = weights / weights.sum()
        image_feature[group_indices[importance[group_indices].argmax()]] = (weights[:, None] * values_to_merge).sum(0)
        to_keep_mask[group_indices[importance[group_indices].argmax()]] = True
    keep = torch.nonzero(to_keep_mask).squeeze(-1)
    return keep, image_feature[keep], importance[keep]


def exact_dropped_count(importance, a, n1, side=GRID) -> int:
    """How many to drop so the official merging keeps exactly ``n1`` (the largest ``k`` kept by
    importance with ``k + non-empty cells among the dropped = n1``)."""
    n = importance.shape[0]
    order = torch.sort(importance).indices
    for k in range(n1, -1, -1):
        low = order[: n - k]
        cells = torch.unique(torch.stack([low // side, low % side], 1).div(a).floor().long(), dim=0).shape[0]
        if k + cells == n1:
            return n - k
    raise AssertionError("no exact count")


def ref_stage_counts(spec: dict, depth: int, n: int = VISUAL_TOKENS):
    """Eq. 5 / the optimiser's R3: ``[(site, count), ...]`` for the three stages."""
    layers = spec["llm_layers"] or [depth // 3, 2 * (depth // 3)]
    spans = [layers[0], layers[1] - layers[0], depth - layers[1]]
    r1 = spec["R1"] if "R1" in spec else spec["stage1"] * spec["keep"]
    r2 = spec["R2"]
    r3 = (depth * spec["keep"] - r1 * spans[0] - r1 * r2 * spans[1]) / spans[2] / (r1 * r2)
    assert 0.01 <= r3 <= 1.0  # no clamping needed
    return [("projector", round(r1 * n)), (f"llm:{layers[0]}", round(r1 * r2 * n)),
            (f"llm:{layers[1]}", round(r1 * r2 * r3 * n))]


def _causal(n: int) -> torch.Tensor:
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]


def ref_llm_last_logits(model, ids, visual_features, kept, later, renumber_first: bool = False):
    """The LLM run by hand (eager layers, explicit causal mask): the sequence holds the text and the
    stage-1 tokens ``kept`` (local indices, features ``visual_features``) at their ORIGINAL
    positions (``renumber_first``: at 0..n-1, as the official code's LLM input built from the
    surviving tokens); before layer ``l`` in ``later`` only the visual tokens in ``later[l]`` stay
    (``position_ids[:, del_musk]``). Returns the last position's logits."""
    lm = model.model.language_model
    visual = torch.nonzero(ids == IMAGE_TOKEN).squeeze(-1)
    local = torch.full(ids.shape, -1, dtype=torch.long)
    local[visual] = torch.arange(visual.numel())
    embeds = lm.embed_tokens(ids).clone()
    embeds[visual[kept]] = visual_features.to(embeds.dtype)
    present = (local < 0) | torch.isin(local, kept)
    index = torch.nonzero(present).squeeze(-1)
    h, loc = embeds[index][None], local[index]
    positions = torch.arange(index.numel()) if renumber_first else index
    for index, layer in enumerate(lm.layers):
        if index in later:
            stay = (loc < 0) | torch.isin(loc, later[index])
            h, positions, loc = h[:, stay], positions[stay], loc[stay]
        pos = positions[None]
        out = layer(h, attention_mask=_causal(h.shape[1]), position_ids=pos,
                    position_embeddings=lm.rotary_emb(h, pos))
        h = out[0] if isinstance(out, tuple) else out
    return model.lm_head(lm.norm(h))[0, -1]


def encode(model, x: dict):
    """The eager tower on one sample: the projected features LLaVA-1.5 reads (layer -2, CLS dropped)
    and the map layer's attention ``[H, 577, 577]``."""
    out = model.model.vision_tower(x["pixel_values"], output_attentions=True, output_hidden_states=True)
    return model.model.multi_modal_projector(out.hidden_states[-2][:, 1:])[0], out.attentions[MAP_LAYER][0]


def reference(model, x: dict, spec: dict, encoded=None):
    """Every stage of the reference for one sample alone: ``{"stages": {name: kept local indices},
    "features": [n1, d] recycled features (ascending), "logits": last-token logits, ...}``."""
    features, attention = encoded if encoded is not None else encode(model, x)
    entropy = ref_patch_entropy(x["pixel_values"])
    importance, context = ref_importance(attention, entropy, spec["t"], spec["alpha"], spec["relevance"])
    counts = ref_stage_counts(spec, len(model.model.language_model.layers))
    (_, n1), (llm2, n2), (llm3, n3) = counts
    dropped = exact_dropped_count(importance, spec["a"], n1)
    kept, merged, kept_importance = ref_merge(features, importance, spec["a"], dropped)
    # forward_illava: the lowest of the remaining map are dropped, stage by stage.
    order = torch.sort(kept_importance).indices
    stage2 = torch.sort(kept[order[n1 - n2 :]]).values
    remaining = kept_importance[torch.isin(kept, stage2)]
    stage3 = torch.sort(stage2[torch.sort(remaining).indices[n2 - n3 :]]).values
    later = {int(llm2.split(":")[1]): stage2, int(llm3.split(":")[1]): stage3}
    logits = ref_llm_last_logits(model, x["input_ids"][0], merged, kept, later)
    # The official code's own choices where vtoken departs (recorded by the strict xfails below):
    # its drop count, and its LLM input renumbered after stage 1.
    r1 = spec["R1"] if "R1" in spec else spec["stage1"] * spec["keep"]
    official_dropped = round(VISUAL_TOKENS * (1 - r1)) + int(VISUAL_TOKENS / spec["a"] ** 2)
    official_count_kept = ref_merge(features, importance, spec["a"], official_dropped)[0]
    official_positions_logits = ref_llm_last_logits(model, x["input_ids"][0], merged, kept, later, renumber_first=True)
    # The host of each cell is its best dropped token: the runner-up must be clearly below it.
    low = torch.sort(importance).indices[:dropped]
    cells = torch.unique(torch.stack([low // GRID, low % GRID], 1).div(spec["a"]).floor().long(), dim=0,
                         return_inverse=True)[1]
    host_margin = min((float((v[0] - v[1]) / v[0]) for v in (torch.sort(importance[low[cells == c]], descending=True)
                       .values for c in range(int(cells.max()) + 1)) if v.numel() > 1), default=1.0)
    return {"stages": {"projector": kept, llm2: stage2, llm3: stage3}, "features": merged, "logits": logits,
            "context": context, "dropped": dropped, "importance": importance, "raw": features,
            "sorted": torch.sort(importance, descending=True).values, "host_margin": host_margin,
            "official_count_kept": official_count_kept, "official_positions_logits": official_positions_logits}


def _run_vtoken(model, x: dict, options: dict):
    """Wrapped run: selection, and the LLM's layer-0 input (hidden states and position ids)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        seen["positions"] = kwargs["position_ids"].detach().clone()

    hook = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with vtoken.pruned(model, "vflowopt", **options):
            logits = model(**x).logits[:, -1]
            selection = vtoken.selection(model)
    finally:
        hook.remove()
    return {"selection": selection, "logits": logits, **seen}


def _visual_rows(run: dict, b: int, ids: torch.Tensor):
    """The layer-0 visual rows of sample ``b`` (hidden states and positions), in sequence order.
    ``ids`` is that sample's row of the batch as given (padded)."""
    first_visual = int(torch.nonzero(ids == IMAGE_TOKEN).min())
    pos = run["positions"][b] if run["positions"].shape[0] > 1 else run["positions"][0]
    # The visual positions occupy [first_visual, first_visual + 576) under the original numbering.
    is_visual = (pos >= first_visual) & (pos < first_visual + VISUAL_TOKENS)
    return run["hidden"][b, is_visual], pos[is_visual] - first_visual


# --- shared runs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return _model("sdpa"), _model("eager")


@pytest.fixture(scope="module")
def runs(models):
    model, eager = models
    x = _inputs(2)
    results = {}
    with torch.no_grad():
        encoded = [encode(eager, alone(x, b)) for b in range(2)]
        for name, (options, spec) in SCHEDULES.items():
            batch = _run_vtoken(model, x, options)
            singles = [_run_vtoken(model, alone(x, b), options) for b in range(2)]
            refs = [reference(eager, alone(x, b), spec, encoded[b]) for b in range(2)]
            results[name] = {"batch": batch, "alone": singles, "ref": refs, "x": x}
        # The hand-run LLM with every token kept, against the unwrapped model (sample 1 alone).
        one = alone(x, 1)
        results["unpruned"] = (model(**one).logits[0, -1], ref_llm_last_logits(
            eager, one["input_ids"][0], encoded[1][0], torch.arange(VISUAL_TOKENS), {}))
    return results


# --- the checks --------------------------------------------------------------------------------------
def test_reference_pipeline_without_pruning_reproduces_the_model(runs):
    """The hand-run LLM with every token kept equals the unwrapped model, so the reference's logits
    mean something."""
    expected, mine = runs["unpruned"]
    assert torch.allclose(mine, expected, atol=1e-4)


def _margin(importance, kept, among):
    """Relative gap between the least important kept token and the most important dropped one."""
    inside, outside = importance[kept], importance[among[~torch.isin(among, kept)]]
    return float((inside.min() - outside.max()) / inside.min().abs())


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_counts_follow_eq5_and_the_boundaries_are_unambiguous(runs, schedule):
    """Preconditions of the comparison: Eq. 5's counts, a real context set, and every cut the
    reference makes far above the float noise between two implementations of the map."""
    counts = ref_stage_counts(SCHEDULES[schedule][1], 32)
    for ref in runs[schedule]["ref"]:
        assert ref["context"] >= 1
        assert [len(ref["stages"][name]) for name, _ in counts] == [n for _, n in counts]
        importance, values = ref["importance"], ref["sorted"]
        k = VISUAL_TOKENS - ref["dropped"]  # kept by importance at stage 1
        assert float((values[k - 1] - values[k]) / values[k - 1]) > 1e-5
        assert ref["host_margin"] > 1e-5
        names = [name for name, _ in counts]
        for before, after in zip(names, names[1:]):
            assert _margin(importance, ref["stages"][after], ref["stages"][before]) > 1e-5


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_kept_indices_per_stage_equal_the_official_reference(runs, schedule):
    run = runs[schedule]
    for b, ref in enumerate(run["ref"]):
        mine = run["alone"][b]["selection"][0]
        assert sorted(mine) == sorted(ref["stages"])
        for name, kept in ref["stages"].items():
            assert torch.equal(torch.sort(mine[name].cpu()).values, kept), (schedule, b, name)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_recycled_features_and_positions_entering_the_llm_equal_the_reference(runs, schedule):
    run = runs[schedule]
    for b, ref in enumerate(run["ref"]):
        single = alone(run["x"], b)
        features, local = _visual_rows(run["alone"][b], 0, single["input_ids"][0])
        # Original position ids: each kept token sits at its place in the unpruned sequence.
        assert torch.equal(local, ref["stages"]["projector"])
        assert torch.allclose(features, ref["features"], atol=1e-5, rtol=1e-4)
        # Recycling really happened: some kept tokens are not the projector's output (4 cells at the
        # default, 25 at the other schedule).
        changed = (ref["features"] - ref["raw"][ref["stages"]["projector"]]).abs().amax(-1) > 1e-4
        assert int(changed.sum()) == len(ref["stages"]["projector"]) - (VISUAL_TOKENS - ref["dropped"]) > 0


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_last_token_logits_equal_the_reference(runs, schedule):
    run = runs[schedule]
    for b, ref in enumerate(run["ref"]):
        assert torch.allclose(run["alone"][b]["logits"][0], ref["logits"], atol=1e-4), (
            schedule, b, float((run["alone"][b]["logits"][0] - ref["logits"]).abs().max()))


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_each_sample_in_a_batch_of_two_is_pruned_as_alone(runs, schedule):
    run = runs[schedule]
    batch = run["batch"]
    for b in range(2):
        mine, single = batch["selection"][b], run["alone"][b]["selection"][0]
        assert sorted(mine) == sorted(single)
        for name in single:
            assert torch.equal(mine[name].cpu(), single[name].cpu()), (schedule, b, name)
        features, _ = _visual_rows(batch, b, run["x"]["input_ids"][b])
        alone_features, _ = _visual_rows(run["alone"][b], 0, alone(run["x"], b)["input_ids"][0])
        assert torch.allclose(features, alone_features, atol=1e-5)


# --- where vtoken departs from the official code (documented in its docstring) ---------------------
@pytest.mark.xfail(strict=True, reason=(
    "documented departure: vtoken keeps exactly the stage-1 budget n1 (153 of 576 at the default, 83 "
    "at the other schedule) by choosing how many to drop; the official code drops round(N (1 - R1)) + "
    "int(N / a^2) and keeps one recycled token per non-empty cell on top, 155 and 85 here (vtoken's "
    "tokens are a subset of those)"))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_stage1_keeps_what_the_official_drop_count_keeps(runs, schedule):
    for b, ref in enumerate(runs[schedule]["ref"]):
        mine = runs[schedule]["alone"][b]["selection"][0]["projector"].cpu()
        assert torch.equal(torch.sort(mine).values, ref["official_count_kept"])


@pytest.mark.xfail(strict=True, reason=(
    "documented departure: vtoken keeps every kept token's original position id at stage 1 too (the "
    "paper: position IDs of visual tokens remain unchanged); the official code builds the LLM input "
    "from the surviving tokens, so after stage 1 positions run 0..n-1 (it gathers them only at the "
    "in-LLM stages); last-token logits differ by 1.8e-3 to 2.3e-3 on this model"))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_logits_with_the_official_codes_stage1_renumbering(runs, schedule):
    for b, ref in enumerate(runs[schedule]["ref"]):
        assert torch.allclose(runs[schedule]["alone"][b]["logits"][0], ref["official_positions_logits"], atol=1e-4)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_the_official_position_policy_is_an_option(models, runs, schedule):
    """``positions="pre_llm"`` renumbers after stage 1 and keeps positions in the LLM, as the official
    code does: the logits then equal the reference run with the official positions."""
    model, _ = models
    options, _ = SCHEDULES[schedule]
    for b, ref in enumerate(runs[schedule]["ref"]):
        with torch.no_grad():
            mine = _run_vtoken(model, alone(runs[schedule]["x"], b), {**options, "positions": "pre_llm"})
        assert torch.allclose(mine["logits"][0], ref["official_positions_logits"], atol=1e-4), (
            schedule, b, float((mine["logits"][0] - ref["official_positions_logits"]).abs().max()))
