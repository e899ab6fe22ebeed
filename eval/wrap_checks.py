"""What must hold of any wrapped model, checked on one random case (``eval/random_models.py``).

For a method drawn with random options (budgets, sites and layers, positions policies, multi-stage
schedules, each method's own options):

- **keep all**: the method at ``keep=1.0`` (its other options as drawn) gives the plain model's logits
  on every valid position and its greedy tokens;
- **budget**: at the drawn budget a forward returns one row of finite last-position logits per
  sample, and every generate mode (greedy with a dynamic cache, without a cache and with a static
  cache, each scoring every step in a dict; greedy returning tokens only; prompt-lookup decoding
  (its first forward's candidates rejected or not); beam search; seeded sampling) returns each prompt followed by new tokens; the greedy modes give the same tokens and,
  step by step, the same scores (to 1e-4 of their scale: decoding from a cache is the recomputation
  of the pruned sequence); sampling twice under one seed gives the same tokens; each sample of the
  batch alone gets the last-position logits it gets in the batch;
- **right padding**: the same batch right-padded gives, at keep-all, the plain model's logits on
  every valid position, and at the budget each sample's last-token logits (read through
  ``logits_to_keep`` as each sample's position of the prompt passed) as in the left-padded batch;
- **labels**: at keep-all the loss over the batch's text tokens (``random_models.training_labels``)
  is the plain model's; at the budget the right-padded batch's loss is the left-padded one's (where
  both keep the same tokens);
- **unwrap**: the weights, hooks and module types are the model's own again, and its logits are the
  plain model's, bit for bit.

A one-line ``ValueError`` / ``TypeError`` / ``NotImplementedError`` raised by vtoken is a refusal, not
a failure (a method that cannot run an option says so); any other exception is a failure unless the
plain model fails the same call too (a transformers limitation, e.g. a mode it refuses itself).
"""

from __future__ import annotations

import copy
import random
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

import vtoken
from random_models import LABELS, PAD, SUPPRESS, VOCAB, RandomCase, right_padded, training_labels

MAX_NEW = 4
VTOKEN_DIR = str(Path(vtoken.__file__).resolve().parent)
#: Methods the checks draw: every registered one but the oracle (it needs annotations per call)
#: and TokenPacker (its budget is fixed by its trained weights: no keep=1.0).
EXCLUDED = ("oracle", "tokenpacker")
_SCORED = dict(do_sample=False, return_dict_in_generate=True, output_scores=True)
GENERATE_MODES = {
    "greedy": _SCORED,
    "greedy without a cache": dict(_SCORED, use_cache=False),
    "static cache": dict(_SCORED, cache_implementation="static"),
    "greedy, tokens only": dict(do_sample=False),
    "prompt-lookup decoding": dict(do_sample=False, prompt_lookup_num_tokens=2),
    "beam search": dict(do_sample=False, num_beams=2),
    "sampling": dict(do_sample=True, top_k=20, temperature=0.9),
}
#: Modes whose tokens are greedy's; the first three also score every step as greedy does.
GREEDY_MODES = ("greedy without a cache", "static cache", "greedy, tokens only", "prompt-lookup decoding")


def methods_for(family: str) -> list[str]:
    """The methods that run on ``family`` (by ``vtoken.methods()``), but the excluded ones."""
    label = LABELS[family]
    return [m["name"] for m in vtoken.methods()
            if not m["name"].startswith("_") and m["name"] not in EXCLUDED and m["families"].get(label) == "runs"]


