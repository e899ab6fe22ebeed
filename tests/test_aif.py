"""AIF (adaptive information flow): its formulas on hand-made tensors, its statistics against eager
attention maps, and its attention modulation against the unwrapped model run with the explicit
modulated 4-D additive mask (logits, and greedy decoding recomputed without a KV cache), in both
modes, on left-padded batches of LLaVA and LLaVA-NeXT."""

import dataclasses
import math

import pytest
import torch

from vtoken import compat

import vtoken
from vtoken.config import PruneConfig
from vtoken.registry import register
from vtoken.strategies.base import MaskStage, Strategy
from vtoken.strategies.aif import (
    adaptive_mask_ratio,
    distribution_entropy,
    dynamics_entropy,
    dynamics_mean,
    token_dynamics,
)
from tiny import IMAGE_TOKEN, greedy_without_cache, tiny_llava
from families import FAMILIES

MODELS = {name: (family.make, family.inputs) for name, family in FAMILIES.items()}


def _build(name, attn="sdpa"):
    make, inputs = MODELS[name]
    model = make(attn)
    return model, inputs(model)


# --- formulas ------------------------------------------------------------------------------------
def test_entropy_of_constant_dynamics_is_log_layers_and_of_one_layer_is_zero():
    layers = 7
    constant = torch.full((layers,), 0.3)
    one_layer = torch.zeros(layers)
    one_layer[4] = 0.9
    never = torch.zeros(layers)
    two_layers = torch.tensor([0.2, 0.2, 0, 0, 0, 0, 0])
    entropy = dynamics_entropy(torch.stack([constant, one_layer, never, two_layers]))
    assert torch.allclose(entropy, torch.tensor([math.log(layers), 0.0, math.log(layers), math.log(2)]), atol=1e-6)
    assert torch.allclose(dynamics_mean(torch.stack([constant, one_layer])), torch.tensor([0.3, 0.9 / layers]))


def test_token_dynamics_is_the_max_over_valid_rows_of_the_head_reduced_attention():
    probs = torch.zeros(1, 2, 3, 4)  # [B, H, Q, L]
    probs[0, 0, 0] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    probs[0, 1, 0] = torch.tensor([0.5, 0.0, 0.1, 0.4])
    probs[0, 0, 1] = torch.tensor([0.0, 0.6, 0.2, 0.2])
    probs[0, 1, 1] = torch.tensor([0.0, 0.2, 0.2, 0.6])
    probs[0, :, 2] = 1.0  # an absent row: must not count
    valid = torch.tensor([[True, True, False]])
    assert torch.allclose(token_dynamics(probs, valid, "max"), torch.tensor([[0.5, 0.6, 0.3, 0.6]]))
    assert torch.allclose(token_dynamics(probs, valid, "mean"), torch.tensor([[0.3, 0.4, 0.2, 0.4]]))


