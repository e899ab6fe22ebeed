"""``vtoken.tuning`` (``vtoken.tune``): choose a method's pruning hyper-parameters for a model by Bayesian optimisation.

This is VFlowOpt's visual-information-flow-guided search (Yang et al., "VFlowOpt: A Token Pruning
Framework for LMMs with Visual Information Flow-Guided Optimization", ICCV 2025, §3.3, Eq. 8 and
Algorithm 1): the last prompt token's final representation is the model's summary of the
text-visual interaction, so a good pruning setting ``s`` keeps it close to the unpruned one,
``max_s sum_x cos(h_f(x), g_s(h_f(x)))``. Here the objective is minimised as the mean over the
calibration samples of ``1 - cos`` (a NaN similarity counts as 0, as in the official optimiser),
where ``h_f`` is the input of the model's LM head (the last decoder layer's output after the final
norm) at the last position, with and without pruning.

The search is optuna's TPE sampler, seeded (the official code uses scikit-optimize's Gaussian
process; the paper names expected improvement): the method's config class lists its search space
(``search_space``: option -> (low, high); VFlowOpt: ``stage1, r2, t, a, alpha`` with the official
bounds, ``R3`` following from the budget). The method's default setting (or the given base config) is
always the first trial (each value moved into its range if a custom ``space`` excludes it), so the
result is never worse than it on the calibration set. Each trial
runs every calibration input once, pruned; the unpruned references are computed once.

Calibration data: a list of model-input dicts, each what the model's processor returns for one
sample or a padded batch (``input_ids``, ``attention_mask``, ``pixel_values``, ``image_sizes``, ...),
already on the model's device. The paper uses 30 unlabelled training samples and 50 steps (about
30 minutes for a 7B model). Call ``model.eval()`` first; the model is wrapped for each trial and
left unwrapped and unchanged afterwards.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch
from torch import nn

from vtoken.api import is_wrapped, pruned
from vtoken.config import PruneConfig
from vtoken.registry import get_strategy
from vtoken.schedule import is_integer, is_number

#: The objective of a setting the model cannot run (a ValueError at wrap time): the worst possible.
WORST = 2.0


def _final_representation(model: nn.Module, inputs: dict) -> torch.Tensor:
    """``[B, d]`` float32: what the LM head reads at the last position (the final normed hidden state)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("tune needs a model with an LM head (get_output_embeddings() returned None)")
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0][:, -1].float()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("the LM head did not run during the forward pass")
    return seen[-1]


def discrepancy(model: nn.Module, config: PruneConfig, calibration: list[dict], references=None) -> float:
    """Mean ``1 - cos`` between the last token's final representation with ``config`` and without
    pruning, over every sample of ``calibration`` (Eq. 8 as a loss). ``references`` are the
    unpruned representations (computed here when not given)."""
    if references is None:
        references = [_final_representation(model, x) for x in calibration]
    with pruned(model, config=config):
        outputs = [_final_representation(model, x) for x in calibration]
    cos = torch.cat([torch.cosine_similarity(a, b, dim=-1) for a, b in zip(references, outputs)])
    cos = torch.nan_to_num(cos, nan=0.0)
    return float((1.0 - cos).mean())