def draw_options(method: str, case: RandomCase, rng: random.Random) -> dict:
    """Random options for ``method`` on ``case``'s model: a budget (a fraction or a token count no
    larger than the smallest image's), and the method's sites, layers and own switches."""
    layers = case.drawn["text"].layers
    vision_layers = case.drawn["vision_layers"]
    fewest = min(case.image_tokens) if case.image_tokens else 1
    r = rng.random()
    options: dict = {"keep": 0.5} if r < 0.4 else {"keep": 0.25} if r < 0.75 else {"keep_tokens": rng.randint(1, max(1, min(6, fewest)))}
    if method in ("random", "pool"):
        site = rng.choice(["projector", "projector", "vision", "llm"])
        if site == "vision":
            options.update(site="vision", layer=rng.randint(0, max(0, vision_layers - 2)))
        elif site == "llm":
            options.update(site="llm", layer=rng.randint(0, layers - 1))
        if method == "random" and "keep" in options and rng.random() < 0.15:
            keep = options.pop("keep")
            options.pop("site", None), options.pop("layer", None)
            options["stages"] = [{"site": "projector", "keep": min(1.0, 2 * keep)},
                                 {"site": "llm", "layer": rng.randint(0, layers - 1), "keep": keep}]
    elif method in ("fastv", "aif"):
        if rng.random() < 0.7:
            options["layer"] = rng.randint(0, layers - 1)
        if method == "aif":
            options["mode"] = rng.choice(["modulate", "evict"])
            if rng.random() < 0.3:
                options.pop("keep", None), options.pop("keep_tokens", None)
                options["ratio"] = "adaptive"
    elif method == "transprune":
        if rng.random() < 0.3:
            options["ttv_only"] = True
        if rng.random() < 0.3:
            options["direction"] = "abs"
    elif method == "repshift":
        if rng.random() < 0.2:
            options.update(site="llm", layer=rng.randint(1, layers - 1))
        else:
            if rng.random() < 0.4:
                options["layer"] = rng.randint(0, max(0, vision_layers - 2))
            if rng.random() < 0.3:
                options["mode"] = "merge"
    elif method == "visionzip" and rng.random() < 0.3:
        options.update(site="vision", layer=rng.randint(0, max(0, vision_layers - 2)))
    elif method == "zoo_prune":
        options["directions"] = rng.choice([8, 16, 64])
    if "stages" not in options and rng.random() < 0.2:
        options["positions"] = rng.choice(["original", "contiguous"])
    return options


@dataclass
class Report:
    """What the checks found on one case: ``results`` per check (``"pass"``, ``"refused: ..."``,
    ``"plain model fails too: ..."``, ``"FAIL: ..."``) and each failure with its traceback."""

    case: str
    method: str
    options: dict
    results: dict[str, str] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)

    def fail(self, check: str, message: str, error: BaseException | None = None) -> None:
        self.results[check] = "FAIL: " + message[:300]
        record = {"check": check, "message": message[:2000]}
        if error is not None:
            record["error"] = type(error).__name__
            record["where"] = _innermost(error)
            record["traceback"] = "".join(traceback.format_exception(error))[-6000:]
        self.failures.append(record)

    def summary(self) -> str:
        lines = [f"{self.case}\n  {self.method} {self.options}"]
        lines += [f"  {f['check']}: {f['message'][:500]}" + (f" ({f['error']} at {f['where']})" if "error" in f else "")
                  for f in self.failures]
        return "\n".join(lines)


