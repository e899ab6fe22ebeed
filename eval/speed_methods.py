"""The options each method of the speed bench (``eval/bench_speed.py``) is wrapped with.

A training-free method needs its budget only (``keep_tokens``, or ``keep=1.0`` for the keep-all
schedule). A trained one needs its weights too: TokenPacker gets a packer of the published
architecture (``vtoken.packer_training.build_packer``, its official initialisation, random as the
model's own weights; speed does not depend on them) whose region count is the budget: ``s = 3`` for 64
of a 24 x 24 grid, ``s = 2`` for 144, ``s = 1`` (one region per patch) for keep-all. A budget no scale
gives is refused in one line; the bench times TokenPacker at the counts nearest the budgets asked for
(:meth:`MethodOptions.budgets`). Packers are built once per scale and model.
"""

from __future__ import annotations

import math

from torch import nn

from vtoken.bench_args import PACKER_SCALES  # the paper's region sides (2, 3, 4), as train-projector trains
from vtoken.registry import get_strategy

#: Trained methods the bench can build weights for.
TRAINED = ("tokenpacker",)
#: Region sides a TokenPacker budget may name (beyond the paper's, 1 for keep-all and up to 8).
ANY_SCALE = range(1, 9)


def is_trained(method: str) -> bool:
    """True for a method whose reduction is learned (its cost is the method, not scoring overhead)."""
    return bool(get_strategy(method).trained)


def _patch_grid(model: nn.Module) -> tuple[int, int]:
    vision = model.config.vision_config
    if not hasattr(vision, "image_size"):
        raise ValueError(f"tokenpacker packs a LLaVA tower's square patch grid; this {type(vision).__name__} "
                         "has none (vtoken.methods(): it does not run on this family)")
    side = vision.image_size // vision.patch_size
    return side, side


class MethodOptions:
    """``options(method, budget)``: the keyword arguments of ``vtoken.wrap`` / ``vtoken.pruned`` for
    ``method`` at ``budget`` visual tokens (``budget=None``: the keep-all schedule, ``keep=1.0``)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._packers: dict[int, nn.Module] = {}

    def __call__(self, method: str, budget: int | None) -> dict:
        options: dict = {"keep": 1.0} if budget is None else {"keep_tokens": budget}
        if method == "tokenpacker":
            scale = self.packer_scale(budget)
            options["weights"] = self._packer(scale)
            if budget is None:  # a packer's count is fixed by its scale: keep=1.0 is s = 1's 576
                options = {"keep_tokens": self._regions(scale), "weights": options["weights"]}
        elif is_trained(method):
            raise ValueError(f"the speed bench cannot build weights for the trained method {method!r}; "
                             f"it builds them for {', '.join(TRAINED)}")
        return options

    def budgets(self, method: str, requested: list[int]) -> list[int]:
        """The budgets ``method`` is timed at: ``requested``, or for TokenPacker, whose count its scale
        fixes, the count of the scale nearest each requested one (64, 128, 192 of 576 -> 64 (s=3) and
        144 (s=2)), each once."""
        if method != "tokenpacker":
            return list(requested)
        counts = [self._regions(s) for s in PACKER_SCALES]
        return sorted({min(counts, key=lambda n: (abs(n - budget), n)) for budget in requested})

    def _regions(self, scale: int) -> int:
        rows, cols = _patch_grid(self.model)
        return math.ceil(rows / scale) * math.ceil(cols / scale)

    def packer_scale(self, budget: int | None) -> int:
        """The region side whose packed count is ``budget`` (1 for keep-all)."""
        if budget is None:
            return 1
        for scale in ANY_SCALE:
            if self._regions(scale) == budget:
                return scale
        counts = ", ".join(f"{self._regions(s)} (s={s})" for s in PACKER_SCALES)
        raise ValueError(f"tokenpacker packs a {'x'.join(map(str, _patch_grid(self.model)))} grid into a count its "
                         f"scale fixes ({counts}), not {budget}; give --budgets one of them")

    def _packer(self, scale: int) -> nn.Module:
        if scale not in self._packers:
            from vtoken.packer_training import build_packer

            param = next(self.model.parameters())
            self._packers[scale] = build_packer(self.model, scale=scale).to(param.device, param.dtype).eval()
        return self._packers[scale]
