"""``vtoken bench``: every registered method at a few budgets on one model, with kept tokens,
measured prefill latency, FLOPs and, on a model that answers the offline benchmark, accuracy.

The default model is the tiny LLaVA shipped in ``vtoken/assets/tiny-llava`` (144 visual tokens per
image, trained on the offline benchmark), so the command runs offline in minutes on 2 cores;
``--model`` takes a LLaVA-1.5 or Qwen2-VL / Qwen2.5-VL directory saved with its tokenizer and image
processor (accuracy too), or any checkpoint of a family vtoken supports for speed and FLOPs (the default
method list skips the methods ``vtoken.methods()`` says do not run on the model). Latency is the median
wall time of a batch-1 prefill (and a batch-``--batch`` one for throughput), after warm-up, on the
model's device. What the results mean is in :mod:`vtoken.bench_report` (equal-cost ranking) and
:mod:`vtoken.bench_plot` (the trade-off plots).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable
from fractions import Fraction

import torch

import vtoken
from vtoken import signals
from vtoken.accounting import flops
from vtoken.model_dims import model_dims
from vtoken.token_geometry import geometry, patchless_tokens
from vtoken.bench_args import DEFAULT_BUDGETS, DEFAULT_LIMIT, check_run_arguments
from vtoken.bench_report import BenchRow, matched_cost_summary, oracle_gap_summary, to_markdown, write  # noqa: F401
from vtoken.registry import get_strategy, strategy_names
from vtoken.vqa.evaluate import on_model_device



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


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ATTENTION = ("sdpa", "eager", "flash_attention_2")


def load_model(path: str | None, dtype: str | None = None, attn: str | None = None):
    """The model at ``path`` (a directory or hub id) with the class its config names; the built-in
    random model when ``path`` is None."""
    if path is None:
        model = builtin_model()
        return model if dtype is None else model.to(DTYPES[dtype])
    from transformers import AutoConfig, AutoModelForImageTextToText, LlavaForConditionalGeneration

    options = _load_options(dtype, attn)
    config = AutoConfig.from_pretrained(path)
    if config.model_type == "llava":  # the Auto class maps it too; name it for old configs without auto_map
        return LlavaForConditionalGeneration.from_pretrained(path, **options).eval()
    return AutoModelForImageTextToText.from_pretrained(path, **options).eval()


def _load_options(dtype: str | None, attn: str | None) -> dict:
    options = {}
    if dtype is not None:
        options["dtype"] = DTYPES[dtype]
    if attn is not None:
        options["attn_implementation"] = attn
    return options


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

    try:  # run() has already refused a model no adapter handles
        family = adapter_for(model)(model).family_name
    except (AttributeError, TypeError):
        return {}
    verdicts = {m["name"]: m["families"].get(family, "runs") for m in vtoken.methods()}
    return {name: f"skipped on {family}: {why}" for name, why in verdicts.items() if why != "runs"}


#: The largest count ``parse_budget`` takes: far above any supported model's visual tokens per image
#: (Qwen2-VL's default ``max_pixels`` gives 16,384); a larger count is a typo.
MAX_BUDGET_TOKENS = 1_000_000


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
        if float(value) == 0:
            raise ValueError(f"budget {text!r} rounds to 0; write a fraction such as 1/9 or a count such as 64")
        return float(value)
    if value.denominator != 1:
        raise ValueError(f"budget {text!r}: a count must be a whole number")
    if value > MAX_BUDGET_TOKENS:
        raise ValueError(f"budget {text!r}: no image has that many visual tokens; write a count up to "
                         f"{MAX_BUDGET_TOKENS:,} or a fraction (1/9, 0.25)")
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


def _patchless(model, image_size: tuple[int, int] | None) -> int:
    """Of one image's visual tokens at ``image_size``, those no patch stands behind (newlines, a CLS
    token: VisionZip's count leaves them out); 0 where the size is not known."""
    if image_size is None:
        return 0
    dims = model_dims(model.config)
    return patchless_tokens(dims, geometry(dims, image_size=image_size))


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


def shipped_tuned(model_path: str | None) -> list[tuple[str, str]]:
    """(label, config directory) of the tuned configs shipped for the default model, shown beside the
    method's default rows: ``vtoken/assets/tiny-llava-tuned/<method>-<budget tag>/vtoken_config.json``
    (VFlowOpt at 1/9, tuned by ``eval/tune_vflowopt.py``)."""
    if model_path is not None or default_model_path() is None:
        return []
    root = os.path.join(os.path.dirname(__file__), "assets", "tiny-llava-tuned")
    if not os.path.isdir(root):
        return []
    return [(f"{entry.split('-')[0]} (tuned)", os.path.join(root, entry)) for entry in sorted(os.listdir(root))
            if os.path.isfile(os.path.join(root, entry, "vtoken_config.json"))]