def test_distribution_entropy_counts_only_valid_entries():
    mass = torch.tensor([[1.0, 1.0, 1.0, 5.0], [2.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert torch.allclose(distribution_entropy(mass, valid), torch.tensor([math.log(3), 0.0]), atol=1e-6)


def test_adaptive_ratio_on_a_hand_made_example():
    # Ten tokens, entropy falling with the index (token 0 is masked first). Tokens 0 and 1 carry
    # almost all the mean attention: S_0 = 0.725 (about log 2). Masking one of them leaves one
    # dominant token, S(0.1) = 0.063; masking both leaves eight equal ones, S(0.2) = log 8 = 2.079;
    # then S(r) = log(10 - 10 r) falls to 0 at r = 0.9. |S(r) - S_0| peaks at r = 0.2 (1.355;
    # 1.221 at r = 0.3, 0.725 at r = 0.9).
    mean = torch.tensor([[1000.0, 1000, 1, 1, 1, 1, 1, 1, 1, 1]])
    entropy = torch.linspace(2.0, 1.0, 10)[None]
    valid = torch.ones(1, 10, dtype=torch.bool)
    ratio, masked = adaptive_mask_ratio(mean, entropy, valid)
    assert ratio.tolist() == [pytest.approx(0.2)] and masked.tolist() == [2]
    s0 = distribution_entropy(mean, valid)
    assert s0.item() == pytest.approx(0.725, abs=1e-3)
    # Every other ratio is further from the peak (brute force of Eq. 5).
    gaps = []
    for m in range(1, 10):
        rest = valid.clone()
        rest[0, :m] = False
        gaps.append(abs(distribution_entropy(mean, rest).item() - s0.item()))
    assert max(range(9), key=lambda i: gaps[i]) == 1


def test_adaptive_ratio_padding_ties_and_unattended_rows():
    mean = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    entropy = torch.tensor([[1.0, 1.0, 1.0, 1.0, 9.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    valid = torch.tensor([[True, True, True, True, False], [True, True, True, True, True]])
    ratio, masked = adaptive_mask_ratio(mean, entropy, valid, ratios=(0.25, 0.5, 0.75))
    # Row 0: four equal tokens (the padded one never counts): S(r) = log(4 - m), the largest gap at
    # the largest ratio. Row 1: no text attends to it, so nothing is masked.
    assert ratio.tolist() == [0.75, 0.0] and masked.tolist() == [3, 0]


# --- statistics against eager attention --------------------------------------------------------
def _eager_dynamics(model, x, rows_of, heads="max"):
    """Eq. 2 per sample from the unwrapped eager model's full attention maps: ``[B, N, layers]``."""
    with torch.no_grad():
        attentions = model(**x, output_attentions=True).attentions
    out = []
    for b in range(x["input_ids"].shape[0]):
        visual = torch.nonzero(x["input_ids"][b] == IMAGE_TOKEN).squeeze(-1)
        rows = rows_of(b, visual)
        per_layer = []
        for a in attentions:
            picked = a[b][:, rows][:, :, visual]  # [H, Q, N]
            per_head = picked.amax(0) if heads == "max" else picked.mean(0)
            per_layer.append(per_head.amax(0))
        out.append(torch.stack(per_layer, dim=-1))
    return out


@pytest.mark.parametrize("name,heads", [("llava", "max"), ("next", "max"), ("llava", "mean")])
def test_instruction_statistics_equal_the_eager_attention_maps(name, heads):
    model, x = _build(name)
    eager, _ = _build(name, "eager")
    length = x["input_ids"].shape[1]
    expected = _eager_dynamics(eager, x, lambda b, visual: torch.arange(int(visual[-1]) + 1, length), heads)
    with vtoken.pruned(model, "aif", keep=0.5, heads=heads):
        with torch.no_grad():
            model(**x)
        last = vtoken.diagnostics(model)[vtoken.strategy_of(model).mask_stage().stage.name]
    assert last["dynamics"].shape[-1] == len(model.model.language_model.layers)
    for b, e in enumerate(expected):
        n = e.shape[0]
        assert torch.allclose(last["dynamics"][b, :n], e, atol=1e-6)
        assert torch.allclose(last["entropy"][b, :n], dynamics_entropy(e), atol=1e-5)


@pytest.mark.parametrize("name", ["llava", "qwen2"])
def test_observed_attention_takes_its_query_rows_from_the_layers_own_projection(name):
    """Each observed layer's instruction rows are sliced from the query projection the layer has just
    made of every slot (kept as it runs), not normalised and projected again: in a prefill every
    layer's q_proj runs exactly as often as its k_proj (the keys come from the KV cache), where the
    scoring's second projection made it run once more per layer. The rows are still the eager map's
    (the test above)."""
    model, x = _build(name)
    calls = {}

    def count(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
        return hook

    handles = [getattr(layer.self_attn, proj).register_forward_hook(count((i, proj)))
               for i, layer in enumerate(model.model.language_model.layers) for proj in ("q_proj", "k_proj")]
    try:
        with vtoken.pruned(model, "aif", keep=0.5), torch.no_grad():
            model(**x)
    finally:
        for handle in handles:
            handle.remove()
    layers = len(model.model.language_model.layers)
    assert all(calls[(i, "q_proj")] == calls[(i, "k_proj")] >= 1 for i in range(layers)), calls


def test_next_token_statistics_equal_the_eager_attention_of_the_first_generated_token():
    model, x = _build("llava")
    eager, _ = _build("llava", "eager")
    with torch.no_grad():
        first = eager(**x).logits[:, -1].argmax(-1)
    longer = dict(x, input_ids=torch.cat([x["input_ids"], first[:, None]], 1),
                  attention_mask=torch.cat([x["attention_mask"], torch.ones_like(first[:, None])], 1))
    length = longer["input_ids"].shape[1]
    expected = _eager_dynamics(eager, longer, lambda b, visual: torch.tensor([length - 1]))
    with vtoken.pruned(model, "aif", keep=0.5, query="next"):
        with torch.no_grad():
            model(**x)
        last = vtoken.diagnostics(model)[vtoken.strategy_of(model).mask_stage().stage.name]
    for b, e in enumerate(expected):
        assert torch.allclose(last["dynamics"][b], e, atol=1e-6)


# --- the modulated mask, by hand -----------------------------------------------------------------
def _masked_positions(ids, selection, stage):
    """``[B, L]`` True at the prompt's visual tokens that text may not attend to."""
    masked = torch.zeros(ids.shape, dtype=torch.bool)
    for b in range(ids.shape[0]):
        visual = torch.nonzero(ids[b] == IMAGE_TOKEN).squeeze(-1)
        hidden = torch.ones(len(visual), dtype=torch.bool)
        hidden[selection[b][stage]] = False
        masked[b, visual[hidden]] = True
    return masked


def _additive(allowed, dtype):
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]


def _reference_forward(model, x, masked, first_layer=0):
    """The unwrapped model with explicit 4-D additive masks: causal and padding everywhere; from
    LLM layer ``first_layer`` on, no text query attends to a ``masked`` key."""
    ids, pad = x["input_ids"], x["attention_mask"].bool()
    length = ids.shape[1]
    masked = torch.cat([masked, torch.zeros(ids.shape[0], length - masked.shape[1], dtype=torch.bool)], 1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None] & pad[:, None, :]
    text = ids != IMAGE_TOKEN
    modulated = causal & ~(text[:, :, None] & masked[:, None, :])
    dtype = model.dtype
    plain_mask, modulated_mask = _additive(causal, dtype), _additive(modulated, dtype)
    layers = model.model.language_model.layers
    hooks = []
    for index in range(first_layer):
        def swap(module, args, kwargs):
            kwargs["attention_mask"] = plain_mask
            return args, kwargs
        hooks.append(layers[index].register_forward_pre_hook(swap, with_kwargs=True))
    try:
        extra = {k: v for k, v in x.items() if k not in ("input_ids", "attention_mask")}
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=modulated_mask, use_cache=False, **extra).logits
    finally:
        for h in hooks:
            h.remove()


def _reference_greedy(model, x, masked, steps, first_layer=0):
    """Greedy decoding recomputed from scratch every step with the modulated mask (generated tokens
    are text), the image token suppressed and finished samples padded, as generate() does."""
    config = model.generation_config
    ids, pad = x["input_ids"], x["attention_mask"]
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    step_logits = []
    for _ in range(steps):
        logits = _reference_forward(model, dict(x, input_ids=ids, attention_mask=pad), masked, first_layer)[:, -1]
        step_logits.append(logits.clone())
        logits[:, IMAGE_TOKEN] = float("-inf")
        token = torch.where(finished, config.pad_token_id, logits.argmax(-1))
        finished |= token == config.eos_token_id
        ids = torch.cat([ids, token[:, None]], 1)
        pad = torch.cat([pad, torch.ones_like(pad[:, :1])], 1)
    return ids, step_logits


@pytest.mark.parametrize("name,layer", [("llava", 0), ("next", 0), ("llava", 2)])
def test_modulated_logits_equal_the_explicit_mask_on_the_unwrapped_model(name, layer):
    model, x = _build(name)
    eager, _ = _build(name, "eager")
    with vtoken.pruned(model, "aif", keep=0.3, layer=layer):
        with torch.no_grad():
            out = model(**x, output_hidden_states=True)
        selection = vtoken.selection(model)
    masked = _masked_positions(x["input_ids"], selection, f"llm:{layer}")
    reference = _reference_forward(eager, x, masked, layer)
    valid = x["attention_mask"].bool()
    assert out.logits.shape == reference.shape  # every token kept
    assert torch.allclose(out.logits[valid], reference[valid], atol=1e-5)
    assert len(out.hidden_states) == len(model.model.language_model.layers) + 1
    assert all(h.shape[1] == x["input_ids"].shape[1] for h in out.hidden_states)
    # The modulation changes the text after the image, and only it.
    with torch.no_grad():
        plain = model(**x).logits
    ids = x["input_ids"]
    last_visual = max(int(torch.nonzero(ids[b] == IMAGE_TOKEN).max()) for b in range(ids.shape[0]))
    assert not torch.allclose(out.logits[:, -1], plain[:, -1], atol=1e-3)
    first_visual = min(int(torch.nonzero(ids[b] == IMAGE_TOKEN).min()) for b in range(ids.shape[0]))
    assert torch.allclose(out.logits[:, :first_visual], plain[:, :first_visual], atol=1e-6)
    assert last_visual < ids.shape[1] - 1


@pytest.mark.parametrize(
    "name,mode,options",
    [
        ("llava", "modulate", {"keep": 0.4}),
        ("llava", "evict", {"keep": 0.4}),
        ("next", "modulate", {}),  # adaptive ratio (Eq. 5)
        ("next", "evict", {"keep_tokens": 7}),
        ("llava", "evict", {"ratio": "adaptive", "query": "next", "heads": "mean", "layer": 1}),
        ("next", "modulate", {"keep": 0.3, "layer": 2}),
    ],
)
def test_cached_generation_equals_recomputation_with_the_modulated_mask(name, mode, options):
    model, x = _build(name)
    eager, _ = _build(name, "eager")
    steps = 5
    layer = options.get("layer", 0)
    with vtoken.pruned(model, "aif", mode=mode, **options):
        out = model.generate(**x, max_new_tokens=steps, do_sample=False, suppress_tokens=[IMAGE_TOKEN],
                             output_logits=True, return_dict_in_generate=True)
        selection = vtoken.selection(model)
        last = vtoken.diagnostics(model)[vtoken.strategy_of(model).mask_stage().stage.name]
    counts = [len(s[f"llm:{layer}"]) for s in selection]
    assert counts == last["kept"].tolist()
    if "keep_tokens" in options:
        assert counts == [7, 7, 7]
    masked = _masked_positions(x["input_ids"], selection, f"llm:{layer}")
    assert bool(masked.any())
    # Evicting a key no text attends to is masking it: the same no-cache reference for both modes.
    uncached, logits = _reference_greedy(eager, x, masked, steps, layer)
    assert torch.equal(uncached, out.sequences)
    # Every step's logits, not only the chosen tokens: the generated tokens never see masked keys.
    for cached_step, reference_step in zip(out.logits, logits):
        assert torch.allclose(cached_step, reference_step, atol=1e-5)


@pytest.mark.parametrize("mode", ["modulate", "evict"])
def test_two_images_in_a_sample_and_a_sample_without_image(mode):
    """Text between two images may not see the first image's masked tokens; the second image's
    tokens still see all of the first's; a sample without image is untouched."""
    model, eager = tiny_llava(), tiny_llava("eager")
    x = FAMILIES["llava"].several_images(model)
    with vtoken.pruned(model, "aif", keep=0.25, mode=mode):
        out = model.generate(**x, max_new_tokens=4, do_sample=False, suppress_tokens=[IMAGE_TOKEN],
                             output_logits=True, return_dict_in_generate=True)
        selection = vtoken.selection(model)
    assert [len(s["llm:0"]) for s in selection] == [8, 0, 4]  # 4 of 16 per image
    masked = _masked_positions(x["input_ids"], selection, "llm:0")
    uncached, logits = _reference_greedy(eager, x, masked, 4)
    assert torch.equal(uncached, out.sequences)
    for cached_step, reference_step in zip(out.logits, logits):
        assert torch.allclose(cached_step, reference_step, atol=1e-5)


@dataclasses.dataclass
class _ReplayMaskConfig(PruneConfig):
    method = "_test_replay_mask"
    site: str = "llm"
    layer: int | None = 0
    evict: bool = False


@register
class _ReplayMask(Strategy):
    """Test-only: a mask stage that keeps, per image row, the image-local indices in ``plan``."""

    name = "_test_replay_mask"
    Config = _ReplayMaskConfig
    plan: dict[int, list[int]] = {}

    def stages(self):
        return ()

    def mask_stage(self):
        return MaskStage(self.config.resolved_stages()[0], evict=self.config.evict)

    def score(self, ctx):
        local = ctx.tokens.local_index
        return torch.stack([torch.isin(local[r], torch.tensor(self.plan[r])).float() for r in range(local.shape[0])])


def _plan_from(selection, stage):
    return {b: s[stage].tolist() for b, s in enumerate(selection)}  # one image per sample


def _greedy_without_cache(model, x, steps):
    """tests/tiny.py's greedy_without_cache with the image token suppressed, as in the cached runs here."""
    return greedy_without_cache(model, x, steps, suppress=[IMAGE_TOKEN])


@pytest.mark.parametrize("name", list(MODELS))
def test_replayed_mask_stage_without_cache_equals_cached_generation(name):
    """The generic recomputation check for a mask stage: AIF's decision reads the text after the
    image, which grows when recomputing, so the no-cache run replays the prefill's choice as a mask
    stage (masking, not dropping) through the wrapped model's own no-cache path."""
    model, x = _build(name)
    with vtoken.pruned(model, "aif", keep=0.4, mode="evict"):
        cached = model.generate(**x, max_new_tokens=5, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
        selection = vtoken.selection(model)
    _ReplayMask.plan = _plan_from(selection, "llm:0")
    with vtoken.pruned(model, "_test_replay_mask", keep=0.4):
        uncached = _greedy_without_cache(model, x, 5)
    assert torch.equal(uncached, cached)


class _CountForwards:
    """Counts the calls of ``module.forward`` while the block runs, through ``module(...)`` or straight
    (a mask stage's rerun calls ``forward`` itself)."""

    def __init__(self, module):
        self.module, self.calls = module, 0

    def __enter__(self):
        forward = self.module.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return forward(*args, **kwargs)

        self.module.forward = counted
        return self

    def __exit__(self, *exc):
        del self.module.forward


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("layer,mode", [(0, "modulate"), (2, "evict")])
def test_a_mask_stage_that_needs_no_probe_is_decided_in_one_masked_pass(name, layer, mode):
    """A mask stage whose strategy reads nothing the prefill observes is decided at its layer's input
    and the prefill runs masked from there: the LLM runs once (AIF's probe-then-rerun runs it twice),
    and logits, KV cache and greedy decoding equal AIF's own on the same hidden tokens."""
    model, x = _build(name)
    lm = model.model.language_model
    with vtoken.pruned(model, "aif", keep=0.3, layer=layer, mode=mode), torch.no_grad():
        with _CountForwards(lm) as probed:
            out = model(**x, use_cache=True)
        selection = vtoken.selection(model)
        generated = model.generate(**x, max_new_tokens=4, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
    assert probed.calls == 2
    _ReplayMask.plan = _plan_from(selection, f"llm:{layer}")
    with vtoken.pruned(model, "_test_replay_mask", keep=0.3, layer=layer, evict=mode == "evict"), torch.no_grad():
        with _CountForwards(lm) as one_pass:
            decided = model(**x, use_cache=True)
        again = vtoken.selection(model)
        assert torch.equal(model.generate(**x, max_new_tokens=4, do_sample=False, suppress_tokens=[IMAGE_TOKEN]),
                           generated)
    assert one_pass.calls == 1
    assert all(torch.equal(a[f"llm:{layer}"], b[f"llm:{layer}"]) for a, b in zip(again, selection))
    valid = x["attention_mask"].bool()
    torch.testing.assert_close(decided.logits[valid], out.logits[valid], atol=1e-5, rtol=0)
    for mine, theirs in zip(compat.output_cache(decided).layers, compat.output_cache(out).layers):
        assert mine.keys.shape == theirs.keys.shape
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer", [0, 2])
def test_the_masked_pass_equals_the_explicit_mask_on_the_unwrapped_model(layer):
    model, x = _build("llava")
    eager, _ = _build("llava", "eager")
    with vtoken.pruned(model, "aif", keep=0.3, layer=layer), torch.no_grad():
        model(**x)
        selection = vtoken.selection(model)
    _ReplayMask.plan = _plan_from(selection, f"llm:{layer}")
    with vtoken.pruned(model, "_test_replay_mask", keep=0.3, layer=layer), torch.no_grad():
        logits = model(**x).logits
    reference = _reference_forward(eager, x, _masked_positions(x["input_ids"], selection, f"llm:{layer}"), layer)
    valid = x["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], reference[valid], atol=1e-5, rtol=0)
    with torch.no_grad():
        assert not torch.allclose(model(**x).logits[:, -1], logits[:, -1], atol=1e-3)  # the mask matters


@pytest.mark.parametrize("name", ["llava", "qwen3"])
def test_generate_without_a_cache_replays_aifs_mask_in_one_pass_per_step(name):
    """Without a KV cache every step re-runs the prompt and applies the first prefill's decision
    again: those prefills run the LLM once, masked, and observe no attention (the first probes and
    reruns); the tokens are the cached generation's."""
    model, x = _build(name)
    steps = 4
    with vtoken.pruned(model, "aif", keep=0.4):
        strategy = vtoken.strategy_of(model)
        observe, observed = strategy.observe_attention, []
        strategy.observe_attention = lambda *a: observed.append(1) or observe(*a)
        try:
            with _CountForwards(model.model.language_model) as counted:
                uncached = model.generate(**x, max_new_tokens=steps, do_sample=False, use_cache=False,
                                          suppress_tokens=[IMAGE_TOKEN])
        finally:
            del strategy.observe_attention
        cached = model.generate(**x, max_new_tokens=steps, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
    assert torch.equal(uncached, cached)
    assert counted.calls == 2 + (steps - 1)
    assert len(observed) == len(model.model.language_model.layers)  # the first prefill's layers only


def _aif_plan(model, x, stage="llm:0"):
    with vtoken.pruned(model, "aif", keep=0.4), torch.no_grad():
        model(**x)
        _ReplayMask.plan = _plan_from(vtoken.selection(model), stage)


@pytest.mark.parametrize("name", ["llava", "qwen3"])
def test_a_masked_pass_runs_over_a_static_cache(name):
    """The in-pass masks span a static cache's slots (M-RoPE and DeepStack on Qwen3-VL)."""
    model, x = _build(name)
    _aif_plan(model, x)
    options = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[model.config.image_token_id])
    with vtoken.pruned(model, "_test_replay_mask", keep=0.4):
        dynamic = model.generate(**x, **options)
        assert torch.equal(model.generate(**x, cache_implementation="static", **options), dynamic)
    with vtoken.pruned(model, "aif", keep=0.4):
        assert torch.equal(model.generate(**x, **options), dynamic)


def test_a_masked_pass_runs_under_gradient_checkpointing():
    """With no rerun over a cache, activation checkpointing gives the same loss and gradients (AIF's
    probe refuses it), and the loss is AIF's."""
    model, x = _build("llava")
    _aif_plan(model, x)
    labels = torch.where(x["attention_mask"].bool(), x["input_ids"], -100)
    with vtoken.pruned(model, "_test_replay_mask", keep=0.4):
        model.train()
        grads, losses = [], []
        try:
            for checkpointing in (False, True):
                if checkpointing:
                    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                loss = model(**x, labels=labels).loss
                loss.backward()
                losses.append(loss.detach())
                grads.append(model.lm_head.weight.grad.clone())
                model.zero_grad()
        finally:
            model.activation_checkpointing_disable()
            model.eval()
    with vtoken.pruned(model, "aif", keep=0.4), torch.no_grad():
        aif_loss = model(**x, labels=labels).loss
    torch.testing.assert_close(losses[0], aif_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_evict_drops_the_masked_tokens_from_the_kv_cache_and_modulate_keeps_them():
    model, x = _build("next")
    length = x["input_ids"].shape[1]
    lengths = {}
    for mode in ("modulate", "evict"):
        with vtoken.pruned(model, "aif", keep=0.25, mode=mode, layer=2):
            with torch.no_grad():
                cache = compat.output_cache(model(**x, use_cache=True))
            selection = vtoken.selection(model)
        lengths[mode] = [layer.keys.shape[2] for layer in cache.layers]
    masked = _masked_positions(x["input_ids"], selection, "llm:2").sum(-1)  # per sample, they differ
    assert len(set(masked.tolist())) > 1
    # Layers before 2 keep every token; later ones the longest sample after eviction (left-padded).
    pad = (x["attention_mask"] == 0).sum(-1)
    evicted = int((length - pad - masked).max())
    assert lengths["modulate"] == [length] * 4
    assert lengths["evict"] == [length, length, evicted, evicted]


def test_adaptive_counts_follow_eq5_and_keep_all_is_the_identity_in_generation():
    model, x = _build("llava")
    with vtoken.pruned(model, "aif", ratio="adaptive", ratios=[0.25, 0.5]):
        with torch.no_grad():
            model(**x)
        last = vtoken.diagnostics(model)[vtoken.strategy_of(model).mask_stage().stage.name]
        selection = vtoken.selection(model)
    n = last["valid"].sum(-1)
    expected_kept = n - torch.floor(last["ratio"] * n).long()
    assert last["ratio"].tolist() == [0.5, 0.5, 0.5]
    assert last["kept"].tolist() == expected_kept.tolist() == [len(s["llm:0"]) for s in selection]
    # The kept ones are the lowest-entropy tokens.
    for b, s in enumerate(selection):
        entropy = last["entropy"][b, : int(n[b])]
        assert set(s["llm:0"].tolist()) == set(torch.sort(entropy, stable=True).indices[: int(last["kept"][b])].tolist())
    ref = model.generate(**x, max_new_tokens=4, do_sample=False)
    for mode in ("modulate", "evict"):
        with vtoken.pruned(model, "aif", keep=1.0, mode=mode):
            assert torch.equal(model.generate(**x, max_new_tokens=4, do_sample=False), ref)


def test_schedule_reports_no_pruning_and_the_probe_cost():
    model, _ = _build("llava")
    with vtoken.pruned(model, "aif", keep=0.25):
        schedule = vtoken.schedule_of(model)
        costs = vtoken.strategy_of(model).scoring_cost(vtoken.strategy_of(model).mask_stage().stage)
    assert schedule.stages == ()
    assert [c.layer for c in costs if c.kind == "llm_attention_rows"] == [0, 1, 2, 3]
    assert any(c.kind == "llm_rerun_rows" for c in costs)
    from vtoken.schedule import Schedule

    report = vtoken.flops("llava-1.5-7b-hf", schedule=Schedule(scoring=tuple(costs)))
    assert report.scoring > 0


@pytest.mark.parametrize(
    "options,needle",
    [
        ({"mode": "drop"}, "mode"),
        ({"ratio": "adaptive", "keep": 0.5}, "remove keep"),
        ({"ratios": [0.0, 0.5]}, "ratios"),
        ({"query": "last"}, "query"),
        ({"heads": "sum"}, "heads"),
        ({"positions": "contiguous"}, "positions"),
        ({"site": "projector"}, "llm"),
        ({"stages": [{"site": "llm", "layer": 0, "keep": 0.5}]}, "single mask stage"),
        ({"layer": 9}, "does not exist"),
    ],
)
def test_bad_options_are_refused_at_wrap_time_and_leave_the_model_untouched(options, needle):
    model, x = _build("llava")
    with torch.no_grad():
        ref = model(**x).logits
    with pytest.raises(ValueError, match=needle):
        vtoken.wrap(model, "aif", **options)
    assert not vtoken.is_wrapped(model)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, ref)


def test_an_attention_without_arbitrary_masks_and_next_without_a_head_are_refused():
    model, _ = _build("llava")
    model.model.language_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="explicit attention mask"):
        vtoken.wrap(model, "aif", keep=0.5)
    assert not vtoken.is_wrapped(model)
    model, _ = _build("llava")
    with pytest.raises(ValueError, match="LM head"):
        vtoken.wrap(model.model, "aif", keep=0.5, query="next")
    assert not vtoken.is_wrapped(model.model)


def test_an_adaptive_eviction_is_counted_at_its_configured_count_and_says_so():
    """Under ``ratio="adaptive"`` each image's attention decides how many tokens the cache keeps
    (Eq. 5), which no count made before the input can know: the report says which count it holds,
    and only then (a fixed budget is exact, above)."""
    from tiny import tiny_llava

    model = tiny_llava()
    with vtoken.pruned(model, "aif", ratio="adaptive", mode="evict"):
        notes = vtoken.flops(model, text_tokens=8).notes
        assert any("adaptive count" in note and "of 16 visual tokens" in note for note in notes), notes
    for options in ({"ratio": "adaptive", "mode": "modulate"}, {"keep": 0.5, "mode": "evict"}):
        with vtoken.pruned(model, "aif", **options):
            assert not any("adaptive count" in note for note in vtoken.flops(model, text_tokens=8).notes), options


@pytest.mark.parametrize("mode", ["modulate", "evict"])
def test_kv_cache_bytes_follow_what_the_prefill_leaves_in_the_cache(mode):
    """vtoken.kv_cache_bytes against the bytes of every key and value the prefill's cache holds: every
    token under "modulate", the text and the kept visual tokens under "evict" (AIF from layer 0)."""
    from tiny import llava_inputs, tiny_llava

    model = tiny_llava()
    x = llava_inputs(1)
    text = int((x["input_ids"] != model.config.image_token_id).sum())
    with vtoken.pruned(model, "aif", keep_tokens=4, mode=mode), torch.no_grad():
        cache = compat.output_cache(model(**x, use_cache=True, logits_to_keep=1))
        held = sum(t.numel() * t.element_size() for layer in range(compat.num_cache_layers(cache))
                   for t in compat.cache_layer_kv(cache, layer))
        assert vtoken.kv_cache_bytes(model, text_tokens=text, dtype=torch.float32) == held
    visual = 16 if mode == "modulate" else 4
    layers, kv = model.config.text_config.num_hidden_layers, model.config.text_config.num_key_value_heads
    head_dim = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    assert held == layers * 2 * kv * head_dim * 4 * (text + visual)  # by construction
