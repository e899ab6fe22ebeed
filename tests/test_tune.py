"""vtoken.tune: VFlowOpt's visual-information-flow-guided search (optuna TPE) on the tiny models:
seeded runs repeat, the result is a valid loadable config no worse than the default, the model is
left exactly as it was, and bad calls fail before any work."""

import pytest
import torch

import vtoken
from vtoken.strategies.vflowopt import VFlowOptConfig
from vtoken.tuning import discrepancy
from tiny import llava_inputs, llava_next_inputs, tiny_llava, tiny_llava_next


def _calibration():
    return [llava_inputs(3, seed=1), llava_inputs(2, seed=2)]


def test_tune_is_seeded_valid_loadable_and_no_worse_than_the_default(tmp_path):
    model = tiny_llava()
    calibration = _calibration()
    with torch.no_grad():  # transformers installs its own output-capturing hooks on the first forward
        model(**calibration[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hooks(model)
    best, study = vtoken.tune(model, "vflowopt", calibration=calibration, trials=6, seed=3, keep=0.25,
                              progress=False, save=tmp_path, return_study=True)
    again = vtoken.tune(model, "vflowopt", calibration=calibration, trials=6, seed=3, keep=0.25, progress=False)
    assert isinstance(best, VFlowOptConfig) and best == again
    assert len(study.trials) == 6 and study.trials[0].params["t"] == VFlowOptConfig().t  # the default goes first
    # The best trial's objective is the discrepancy of the returned config, and no worse than the default's.
    default = discrepancy(model, VFlowOptConfig(keep=0.25), calibration)
    assert study.best_value == pytest.approx(discrepancy(model, best, calibration), abs=1e-7)
    assert study.best_value <= default
    assert study.trials[0].value == pytest.approx(default, abs=1e-7)
    for name, (low, high) in VFlowOptConfig.search_space.items():
        assert low <= getattr(best, name) <= high
    # Saved as save_config writes it; loadable and usable.
    assert vtoken.load(tmp_path) == best
    x = llava_inputs(3)
    with vtoken.pruned(model, config=tmp_path):
        with torch.no_grad():
            model(**x)
    # The model is left unwrapped and unchanged.
    assert not vtoken.is_wrapped(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert _hooks(model) == hooks


def _hooks(model):
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()}


def test_discrepancy_is_zero_when_nothing_is_pruned():
    model = tiny_llava()
    assert discrepancy(model, VFlowOptConfig(keep=1.0), _calibration()) == pytest.approx(0.0, abs=1e-6)
    assert discrepancy(model, VFlowOptConfig(keep=0.2), _calibration()) > 1e-4


def test_tune_on_llava_next_with_a_custom_space_and_count_budget():
    model = tiny_llava_next()
    calibration = [llava_next_inputs(model)]
    best = vtoken.tune(model, "vflowopt", calibration=calibration, trials=3, seed=0, keep=0.3,
                       space={"t": (0.5, 3.0), "alpha": (0.0, 1.0)}, progress=False)
    assert 0.5 <= best.t <= 3.0 and 0.0 <= best.alpha <= 1.0 and best.keep == 0.3
    assert best.stage1 == VFlowOptConfig().stage1  # not searched: the base value


def test_bad_calls_fail_before_any_work():
    model = tiny_llava()
    with pytest.raises(ValueError, match="non-empty list"):
        vtoken.tune(model, calibration=[], trials=2)
    with pytest.raises(ValueError, match="not an option"):
        vtoken.tune(model, calibration=_calibration(), trials=2, space={"beta": (0.0, 1.0)})
    with pytest.raises(ValueError, match="stage1"):
        vtoken.tune(model, calibration=_calibration(), trials=2, stage1=0.5)
    with pytest.raises(ValueError, match="no search space"):
        vtoken.tune(model, "fastv", calibration=_calibration(), trials=2)
    with vtoken.pruned(model, "pool", keep=0.5):
        with pytest.raises(ValueError, match="unwrap"):
            vtoken.tune(model, calibration=_calibration(), trials=2)


def test_bad_search_ranges_are_one_line_and_whole_options_are_searched_as_integers():
    """A range that is not a (low, high) pair of numbers was an unpacking or type error; an integer
    option (a layer) was drawn as a float, every trial refused for it, and the call ended on the
    last refusal."""
    model = tiny_llava()
    for space in ({"t": (0, 1, 2)}, {"t": ("0", "50")}, {"t": 5}):
        with pytest.raises(ValueError, match=r"the search range of 't' must be a \(low, high\) pair of numbers"):
            vtoken.tune(model, calibration=_calibration(), trials=2, space=space, progress=False)
    with pytest.raises(ValueError, match=r"'layer' is a whole number: give its search range as whole numbers"):
        vtoken.tune(model, "fastv", calibration=_calibration(), trials=2, keep=0.5, space={"layer": (1.5, 3)})
    best, study = vtoken.tune(model, "fastv", calibration=_calibration(), trials=3, keep=0.5, space={"layer": (1, 3)},
                              progress=False, return_study=True)
    assert type(best.layer) is int and 1 <= best.layer <= 3
    assert all(type(t.params["layer"]) is int for t in study.trials)


def test_tune_refuses_when_every_trial_was_refused():
    """Every trial refused (a budget the model cannot meet) still returned a 'best' config, which
    wrap then refused: the refusal comes back instead."""
    model = tiny_llava()
    with pytest.raises(ValueError, match=r"every one of the 2 trials was refused, e.g.: keep_tokens=\d+ is larger "
                                         r"than the 16 visual tokens"):
        vtoken.tune(model, calibration=_calibration(), trials=2, keep_tokens=1000, progress=False)
    assert not vtoken.is_wrapped(model)
