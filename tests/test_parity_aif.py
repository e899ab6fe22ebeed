"""AIF parity: vtoken's ``aif`` against an independent reference written in this file from the
paper's equations, on a random model with LLaVA-1.5-7B's shape (``tests/llava15_shape.py``: 576
visual tokens, 32-layer LLM).

There is no official code. The reference follows Liu, Choi, Zhang, Oh, "Aligning What Vision-Language
Models See and Perceive with Adaptive Information Flow" (CVPR 2026, arXiv 2604.15809) as quoted in
``shared/papers/transprune_vflowopt_aif.md`` §3.3 (the PDF itself was not available to the notes):

- Eq. 2, token dynamics: ``d^l_i = max_j a^l_{j,i}``, the largest attention a text query ``j`` pays
  to visual token ``i`` at LLM layer ``l`` (queries: the text after the image, vtoken's default
  reading, or the first generated token; heads reduced by max, or mean);
- Eq. 3, ``mu_i = (1/L) sum_l d^l_i``;
- Eq. 4, ``Ent_i = -sum_l p_l log p_l`` with ``p_l = d^l_i / (L mu_i)``; low entropy = relevant, so
  text keeps attending to the lowest-entropy tokens (Table 7: masking the low-entropy ones is worse);
- Eq. 5 (§4.3), the adaptive ratio: ``S_0`` the entropy of ``q_i = mu_i / sum mu``; for each
  ``r`` in {0.1, ..., 0.9} mask the ``floor(r N)`` highest-entropy tokens, ``S(r)`` the same entropy
  over the rest; ``r* = argmax_r |S(r) - S_0|``;
- the modulation (Fig. 2b/6): text queries get ``-inf`` on the masked visual keys, every layer from
  the first modulated one; visual rows and positions untouched.

The reference reads full eager attention maps of the unwrapped model (``output_attentions``) and
runs the modulated pass by hand (eager decoder layers given the explicit 4-D additive mask). Checked
at the default (``ratio`` by Eq. 5, heads max, text after the image, all layers) and at two others
(``keep_tokens=100, heads="mean", layer=3``; ``query="next"`` with ``ratios=[0.2, 0.4, 0.6, 0.8]``):
the statistics (Eqs. 2-4) on the 576 tokens, the ratio (Eq. 5), the kept set, last-token logits
(each sample alone), and each sample's selection in a left-padded batch of 2 equal to its run alone.

The random model's attention is nearly uniform, so every token's dynamics are flat and the
lowest-entropy cut would fall between values 1e-7 apart; the LLM's query weights are scaled by 40
(``SHARPEN``), which puts the cuts 5e-5 or more apart (float noise between the two implementations is
about 1e-6). Its means ``mu`` stay fairly even, so ``|S(r) - S_0|`` grows with ``r`` and Eq. 5 picks
the largest candidate (0.9; 0.8 among the "next" schedule's candidates). A second check therefore
runs Eqs. 3-5 and the rule on synthetic 576 x 32 dynamics built so that ``r*`` is 0.1, 0.2 or 0.9.
"""

import math

import pytest
import torch

import vtoken
import vtoken.strategies.aif as aif
from vtoken import compat  # only for the KV-cache keyword, renamed in transformers 5.24
from llava15_shape import IMAGE_TOKEN, VISUAL_TOKENS, alone, llava15_inputs, llava15_shaped, one_thread

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SCHEDULES = {
    "default": ({}, dict(query="instruction", heads="max", layer=0, ratios=RATIOS, keep_tokens=None)),
    "budget": (dict(keep_tokens=100, heads="mean", layer=3),
               dict(query="instruction", heads="mean", layer=3, ratios=RATIOS, keep_tokens=100)),
    "next": (dict(query="next", ratios=[0.2, 0.4, 0.6, 0.8]),
             dict(query="next", heads="max", layer=0, ratios=(0.2, 0.4, 0.6, 0.8), keep_tokens=None)),
}


SHARPEN = 40.0  # LLM query weights scaled: the random model's attention is otherwise nearly uniform


def _model(attn: str):
    """``llava15_shaped`` with every LLM layer's query projection scaled by ``SHARPEN``: at the random
    init, every visual token's dynamics are flat (entropies within 3e-4 of log 32, neighbours 1e-7
    apart, below float noise), so the kept set would be decided by rounding; sharpened, the cuts
    lie 5e-5 or more apart."""
    model = llava15_shaped(attn)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(SHARPEN)
    return model