def _innermost(error: BaseException) -> str:
    """The innermost frame of vtoken's own code the error passed (else the innermost frame)."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if f.filename.startswith(VTOKEN_DIR)]
    frame = ours[-1] if ours else (frames[-1] if frames else None)
    return f"{Path(frame.filename).name}:{frame.name}:{frame.lineno}" if frame else "?"


def _is_refusal(error: BaseException) -> bool:
    """A one-line error raised by vtoken's own code (its last frame is vtoken's) that names what it
    refuses; an error raised inside torch or transformers is a crash, wherever it passed."""
    frames = traceback.extract_tb(error.__traceback__)
    return (isinstance(error, (ValueError, TypeError, NotImplementedError)) and "\n" not in str(error).strip()
            and bool(frames) and frames[-1].filename.startswith(VTOKEN_DIR))


def hook_count(model) -> int:
    """Forward hooks and pre-hooks on every module of ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _same_selection(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    """Two calls' ``vtoken.selection``: the same stages keeping the same tokens for every sample."""
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def _one_swap_per_stage(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two selections of one sample (``vtoken.selection``) differ, by at most one kept
    token swapped for another at each stage."""
    if a.keys() != b.keys():
        return False
    swaps = []
    for stage in a:
        kept, other = set(a[stage].tolist()), set(b[stage].tolist())
        if len(kept) != len(other):
            return False
        swaps.append(len(kept - other))
    return max(swaps, default=0) == 1


def _tie(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    """Whether two calls' ``vtoken.selection`` differ, by at most one kept token swapped per stage of
    each sample (a float32 tie, see ``_Checker._alone``)."""
    return (len(a) == len(b) and not _same_selection(a, b)
            and all(_same_selection([x], [y]) or _one_swap_per_stage(x, y) for x, y in zip(a, b)))


def _generate(model, x: dict, **kwargs):
    kwargs = dict(max_new_tokens=MAX_NEW, suppress_tokens=SUPPRESS, pad_token_id=PAD, **kwargs)
    with torch.no_grad():
        return model.generate(**x, **kwargs)


class _Checker:
    def __init__(self, case: RandomCase, method: str, options: dict, dtype: torch.dtype):
        self.case, self.method, self.options = case, method, options
        self.report = Report(case.describe(), method, options)
        self.model = case.model.to(dtype)
        self.x = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in case.inputs.items()}
        self.exact = dtype == torch.float32
        self.plain = copy.deepcopy(self.model)
        self.labels = training_labels(self.x)
        with torch.no_grad():  # (transformers adds its own hooks on a first forward)
            plain = self.model(**self.x, labels=self.labels)
        self.logits, self.loss = plain.logits, plain.loss
        self.state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.hooks = hook_count(self.model)
        self.types = [type(m).__name__ for m in self.model.modules()]
        self.greedy = _generate(self.plain, self.x, do_sample=False)
        # The batch right-padded, where it has padding (a batch of one, or of equal lengths, has none).
        self.right = None if bool(self.x["attention_mask"].bool().all()) else right_padded(self.x)
        if self.right is not None:
            with torch.no_grad():
                self.right_logits = self.plain(**self.right).logits

    def call(self, check: str, run, plain_run):
        """``run(self.model)``; on an error, a refusal or the plain model failing too is no failure."""
        try:
            return run(self.model)
        except Exception as error:  # noqa: BLE001 - every other error is what the checks look for
            if _is_refusal(error):
                self.report.results[check] = f"refused: {error}"[:300]
                return None
            try:
                plain_run(self.plain)
            except Exception as plain_error:  # noqa: BLE001
                self.report.results[check] = f"plain model fails too: {type(plain_error).__name__}: {plain_error}"[:300]
                return None
            self.report.fail(check, f"{type(error).__name__}: {error}", error)
            return None

    def wrap(self, check: str, **options) -> bool:
        try:
            vtoken.wrap(self.model, self.method, **options)
        except Exception as error:  # noqa: BLE001
            if _is_refusal(error):
                self.report.results[check] = f"refused: {error}"[:300]
            else:
                self.report.fail(check, f"{type(error).__name__}: {error}", error)
            return False
        return True

    # --- the checks -----------------------------------------------------------------------------
    def keep_all(self) -> None:
        options = {k: v for k, v in self.options.items() if k not in ("keep", "keep_tokens", "stages", "ratio", "r")}
        if not self.wrap("keep all: wrap", keep=1.0, **options):
            return
        try:
            with torch.no_grad():
                out = self.call("keep all: forward", lambda m: m(**self.x, labels=self.labels),
                                lambda m: m(**self.x, labels=self.labels))
            if out is not None:
                self._same_logits("keep all: logits", out.logits)
                self._same_loss("keep all: loss", out.loss, self.loss)
            if self.right is not None:
                right = self.call("keep all: right padding", lambda m: m(**self.right).logits,
                                  lambda m: m(**self.right))
                if right is not None:
                    self._same_logits("keep all: right padding", right, self.right_logits, self.right["attention_mask"])
            tokens = self.call("keep all: greedy", lambda m: _generate(m, self.x, do_sample=False),
                               lambda m: _generate(m, self.x, do_sample=False))
            if tokens is not None and self.exact and not torch.equal(tokens, self.greedy):
                self.report.fail("keep all: greedy", f"tokens {tokens.tolist()} where the plain model gives {self.greedy.tolist()}")
            elif tokens is not None:
                self.report.results["keep all: greedy"] = "pass"
        finally:
            self.unwrap("keep all")

    def _same_logits(self, check: str, out: torch.Tensor, reference: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None) -> None:
        """``out`` is the plain model's logits (``reference``, default the batch's) on every valid
        position of ``mask`` (default the batch's attention mask)."""
        reference = self.logits if reference is None else reference
        if out.shape != reference.shape:
            self.report.fail(check, f"logits of shape {tuple(out.shape)} where the plain model's are {tuple(reference.shape)}")
            return
        valid = (self.x["attention_mask"] if mask is None else mask).bool()
        scale = float(reference[valid].abs().max())
        tolerance = 1e-5 if self.exact else 2e-2 * max(1.0, scale)
        worst = float((out - reference)[valid].abs().max())
        if not worst <= tolerance:
            self.report.fail(check, f"logits differ from the plain model's by {worst:.3g} on valid positions (scale {scale:.3g})")
        else:
            self.report.results[check] = "pass"

    def budget(self) -> None:
        if not self.wrap("budget: wrap", **self.options):
            return
        try:
            self._budget()
        finally:
            self.unwrap("budget")

    def _budget(self) -> None:
        ids = self.x["input_ids"]
        batch, length = ids.shape
        out = self.call("budget: forward", lambda m: m(**self.x, labels=self.labels), lambda m: m(**self.x, labels=self.labels))
        if out is not None:
            selection = vtoken.selection(self.model)
            logits = out.logits
            if logits.shape[0] != batch or logits.shape[1] > length or logits.shape[2] != VOCAB:
                self.report.fail("budget: forward", f"logits of shape {tuple(logits.shape)} for a prompt of {tuple(ids.shape)}")
            elif not bool(torch.isfinite(logits[:, -1]).all()):
                self.report.fail("budget: forward", "last-position logits that are not finite")
            else:
                self.report.results["budget: forward"] = "pass"
        tokens, scores, selections = {}, {}, {}
        for mode, kwargs in GENERATE_MODES.items():
            def run(m, kwargs=kwargs, mode=mode):
                if mode == "sampling":
                    torch.manual_seed(1234)
                return _generate(m, self.x, **kwargs)

            result = self.call(f"generate: {mode}", run, run)
            if result is None:
                continue
            selections[mode] = vtoken.selection(self.model)  # its prompt's (a tie may differ by mode)
            sequences = result.sequences if hasattr(result, "sequences") else result
            if not (sequences.shape[0] == batch and length < sequences.shape[1] <= length + MAX_NEW
                    and torch.equal(sequences[:, :length], ids)):
                self.report.fail(f"generate: {mode}", f"sequences of shape {tuple(sequences.shape)} for a prompt of "
                                 f"{tuple(ids.shape)} (the prompt kept: {torch.equal(sequences[:, :length], ids)})")
                continue
            if hasattr(result, "scores") and (len(result.scores) != sequences.shape[1] - length
                                              or any(s.shape != (batch, VOCAB) for s in result.scores)):
                self.report.fail(f"generate: {mode}", f"{len(result.scores)} scores for {sequences.shape[1] - length} new tokens")
                continue
            if mode == "sampling":
                again = self.call("generate: sampling again", run, run)
                if again is not None and not torch.equal(again, sequences):
                    self.report.fail("generate: sampling", "two runs under one seed sample different tokens")
                    continue
            tokens[mode], scores[mode] = sequences, getattr(result, "scores", None)
            self.report.results[f"generate: {mode}"] = "pass"
        if "greedy" in tokens and self.exact:
            for mode in GREEDY_MODES:
                if mode in tokens and _tie(selections[mode], selections["greedy"]):
                    # Another cache sums the same scores in another order: a float32 tie chose other
                    # tokens (other logits, maybe other tokens), which decides nothing about the mode.
                    self.report.results[f"generate: {mode} equals greedy, a tie"] = "one kept token swapped (a float32 tie)"
                elif mode in tokens and not torch.equal(tokens[mode], tokens["greedy"]):
                    self.report.fail(f"generate: {mode} equals greedy",
                                     f"{tokens[mode][:, length:].tolist()} where greedy gives {tokens['greedy'][:, length:].tolist()}")
                elif scores.get(mode) is not None:
                    self._same_scores(f"generate: {mode} scores as greedy", scores[mode], scores["greedy"])
        if out is not None and batch > 1 and self.exact:
            self._alone(out.logits, selection)
            if self.right is not None:
                self._right_padding(out.logits, out.loss, selection)

    def _same_scores(self, check: str, scores: tuple, reference: tuple) -> None:
        """Each step's scores as greedy's with a dynamic cache (a static cache or none decodes the
        same sequence: the same numbers up to the kernels' rounding)."""
        finite = [torch.isfinite(b) for b in reference]  # suppressed tokens score -inf in both
        if any(not torch.equal(torch.isfinite(a), f) for a, f in zip(scores, finite)):
            self.report.fail(check, "other tokens are suppressed (score -inf) than in greedy's steps")
            return
        worst = max(float((a - b)[f].abs().max()) for a, b, f in zip(scores, reference, finite))
        scale = max(float(b[f].abs().max()) for b, f in zip(reference, finite))
        if not worst <= 1e-4 * max(1.0, scale):
            self.report.fail(check, f"step scores differ from greedy's by {worst:.3g} (scale {scale:.3g})")
        else:
            self.report.results[check] = "pass"

    def _alone(self, batched: torch.Tensor, selection: list[dict[str, torch.Tensor]]) -> None:
        """Each sample with an image alone gets the last-position logits it gets in the batch (a
        sample without one is refused alone by the default ``text_only="error"``).

        Random weights make near-uniform attention, so a method can score two tokens within
        float32's rounding of each other (strategies score in float32 whatever the model's dtype),
        and padding rounds them the other way: one kept token swapped for another at a stage,
        other logits. Logits that differ with at most one such swap per stage are that tie, not a
        failure; with the same kept tokens, or more than one swap, they are one. ``selection``: the
        batch forward's (``vtoken.selection``)."""
        worst, which = 0.0, None
        for b, sample in enumerate(self.case.samples):
            if not sample.images:
                continue
            x = self.case.inputs_of(b)
            alone = self.call("budget: a sample alone", lambda m: m(**x).logits[0, -1], lambda m: m(**x))
            if alone is None:
                return
            difference = float((alone - batched[b, -1]).abs().max())
            if difference > 1e-3 and _one_swap_per_stage(selection[b], vtoken.selection(self.model)[0]):
                self.report.results["budget: a sample alone, a tie"] = f"sample {b}: one kept token swapped (a float32 tie)"
                continue
            if difference > worst:
                worst, which = difference, b
        if worst > 1e-3:
            self.report.fail("budget: a sample alone", f"sample {which} alone: last-position logits differ from the batch's by {worst:.3g}")
        else:
            self.report.results["budget: a sample alone"] = "pass"

    def _same_loss(self, check: str, loss: torch.Tensor, reference: torch.Tensor) -> None:
        tolerance = 1e-5 if self.exact else 2e-2
        if not abs(float(loss) - float(reference)) <= tolerance * max(1.0, abs(float(reference))):
            self.report.fail(check, f"loss {float(loss):.6g} where {float(reference):.6g} is expected")
        else:
            self.report.results[check] = "pass"

    def _right_padding(self, batched: torch.Tensor, loss: torch.Tensor,
                       selection: list[dict[str, torch.Tensor]]) -> None:
        """The batch right-padded: each sample's last prompt token (``logits_to_keep`` naming its
        position in the right-padded prompt) gets the logits it gets in the left-padded batch
        (``batched``), with :meth:`_alone`'s float32-tie rule against the left-padded batch's
        ``selection``; the loss over the text tokens is the left-padded batch's ``loss`` where both
        keep the same tokens."""
        last = (self.right["attention_mask"].sum(-1) - 1)[:, None]
        run = lambda m: m(**self.right, logits_to_keep=last).logits[:, 0]  # noqa: E731
        right = self.call("budget: right padding", run, lambda m: m(**self.right))
        if right is None:
            return
        kept = vtoken.selection(self.model)
        worst, which = 0.0, None
        for b in range(right.shape[0]):
            difference = float((right[b] - batched[b, -1]).abs().max())
            if difference > 1e-3 and _one_swap_per_stage(selection[b], kept[b]):
                self.report.results["budget: right padding, a tie"] = f"sample {b}: one kept token swapped (a float32 tie)"
                continue
            if difference > worst:
                worst, which = difference, b
        if worst > 1e-3:
            self.report.fail("budget: right padding", f"sample {which}: last-token logits differ from the left-padded "
                             f"batch's by {worst:.3g}")
        else:
            self.report.results["budget: right padding"] = "pass"
        # The labels follow each kept slot: the loss over the text tokens is the same on either side.
        labels = training_labels(self.right)
        right_loss = self.call("budget: loss", lambda m: m(**self.right, labels=labels).loss,
                               lambda m: m(**self.right, labels=labels))
        if right_loss is not None and _same_selection(selection, vtoken.selection(self.model)):
            self._same_loss("budget: loss, right padding", right_loss, loss)

    def unwrap(self, check: str) -> None:
        check = f"{check}: unwrap"
        try:
            vtoken.unwrap(self.model)
        except Exception as error:  # noqa: BLE001
            self.report.fail(check, f"{type(error).__name__}: {error}", error)
            return
        state = self.model.state_dict()
        changed = [k for k in set(state) | set(self.state)
                   if k not in state or k not in self.state or not torch.equal(state[k], self.state[k])]
        problems = []
        if changed:
            problems.append(f"weights differ: {sorted(changed)[:5]}")
        if hook_count(self.model) != self.hooks:
            problems.append(f"{hook_count(self.model)} hooks where the model had {self.hooks}")
        if [type(m).__name__ for m in self.model.modules()] != self.types:
            problems.append("module types changed")
        if vtoken.is_wrapped(self.model):
            problems.append("still wrapped")
        with torch.no_grad():
            logits = self.model(**self.x).logits
        if logits.shape != self.logits.shape or not torch.equal(logits, self.logits):
            problems.append("logits differ from the plain model's")
        if problems:
            self.report.fail(check, "; ".join(problems))
        else:
            self.report.results[check] = "pass"


def check_case(case: RandomCase, method: str, options: dict, dtype: torch.dtype = torch.float32) -> Report:
    """Every check of this module on ``case`` wrapped with ``method`` and ``options``."""
    checker = _Checker(case, method, options, dtype)
    checker.keep_all()
    checker.budget()
    return checker.report


def check_seed(seed: int, family: str | None = None, method: str | None = None,
               dtype: torch.dtype | None = None) -> Report:
    """The case of ``seed`` (its family, model, batch, method, options and dtype all drawn from it
    unless given) through :func:`check_case`."""
    case = RandomCase.draw(seed, family)
    rng = random.Random(seed + 1)
    method = method or rng.choice(methods_for(case.family))
    options = draw_options(method, case, rng)
    if dtype is None:
        dtype = torch.bfloat16 if rng.random() < 0.15 else torch.float32
    options.update(method_switches(method, seed))
    options = method_structure(method, case, options, seed)
    return check_case(case, method, options, dtype)


#: Each method's own switches beyond its sites and budget (the paper's variants and the official
#: code's): ``(option, chance of drawing it, the values drawn among)``, in the order they are drawn.
#: AIF's come first, as when they were the only ones: its seeds keep their cases.
METHOD_SWITCHES: dict[str, list[tuple[str, float, tuple]]] = {
    "aif": [("query", 0.3, ("next",)), ("heads", 0.3, ("mean",))],
    "fastv": [("score_layer", 0.3, ("current",))],
    "repshift": [("operation", 0.3, ("attention", "block")), ("distance", 0.3, ("l1", "cos")),
                 ("shift", 0.2, ("residual",)), ("merge_weight", 0.2, ("size",))],
    "tome": [("proportional_attention", 0.3, (False,))],
    "transprune": [("alpha", 0.3, (0.0, 0.25, 1.0)), ("rounding", 0.3, ("round",))],
    "vflowopt": [("relevance", 0.3, ("sum",)), ("recycle", 0.3, (False,)), ("alpha", 0.3, (0.5,))],
    "visionzip": [("dominant_share", 0.3, (0.5, 0.9))],
    "zoo_prune": [("precision", 0.3, ("float32", "float16")), ("projector_rank", 0.2, (2, 8))],
}


def method_switches(method: str, seed: int) -> dict:
    """``METHOD_SWITCHES`` drawn for the case of ``seed`` from a stream of their own (``seed + 2``),
    so every other draw of a seed, and the seeds campaigns name, stay what they were; each switch is
    left at its default most of the time."""
    rng = random.Random(seed + 2)
    options: dict = {}
    for name, chance, values in METHOD_SWITCHES.get(method, []):
        if rng.random() < chance:
            # (one value is taken as it is: a choice among one would still draw from the stream)
            options[name] = values[0] if len(values) == 1 else rng.choice(values)
    return options


def method_structure(method: str, case: RandomCase, options: dict, seed: int) -> dict:
    """``options`` with a method's own layer choices and schedule drawn for ``case``'s model, from a
    stream of their own (``seed + 3``, so every other draw of a seed stays what it was), each left
    at its default most of the time:

    - ToMe: ``r`` instead of a budget (a constant, one value per vision layer, or ``(r, -1)``: the
      paper's decreasing schedule);
    - TransPrune: ``prune_layers`` with non-increasing ``keep_ratios`` (its progressive schedule;
      the budget replaces the last ratio), and ``accumulate_layers``;
    - VFlowOpt: ``llm_layers`` (none, one or two) and ``vision_layer``;
    - VisionZip: ``vision_layer`` where it scores at the projector;
    - ZOO-Prune: a ``chunk_size`` that cuts the perturbed copies into uneven blocks.

    A stage's layers that the drawn ones make impossible are refused by the method in one line (a
    refusal, not a failure), as a user's would be."""
    rng = random.Random(seed + 3)
    options = dict(options)
    depth = case.drawn["text"].layers
    vision_layers = case.drawn["vision_layers"]
    if method == "tome" and rng.random() < 0.4:
        for budget in ("keep", "keep_tokens"):
            options.pop(budget, None)
        kind = rng.choice(["constant", "per layer", "decreasing"])
        if kind == "constant":
            options["r"] = rng.randint(1, 4)
        elif kind == "per layer":
            options["r"] = [rng.randint(0, 3) for _ in range(vision_layers)]
        else:
            options["r"] = (rng.randint(1, 4), -1.0)
    elif method == "transprune" and "stages" not in options and depth >= 2:
        if rng.random() < 0.35:
            count = rng.randint(1, min(3, depth - 1))
            layers = sorted(rng.sample(range(1, depth), count))
            options["prune_layers"] = layers
            options["keep_ratios"] = sorted((rng.choice([1.0, 0.9, 0.75, 0.5, 0.3]) for _ in layers), reverse=True)
            if rng.random() < 0.3:  # the accumulation span: any layers before the last stage, the first one's included
                first, last = layers[0], layers[-1]
                span = sorted({rng.randint(0, first - 1)} | {rng.randint(0, last - 1) for _ in range(2)})
                options["accumulate_layers"] = span
    elif method == "vflowopt" and rng.random() < 0.35:
        if rng.random() < 0.6:
            wanted = rng.randint(0, min(2, depth - 1))
            options["llm_layers"] = sorted(rng.sample(range(1, depth), wanted))
        if rng.random() < 0.5:
            options["vision_layer"] = rng.randint(0, vision_layers - 1)
    elif method == "visionzip" and options.get("site") != "vision" and rng.random() < 0.3:
        options["vision_layer"] = rng.randint(0, vision_layers - 1)
    elif method == "zoo_prune" and rng.random() < 0.35:
        options["chunk_size"] = rng.choice([2, 3, 7, 64])
    return options