def tune(
    model: nn.Module,
    method: str = "vflowopt",
    *,
    calibration: list[dict],
    trials: int = 50,
    seed: int = 0,
    config: PruneConfig | dict | None = None,
    space: dict[str, tuple[float, float]] | None = None,
    progress: bool = True,
    save: str | os.PathLike | None = None,
    return_study: bool = False,
    **options: Any,
):
    """Search ``method``'s hyper-parameters for ``model`` (see the module docstring) and return the
    best config (for VFlowOpt a :class:`~vtoken.strategies.vflowopt.VFlowOptConfig`).

    Args:
        calibration: a list of model-input dicts (a processor's output per sample or batch).
        trials: optimisation steps (the first evaluates the base setting).
        seed: seeds the TPE sampler; with the same inputs the result is the same.
        config / options: the base setting (budget, layers, ...): a config object, a dict, or the
            method's options as keywords (``keep=0.25``); the searched options start from it.
        space: option -> (low, high) to search instead of the method's ``search_space``.
        progress: show optuna's progress bar.
        save: a directory to save the best config to (``vtoken_config.json``, as ``save_config``;
            ``vtoken.wrap(model, config=save)`` or ``vtoken.load(save)`` reads it back).
        return_study: also return the optuna study, ``(config, study)``.
    """
    import optuna

    if is_wrapped(model):
        raise ValueError("tune compares the model with and without pruning; call vtoken.unwrap(model) first")
    if not isinstance(calibration, (list, tuple)) or not calibration or not all(isinstance(x, dict) for x in calibration):
        raise ValueError("calibration must be a non-empty list of model-input dicts (a processor's outputs)")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    config_cls = get_strategy(method).Config
    if isinstance(config, PruneConfig):
        if options:
            raise ValueError("give either a base config or keyword options, not both")
        if config.method != config_cls.method:
            raise ValueError(f"the base config is for {config.method!r}, not {method!r}")
        base = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    else:
        base = {**(dict(config) if config else {}), **options}
        base.pop("method", None)
    base_config = config_cls.from_options(**base)  # validates the base before any work
    space = dict(space if space is not None else getattr(config_cls, "search_space", None) or {})
    if not space:
        raise ValueError(f"method {method!r} has no search space; pass space={{option: (low, high)}}")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    whole = {}  # option -> searched as an integer (a layer, a count) rather than a real number
    for name, bounds in space.items():
        if name not in fields:
            raise ValueError(f"{name!r} is not an option of {method!r}; its options are: {', '.join(sorted(fields))}")
        if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2 and all(is_number(b) for b in bounds)):
            raise ValueError(f"the search range of {name!r} must be a (low, high) pair of numbers, got {bounds!r}")
        low, high = bounds
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"the search range of {name!r} must be finite with low < high, got {bounds!r}")
        current = getattr(base_config, name)
        annotation = str(fields[name].type)
        whole[name] = is_integer(current) or (current is None and annotation.startswith("int"))
        if whole[name] and not (float(low).is_integer() and float(high).is_integer()):
            raise ValueError(f"{name!r} is a whole number: give its search range as whole numbers, got {bounds!r}")
        if not whole[name] and current is not None and not is_number(current):
            raise ValueError(f"{name!r} is not a number ({current!r}): tune searches numeric options only")

    references = [_final_representation(model, x) for x in calibration]
    refusals: list[str] = []

    def objective(trial) -> float:
        params = {name: trial.suggest_int(name, int(low), int(high)) if whole[name] else trial.suggest_float(name, low, high)
                  for name, (low, high) in space.items()}
        try:
            candidate = config_cls.from_options(**{**base, **params})
            return discrepancy(model, candidate, calibration, references)
        except ValueError as error:  # a setting this model cannot run (refused at wrap time, model untouched)
            refusals.append(str(error))
            return WORST

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar reports instead
    try:
        sampler = optuna.samplers.TPESampler(seed=seed)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        # The base setting first (moved into the space where it lies outside it).
        start = {}
        for name, (low, high) in space.items():
            current = getattr(base_config, name)
            if current is not None:  # (an unset option, keep_tokens beside keep: the sampler's first draw)
                start[name] = type(current)(min(max(current, low), high)) if whole[name] else min(max(float(current), low), high)
        study.enqueue_trial(start)
        study.optimize(objective, n_trials=trials, show_progress_bar=progress)
    finally:
        optuna.logging.set_verbosity(verbosity)
    if len(refusals) == len(study.trials):  # nothing ran: no setting to call best
        raise ValueError(f"every one of the {len(refusals)} trials was refused, e.g.: {refusals[0]}")
    best = config_cls.from_options(**{**base, **study.best_params})
    if save is not None:
        best.save(save)
    return (best, study) if return_study else best


__all__ = ["tune", "discrepancy"]
