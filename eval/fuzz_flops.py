"""``vtoken.flops`` of a wrapped model against torch's ``FlopCounterMode`` on the wrapped forward, over
fresh random cases (``eval/random_models.py``: random families, widths, depths, GQA, LLM backbones,
AnyRes grids, Qwen windows and DeepStack layers; methods and options drawn as ``eval/wrap_checks.py``
draws them).

    OMP_NUM_THREADS=1 python eval/fuzz_flops.py --minutes 10 --first-seed 100000 --log /tmp/fuzz_flops.jsonl

Each case is one seed: the random model in eager attention (the matmuls FlopCounterMode counts are
the ones the count models), one sample of its batch that holds exactly one image (``--images 2``:
two), and a method with drawn options. ``vtoken.flops(model, text_tokens=..., image_size=...,
images=..., instruction_tokens=...)`` must equal the counter on that sample's forward
(``logits_to_keep=1``, after one warm-up call), FLOP for FLOP, and its first three decoding steps and
KV-cache bytes what ``generate`` does (a generate of four tokens less one of one; the cache the
prefill leaves), unless the report's ``notes`` say why it cannot (an AnyRes vision stage's upper bound,
Qwen2.5-VL's windows after a vision stage, an adaptive eviction, the text between two images that AIF
reruns): such a case is recorded with its gap, not failed. A case whose sample cannot be described
by one image size (a Qwen video, a grid the processor's resize would change, two images of different
sizes) is skipped, and so is a method the model refuses in one line. The random Qwen-VL models'
patches are a few pixels wide, so their images are counted under resize bounds of their own (no
minimum, as a processor configured for them would have), not the released processors' defaults.
Rerun one case with ``--first-seed S --cases 1``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import vtoken  # noqa: E402
from vtoken import compat, token_geometry  # noqa: E402
from vtoken.model_dims import model_dims  # noqa: E402
from campaign import add_campaign_arguments, campaign_seeds, quiet_one_thread  # noqa: E402
from random_models import ANYRES, QWEN, RandomCase  # noqa: E402
from wrap_checks import draw_options, methods_for  # noqa: E402


def counted(model, inputs: dict) -> int:
    """FLOPs of one forward (the last position's logits), after a call that builds what a wrap caches."""
    with torch.no_grad():
        model(**inputs, logits_to_keep=1)
        with FlopCounterMode(display=False) as counter:
            model(**inputs, logits_to_keep=1)
    return counter.get_total_flops()


#: Resize bounds of the random Qwen-VL models' images (their patches are a few pixels wide).
OWN_MAX_PIXELS = 10**9


@contextlib.contextmanager
def own_resize_bounds(factor: int):
    """``vtoken.flops``'s Qwen resize bounds (the released processors' defaults) set to a processor's
    for a model of ``factor``-pixel merge units: no minimum beyond one unit, no practical maximum."""
    names = ("QWEN_MIN_PIXELS", "QWEN_MAX_PIXELS", "QWEN3_MIN_PIXELS", "QWEN3_MAX_PIXELS")
    saved = {name: getattr(token_geometry, name) for name in names}
    for name in names:
        setattr(token_geometry, name, factor * factor if "MIN" in name else OWN_MAX_PIXELS)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(token_geometry, name, value)


def generated(model, inputs: dict, new_tokens: int, **kwargs):
    """Greedy ``generate`` of exactly ``new_tokens`` tokens (no early end at an EOS)."""
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)


#: Decoding steps checked: a generate of 1 + DECODE_STEPS tokens less one of 1 token.
DECODE_STEPS = 3


def decode_steps_and_cache(model, inputs: dict) -> tuple[int, int]:
    """What ``generate`` really costs after the prefill: the FLOPs of its first ``DECODE_STEPS``
    decoding steps (a generate of 1 + DECODE_STEPS tokens less one of one token, the same prefill in
    both) and the bytes of the KV cache the prefill leaves (every layer's keys and values)."""
    totals = []
    with torch.no_grad():
        for new_tokens in (1, 1 + DECODE_STEPS):
            with FlopCounterMode(display=False) as counter:
                generated(model, inputs, new_tokens)
            totals.append(counter.get_total_flops())
        out = generated(model, inputs, 1, return_dict_in_generate=True)
    cache = compat.output_cache(out)
    tensors = [t for i in range(compat.num_cache_layers(cache)) for t in compat.cache_layer_kv(cache, i)]
    return totals[1] - totals[0], sum(t.numel() * t.element_size() for t in tensors)