def run(
    methods=None, budgets=DEFAULT_BUDGETS, model_path=None, repeats=5, batch=8, data=None, limit=DEFAULT_LIMIT,
    progress=print, trained=None, configs=None, device=None, dtype=None, attn=None,
    on_row: Callable[[list[BenchRow]], None] | None = None, bar: bool = False,
    skipped: list[str] | None = None,
) -> list[BenchRow]:
    """Benchmark every method at every budget. With a VQA model (the shipped tiny LLaVA, or a
    directory holding a tokenizer and image processor) also accuracy on ``data`` (a JSONL file in
    the :mod:`vtoken.vqa.data` format; default: ``limit`` generated test records).

    ``trained`` lists (method, weights directory) pairs of trained methods (TokenPacker), each run
    once at the budget its weights fix; by default those shipped for the default model, unless
    ``methods`` names others only. ``configs`` lists (label, saved config) pairs run as extra rows (by
    default the tuned configs shipped for the default model, for the methods in the sweep).
    ``on_row(rows)`` is called after every measured row (the CLI writes its files there, so a crash
    keeps what was measured); ``bar`` shows a progress bar over the whole sweep on stderr. ``skipped``,
    when given, receives a line for each point not measured and why (a method the family refuses, a
    budget the method cannot meet), as ``progress`` does.
    """
    skipped = [] if skipped is None else skipped
    methods, budgets, trained, configs, model_path = check_run_arguments(
        methods, budgets, model_path, repeats, batch, data, limit, trained, configs, device, dtype, attn)
    vqa = _vqa_model(model_path, dtype, attn)
    model = vqa.model if vqa is not None else load_model(model_path, dtype, attn)
    from vtoken.adapters import adapter_for

    adapter_for(model)  # a family vtoken has no adapter for: one line naming the supported ones
    if device is not None:
        model.to(device)
    if vqa is None and type(model).__name__ != "LlavaForConditionalGeneration":
        raise ValueError(
            f"--model: a {type(model).__name__} is benchmarked on questions put through its processor: save the "
            "model with its tokenizer and processor (with a chat template) in one directory")
    if vqa is None and (data is not None or limit != DEFAULT_LIMIT):
        progress(f"{model_path}: no tokenizer and processor saved with the model, so no questions are asked (data and "
                 "limit do not apply): latency and FLOPs on synthetic inputs only; save the tokenizer and processor "
                 "with the model for accuracy")
    records = _records(vqa, data, limit) if vqa is not None else None
    if records and batch > len(records):
        # The batch is timed on the records themselves: there are only these many.
        progress(f"batch {batch}: the data holds {len(records)} question(s); timing batches of {len(records)}")
        batch = len(records)
    one, many = (vqa.encode(records[:1]), vqa.encode(records[:batch])) if records else (
        synthetic_inputs(model, 1), synthetic_inputs(model, batch))
    one, many = on_model_device(one, model), on_model_device(many, model)
    visual = int((one["input_ids"] == model.config.image_token_id).sum())
    refused = _refusals(model) if methods is None else {}
    if methods is None:
        for name in strategy_names():
            if _runs_unassisted(name) and name in refused:
                skipped.append(f"{name}: {refused[name]}")
                progress(skipped[-1])
    names = methods or [n for n in strategy_names() if _runs_unassisted(n) and n not in refused]
    recall = vqa is not None and vqa.has_recall  # the benchmark's boxes map onto this model's tokens
    if configs is None:
        configs = [(label, path) for label, path in shipped_tuned(model_path)
                   if label.split(" ")[0] in names]
    loaded = [(label, path, vtoken.load(path)) for label, path in configs]  # each read once
    needs_boxes = [n for n in [*names, *(config.method for _, _, config in loaded)]
                   if signals.ANNOTATIONS in get_strategy(n).reads]
    if needs_boxes and not (records and recall):
        raise ValueError(f"{needs_boxes[0]} reads the benchmark's boxes: run it on a model that answers the "
                         "benchmark (the default one, or a directory saved with its tokenizer and processor)")
    if needs_boxes and not any(r.get("boxes") for r in records):
        raise ValueError(f"{needs_boxes[0]} reads the benchmark's boxes, and no question of the data has any: give "
                         "data whose records carry boxes (as vtoken.vqa.data.generate writes them), or leave "
                         f"{needs_boxes[0]} out")
    if records and recall and any(r.get("boxes") for r in records) and methods is None:
        names = [*names, "oracle"]
    if trained is None:  # the shipped weights, for the trained methods asked for (all by default)
        trained = [(m, w) for m, w in shipped_trained(model_path) if methods is None or m in methods]
    points = list(_points([n for n in names if not get_strategy(n).trained], budgets))
    # Trained weights and saved configs are wrapped once on this model before anything is measured: a
    # refusal (weights for another tower, a config for another family) is one line now, not the end
    # of a sweep that has run for an hour.
    for name, weights in trained:
        _check_wraps(model, f"--trained {name}={weights}", name, weights=weights)
    for label, path, config in loaded:
        _check_wraps(model, f"--configs {label}={path}", config=config)

    # families with processors size their tokens from the image (LLaVA-1.5's grid is fixed by its config)
    image_size = (vqa.grid[0],) * 2 if vqa is not None and getattr(vqa, "processor", None) is not None else None

    ticker = _Ticker(1 + len(points) + len(trained) + len(configs), progress, bar)
    rows: list[BenchRow] = []

    def timed(inputs, count: int) -> float:
        with _annotations(vqa, records[:count] if records else []):
            return _median_ms(model, inputs, repeats)

    def measure(name, text, site, schedule, option=None, label="") -> None:
        if option and "keep_tokens" in option:  # a count on this model is the same share of 576
            option = {"keep": option["keep_tokens"] / visual}
        own, kept, paper = _flops(model, schedule, None if name == "none" else name, option, image_size)
        row = BenchRow(name, text, site, kept, visual, timed(one, 1), timed(many, batch), batch, own, paper,
                       label=label, prunes_in_llm=any(s.startswith("llm") for s in site.split(",")))
        if records is not None:
            from vtoken.vqa.evaluate import evaluate

            result = evaluate(vqa, records)
            row.accuracy, row.families, row.recall = result.accuracy, result.family_accuracy(), result.recall
            row.samples = len(records)
            base = rows[0] if rows else None
            row.retained = row.accuracy / base.accuracy if base is not None and base.accuracy else None
        rows.append(row)
        ticker.done(f"{row.label} @ {text}: {row.prefill_ms:.1f} ms, {row.kept_tokens:.1f} tokens"
                    + (f", accuracy {100 * row.accuracy:.1f}%" if row.accuracy is not None else ""))
        if on_row is not None:
            on_row(rows)

    def measure_wrapped(name, text, option=None, label="", fraction_of_kept=False) -> None:
        """Measure the model as wrapped now (unwrapped afterwards, whatever happens)."""
        try:
            with _annotations(vqa, records[:1] if records else []), torch.no_grad():
                model(**one)
            selected = vtoken.selection(model)[0]
            site = ",".join(selected)
            if fraction_of_kept:  # a trained or tuned point: its budget is what it kept
                kept = len(list(selected.values())[-1])
                text, option = str(Fraction(kept, visual)), {"keep": kept / visual}
            schedule = vtoken.schedule_of(model, visual_tokens=visual, patchless_tokens=_patchless(model, image_size))
            measure(name, text, site, schedule, option, label)
        finally:
            vtoken.unwrap(model)

    try:
        measure("none", "1", "-", None)
        for name, text, option in points:
            try:
                vtoken.wrap(model, name, **option)
            except ValueError as error:  # a budget this method cannot meet on this model: say so, go on
                skipped.append(f"{name} @ {text}: skipped: {error}")
                ticker.done(skipped[-1])
                continue
            measure_wrapped(name, text, option)
        for name, weights in trained:
            vtoken.wrap(model, name, weights=weights)
            measure_wrapped(name, "", fraction_of_kept=True)
        for label, _, config in loaded:
            vtoken.wrap(model, config=config)
            if config.stages or (config.keep is None and config.keep_tokens is None):
                # its budget is in its stages, ToMe's r or the method's default: what it kept
                measure_wrapped(config.method, "", label=label, fraction_of_kept=True)
                continue
            text = str(Fraction(config.keep).limit_denominator(1000)) if config.keep else str(config.keep_tokens)
            measure_wrapped(config.method, text, {"keep": config.keep} if config.keep else
                            {"keep_tokens": config.keep_tokens}, label=label)
    finally:
        ticker.close()
    return rows


