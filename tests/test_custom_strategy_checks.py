"""A method written outside vtoken (a ``score`` or a ``reduce`` on tensors, README "Methods") that hands
back the wrong thing gets one line naming it, the field and the fix: before, a reduce that kept
padding or a token twice, and NaN scores, ran on silently (wrong sequences, NaN tokens kept first),
and out-of-range or wrongly typed results failed with raw indexing errors deep in the pipeline; a
config class inherited from a built-in's ran the built-in instead of the new method."""

import dataclasses

import pytest
import torch

import vtoken
from vtoken.config import PruneConfig
from vtoken.context import Reduction
from vtoken.kernels import masked_topk
from vtoken.registry import _STRATEGIES, register
from vtoken.strategies.base import Strategy
from vtoken.strategies.fastv import FastVConfig, FastVStrategy
from tiny import llava_next_inputs, tiny_llava_next


@dataclasses.dataclass
class _MistakeConfig(PruneConfig):
    method = "_test_mistake"
    mistake: str = "none"


@register
class _Mistake(Strategy):
    """Test-only: keeps the top of its norm scores, then makes the mistake its config names."""

    name = "_test_mistake"
    Config = _MistakeConfig

    def reduce(self, ctx):
        rows, mistake = ctx.tokens, self.config.mistake
        scores = rows.features.float().norm(dim=-1)
        if mistake == "nan":
            return super().reduce(ctx)  # the base class ranks what score() returns
        if mistake == "padding":  # the last columns of every row, padding included (ctx.tokens.valid ignored)
            width, most = rows.valid.shape[1], int(rows.budget.max())
            keep = torch.arange(width - most, width).expand(rows.num_rows, -1).clone()
            short = torch.arange(most)[None, :] >= rows.budget[:, None]
            return Reduction(keep=keep.masked_fill(short, -1))
        keep = masked_topk(scores, rows.valid, rows.budget)
        if mistake == "twice":
            keep[:, 1] = torch.where(keep[:, 1] >= 0, keep[:, 0], keep[:, 1])
        elif mistake == "range":
            keep[:, 0] = 1000
        elif mistake == "float":
            keep = keep.float()
        elif mistake == "tensor":
            return keep
        return Reduction(keep=keep)

    def score(self, ctx):  # (mistake "nan": a NaN for every row's first candidate)
        scores = ctx.tokens.features.float().norm(dim=-1)
        scores[:, 0] = float("nan")
        return scores


@pytest.mark.parametrize("mistake,message", [
    ("nan", r"_test_mistake.score returned NaN for \d+ valid candidate\(s\)"),
    ("padding", r"_test_mistake.reduce: row \d+ keeps padding \(ctx.tokens.valid is False there\) while leaving "
                r"valid candidates out"),
    ("twice", r"_test_mistake.reduce: row \d+ keeps a candidate more than once"),
    ("range", r"_test_mistake.reduce: keep holds indices outside 0..\d+"),
    ("float", r"_test_mistake.reduce: keep holds torch.float32, expected integer indices"),
    ("tensor", r"_test_mistake.reduce returned Tensor, expected a vtoken.context.Reduction"),
])
def test_a_reduction_a_pipeline_cannot_use_is_one_line(mistake, message):
    model = tiny_llava_next()  # images of other sizes: rows of other lengths, padding in the batch
    x = llava_next_inputs(model)
    with vtoken.pruned(model, "_test_mistake", keep=0.5, mistake=mistake), torch.no_grad():
        with pytest.raises(RuntimeError, match=message) as error:
            model(**x)
    assert "\n" not in str(error.value)


def test_a_correct_custom_reduction_passes_the_checks():
    """The checks refuse nothing a correct reduce returns: at keep=1.0 the wrapped model is the plain
    one, and at 0.5 each image of the padded batch keeps round(0.5 * its tokens)."""
    from tiny import next_image_tokens

    model = tiny_llava_next()
    x = llava_next_inputs(model)
    with torch.no_grad():
        plain = model(**x).logits
        with vtoken.pruned(model, "_test_mistake", keep=1.0):
            torch.testing.assert_close(model(**x).logits, plain, rtol=0, atol=0)
        with vtoken.pruned(model, "_test_mistake", keep=0.5):
            model(**x)
            kept = [len(s["projector"]) for s in vtoken.selection(model)]
    assert kept == [round(0.5 * n) for n in next_image_tokens(model, [(32, 64), (64, 64), (64, 40)])]