def after_prefill(model, inputs: dict, report) -> str | None:
    """None when ``report``'s decoding steps (``decode_tokens=DECODE_STEPS``) and KV-cache bytes equal
    what ``generate`` does, else what differs."""
    steps, cache_bytes = decode_steps_and_cache(model, inputs)
    wrong = []
    if round(report.decode_total) != steps:
        wrong.append(f"{DECODE_STEPS} decoding steps counted {report.decode_total:.0f}, FlopCounterMode {steps} "
                     f"({(report.decode_total - steps) / steps:+.4%})")
    if report.kv_cache_bytes != cache_bytes:
        wrong.append(f"KV cache counted {report.kv_cache_bytes} bytes, the cache holds {cache_bytes}")
    return "; ".join(wrong) or None


def sample_image_size(case: RandomCase, index: int, dims) -> tuple[int, int] | None | str:
    """The one image size ``vtoken.flops`` needs for every image of sample ``index`` (``dims``: the
    model's ``model_dims``), None where the family has one fixed size, or a reason to skip the case
    (images of different sizes: ``flops`` takes one size for a sample's images)."""
    sizes = [image_size_of(case, index, number, dims) for number in range(len(case.samples[index].images))]
    for size in sizes:
        if isinstance(size, str):
            return size
    # A OneVision sample of several images encodes each as its base view: the size does not matter.
    if len(set(sizes)) > 1 and not (case.family == "llava_onevision" and len(sizes) > 1):
        return "images of different sizes in one sample"
    return sizes[0]


def image_size_of(case: RandomCase, index: int, number: int, dims) -> tuple[int, int] | None | str:
    """The size ``vtoken.flops`` needs for image ``number`` of sample ``index``, None where the family
    has one fixed size, or a reason to skip the case."""
    image = case.samples[index].images[number]
    if case.family in ANYRES:
        return tuple(int(v) for v in image.size)
    if case.family not in QWEN:
        return None
    if image.video:
        return "a video"
    _, rows, cols = (int(v) for v in image.grid)
    size = (rows * dims.vision.patch, cols * dims.vision.patch)
    factor = dims.vision.patch * dims.vision.merge
    if compat.qwen2_vl_smart_resize(*size, factor=factor, min_pixels=factor * factor, max_pixels=OWN_MAX_PIXELS) != size:
        return f"a {rows}x{cols} grid a processor's resize would change"
    return size