def _check_wraps(model, origin: str, method: str | None = None, **options) -> None:
    """``vtoken.wrap(model, method, **options)`` and unwrap; a refusal is a ValueError naming
    ``origin`` (the argument that asked for it)."""
    try:
        vtoken.wrap(model, method, **options)
    except ValueError as error:
        raise ValueError(f"{origin}: {error}") from None
    vtoken.unwrap(model)


class _Ticker:
    """Progress over the sweep: a tqdm bar on stderr (``bar=True``) whose lines go above it, or plain
    ``progress`` lines."""

    def __init__(self, total: int, progress: Callable[[str], None], bar: bool):
        self.progress, self.bar = progress, None
        if bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="point", desc="vtoken bench", dynamic_ncols=True)

    def done(self, line: str) -> None:
        if self.bar is None:
            self.progress(line)
        else:
            self.bar.write(line)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _annotations(vqa, records):
    """The oracle's annotations for ``records`` (none without a VQA model or records)."""
    if vqa is None or not records:
        return contextlib.nullcontext()
    from vtoken.vqa.evaluate import annotations_for

    return annotations_for(vqa, records)


def _vqa_model(model_path, dtype=None, attn=None):
    from vtoken.vqa.evaluate import VQAModel

    path = model_path or default_model_path()
    if path is None or not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        return None
    return VQAModel.load(path, **_load_options(dtype, attn))


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