# --- the reference (paper Eqs. 2-5) ---------------------------------------------------------------
def ref_dynamics(attentions, ids, rows, heads: str) -> torch.Tensor:
    """Eq. 2 for one sample: ``[N, L]``, from the eager maps ``attentions`` (L x ``[1, H, Q, S]``)."""
    visual = torch.nonzero(ids == IMAGE_TOKEN).squeeze(-1)
    per_layer = []
    for a in attentions:
        block = a[0][:, rows][:, :, visual].double()  # [H, Q, N]
        block = block.amax(0) if heads == "max" else block.mean(0)
        per_layer.append(block.amax(0))
    return torch.stack(per_layer, dim=-1)


def ref_mean_and_entropy(d: torch.Tensor):
    """Eqs. 3-4 (natural log; ``0 log 0 = 0``)."""
    layers = d.shape[-1]
    mu = d.sum(-1) / layers
    p = d / (layers * mu[..., None])
    logs = torch.where(p > 0, torch.log(torch.where(p > 0, p, 1.0)), 0.0)
    return mu, -(p * logs).sum(-1)


def _shannon(mass: torch.Tensor) -> torch.Tensor:
    q = mass / mass.sum()
    q = q[q > 0]
    return -(q * torch.log(q)).sum()


def ref_ratio(mu: torch.Tensor, entropy: torch.Tensor, ratios):
    """Eq. 5: ``(r*, masked count, [|S(r) - S_0|])`` for one image."""
    n = mu.shape[0]
    s0 = _shannon(mu)
    by_entropy = sorted(range(n), key=lambda i: -float(entropy[i]))  # highest first
    gaps = []
    for r in ratios:
        m = math.floor(r * n)
        rest = torch.ones(n, dtype=torch.bool)
        rest[by_entropy[:m]] = False
        gaps.append(abs(float(_shannon(mu[rest]) - s0)))
    best = max(range(len(ratios)), key=lambda i: (gaps[i], -i))
    return ratios[best], math.floor(ratios[best] * n), gaps