def test_a_config_inherited_from_another_method_is_refused_at_register():
    """A config class that reuses FastV's options without its own `method` made wrap build FastV: the
    new method's score never ran."""

    @dataclasses.dataclass
    class InheritedConfig(FastVConfig):
        pass

    class MyFastV(FastVStrategy):
        name = "_test_myfastv"
        Config = InheritedConfig

    with pytest.raises(ValueError, match=r"strategy '_test_myfastv' has the config class InheritedConfig, whose method "
                                         r"is 'fastv'; give it `method = '_test_myfastv'`"):
        register(MyFastV)
    assert "_test_myfastv" not in _STRATEGIES


def test_a_class_defined_again_replaces_its_registration_but_a_built_in_name_is_never_taken():
    """A notebook cell run twice defines the same class again: the new definition replaces the old
    (it was refused as a clash with itself); a built-in's name stays refused."""

    def define():
        @dataclasses.dataclass
        class AgainConfig(PruneConfig):
            method = "_test_again"

        class Again(Strategy):
            name = "_test_again"
            Config = AgainConfig

        return Again

    first, second = define(), define()
    try:
        register(first)
        register(second)
        assert _STRATEGIES["_test_again"] is second
    finally:
        _STRATEGIES.pop("_test_again", None)

    class Impostor(FastVStrategy):
        name = "fastv"

    with pytest.raises(ValueError, match="a strategy named 'fastv' is already registered"):
        register(Impostor)


@dataclasses.dataclass
class _LateObserverConfig(PruneConfig):
    method = "_test_late_observer"
    site: str = "llm"
    layer: int = 2


@register
class _LateObserver(Strategy):
    """Test-only: reads what it observed at the layer of its own stage (which runs after the stage)."""

    name = "_test_late_observer"
    Config = _LateObserverConfig
    sites = ("llm",)

    def needs(self):
        from vtoken import signals
        from vtoken.signals import Needs, Signal

        return Needs.of(Signal(signals.LLM_OBSERVED, self.config.layer))

    def observe(self, site, layer, io, valid):
        return io["block"][1].float().norm(dim=-1)

    def score(self, ctx):
        return ctx.require("observed", self.name)(ctx.stage.layer)[..., 0]


def test_reading_a_layer_that_runs_after_the_stage_says_so():
    """Observing the stage's own layer (it runs after the stage decides) was answered with 'list it in
    needs()', where it was listed."""
    from tiny import llava_inputs, tiny_llava

    model = tiny_llava()
    with vtoken.pruned(model, "_test_late_observer", keep=0.5), torch.no_grad():
        with pytest.raises(ValueError, match=r"LLM layer 2 was not observed before this stage; .* read only layers "
                                             r"that run first \(a stage before LLM layer K reads layers 0..K-1\)"):
            model(**llava_inputs(1))


def test_flops_of_a_custom_method_without_scoring_cost_warns_at_the_callers_line():
    """A method written outside vtoken that does not define ``scoring_cost`` had its scoring counted as
    free by ``vtoken.flops`` without a word. Now one warning says so, at the caller's line; a built-in
    that scores for free (pool) and a custom method that declares its cost (even none) are silent."""
    import warnings

    @dataclasses.dataclass
    class _DeclaredConfig(PruneConfig):
        method = "_test_declared"

    @register
    class _Declared(_Mistake):
        name = "_test_declared"
        Config = _DeclaredConfig

        def scoring_cost(self, stage, shapes=None):
            return []

    model = tiny_llava_next()
    try:
        for method, warns in (("_test_mistake", True), ("pool", False), ("_test_declared", False)):
            with vtoken.pruned(model, method, keep_tokens=4), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                report = vtoken.flops(model, image_size=(64, 64))
            mine = [w for w in caught if "scoring_cost" in str(w.message)]
            assert len(mine) == int(warns), method
            if warns:
                assert mine[0].filename == __file__  # the line that called vtoken.flops
                assert "_test_mistake: the method defines no scoring_cost()" in str(mine[0].message)
                assert report.scoring == 0
    finally:
        _STRATEGIES.pop("_test_declared", None)
