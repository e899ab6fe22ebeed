"""``vtoken bench``: every registered method at a few budgets on one model, with kept tokens,
measured prefill latency and FLOPs.

The default model is a small LLaVA built from a config with random weights (144 visual tokens per
image, the shape of the offline benchmark), so the command runs anywhere in seconds; ``--model``
takes any LLaVA / LLaVA-NeXT checkpoint directory or hub id that ``from_pretrained`` can load, or a
Qwen2-VL directory saved with its processor (``vtoken/assets/tiny-qwen2-vl``: accuracy on the benchmark
too; the default method list skips the methods ``vtoken.methods()`` says do not run on the model).
Latency is the median wall time of a batch-1 prefill (and a batch-``--batch`` one for throughput),
after warm-up, on whatever device the model is on.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from fractions import Fraction

import torch

import vtoken
from vtoken import signals
from vtoken.accounting import flops
from vtoken.registry import get_strategy, strategy_names

DEFAULT_BUDGETS = ("1", "1/3", "2/9", "1/9")


def builtin_model(seed: int = 0):
    """A LLaVA-1.5-shaped model at toy size: CLIP tower on 96 px images in 8 px patches (144 visual
    tokens), MLP projector, 4-layer Llama. Random weights; built, never downloaded."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=96, patch_size=8, hidden_size=128, intermediate_size=512, num_hidden_layers=6,
            num_attention_heads=4, projection_dim=128,
        ),
        text_config=LlamaConfig(
            vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=0,
        ),
        image_token_id=511, image_seq_length=144, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    return model.eval()


def load_model(path: str | None):
    if path is None:
        return builtin_model()
    from transformers import AutoConfig, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    config = AutoConfig.from_pretrained(path)
    cls = LlavaNextForConditionalGeneration if config.model_type == "llava_next" else LlavaForConditionalGeneration
    return cls.from_pretrained(path).eval()