def check_flops_seed(seed: int, images: int = 1) -> dict:
    """One case, of a sample holding ``images`` images: ``{"seed", "case", "method", "options",
    "outcome", ...}``; ``outcome`` is ``"exact"``,
    ``"noted"`` (the report's notes explain a gap: ``gap`` holds it), ``"skipped: ..."``,
    ``"refused: ..."``, ``"UNPRUNED: ..."`` (the count of the unwrapped model already differs: a
    finding about that model's count, not the method's) or ``"FAIL: ..."``."""
    case = RandomCase.draw(seed, attn="eager")
    # Mixture-of-experts LLMs run one F.linear per expert, the product the count models (transformers'
    # default grouped form is counted otherwise by the counter).
    case.model.config.text_config._experts_implementation = "eager"
    rng = random.Random(seed * 7 + 1)
    out = {"seed": seed, "case": case.describe()}
    holding = [i for i, s in enumerate(case.samples) if len(s.images) == images]
    if not holding:
        return dict(out, outcome=f"skipped: no sample with exactly {images} image{'s' * (images > 1)}")
    index = rng.choice(holding)
    model = case.model
    try:
        dims = model_dims(model.config)
    except (ValueError, NotImplementedError) as error:  # (an LLM the count refuses: state-space layers)
        return dict(out, outcome=f"refused: {str(error).splitlines()[0][:200]}")
    size = sample_image_size(case, index, dims)
    if isinstance(size, str):
        return dict(out, outcome=f"skipped: {size}")
    method = rng.choice(methods_for(case.family))
    options = draw_options(method, case, rng)
    out.update(method=method, options=options)
    x = case.inputs_of(index)
    ids = x["input_ids"][0]
    token = case.model.config.image_token_id
    visual = int((ids == token).sum())
    after = len(ids) - 1 - int((ids == token).nonzero()[-1])

    def bounds():  # (a fresh context each time: a generator's context runs once)
        return own_resize_bounds(dims.vision.patch * dims.vision.merge) if case.family in QWEN else contextlib.nullcontext()

    counts = dict(text_tokens=len(ids) - visual, image_size=size, images=images)
    # The unwrapped model first: a case whose plain forward the count misses is about the count of
    # that model, not of the method (its outcome says so apart).
    try:
        plain = counted(model, x)
    except Exception as error:  # noqa: BLE001
        return dict(out, outcome=f"skipped: the counter fails on the plain model ({type(error).__name__}: {error})"[:300])
    try:
        with bounds():
            unpruned = vtoken.flops(model.config, dtype=model.dtype, decode_tokens=DECODE_STEPS, **counts)
    except (ValueError, NotImplementedError) as error:
        return dict(out, outcome=f"refused: {str(error).splitlines()[0][:200]}")
    if unpruned.prefill != plain:
        return dict(out, outcome=f"UNPRUNED: counted {unpruned.prefill}, FlopCounterMode {plain} "
                                 f"({(unpruned.prefill - plain) / plain:+.4%})", gap=(unpruned.prefill - plain) / plain)
    try:
        plain_later = after_prefill(model, x, unpruned)
    except Exception as error:  # noqa: BLE001
        return dict(out, outcome=f"skipped: the plain model's generate fails ({type(error).__name__}: {error})"[:300])
    if plain_later is not None:
        return dict(out, outcome=f"UNPRUNED: after the prefill: {plain_later}")
    try:
        vtoken.wrap(model, method, **options)
    except (ValueError, TypeError, NotImplementedError) as error:
        return dict(out, outcome=f"refused: {str(error).splitlines()[0][:200]}")
    try:
        try:
            real = counted(model, x)
        except (ValueError, NotImplementedError) as error:  # a one-line refusal of this input
            return dict(out, outcome=f"refused: {str(error).splitlines()[0][:200]}")
        with bounds():
            report = vtoken.flops(model, instruction_tokens=after, dtype=model.dtype, decode_tokens=DECODE_STEPS,
                                  **counts)
        try:
            later = after_prefill(model, x, report)
        except (ValueError, NotImplementedError) as error:  # generate refused in one line (past a window)
            later = error
    except Exception as error:  # noqa: BLE001  (anything else is what the campaign looks for)
        return dict(out, outcome=f"FAIL: {type(error).__name__}: {error}")
    finally:
        vtoken.unwrap(model)
    gap = (report.prefill - real) / real
    if isinstance(later, Exception):
        if report.prefill != real and not report.notes:
            return dict(out, outcome=f"FAIL: counted {report.prefill}, FlopCounterMode {real} ({gap:+.4%})", gap=gap)
        return dict(out, outcome=f"refused: generate after the prefill: {str(later).splitlines()[0][:200]}")
    if report.notes and (report.prefill != real or later is not None):
        return dict(out, outcome="noted", gap=gap, notes=list(report.notes), after_prefill=later)
    if report.prefill != real:
        return dict(out, outcome=f"FAIL: counted {report.prefill}, FlopCounterMode {real} ({gap:+.4%})", gap=gap)
    if later is not None:
        return dict(out, outcome=f"FAIL: after the prefill: {later}")
    return dict(out, outcome="exact")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_campaign_arguments(parser, log="fuzz_flops.jsonl")
    parser.add_argument("--images", type=int, choices=(1, 2), default=1,
                        help="check a sample holding this many images (2: the count's images=2; seeds whose "
                             "batch has no such sample are skipped)")
    args = parser.parse_args(argv)
    quiet_one_thread()
    outcomes: collections.Counter = collections.Counter()
    seed = args.first_seed - 1  # (the last seed run)
    with args.log.open("a") as log:
        for seed in campaign_seeds(args):
            start = time.time()
            result = check_flops_seed(seed, args.images)
            result["seconds"] = round(time.time() - start, 2)
            log.write(json.dumps(result, default=str) + "\n")
            log.flush()
            kind = result["outcome"].split(":")[0]
            outcomes[kind] += 1
            if kind in ("FAIL", "UNPRUNED"):
                print(f"seed {seed}: {result.get('method')} {result.get('options')}: {result['outcome']}\n  {result['case']}",
                      flush=True)
    cases = seed + 1 - args.first_seed
    noted = [json.loads(line) for line in args.log.open() if '"noted"' in line]
    print(f"{cases} cases (seeds {args.first_seed}..{seed}); outcomes: {dict(outcomes)}; log: {args.log}")
    if noted:
        gaps = [case["gap"] for case in noted if args.first_seed <= case["seed"] <= seed]
        if gaps:
            print(f"noted gaps: {min(gaps):+.4%} to {max(gaps):+.4%}")
    return 1 if outcomes["FAIL"] or outcomes["UNPRUNED"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
