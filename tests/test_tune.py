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
