"""Per-request visual tokens and prefill FLOPs of the wrapped schedule, summed into lmms-eval's results.

lmms-eval 0.7 has one place where a model adds its own numbers to the results:
``lmms_eval.models.model_utils.gen_metrics.log_metrics(..., additional_metrics={...})``. Every numeric
entry comes back as ``avg_<name>`` under ``results["throughput"]``, which the harness prints in its
"Throughput Summary" table and writes into ``<output_path>/<model>/<date>_results.json``. The
plug-in logs once per evaluation, from every rank's requests together, with these entries:

``vtoken_requests``                    requests with images counted (lmms-eval's rank-padding copies
                                       excluded); the means below are over these
``vtoken_text_only_requests``          requests without an image (run unpruned: ``text_only="passthrough"``)
``vtoken_visual_tokens``               mean visual tokens per request entering the model
``vtoken_visual_tokens_kept``          mean visual tokens left after the last stage (``vtoken.selection``)
``vtoken_llm_layer_mean_visual_tokens`` mean over LLM layers of the visual tokens each layer sees
``vtoken_prefill_tflops``              mean prefill TFLOPs per request under the wrapped schedule
``vtoken_prefill_tflops_unpruned``     the same request unpruned
``vtoken_prefill_flops_ratio``         their ratio

FLOPs come from ``vtoken.flops`` (the ``"true"`` convention: every token, vision tower, projector,
LLM, LM head, the method's scoring work) with each request's own visual and text token counts and
image size, under the wrapped model's own schedule. A request with several images is counted as
that many images of equal token count (the schedule's per-image budgets and scoring times the images).
"""

from __future__ import annotations

from typing import Any

import torch

import vtoken


def image_token_id(model) -> int | None:
    config = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def request_flops(model, visual: int, text: int, images: int, image_size: tuple[int, int] | None):
    """(pruned report, unpruned report) of one request; the same report twice when not wrapped. A
    wrapped model is counted under its own schedule for a sample of ``images`` images sharing the
    ``visual`` tokens (``vtoken.flops`` scales the per-image budgets and scoring to the sample)."""
    counts = dict(text_tokens=text, image_size=image_size, images=max(images, 1), visual_tokens=visual)
    base = vtoken.flops(model.config, **counts)
    if not vtoken.is_wrapped(model):
        return base, base
    return vtoken.flops(model, **counts), base


class Tally:
    """Rows of per-request numbers on this rank; ``summary`` of rows gathered from every rank."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.elapsed = 0.0
        self.generated = 0
        self.failure: str | None = None  # why FLOPs could not be counted (logged once)

    def record(self, model, inputs: dict, images: list[list], counted: list[bool]) -> None:
        """Add one row per counted request of a batch that has just run through ``model``."""
        token = image_token_id(model)
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        lengths = mask.sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])
        visual = (ids == token).sum(1) if token is not None else torch.zeros_like(lengths)
        kept = vtoken.selection(model) if vtoken.is_wrapped(model) else None
        for i, count in enumerate(counted):
            if not count:
                continue
            v, t = int(visual[i]), int(lengths[i] - visual[i])
            row = {"visual": float(v), "kept": float(v)}
            if v == 0:  # a text-only request: nothing to prune, no image to count
                self.rows.append(row)
                continue
            if kept is not None and i < len(kept) and kept[i]:
                row["kept"] = float(len(list(kept[i].values())[-1]))
            size = images[i][0].size if images[i] else None  # PIL: (width, height)
            try:
                pruned, unpruned = request_flops(model, v, t, len(images[i]), None if size is None else (size[1], size[0]))
                row.update(layer_mean=pruned.mean_visual_tokens, tflops=pruned.prefill / 1e12,
                           tflops_unpruned=unpruned.prefill / 1e12)
            except (ValueError, NotImplementedError, KeyError, AttributeError) as err:
                self.failure = self.failure or f"{type(err).__name__}: {err}"
            self.rows.append(row)

    def take(self) -> dict[str, Any]:
        """This rank's rows and timings, cleared (so a second evaluation does not count them again)."""
        out = {"rows": self.rows, "elapsed": self.elapsed, "generated": self.generated, "failure": self.failure}
        self.rows, self.elapsed, self.generated = [], 0.0, 0
        return out


def summary(rows: list[dict[str, float]]) -> dict[str, float]:
    """Means over the requests with images (text-only ones only counted) of the numbers above; the
    FLOPs entries only when every such request has them."""
    images = [r for r in rows if r["visual"] > 0]
    out = {"vtoken_requests": float(len(images)), "vtoken_text_only_requests": float(len(rows) - len(images))}
    if not images:
        return out if rows else {}
    n = len(images)
    out["vtoken_visual_tokens"] = sum(r["visual"] for r in images) / n
    out["vtoken_visual_tokens_kept"] = sum(r["kept"] for r in images) / n
    if all("tflops" in r for r in images):
        out["vtoken_llm_layer_mean_visual_tokens"] = sum(r["layer_mean"] for r in images) / n
        out["vtoken_prefill_tflops"] = sum(r["tflops"] for r in images) / n
        out["vtoken_prefill_tflops_unpruned"] = sum(r["tflops_unpruned"] for r in images) / n
        out["vtoken_prefill_flops_ratio"] = out["vtoken_prefill_tflops"] / out["vtoken_prefill_tflops_unpruned"]
    return out