def synthetic_inputs(model, batch: int, text_tokens: int = 32, seed: int = 0) -> dict:
    """A prompt of ``text_tokens`` text tokens around one image per sample (LLaVA-1.5 geometry)."""
    config = model.config
    vision = config.vision_config
    visual = (vision.image_size // vision.patch_size) ** 2
    g = torch.Generator().manual_seed(seed)
    before = torch.randint(3, 100, (batch, text_tokens // 4), generator=g)
    after = torch.randint(3, 100, (batch, text_tokens - text_tokens // 4), generator=g)
    image = torch.full((batch, visual), config.image_token_id)
    ids = torch.cat([before, image, after], dim=1)
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def _runs_unassisted(name: str) -> bool:
    """Methods a plain benchmark can run: no trained weights, no per-input annotations, not test-only."""
    cls = get_strategy(name)
    return not (name.startswith("_") or cls.trained or signals.ANNOTATIONS in cls.reads)


def _refusals(model) -> dict[str, str]:
    """Method -> why it does not run on ``model``'s family, as ``vtoken.methods()`` says (the default
    method list skips those, saying why: e.g. ToMe on Qwen2-VL, whose packed blocks are not split)."""
    from vtoken.adapters import adapter_for

    try:
        family = adapter_for(model)(model).family_name
    except (ValueError, AttributeError, TypeError):
        return {}
    verdicts = {m["name"]: m["families"].get(family, "runs") for m in vtoken.methods()}
    return {name: f"skipped on {family}: {why}" for name, why in verdicts.items() if why != "runs"}


def parse_budget(text: str) -> float | int:
    """``"1/9"`` or ``"0.25"`` is a fraction of the visual tokens, ``"64"`` a count; ``"1"`` keeps all."""
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(
            f"budget {text!r} is not a number; write fractions of the visual tokens (1/9, 0.25) or counts (64), "
            "separated by spaces or commas"
        ) from None
    if value <= 0:
        raise ValueError(f"budget {text!r} must be positive")
    if value <= 1:
        return float(value)
    if value.denominator != 1:
        raise ValueError(f"budget {text!r}: a count must be a whole number")
    return int(value)


def _median_ms(model, inputs: dict, repeats: int) -> float:
    with torch.no_grad():
        model(**inputs, use_cache=False)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs, use_cache=False)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@dataclass
class BenchRow:
    method: str
    budget: str
    site: str
    kept_tokens: float
    visual_tokens: int
    prefill_ms: float
    batch_ms: float
    batch: int
    tflops: float
    tflops_llava_7b: float
    accuracy: float | None = None
    retained: float | None = None
    recall: float | None = None
    families: dict[str, float] | None = None
    samples: int = 0


LLAVA_7B = "llava-hf/llava-1.5-7b-hf"


def _flops(model, schedule, method: str | None = None, option: dict | None = None,
           image_size: tuple[int, int] | None = None) -> tuple[float, float, float]:
    """This model's prefill TFLOPs, the layer-mean visual tokens, and LLaVA-1.5-7B's TFLOPs for the
    same method and budget (64 text tokens), in the true convention. The 7B schedule comes from
    wrapping a weightless LLaVA-1.5-7B with the method, so depth-relative defaults (TransPrune's
    layers) resolve for 32 layers rather than being copied from the small model."""
    own = flops(model, schedule=schedule, text_tokens=32, image_size=image_size)
    try:
        seven_b = flops(LLAVA_7B, schedule=llava_7b_schedule(method, option), text_tokens=64).prefill / 1e12
    except ValueError:  # e.g. a trained method whose weights fit the small model only
        seven_b = float("nan")
    return own.prefill / 1e12, own.mean_visual_tokens, seven_b


_META_7B = {}
LLAVA_7B_VISUAL_TOKENS = 576  # 336 px / 14 px patches, squared


def llava_7b_schedule(method: str | None, option: dict | None):
    """The schedule ``method`` with ``option`` (a budget) has on LLaVA-1.5-7B (576 visual tokens),
    read from a wrapped meta-device model built from the shipped config; ``None`` when unpruned."""
    if method is None:
        return None
    if get_strategy(method).trained:
        # Trained weights fit the small model only: project the same share of tokens reaching the
        # LLM (the trained projector's own few GFLOPs are left out of this column).
        from vtoken.schedule import Schedule, Stage

        kept = option["keep_tokens"] if "keep_tokens" in option else round(LLAVA_7B_VISUAL_TOKENS * option["keep"])
        return Schedule((Stage("projector", max(1, kept)),), visual_tokens=LLAVA_7B_VISUAL_TOKENS)
    if "model" not in _META_7B:
        from transformers import LlavaForConditionalGeneration

        from vtoken.accounting import load_config

        with torch.device("meta"):
            _META_7B["model"] = LlavaForConditionalGeneration(load_config(LLAVA_7B)).eval()
    meta = _META_7B["model"]
    with vtoken.pruned(meta, method, **(option or {})):
        return vtoken.schedule_of(meta, visual_tokens=LLAVA_7B_VISUAL_TOKENS)


def _points(methods, budgets):
    """(method, budget text, options) for every method and budget below 1 (1 is the unpruned row)."""
    for name in methods:
        for text in budgets:
            budget = parse_budget(text)
            if budget == 1.0:
                continue
            yield name, text, ({"keep": budget} if isinstance(budget, float) else {"keep_tokens": budget})


def shipped_trained(model_path: str | None) -> list[tuple[str, str]]:
    """(method, weights directory) of the trained methods shipped for the default model:
    ``vtoken/assets/tiny-llava-trained/<method>-<tag>/`` (TokenPacker at scales 2 and 3)."""
    if model_path is not None or default_model_path() is None:
        return []
    root = os.path.join(os.path.dirname(__file__), "assets", "tiny-llava-trained")
    if not os.path.isdir(root):
        return []
    return [(entry.split("-")[0], os.path.join(root, entry)) for entry in sorted(os.listdir(root))
            if os.path.isdir(os.path.join(root, entry))]


def run(
    methods=None, budgets=DEFAULT_BUDGETS, model_path=None, repeats=5, batch=8, data=None, limit=500,
    progress=print, trained=None,
) -> list[BenchRow]:
    """Benchmark every method at every budget. With a VQA model (the shipped tiny LLaVA, or a
    directory holding a tokenizer and image processor) also accuracy on ``data`` (a JSONL file in
    the :mod:`vtoken.vqa.data` format; default: ``limit`` generated test records).

    ``trained`` lists (method, weights directory) pairs of trained methods (TokenPacker), each run
    once at the budget its weights fix; by default those shipped for the default model, unless
    ``methods`` names others only."""
    vqa = _vqa_model(model_path)
    model = vqa.model if vqa is not None else load_model(model_path)
    records = _records(vqa, data, limit) if vqa is not None else None
    one, many = (vqa.encode(records[:1]), vqa.encode(records[:batch])) if records else (
        synthetic_inputs(model, 1), synthetic_inputs(model, batch))
    visual = int((one["input_ids"] == model.config.image_token_id).sum())
    refused = _refusals(model) if methods is None else {}
    if methods is None:
        for name in strategy_names():
            if _runs_unassisted(name) and name in refused:
                progress(f"{name}: {refused[name]}")
    names = methods or [n for n in strategy_names() if _runs_unassisted(n) and n not in refused]
    if records and any(r.get("boxes") for r in records) and methods is None:
        names = [*names, "oracle"]

    # the Qwen families size their patch grid from the image (LLaVA-1.5's is fixed by its config)
    image_size = (vqa.grid[0],) * 2 if vqa is not None and "image_grid_thw" in one else None

    def timed(inputs, count: int) -> float:
        with _annotations(vqa, records[:count] if records else []):
            return _median_ms(model, inputs, repeats)

    def measure(name, text, site, schedule, base=None, option=None) -> BenchRow:
        if option and "keep_tokens" in option:  # a count on this model is the same share of 576
            option = {"keep": option["keep_tokens"] / visual}
        own, kept, paper = _flops(model, schedule, None if name == "none" else name, option, image_size)
        row = BenchRow(name, text, site, kept, visual, timed(one, 1), timed(many, batch), batch, own, paper)
        if records is not None:
            from vtoken.vqa.evaluate import evaluate

            result = evaluate(vqa, records)
            row.accuracy, row.families, row.recall = result.accuracy, result.family_accuracy(), result.recall
            row.samples = len(records)
            row.retained = row.accuracy / base.accuracy if base is not None and base.accuracy else None
        progress(f"{name} @ {text}: {row.prefill_ms:.1f} ms, {row.kept_tokens:.1f} tokens"
                 + (f", accuracy {row.accuracy:.3f}" if row.accuracy is not None else ""))
        return row

    base = measure("none", "1", "-", None)
    rows = [base]
    for name, text, option in _points(names, budgets):
        try:
            vtoken.wrap(model, name, **option)
        except ValueError as error:  # a budget this method cannot meet on this model: say so, go on
            progress(f"{name} @ {text}: skipped: {error}")
            continue
        try:
            with _annotations(vqa, records[:1] if records else []), torch.no_grad():
                model(**one)
            site = ",".join(vtoken.selection(model)[0])
            schedule = vtoken.schedule_of(model, visual_tokens=visual)
            rows.append(measure(name, text, site, schedule, base, option))
        finally:
            vtoken.unwrap(model)
    if trained is None:
        trained = [(m, w) for m, w in shipped_trained(model_path) if methods is None or m in methods]
    for name, weights in trained:
        with vtoken.pruned(model, name, weights=weights):
            with torch.no_grad():
                model(**one)
            selected = vtoken.selection(model)[0]
            site, kept = ",".join(selected), len(list(selected.values())[-1])
            schedule = vtoken.schedule_of(model, visual_tokens=visual)
            text = str(Fraction(kept, visual))
            rows.append(measure(name, text, site, schedule, base, {"keep": kept / visual}))
    return rows


def _annotations(vqa, records):
    """The oracle's annotations for ``records`` (none without a VQA model or records)."""
    if vqa is None or not records:
        return contextlib.nullcontext()
    from vtoken.vqa.evaluate import annotations_for

    return annotations_for(vqa, records)


def _vqa_model(model_path):
    from vtoken.vqa.evaluate import VQAModel

    path = model_path or default_model_path()
    if path is None or not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        return None
    return VQAModel.load(path)


def default_model_path() -> str | None:
    """The tiny LLaVA trained on the offline benchmark, shipped inside the package (if present)."""
    path = os.path.join(os.path.dirname(__file__), "assets", "tiny-llava")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def _records(vqa, data, limit):
    from vtoken.vqa.data import generate, load_jsonl

    if data is not None:
        return load_jsonl(data)[:limit]
    image_size, patch_size, _ = vqa.grid
    return generate("test", limit, seed=0, image_size=image_size, patch_size=patch_size)


def to_markdown(rows: list[BenchRow]) -> str:
    accuracy = rows[0].accuracy is not None
    families = sorted(rows[0].families or {}) if accuracy else []
    head = ["method", "budget", "stages", "visual tokens (LLM layer mean)"]
    if accuracy:
        head += ["accuracy", *families, "retained", "relevant-patch recall"]
    head += ["prefill ms (b=1)", f"prefill ms (b={rows[0].batch})", "TFLOPs (this model)",
             "TFLOPs (LLaVA-1.5-7B, same schedule)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for r in rows:
        cells = [r.method, r.budget, r.site, f"{r.kept_tokens:.1f} / {r.visual_tokens}"]
        if accuracy:
            cells += [pct(r.accuracy), *(pct(r.families.get(f)) for f in families), pct(r.retained), pct(r.recall)]
        cells += [f"{r.prefill_ms:.1f}", f"{r.batch_ms:.1f}", f"{r.tflops:.5f}", f"{r.tflops_llava_7b:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def oracle_gap_summary(rows: list[BenchRow]) -> str:
    """Per budget: how far ``oracle`` beats ``random`` (the benchmark's test of itself: a good
    benchmark shows at least 15 points at 1/9), and where each method lands between them
    (0 = random, 1 = oracle). Empty without accuracy or without both reference rows."""
    by = {(r.method, r.budget): r for r in rows if r.accuracy is not None}
    lines = []
    for budget in dict.fromkeys(r.budget for r in rows if r.method == "oracle"):
        oracle, random = by.get(("oracle", budget)), by.get(("random", budget))
        if oracle is None or random is None:
            continue
        gap = 100 * (oracle.accuracy - random.accuracy)
        verdict = "meets" if gap >= 15 else "misses"
        lines.append(f"- budget {budget}: oracle {100 * oracle.accuracy:.1f}, random {100 * random.accuracy:.1f}:"
                     f" gap {gap:+.1f} points ({verdict} the 15-point bar).")
        if abs(gap) < 1e-9:
            continue
        placed = sorted(
            ((r.accuracy - random.accuracy) / (oracle.accuracy - random.accuracy), r.method)
            for r in rows
            if r.budget == budget and r.accuracy is not None and r.method not in ("oracle", "random")
        )
        if placed:
            lines.append("  Position between random (0) and oracle (1): "
                         + ", ".join(f"{m} {p:.2f}" for p, m in reversed(placed)) + ".")
    return ("Oracle against random:\n\n" + "\n".join(lines) + "\n") if lines else ""


def write(rows: list[BenchRow], out: str, command: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write(f"Produced by `{command}`.\n\n")
        if rows[0].accuracy is not None:
            f.write(f"Accuracy: exact match of the greedy answer on {rows[0].samples} records, in percent; "
                    "retained = accuracy / unpruned accuracy.\n\n")
        f.write(to_markdown(rows))
        summary = oracle_gap_summary(rows)
        if summary:
            f.write("\n" + summary)
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=2)