def ref_kept(entropy: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` lowest-entropy tokens (those text keeps attending to), ascending."""
    return torch.sort(torch.sort(entropy).indices[:count]).values


def ref_image_features(model, x: dict) -> torch.Tensor:
    """LLaVA-1.5's visual tokens: the projected penultimate-layer patch features (CLS dropped)."""
    tower = model.model.vision_tower(x["pixel_values"], output_hidden_states=True)
    return model.model.multi_modal_projector(tower.hidden_states[-2][:, 1:])[0]


def ref_modulated_last_logits(model, x: dict, kept, first_layer: int, features=None):
    """The modulated pass by hand (eager layers, explicit 4-D additive masks): causal everywhere;
    from ``first_layer`` on, no text query attends to a visual token outside ``kept``."""
    lm = model.model.language_model
    ids = x["input_ids"][0]
    n = ids.shape[0]
    visual = torch.nonzero(ids == IMAGE_TOKEN).squeeze(-1)
    masked = torch.zeros(n, dtype=torch.bool)
    masked[visual] = True
    masked[visual[kept]] = False
    text = ids != IMAGE_TOKEN
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    modulated = causal & ~(text[:, None] & masked[None, :])
    additive = lambda allowed: torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
    features = ref_image_features(model, x) if features is None else features
    h = lm.embed_tokens(ids[None]).clone()
    h[0, visual] = features.to(h.dtype)
    pos = torch.arange(n)[None]
    pe = lm.rotary_emb(h, pos)
    for index, layer in enumerate(lm.layers):
        mask = additive(modulated if index >= first_layer else causal)
        out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        h = out[0] if isinstance(out, tuple) else out
    return model.lm_head(lm.norm(h))[0, -1]


def reference(eager, x: dict, spec: dict, probes: dict, with_logits: bool = True):
    """One sample alone: the statistics, ratio, kept set and (``with_logits``) modulated logits."""
    ids = x["input_ids"][0]
    if not probes:
        # The unmasked prefill (instruction rows), then one greedy decoding step over its KV cache
        # (the first generated token's row: the "next" query).
        out = eager(**x, output_attentions=True, use_cache=True)
        rows = torch.arange(int(torch.nonzero(ids == IMAGE_TOKEN).max()) + 1, ids.shape[0])
        probes["instruction"] = {heads: ref_dynamics(out.attentions, ids, rows, heads) for heads in ("max", "mean")}
        probes["logits"], probes["features"] = out.logits[0, -1], ref_image_features(eager, x)
        first = out.logits[0, -1].argmax().view(1, 1)
        step = eager(input_ids=first, attention_mask=torch.ones(1, ids.shape[0] + 1, dtype=torch.long),
                     output_attentions=True, use_cache=True, **compat.cache_kwargs(compat.output_cache(out)))
        rows = torch.tensor([0])  # the step's only query row; its keys are the prompt's, then itself
        probes["next"] = {heads: ref_dynamics(step.attentions, torch.cat([ids, first[0]]), rows, heads)
                          for heads in ("max", "mean")}
    key = spec["query"]
    d = probes[key][spec["heads"]]
    mu, entropy = ref_mean_and_entropy(d)
    if spec["keep_tokens"] is None:
        ratio, masked, gaps = ref_ratio(mu, entropy, spec["ratios"])
        count = VISUAL_TOKENS - masked
    else:
        ratio, gaps, count = None, None, spec["keep_tokens"]
    kept = ref_kept(entropy, count)
    logits = ref_modulated_last_logits(eager, x, kept, spec["layer"], probes["features"]) if with_logits else None
    ordered = torch.sort(entropy).values
    return {"dynamics": d, "mean": mu, "entropy": entropy, "ratio": ratio, "gaps": gaps, "count": count,
            "kept": kept, "logits": logits, "boundary": float(ordered[count] - ordered[count - 1])}


def _statistics(model) -> dict:
    """The statistics the strategy reported for the last prefill's mask stage (dynamics, mean,
    entropy, ratio, kept)."""
    return vtoken.diagnostics(model)[vtoken.strategy_of(model).mask_stage().stage.name]


def _run_vtoken(model, x: dict, options: dict):
    with vtoken.pruned(model, "aif", **options):
        logits = model(**x).logits[:, -1]
        selection = vtoken.selection(model)
        last = {k: v.detach().clone() for k, v in _statistics(model).items()}
    return {"selection": selection, "logits": logits, "last": last}


# --- shared runs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def runs():
    model, eager = _model("sdpa"), _model("eager")
    x = llava15_inputs(2)
    probes = [{}, {}]
    results = {}
    with torch.no_grad():
        for name, (options, spec) in SCHEDULES.items():
            batch = _run_vtoken(model, x, options)
            singles = [_run_vtoken(model, alone(x, b), options) for b in range(2)]
            # Logits of both samples at the default, of sample 0 at the others (time).
            refs = [reference(eager, alone(x, b), spec, probes[b], with_logits=name == "default" or b == 0)
                    for b in range(2)]
            results[name] = {"batch": batch, "alone": singles, "ref": refs}
        # The hand-run pass with nothing masked equals the unwrapped model (sample 0 alone).
        results["unmasked"] = (probes[0]["logits"], ref_modulated_last_logits(
            eager, alone(x, 0), torch.arange(VISUAL_TOKENS), 0, probes[0]["features"]))
    return results


# --- the checks --------------------------------------------------------------------------------------
def test_reference_pass_without_masking_reproduces_the_model(runs):
    expected, mine = runs["unmasked"]
    assert torch.allclose(mine, expected, atol=1e-4)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_statistics_on_576_tokens_equal_eqs_2_to_4(runs, schedule):
    run = runs[schedule]
    for b, ref in enumerate(run["ref"]):
        last = run["alone"][b]["last"]
        assert last["dynamics"].shape == (1, VISUAL_TOKENS, 32)
        assert torch.allclose(last["dynamics"][0].double(), ref["dynamics"], atol=1e-6, rtol=1e-4)
        assert torch.allclose(last["mean"][0].double(), ref["mean"], atol=1e-7, rtol=1e-4)
        assert torch.allclose(last["entropy"][0].double(), ref["entropy"], atol=1e-5)
        # The kept count's cut lies well above the float noise between the two implementations.
        assert ref["boundary"] > 1e-5


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_ratio_and_kept_tokens_equal_the_reference(runs, schedule):
    """Eq. 5's ratio (or the budget) and the lowest-entropy rule, per sample alone."""
    run = runs[schedule]
    for b, ref in enumerate(run["ref"]):
        kept = run["alone"][b]["selection"][0]
        layer = SCHEDULES[schedule][1]["layer"]
        assert list(kept) == [f"llm:{layer}"]
        assert torch.equal(torch.sort(kept[f"llm:{layer}"].cpu()).values, ref["kept"]), (schedule, b)
        last = run["alone"][b]["last"]
        assert int(last["kept"][0]) == ref["count"]
        if ref["ratio"] is not None:
            assert float(last["ratio"][0]) == pytest.approx(ref["ratio"])
            ordered = sorted(ref["gaps"], reverse=True)
            assert ordered[0] - ordered[1] > 1e-4  # the argmax is not a float tie


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_last_token_logits_equal_the_modulated_reference(runs, schedule):
    run = runs[schedule]
    for b, ref in enumerate(run["ref"]):
        if ref["logits"] is None:
            continue
        mine = run["alone"][b]["logits"][0]
        assert torch.allclose(mine, ref["logits"], atol=1e-4), (schedule, b, float((mine - ref["logits"]).abs().max()))


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_each_sample_in_a_batch_of_two_is_selected_as_alone(runs, schedule):
    run = runs[schedule]
    for b in range(2):
        mine, single = run["batch"]["selection"][b], run["alone"][b]["selection"][0]
        assert sorted(mine) == sorted(single)
        for name in single:
            assert torch.equal(mine[name].cpu(), single[name].cpu()), (schedule, b, name)


def test_the_samples_differ_so_the_checks_are_not_vacuous(runs):
    """The adaptive counts are Eq. 5's per sample, and the default keeps a strict subset."""
    refs = runs["default"]["ref"]
    assert all(0 < ref["count"] < VISUAL_TOKENS for ref in refs)
    assert not torch.equal(refs[0]["kept"], refs[1]["kept"][: len(refs[0]["kept"])])


def _synthetic_dynamics(seed: int, heavy_share: float, weight: float) -> torch.Tensor:
    """``[576, 32]`` dynamics: "light" tokens active in a random number of layers (entropies spread,
    means equal within 10%), and a share of "heavy" ones attended ``weight`` times more, evenly in
    every layer (the highest entropy: Eq. 5 masks them first), so that ``r*`` lands inside the range."""
    n, layers = VISUAL_TOKENS, 32
    g = torch.Generator().manual_seed(seed)
    heavy = torch.randperm(n, generator=g)[: int(heavy_share * n)]
    share = torch.randint(1, layers, (n, 1), generator=g)
    active = torch.rand(n, layers, generator=g).argsort(-1) < share
    d = active * (0.5 + torch.rand(n, layers, generator=g))
    d = d / d.sum(-1, keepdim=True) * (1 + 0.1 * torch.rand(n, 1, generator=g))
    d[heavy] = weight * (1 + 0.01 * torch.rand(len(heavy), layers, generator=g)) / layers
    return d


@pytest.mark.parametrize("seed,heavy_share,weight,expected", [
    (0, 0.1, 100.0, 0.1), (5, 0.12, 40.0, 0.2), (1, 0.2, 60.0, 0.2), (2, 0.15, 30.0, 0.9), (3, 0.0, 1.0, 0.9)])
def test_entropy_and_adaptive_ratio_on_synthetic_576_token_dynamics(seed, heavy_share, weight, expected):
    """Eqs. 3-5 and the keep-lowest-entropy rule on 576 x 32 synthetic dynamics, through vtoken's
    functions, against the reference (``expected`` is the reference's ``r*``, listed so the cases
    visibly cover small and large ratios)."""
    n = VISUAL_TOKENS
    d = _synthetic_dynamics(seed, heavy_share, weight)
    mu, entropy = ref_mean_and_entropy(d.double())
    assert torch.allclose(aif.dynamics_mean(d).double(), mu, rtol=1e-5)
    assert torch.allclose(aif.dynamics_entropy(d).double(), entropy, atol=1e-5)
    ratio, masked, gaps = ref_ratio(mu, entropy, RATIOS)
    assert ratio == expected
    ordered = sorted(gaps, reverse=True)
    assert ordered[0] - ordered[1] > 1e-2
    valid = torch.ones(1, n, dtype=torch.bool)
    got_ratio, got_masked = aif.adaptive_mask_ratio(mu.float()[None], entropy.float()[None], valid)
    assert float(got_ratio[0]) == pytest.approx(ratio) and int(got_masked[0]) == masked
    # The tokens text keeps seeing are the lowest-entropy ones (the rule, through vtoken's top-k).
    keep = aif.masked_topk(-entropy.float()[None], valid, torch.tensor([n - masked]))
    assert torch.equal(keep[0][keep[0] >= 0], ref_kept(entropy, n - masked))
